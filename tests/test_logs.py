"""The last line of defence for log output, and server names without credentials."""

from __future__ import annotations

import httpx
import pytest

from broker.comfy.client import ComfyClient
from broker.logs import redact_literally, redact_text


def test_keys_tokens_query_tokens_and_configured_secrets_are_redacted() -> None:
    redact_literally("plain-operator-secret-123")
    line = (
        "key comfyui-0123456789abcdef token cbk_usr_ABCDEFGHIJKLmnop "
        "GET /ws?clientId=x&token=whatever admin plain-operator-secret-123"
    )
    redacted = redact_text(line)
    for secret in ("comfyui-0123", "cbk_usr_ABCD", "token=whatever", "plain-operator-secret-123"):
        assert secret not in redacted
    assert redacted.count("[redacted]") == 4


@pytest.mark.parametrize(
    "url",
    [
        "/ws?%74oken=cbk-secret-value",
        "/ws?clientId=x&t%6Fken=cbk-secret-value",
        "/api/ws?%74%6F%6B%65%6E=cbk-secret-value&clientId=y",
        '"WebSocket /ws?clientId=a&token=cbk-secret-value" [accepted]',
        "GET /comfy-api/proxy/result?id=1&cbk_grant=cbk-secret-value 200",
    ],
)
def test_a_token_in_a_percent_encoded_query_parameter_is_redacted(url: str) -> None:
    redacted = redact_text(url)
    assert "cbk-secret-value" not in redacted
    assert "[redacted]" in redacted


def test_other_query_parameters_are_kept() -> None:
    line = "/ws?clientId=abc&tokens=1&my_token=2"
    assert redact_text(line) == line


def test_a_server_is_named_without_the_credentials_in_its_url() -> None:
    client = ComfyClient(httpx.AsyncClient(), "http://ops:hunter2@comfy.internal:8188/")
    assert client.url == "http://comfy.internal:8188"
    assert client.base_url == "http://ops:hunter2@comfy.internal:8188"
