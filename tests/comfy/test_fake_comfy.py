"""Self-test of the fake ComfyUI (tests/fixtures/comfy.py): its protocol must be right, since
the broker's tests trust it."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests.fixtures.comfy import PAYMENT_REQUIRED, FakeComfyUI, text_frame

KEY = "comfyui-0123456789abcdef"


def flux_graph(seed: int = 1, prefix: str = "ComfyUI") -> dict[str, Any]:
    return {
        "1": {
            "class_type": "FluxProUltraImageNode",
            "inputs": {
                "prompt": "a cat",
                "prompt_upsampling": False,
                "seed": seed,
                "aspect_ratio": "16:9",
                "raw": False,
            },
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def submit(fake: FakeComfyUI, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{fake.url}/prompt", json=body, **kwargs)


def run(fake: FakeComfyUI, graph: dict[str, Any], key: str | None = KEY) -> dict[str, Any]:
    """Submit, wait, and return the prompt's /history entry."""
    extra = {"api_key_comfy_org": key} if key else {}
    prompt_id = submit(fake, {"prompt": graph, "extra_data": extra}).json()["prompt_id"]
    fake.wait_idle()
    entry: dict[str, Any] = httpx.get(f"{fake.url}/history/{prompt_id}").json()[prompt_id]
    return entry


async def receive_until_done(ws: ClientConnection) -> tuple[list[dict[str, Any]], list[bytes]]:
    """JSON messages and binary frames until `executing` with node null."""
    messages: list[dict[str, Any]] = []
    frames: list[bytes] = []
    while True:
        raw = await asyncio.wait_for(ws.recv(), 5)
        if isinstance(raw, bytes):
            frames.append(raw)
            continue
        messages.append(json.loads(raw))
        if messages[-1]["type"] == "executing" and messages[-1]["data"]["node"] is None:
            return messages, frames


async def drain(ws: ClientConnection, wait: float = 0.2) -> list[str | bytes]:
    out: list[str | bytes] = []
    while True:
        try:
            out.append(await asyncio.wait_for(ws.recv(), wait))
        except TimeoutError:
            return out


def test_prompt_accepted_like_comfyui(fake_comfy: FakeComfyUI) -> None:
    fake_comfy.auto_execute = False
    prompt_id = str(uuid.uuid4())
    body = {"prompt": flux_graph(), "client_id": "c1", "prompt_id": prompt_id}
    response = submit(fake_comfy, body)
    assert response.status_code == 200
    assert response.json() == {"prompt_id": prompt_id, "number": 0, "node_errors": {}}
    minted = httpx.post(f"{fake_comfy.url}/api/prompt", json={"prompt": flux_graph()}).json()
    assert uuid.UUID(minted["prompt_id"]).version == 4
    assert minted["number"] == 1
    assert httpx.get(f"{fake_comfy.url}/prompt").json() == {"exec_info": {"queue_remaining": 2}}
    pending = httpx.get(f"{fake_comfy.url}/queue").json()["queue_pending"]
    number, pid, graph, extra_data, outputs = pending[0]
    assert (number, pid, graph, outputs) == (0, prompt_id, flux_graph(), ["2"])
    assert extra_data["client_id"] == "c1"
    assert fake_comfy.prompts_received() == [body, {"prompt": flux_graph()}]
    assert fake_comfy.received[0].headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("body", "error_type"),
    [
        ({"client_id": "x"}, "no_prompt"),
        ({"prompt": flux_graph(), "prompt_id": "my-id"}, "invalid_prompt_id"),
        ({"prompt": flux_graph(), "prompt_id": str(uuid.uuid4()).upper()}, "invalid_prompt_id"),
        ({"prompt": {"1": {"class_type": "Nope", "inputs": {}}}}, "invalid_prompt"),
        ({"prompt": {"1": {"inputs": {}}}}, "invalid_prompt"),
        ({"prompt": {"1": flux_graph()["1"]}}, "prompt_no_outputs"),
    ],
)
def test_prompt_rejections(fake_comfy: FakeComfyUI, body: dict[str, Any], error_type: str) -> None:
    response = submit(fake_comfy, body)
    assert response.status_code == 400
    payload = response.json()
    assert set(payload) == {"error", "node_errors"}
    assert set(payload["error"]) == {"type", "message", "details", "extra_info"}
    assert payload["error"]["type"] == error_type
    assert payload["node_errors"] == {}
    assert httpx.get(f"{fake_comfy.url}/queue").json()["queue_pending"] == []


def test_unknown_node_messages(fake_comfy: FakeComfyUI) -> None:
    body = {"prompt": {"7": {"class_type": "Nope", "inputs": {}}}}
    error = submit(fake_comfy, body).json()["error"]
    assert error["message"] == "Cannot execute because node Nope does not exist."
    assert error["details"] == "Node ID '#7'"
    fake_comfy.missing_node_error = "missing_node_type"
    error = submit(fake_comfy, body).json()["error"]
    assert error["type"] == "missing_node_type"
    assert error["extra_info"] == {"node_id": "7", "class_type": "Nope", "node_title": "Nope"}


def test_outputs_failed_validation(fake_comfy: FakeComfyUI) -> None:
    graph: dict[str, Any] = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "missing.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}},
        "3": {"class_type": "PreviewImage", "inputs": {}},
    }
    payload = submit(fake_comfy, {"prompt": graph}).json()
    assert payload["error"]["type"] == "prompt_outputs_failed_validation"
    errors = payload["node_errors"]
    assert errors["1"]["class_type"] == "LoadImage"
    assert errors["1"]["errors"][0]["type"] == "custom_validation_failed"  # VALIDATE_INPUTS
    assert errors["1"]["dependent_outputs"] == ["2", "3"]  # real quirk: every failed output
    assert errors["2"]["errors"][0]["type"] == "required_input_missing"  # filename_prefix
    assert errors["3"]["errors"][0]["extra_info"] == {"input_name": "images"}
    graph["1"]["inputs"]["image"] = "example.png"
    graph["2"]["inputs"]["filename_prefix"] = "x"
    partial = submit(fake_comfy, {"prompt": graph}).json()  # one good output: accepted
    assert partial["node_errors"]["3"]["dependent_outputs"] == ["3"]
    assert "prompt_id" in partial


def test_origin_check(fake_comfy: FakeComfyUI) -> None:
    host = f"127.0.0.1:{fake_comfy.port}"
    body = {"prompt": flux_graph()}
    assert submit(fake_comfy, body, headers={"Origin": "https://evil.example"}).status_code == 403
    wrong_name = {"Origin": f"http://localhost:{fake_comfy.port}"}
    assert submit(fake_comfy, body, headers=wrong_name).status_code == 403
    assert httpx.get(f"{fake_comfy.url}/queue", headers={"Origin": "http://x"}).status_code == 403
    assert submit(fake_comfy, body, headers={"Origin": f"http://{host}"}).status_code == 200
    assert submit(fake_comfy, body).status_code == 200
    assert len(fake_comfy.prompts_received()) == 4  # refused requests are recorded too


async def test_websocket_origin_refused(fake_comfy: FakeComfyUI) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(fake_comfy.ws_url, origin="https://evil.example")  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403


async def test_events_of_a_prompt(fake_comfy: FakeComfyUI) -> None:
    async with (
        connect(f"{fake_comfy.ws_url}?clientId=me") as mine,
        connect(fake_comfy.ws_url) as other,
        httpx.AsyncClient(base_url=fake_comfy.url) as client,
    ):
        hello = json.loads(await other.recv())
        assert hello["type"] == "status"
        assert len(hello["data"]["sid"]) == 32  # minted by the server
        first = json.loads(await mine.recv())
        assert first["data"] == {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "me"}
        extra_data = {"api_key_comfy_org": KEY}
        body = {"prompt": flux_graph(), "client_id": "me", "extra_data": extra_data}
        prompt_id = (await client.post("/prompt", json=body)).json()["prompt_id"]
        messages, frames = await receive_until_done(mine)
        types = [m["type"] for m in messages if m["type"] != "status"]
        assert types == [
            "execution_start",
            "execution_cached",
            "executing",
            "progress",
            "progress",
            "progress_state",
            "executing",
            "executed",
            "execution_success",
            "executing",
        ]
        assert all(
            m["data"]["prompt_id"] == prompt_id for m in messages if "prompt_id" in m["data"]
        )
        executed = next(m["data"] for m in messages if m["type"] == "executed")
        image = {"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}
        assert executed == {
            "node": "2",
            "display_node": "2",
            "output": {"images": [image]},
            "prompt_id": prompt_id,
        }
        assert [text_frame(f) for f in frames] == [("1", "Price: 12.66 credits")]
        # Other sockets see the price frame (broadcast) and status, never the prompt's events.
        seen = await drain(other)
        assert [text_frame(f) for f in seen if isinstance(f, bytes)] == [
            ("1", "Price: 12.66 credits")
        ]
        assert {json.loads(m)["type"] for m in seen if isinstance(m, str)} == {"status"}

        entry = (await client.get(f"/api/history/{prompt_id}")).json()[prompt_id]
        assert entry["outputs"] == {"2": {"images": [image]}}
        assert entry["prompt"][:3] == [0, prompt_id, flux_graph()]
        assert entry["status"]["status_str"] == "success"
        assert entry["status"]["completed"] is True
        assert [m[0] for m in entry["status"]["messages"]] == [
            "execution_start",
            "execution_cached",
            "execution_success",
        ]
        assert entry["meta"]["2"]["node_id"] == "2"
        view = await client.get("/view", params=image)
        assert view.status_code == 200
        assert view.headers["content-type"] == "image/png"
        assert view.content.startswith(b"\x89PNG\r\n\x1a\n")
        assert (await client.get("/history/unknown")).json() == {}
    assert fake_comfy.api_calls[0].api_key == KEY


async def test_prompt_without_client_id_sends_only_broadcasts(fake_comfy: FakeComfyUI) -> None:
    async with connect(fake_comfy.ws_url) as ws:
        await ws.recv()
        run_in_thread = asyncio.to_thread(run, fake_comfy, flux_graph())
        entry = await run_in_thread
        seen = await drain(ws)
    kinds = {json.loads(m)["type"] if isinstance(m, str) else "binary" for m in seen}
    assert kinds == {"status", "progress", "binary"}  # progress leaks prompt ids to everyone
    assert entry["status"]["status_str"] == "success"


async def test_client_id_takeover(fake_comfy: FakeComfyUI) -> None:
    async with connect(f"{fake_comfy.ws_url}?clientId=same") as old:
        await old.recv()
        async with connect(f"{fake_comfy.ws_url}?clientId=same") as new:
            await new.recv()
            body = {
                "prompt": flux_graph(),
                "client_id": "same",
                "extra_data": {"api_key_comfy_org": KEY},
            }
            async with httpx.AsyncClient() as client:
                await client.post(f"{fake_comfy.url}/prompt", json=body)
            messages, _ = await receive_until_done(new)
            assert messages[-1]["data"]["node"] is None
            old_seen = [json.loads(m) for m in await drain(old) if isinstance(m, str)]
            assert {m["type"] for m in old_seen} <= {"status"}


def test_queue_and_history_leak_keys(fake_comfy: FakeComfyUI) -> None:
    fake_comfy.auto_execute = False
    submit(fake_comfy, {"prompt": flux_graph(), "extra_data": {"api_key_comfy_org": KEY}})
    pending = httpx.get(f"{fake_comfy.url}/queue").json()["queue_pending"]
    assert pending[0][3]["api_key_comfy_org"] == KEY
    fake_comfy.leak_keys = False
    pending = httpx.get(f"{fake_comfy.url}/queue").json()["queue_pending"]
    assert "api_key_comfy_org" not in pending[0][3]
    fake_comfy.auto_execute = True
    fake_comfy.wait_idle()
    history = httpx.get(f"{fake_comfy.url}/history").json()
    assert next(iter(history.values()))["prompt"][3]["api_key_comfy_org"] == KEY
    fake_comfy.history_leaks_keys = False
    history = httpx.get(f"{fake_comfy.url}/history", params={"max_items": 1}).json()
    assert "api_key_comfy_org" not in next(iter(history.values()))["prompt"][3]
    assert fake_comfy.api_calls[0].api_key == KEY


def test_queue_and_history_admin(fake_comfy: FakeComfyUI) -> None:
    fake_comfy.auto_execute = False
    ids = [submit(fake_comfy, {"prompt": flux_graph(seed=i)}).json()["prompt_id"] for i in range(3)]
    assert httpx.post(f"{fake_comfy.url}/queue", json={"delete": [ids[0]]}).status_code == 200
    pending = httpx.get(f"{fake_comfy.url}/queue").json()["queue_pending"]
    assert [p[1] for p in pending] == ids[1:]
    httpx.post(f"{fake_comfy.url}/queue", json={"clear": True})
    assert httpx.get(f"{fake_comfy.url}/queue").json() == {"queue_running": [], "queue_pending": []}
    fake_comfy.auto_execute = True
    for seed in range(3):
        run(fake_comfy, flux_graph(seed=seed))
    history = httpx.get(f"{fake_comfy.url}/history", params={"max_items": 2}).json()
    assert len(history) == 2
    first = next(iter(httpx.get(f"{fake_comfy.url}/history").json()))
    httpx.post(f"{fake_comfy.url}/history", json={"delete": [first]})
    assert len(httpx.get(f"{fake_comfy.url}/history").json()) == 2
    httpx.post(f"{fake_comfy.url}/history", json={"clear": True})
    assert httpx.get(f"{fake_comfy.url}/history").json() == {}


def test_fail_next_and_prompt_delay(fake_comfy: FakeComfyUI) -> None:
    fake_comfy.fail_next(500, '{"prompt_id": "trunc')
    response = submit(fake_comfy, {"prompt": flux_graph()})
    assert (response.status_code, response.content) == (500, b'{"prompt_id": "trunc')
    assert submit(fake_comfy, {"prompt": flux_graph()}).status_code == 200
    fake_comfy.prompt_delay = 30
    with pytest.raises(httpx.ReadTimeout):
        submit(fake_comfy, {"prompt": flux_graph()}, timeout=0.2)
    assert len(fake_comfy.prompts_received()) == 3


def test_execution_errors(fake_comfy: FakeComfyUI) -> None:
    def error_of(entry: dict[str, Any]) -> dict[str, Any]:
        assert entry["status"]["status_str"] == "error"
        assert entry["status"]["completed"] is False
        assert entry["outputs"] == {}
        data: dict[str, Any] = entry["status"]["messages"][-1][1]
        assert entry["status"]["messages"][-1][0] == "execution_error"
        return data

    no_key = error_of(run(fake_comfy, flux_graph(seed=1), key=None))
    assert no_key["exception_message"].startswith("Unauthorized: Please login first")
    assert (no_key["node_id"], no_key["node_type"]) == ("1", "FluxProUltraImageNode")
    fake_comfy.fail_execution_with = PAYMENT_REQUIRED
    assert error_of(run(fake_comfy, flux_graph(seed=2)))["exception_message"].startswith(
        "Payment Required:"
    )
    fake_comfy.fail_execution_with = None
    fake_comfy.failing_keys["broke"] = "Rate Limit Exceeded: try later"
    limited = error_of(run(fake_comfy, flux_graph(seed=3), key="broke"))
    assert limited["exception_message"].startswith("Rate Limit Exceeded")
    assert "broke" not in json.dumps(limited)


def test_api_logs_leak_the_key_through_view(fake_comfy: FakeComfyUI) -> None:
    run(fake_comfy, flux_graph())
    names = sorted(os.listdir(os.path.join(fake_comfy.dir("temp"), "api_logs")))
    assert len(names) == 1
    params = {"filename": names[0], "subfolder": "api_logs", "type": "temp"}
    log = httpx.get(f"{fake_comfy.url}/view", params=params)
    assert log.status_code == 200
    assert f"X-API-KEY: {KEY}" in log.text


def test_cache_ignores_the_key(fake_comfy: FakeComfyUI) -> None:
    first = run(fake_comfy, flux_graph(), key="key-a")
    second = run(fake_comfy, flux_graph(), key="key-b")
    cached = second["status"]["messages"][1]
    assert cached[0] == "execution_cached"
    assert sorted(cached[1]["nodes"]) == ["1", "2"]
    assert second["outputs"] == first["outputs"]
    assert [c.api_key for c in fake_comfy.api_calls] == ["key-a"]
    fake_comfy.cache_outputs = False
    run(fake_comfy, flux_graph(), key="key-b")
    assert [c.api_key for c in fake_comfy.api_calls] == ["key-a", "key-b"]


def test_interrupt(fake_comfy: FakeComfyUI) -> None:
    fake_comfy.execution_time = 10
    prompt_id = submit(fake_comfy, {"prompt": flux_graph()}).json()["prompt_id"]
    assert httpx.post(f"{fake_comfy.url}/interrupt", json={"prompt_id": "other"}).status_code == 200
    for _ in range(200):
        if httpx.get(f"{fake_comfy.url}/queue").json()["queue_running"]:
            break
        time.sleep(0.005)
    httpx.post(f"{fake_comfy.url}/interrupt", json={"prompt_id": prompt_id})
    fake_comfy.wait_idle(within=3)
    entry = fake_comfy.history()[prompt_id]
    assert entry["status"]["status_str"] == "error"
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"


def test_view_and_upload(fake_comfy: FakeComfyUI) -> None:
    url = fake_comfy.url
    png = b"\x89PNG\r\n\x1a\nnot really"
    files = {"image": ("cat.png", png, "image/png")}
    uploaded = httpx.post(f"{url}/upload/image", files=files, data={"subfolder": "u"}).json()
    assert uploaded == {"name": "cat.png", "subfolder": "u", "type": "input"}
    same = httpx.post(f"{url}/upload/image", files=files, data={"subfolder": "u"}).json()
    assert same["name"] == "cat.png"  # identical bytes: kept
    files = {"image": ("cat.png", png + b"!", "image/png")}
    assert httpx.post(f"{url}/upload/image", files=files, data={"subfolder": "u"}).json()[
        "name"
    ] == ("cat (1).png")
    escape = httpx.post(f"{url}/upload/image", files=files, data={"subfolder": "../.."})
    assert escape.status_code == 400
    view = httpx.get(
        f"{url}/view", params={"filename": "cat.png", "subfolder": "u", "type": "input"}
    )
    assert view.content == png
    assert (
        httpx.get(f"{url}/view", params={"filename": "cat.png [input]", "subfolder": "u"}).content
        == png
    )
    assert httpx.get(f"{url}/view", params={"filename": "../x.png"}).status_code == 400
    assert httpx.get(f"{url}/view", params={"filename": "/etc/passwd"}).status_code == 400
    assert httpx.get(f"{url}/view", params={"filename": "x", "type": "models"}).status_code == 400
    up = {"filename": "passwd", "subfolder": "../../../../etc"}
    assert httpx.get(f"{url}/view", params=up).status_code == 403
    assert httpx.get(f"{url}/view", params={"filename": "nope.png"}).status_code == 404
    loader = fake_comfy.object_info["LoadImage"]["input"]["required"]["image"]
    assert loader[0] == ["example.png"]  # the served list is refreshed, not the knob
    served = httpx.get(f"{url}/object_info/LoadImage").json()["LoadImage"]
    assert served["input"]["required"]["image"][0] == ["example.png", "u/cat (1).png", "u/cat.png"]


def test_object_info_and_misc(fake_comfy: FakeComfyUI) -> None:
    url = fake_comfy.url
    everything = httpx.get(f"{url}/api/object_info").json()
    assert {"SaveImage", "PreviewImage", "KSampler", "OpenAIDalle3"} <= set(everything)
    flux = httpx.get(f"{url}/object_info/FluxProUltraImageNode").json()["FluxProUltraImageNode"]
    assert flux["api_node"] is True
    assert flux["category"] == "api node/image/BFL"
    assert flux["price_badge"]["engine"] == "jsonata"
    assert json.loads(flux["price_badge"]["expr"]) == {"type": "usd", "usd": 0.06}
    assert flux["input"]["hidden"]["api_key_comfy_org"] == "API_KEY_COMFY_ORG"
    assert flux["input"]["optional"]["image_prompt"][0] == "IMAGE"
    assert everything["SaveImage"]["output_node"] is True
    assert "api_node" not in everything["SaveImage"]
    assert httpx.get(f"{url}/object_info/Nope").json() == {}
    assert "argv" in httpx.get(f"{url}/system_stats").json()["system"]
    assert httpx.post(f"{url}/free", json={"unload_models": True}).status_code == 200
    assert fake_comfy.flags == {"unload_models": True}
    assert httpx.post(f"{url}/interrupt").status_code == 200
