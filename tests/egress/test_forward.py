"""The egress forwards on the aiohttp session directly (broker/egress/forward.py): no httpx
in the path, the URL as sent, the request body bounded, a compressed answer decoded within
bounds."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import AsyncIterator

import httpx
import pytest

from broker.comfy.client import UpstreamHttp
from broker.egress.forward import REWRITE_LIMIT, BodyTooLarge, _Inflater
from broker.settings import Settings
from tests.egress.test_sealed import capability_of, funded_user
from tests.fixtures.app import AdminApi, AppFactory
from tests.fixtures.comfy import FakeComfyUI
from tests.fixtures.comfy_api import FakeComfyApi
from tests.proxy.helpers import submit


async def no_httpx(*args: object, **kwargs: object) -> None:
    raise AssertionError("the egress went through httpx")


async def test_calls_skip_httpx_and_their_url_goes_on_as_sent(
    client: httpx.AsyncClient,
    admin_api: AdminApi,
    egress_url: str,
    fake_comfy: FakeComfyUI,
    fake_comfy_api: FakeComfyApi,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alice, alice_key = await funded_user(admin_api, fake_comfy_api, "alice")
    fake_comfy.auto_execute = False
    capability = {"X-API-KEY": capability_of(fake_comfy, await submit(client, alice))}
    monkeypatch.setattr(UpstreamHttp, "send", no_httpx)
    query = "id=task%2D1&sig=a%2Fb%7E%2b&empty="  # percent-escapes a URL library may "fix"
    async with httpx.AsyncClient() as http:
        generated = await http.post(
            f"{egress_url}/comfy-api/proxy/bfl/flux-pro-1.1-ultra/generate",
            json={"seed": 1},
            headers=capability,
        )
        polled = await http.get(
            f"{egress_url}/comfy-api/proxy/bfl/get_result?{query}", headers=capability
        )
    assert generated.status_code == 200, generated.text
    assert polled.status_code == 200, polled.text
    assert [(r.method, r.query) for r in fake_comfy_api.requests] == [
        ("POST", ""),
        ("GET", query),
    ]
    assert fake_comfy_api.keys_received() == [alice_key, alice_key]
    assert fake_comfy_api.requests[0].body == b'{"seed":1}'


async def test_a_chunked_body_past_the_limit_is_refused_with_413(
    client: httpx.AsyncClient,
    admin_api: AdminApi,
    app_factory: AppFactory,
    settings: Settings,
    fake_comfy: FakeComfyUI,
    fake_comfy_api: FakeComfyApi,
) -> None:
    alice, _ = await funded_user(admin_api, fake_comfy_api, "alice")
    fake_comfy.auto_execute = False
    capability = {"X-API-KEY": capability_of(fake_comfy, await submit(client, alice))}
    limited = await app_factory(settings.model_copy(update={"MAX_COMFY_API_BODY_BYTES": 100_000}))

    async def upload() -> AsyncIterator[bytes]:  # no Content-Length: counted as it goes
        for _ in range(10):
            yield b"x" * 65_536

    transport = httpx.ASGITransport(app=limited)
    async with httpx.AsyncClient(transport=transport, base_url="http://b") as http:
        response = await http.post(
            "/comfy-api/proxy/fake/upload", content=upload(), headers=capability
        )
    assert response.status_code == 413, response.text
    assert response.json()["error"]["type"] == "payload_too_large"
    assert all(len(request.body) <= 100_000 for request in fake_comfy_api.requests)


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("deflate", zlib.compress),  # zlib-wrapped, as the standard says
        ("deflate", lambda data: zlib.compress(data, wbits=-zlib.MAX_WBITS)),  # bare, as some
    ],
)
def test_a_compressed_answer_is_decoded_in_chunks(encoding: str, compress: object) -> None:
    assert callable(compress)
    body = b'{"error": {"message": "' + b"k" * 200_000 + b'"}}'
    compressed = compress(body)
    inflater = _Inflater.for_encoding(encoding)
    assert inflater is not None
    decoded = b""
    for start in range(0, len(compressed), 1000):
        decoded += inflater.decode(compressed[start : start + 1000], len(decoded))
    assert decoded + inflater.flush() == body


def test_a_compressed_answer_decodes_to_no_more_than_the_limit() -> None:
    bomb = gzip.compress(b"\0" * (REWRITE_LIMIT * 8))  # ~32 KiB, 32 MiB decoded
    inflater = _Inflater.for_encoding("gzip")
    assert inflater is not None
    with pytest.raises(BodyTooLarge):
        inflater.decode(bomb, 0)


def test_an_encoding_it_cannot_read_is_not_decoded() -> None:
    assert _Inflater.for_encoding("br") is None
    assert _Inflater.for_encoding("compress") is None
