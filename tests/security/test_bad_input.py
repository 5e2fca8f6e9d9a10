"""Bad input gets a quick 4xx: nothing stored, nothing forwarded to ComfyUI, no 5xx.

JSON bombs (deep nesting, 100k nodes, a 5 MB string), wrong content types, bodies over the
limits, unicode and NUL in ids and file names, path traversal in `/view` and uploads.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

import httpx
import orjson
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.settings import Settings
from tests.fixtures.app import OPERATOR, AdminApi, AppFactory, Tenant, User, comfy_key
from tests.fixtures.comfy import FakeComfyUI, Received
from tests.fixtures.dump import dump_database
from tests.proxy.workflows import LOCAL_WORKFLOW
from tests.security.helpers import ACCEPTED_SOCKET, REFUSED_SOCKET, websocket_handshake

# seconds: a refusal must not cost more. Well under what a refusal stuck on a deadline
# would take (the 10 s header/body deadline, the tests' 10 s upstream timeouts), and over
# the stalls of a loaded CI machine (2 s was exceeded once by a refused websocket that
# runs in 0.07 s: the JSON bombs and this test flaked at 2 s, never near 5).
QUICK = 5.0
MB = 1024 * 1024
# Requests the broker makes for its own bookkeeping, not on the caller's behalf.
LOOKUPS = {("GET", "/ws"), ("GET", "/object_info"), ("GET", "/queue"), ("GET", "/prompt")}


@dataclass
class Scene:
    client: httpx.AsyncClient
    fake: FakeComfyUI
    db: async_sessionmaker[AsyncSession]
    acme: Tenant
    alice: User


@pytest.fixture
async def scene(
    admin_api: AdminApi, fake_comfy: FakeComfyUI, db: async_sessionmaker[AsyncSession]
) -> Scene:
    acme = await admin_api.tenant("acme")
    alice = await admin_api.user(acme, "alice", comfy_key())
    # Use alice's token once, so that its last_used_at does not move during the tests.
    assert (await admin_api.client.get("/prompt", headers=alice.auth)).status_code == 200
    return Scene(admin_api.client, fake_comfy, db, acme, alice)


@dataclass
class Outcome:
    response: httpx.Response
    seconds: float
    forwarded: list[Received]  # what reached ComfyUI on the caller's behalf
    stored: bool  # whether the database changed


async def attempt(scene: Scene, request: Awaitable[httpx.Response]) -> Outcome:
    before, upstream = await dump_database(scene.db), len(scene.fake.received)
    started = time.monotonic()
    response = await request
    seconds = time.monotonic() - started
    forwarded = [
        r
        for r in scene.fake.received[upstream:]
        if (r.method, r.path.removeprefix("/api")) not in LOOKUPS
        and not r.path.startswith(("/history", "/api/history"))
    ]
    return Outcome(response, seconds, forwarded, await dump_database(scene.db) != before)


def refusal_problem(outcome: Outcome, statuses: tuple[int, ...]) -> str | None:
    """Why `outcome` is not a quick 4xx among `statuses` with nothing stored or forwarded."""
    response, status = outcome.response, outcome.response.status_code
    if outcome.forwarded:
        return f"forwarded {[f'{r.method} {r.path}' for r in outcome.forwarded]} ({status})"
    if outcome.stored:
        return f"the database changed ({status})"
    if status not in statuses:
        return f"{status} instead of {statuses}: {response.text[:200]}"
    if outcome.seconds >= QUICK:
        return f"took {outcome.seconds:.2f} s"
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"not a JSON error body: {response.text[:200]}"
    return None if isinstance(error, dict) else f"not a JSON error body: {response.text[:200]}"


class Findings:
    """Problems of many cases of one test, all reported at once."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def refused(self, label: str, outcome: Outcome, *statuses: int) -> None:
        problem = refusal_problem(outcome, statuses)
        if problem is not None:
            self.problems.append(f"{label}: {problem}")

    def check(self, label: str, ok: bool, detail: str = "") -> None:
        if not ok:
            self.problems.append(f"{label}: {detail}")

    def assert_none(self) -> None:
        assert not self.problems, "\n".join(self.problems)


def assert_refused(outcome: Outcome, *statuses: int) -> None:
    problem = refusal_problem(outcome, statuses)
    assert problem is None, problem


def post_prompt(scene: Scene, body: bytes, **headers: str) -> Awaitable[httpx.Response]:
    return scene.client.post("/prompt", content=body, headers={**scene.alice.auth, **headers})


def nested(depth: int, leaf: bytes = b"1") -> bytes:
    return b'{"a":' * depth + leaf + b"}" * depth


# ------------------------------------------------------------------------- JSON bombs

FIVE_MB = "x" * (5 * MB)


async def test_deeply_nested_prompts_are_400(scene: Scene) -> None:
    findings = Findings()
    for label, graph in [
        ("arrays, depth 10000", b"[" * 10_000 + b"]" * 10_000),  # past any parser's limit
        ("objects, depth 10000", nested(10_000)),
        ("objects, depth 1000", nested(1_000)),  # parses, but no workflow is this deep
        (
            "inputs, depth 100",
            b'{"1": {"class_type": "SaveImage", "inputs": ' + nested(100) + b"}}",
        ),
    ]:
        outcome = await attempt(scene, post_prompt(scene, b'{"prompt": ' + graph + b"}"))
        findings.refused(label, outcome, 400)
    findings.assert_none()


async def test_a_prompt_of_100k_nodes_is_refused(scene: Scene) -> None:
    """Within the size limit (≈5 MB of 8 MiB), yet no workflow has 100k nodes: refuse it
    before it is recorded or forwarded."""
    # If it is forwarded anyway, the fake answers at once instead of validating 100k nodes.
    scene.fake.fail_next(500, "guard: the 100k-node prompt reached ComfyUI")
    graph = {str(i): {"class_type": "PreviewImage", "inputs": {}} for i in range(100_000)}
    body = orjson.dumps({"prompt": {**graph, **LOCAL_WORKFLOW}})
    assert 4 * MB < len(body) < Settings.model_fields["MAX_PROMPT_BYTES"].default
    assert_refused(await attempt(scene, post_prompt(scene, body)), 400, 413, 422)


async def test_a_5mb_string_in_a_checked_field_is_400(scene: Scene) -> None:
    findings = Findings()
    for field in ("client_id", "prompt_id"):
        body = orjson.dumps({"prompt": LOCAL_WORKFLOW, field: FIVE_MB})
        findings.refused(field, await attempt(scene, post_prompt(scene, body)), 400)
    body = orjson.dumps({"prompt": LOCAL_WORKFLOW})
    outcome = await attempt(scene, post_prompt(scene, body, **{"Idempotency-Key": FIVE_MB}))
    findings.refused("Idempotency-Key", outcome, 400)
    findings.assert_none()


async def test_a_5mb_string_in_free_form_data_is_forwarded_intact_and_quickly(
    scene: Scene,
) -> None:
    """ComfyUI's own UI sends the whole workflow in extra_data.extra_pnginfo: big strings
    within the size limit are legitimate and must pass, unchanged, without a slow path."""
    extra = {"extra_pnginfo": {"workflow": FIVE_MB}}
    body = orjson.dumps({"prompt": LOCAL_WORKFLOW, "extra_data": extra})
    outcome = await attempt(scene, post_prompt(scene, body))
    assert outcome.response.status_code == 200, outcome.response.text[:300]
    assert outcome.seconds < QUICK
    # The prompt (and a look for the caller's own upload of LoadImage's file: broker/files).
    [forwarded] = [r for r in outcome.forwarded if r.method == "POST"]
    assert forwarded.json["extra_data"]["extra_pnginfo"]["workflow"] == FIVE_MB
    await scene.fake.await_idle()


def admin_requests(scene: Scene) -> list[tuple[str, str]]:
    users = f"/admin/tenants/{scene.acme.id}/users"
    return [
        ("POST", "/admin/tenants"),
        ("POST", users),
        ("PUT", f"{users}/{scene.alice.id}/comfy-key"),
        ("POST", f"/admin/tenants/{scene.acme.id}/tokens"),
    ]


async def test_json_bombs_to_the_admin_api_are_refused(scene: Scene) -> None:
    findings = Findings()
    headers = {**OPERATOR, "Content-Type": "application/json"}
    for label, body, statuses in [
        ("arrays, depth 10000", b'{"name": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", (400,)),
        ("objects, depth 10000", b'{"name": ' + nested(10_000) + b"}", (400,)),
        ("objects, depth 1000", b'{"name": ' + nested(1_000) + b"}", (400, 422)),
        ("a 5 MB string", orjson.dumps({"name": FIVE_MB}), (413,)),
        ("a list of 100k", orjson.dumps({"name": list(range(100_000))}), (413,)),
    ]:
        for method, url in admin_requests(scene):
            request = scene.client.request(method, url, content=body, headers=headers)
            findings.refused(f"{label} to {method} {url}", await attempt(scene, request), *statuses)
    findings.assert_none()


# ------------------------------------------------------------------------- content types


async def test_prompt_reads_json_whatever_the_content_type(scene: Scene) -> None:
    """ComfyUI ignores Content-Type, and the Comfy docs' urllib client sends
    application/x-www-form-urlencoded: the body is JSON all the same."""
    body = orjson.dumps({"prompt": LOCAL_WORKFLOW})
    response = await post_prompt(
        scene, body, **{"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 200, response.text
    await scene.fake.await_idle()


FORM_PART = b'--b\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n--b--\r\n'
MULTIPART = "multipart/form-data; boundary=b"


async def test_bodies_of_the_wrong_type_are_refused(scene: Scene) -> None:
    findings = Findings()
    for content_type, body in [
        ("application/x-www-form-urlencoded", b"prompt=%7B%7D&client_id=x"),
        (MULTIPART, FORM_PART % (b"prompt", b"{}")),
        ("text/plain", b"prompt: {}"),
        ("application/json", b"\xff\xfe{\x00}\x00"),  # UTF-16 with a BOM
        ("application/json", b""),
    ]:
        outcome = await attempt(scene, post_prompt(scene, body, **{"Content-Type": content_type}))
        findings.refused(f"/prompt, {content_type} {body[:20]!r}", outcome, 400)
    for content_type, body in [
        ("text/plain", b'{"name": "plain"}'),
        ("application/x-www-form-urlencoded", b"name=form"),
        (MULTIPART, FORM_PART % (b"name", b"x")),
        ("application/json", b'{"name": '),
    ]:
        headers = {**OPERATOR, "Content-Type": content_type}
        for method, url in admin_requests(scene):
            request = scene.client.request(method, url, content=body, headers=headers)
            label = f"{method} {url}, {content_type} {body[:20]!r}"
            findings.refused(label, await attempt(scene, request), 400, 415, 422)
    for content_type, body in [
        ("application/json", b'{"image": "x.png"}'),
        (MULTIPART, b"not multipart at all"),
        ("multipart/form-data", b"--b\r\n\r\n--b--\r\n"),  # no boundary
        ("image/png", b"\x89PNG\r\n\x1a\n"),
    ]:
        headers = {**scene.alice.auth, "Content-Type": content_type}
        request = scene.client.post("/upload/image", content=body, headers=headers)
        label = f"/upload/image, {content_type} {body[:20]!r}"
        findings.refused(label, await attempt(scene, request), 400, 415, 422)
    findings.assert_none()


async def test_a_bad_body_without_a_token_is_401(scene: Scene) -> None:
    """Authentication comes first: an anonymous client learns nothing about how bodies are
    read, and the broker parses nothing for it."""
    findings = Findings()
    for path, content_type, body in [
        ("/admin/tenants", "application/json", b'{"name": '),
        ("/admin/tenants", "application/json", b"[" * 5_000),
        (f"/admin/tenants/{scene.acme.id}/users", "application/json", b"\xff\xfe"),
        ("/upload/image", MULTIPART, b"not multipart at all"),
        ("/prompt", "application/json", b'{"prompt": '),
    ]:
        request = scene.client.post(path, content=body, headers={"Content-Type": content_type})
        findings.refused(f"{path}, {body[:20]!r}", await attempt(scene, request), 401)
    findings.assert_none()


# ------------------------------------------------------------------------- size limits


@pytest.fixture
async def small_limits(
    app_factory: AppFactory, settings: Settings
) -> AsyncIterator[httpx.AsyncClient]:
    """A second broker on the same database, with small body limits."""
    limits = {"MAX_PROMPT_BYTES": 64 * 1024, "MAX_UPLOAD_BYTES": 16 * 1024}
    app = await app_factory(settings.model_copy(update=limits))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://broker.test") as client:
        yield client


async def chunked(body: bytes, size: int = 8192) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):  # no Content-Length: sent chunked
        yield body[start : start + size]


async def test_bodies_over_the_limits_are_413(
    scene: Scene, small_limits: httpx.AsyncClient
) -> None:
    findings = Findings()
    auth = scene.alice.auth
    body = orjson.dumps({"prompt": LOCAL_WORKFLOW, "extra_data": {"pad": "x" * 70_000}})
    for path in ("/prompt", "/api/prompt"):
        outcome = await attempt(scene, small_limits.post(path, content=body, headers=auth))
        findings.refused(f"{path} with Content-Length", outcome, 413)
        kind = outcome.response.json().get("error", {}).get("type")
        findings.check(f"{path} error type", kind == "payload_too_large", str(kind))
        streamed = small_limits.post(path, content=chunked(body), headers=auth)
        findings.refused(f"{path} chunked", await attempt(scene, streamed), 413)
    files = {"image": ("big.png", b"\x89PNG" + os.urandom(20_000), "image/png")}
    upload = small_limits.post("/upload/image", files=files, headers=auth)
    findings.refused("/upload/image", await attempt(scene, upload), 413)
    findings.assert_none()
    # Just under the limit is fine: the limit is the one configured.
    fits = orjson.dumps({"prompt": LOCAL_WORKFLOW, "extra_data": {"pad": "x" * 60_000}})
    response = await small_limits.post("/prompt", content=fits, headers=auth)
    assert response.status_code == 200, response.text[:300]
    await scene.fake.await_idle()


# ------------------------------------------------------------------------- unicode and NUL

CONTROL_CHARACTERS = ["nul\x00inside", "\x00", "line\nbreak", "tab\there", "del\x7f", "esc\x1b[31m"]


async def test_control_characters_in_ids_and_names_are_refused(scene: Scene) -> None:
    findings = Findings()
    users = f"/admin/tenants/{scene.acme.id}/users"
    for value in CONTROL_CHARACTERS:
        for url, body in [
            (users, {"external_id": value}),
            (users, {"external_id": "ok", "name": value}),
            ("/admin/tenants", {"name": value}),
        ]:
            request = scene.client.post(url, json=body, headers=OPERATOR)
            findings.refused(f"POST {url} {body!r}", await attempt(scene, request), 422)
    for path in [
        "/admin/tenants/%00",
        "/admin/tenants/%E2%80%AE",
        "/admin/tenants/%F0%9F%A6%8A/users",
    ]:
        outcome = await attempt(scene, scene.client.get(path, headers=OPERATOR))
        findings.refused(f"GET {path}", outcome, 404, 422)
    for prompt_id in ["%00", "x%00y", "%F0%9F%A6%8A", "..%2F..%2Fqueue"]:
        request = scene.client.get(f"/history/{prompt_id}", headers=scene.alice.auth)
        outcome = await attempt(scene, request)  # ComfyUI's answer for an unknown id: {}
        answer = (outcome.response.status_code, outcome.response.json())
        ok = answer == (200, {}) or answer[0] == 404  # a '/' in it: no such route
        findings.check(f"GET /history/{prompt_id}", ok and not outcome.forwarded)
    for client_id in ["nul\x00inside", "line\nbreak", "x" * 201, "", 42, ["tab-1"]]:
        prompt = orjson.dumps({"prompt": LOCAL_WORKFLOW, "client_id": client_id})
        outcome = await attempt(scene, post_prompt(scene, prompt))
        findings.refused(f"client_id {client_id!r:.30}", outcome, 400)
    for name in [
        "nul\x00inside.png",
        "line\nbreak.png",
        "back\\slash.png",
        "colon:name.png",
        "x" * 256,
    ]:
        # Raw multipart: httpx would percent-escape the name before the broker saw it.
        multipart = (
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="'
            + name.encode()
            + b'"\r\nContent-Type: image/png\r\n\r\n\x89PNG\r\n--b--\r\n'
        )
        headers = {**scene.alice.auth, "Content-Type": MULTIPART}
        request = scene.client.post("/upload/image", content=multipart, headers=headers)
        findings.refused(f"upload named {name!r:.30}", await attempt(scene, request), 400)
    for filename in ["nul\x00inside.png", "line\nbreak.png", "🦊.png", "\u202egnp.exe"]:
        request = scene.client.get("/view", params={"filename": filename}, headers=scene.alice.auth)
        findings.refused(f"/view of {filename!r}", await attempt(scene, request), 404)
    findings.assert_none()


async def test_unicode_ids_and_names_round_trip(scene: Scene, app: FastAPI) -> None:
    users = f"/admin/tenants/{scene.acme.id}/users"
    external_id = "Zoë 🦊 東京 \u202ertl"
    created = await scene.client.post(users, json={"external_id": external_id}, headers=OPERATOR)
    assert created.status_code == 201, created.text
    assert created.json()["external_id"] == external_id
    listed = (await scene.client.get(users, headers=OPERATOR)).json()["items"]
    assert external_id in [user["external_id"] for user in listed]
    again = await scene.client.post(users, json={"external_id": external_id}, headers=OPERATOR)
    assert again.status_code == 409

    body = orjson.dumps({"prompt": LOCAL_WORKFLOW, "client_id": "onglet-🦊-東京"})
    assert (await post_prompt(scene, body)).status_code == 200
    await scene.fake.await_idle()
    socket = await websocket_handshake(app, "/ws", scene.alice.auth, {"clientId": "onglet-🦊"})
    assert socket == ACCEPTED_SOCKET

    files = {"image": ("résumé 🦊 東京.png", b"\x89PNG unicode", "image/png")}
    uploaded = await scene.client.post("/upload/image", files=files, headers=scene.alice.auth)
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["name"] == "résumé 🦊 東京.png"
    # The fake can only put latin-1 in its Content-Disposition (real ComfyUI sends UTF-8).
    files = {"image": ("résumé.png", b"\x89PNG latin", "image/png")}
    answer = (
        await scene.client.post("/upload/image", files=files, headers=scene.alice.auth)
    ).json()
    params = {"filename": "résumé.png", "subfolder": answer["subfolder"], "type": "input"}
    viewed = await scene.client.get("/view", params=params, headers=scene.alice.auth)
    assert (viewed.status_code, viewed.content) == (200, b"\x89PNG latin")


async def test_websocket_client_ids_follow_the_prompt_rules(scene: Scene, app: FastAPI) -> None:
    """A clientId that POST /prompt refuses could never receive an event: refuse the
    socket too, before it is accepted."""
    findings = Findings()
    for client_id in ["nul\x00inside", "line\nbreak", "x" * 201]:
        started = time.monotonic()
        status = await websocket_handshake(app, "/ws", scene.alice.auth, {"clientId": client_id})
        findings.check(f"clientId {client_id!r:.30}", status == REFUSED_SOCKET, f"got {status}")
        findings.check(f"clientId {client_id!r:.30} time", time.monotonic() - started < QUICK)
    findings.assert_none()


# ------------------------------------------------------------------------- path traversal

VIEW_TRAVERSALS: list[dict[str, str]] = [
    {"filename": "../../../etc/passwd"},
    {"filename": "..%2F..%2Fetc%2Fpasswd"},
    {"filename": "..\\..\\windows\\win.ini"},
    {"filename": "/etc/passwd"},
    {"filename": "passwd", "subfolder": "../../../etc"},
    {"filename": "passwd", "subfolder": "/etc"},
    {"filename": "passwd", "subfolder": "a/../../../etc"},
    {"filename": "passwd", "subfolder": "OWN/../../../etc", "type": "input"},
    {"filename": "example.png", "subfolder": "OWN/..", "type": "input"},
    {"filename": "x.png", "subfolder": "OWN", "type": "../input"},
    {"filename": "x.png [temp]", "subfolder": "OWN", "type": "input"},
    {"filename": "x.png", "subfolder": "OWN/\x00", "type": "input"},
    {"filename": ".", "subfolder": "OWN", "type": "input"},
    {"filename": "..", "subfolder": "OWN", "type": "input"},
]


def own_folder(scene: Scene) -> str:
    return f"cbk-{scene.alice.id}"


async def test_path_traversal_in_view_is_a_quick_404(scene: Scene) -> None:
    findings = Findings()
    for params in VIEW_TRAVERSALS:
        query = {key: value.replace("OWN", own_folder(scene)) for key, value in params.items()}
        request = scene.client.get("/view", params=query, headers=scene.alice.auth)
        findings.refused(json.dumps(params), await attempt(scene, request), 404)
    findings.assert_none()


UPLOAD_TRAVERSALS: list[tuple[str, dict[str, str]]] = [
    ("../escape.png", {}),
    ("../../escape.png", {}),
    ("..", {}),
    (".", {}),
    ("/abs.png", {}),
    ("sub/dir.png", {}),
    ("..\\escape.png", {}),
    ("x.png [output]", {}),
    ("ok.png", {"subfolder": "../other"}),
    ("ok.png", {"subfolder": "/abs"}),
    ("ok.png", {"subfolder": "a/../../b"}),
    ("ok.png", {"subfolder": "a//b"}),
    ("ok.png", {"subfolder": "./a"}),
    ("ok.png", {"subfolder": "a\\..\\..\\b"}),
    ("ok.png", {"type": "output"}),
    ("ok.png", {"type": "../input"}),
]


async def test_path_traversal_in_uploads_is_a_quick_400(scene: Scene) -> None:
    findings = Findings()
    input_before = sorted(os.walk(scene.fake.dir("input")))
    for filename, fields in UPLOAD_TRAVERSALS:
        files = {"image": (filename, b"\x89PNG escape", "image/png")}
        request = scene.client.post(
            "/upload/image", data=fields, files=files, headers=scene.alice.auth
        )
        findings.refused(f"{filename!r} {fields}", await attempt(scene, request), 400)
    findings.check("input folder", sorted(os.walk(scene.fake.dir("input"))) == input_before)
    for reference in [
        {"filename": "../../etc/passwd", "subfolder": "", "type": "input"},
        {"filename": "example.png", "subfolder": "..", "type": "input"},
        {"filename": "x.png", "subfolder": "OWN/../cbk-someone-else", "type": "input"},
        {"filename": "x.png", "subfolder": "OWN", "type": "../input"},
    ]:
        ref = {key: value.replace("OWN", own_folder(scene)) for key, value in reference.items()}
        files = {"image": ("mask.png", b"\x89PNG mask", "image/png")}
        data = {"original_ref": json.dumps(ref)}
        request = scene.client.post(
            "/upload/mask", data=data, files=files, headers=scene.alice.auth
        )
        findings.refused(f"mask for {reference}", await attempt(scene, request), 404)
    findings.assert_none()
