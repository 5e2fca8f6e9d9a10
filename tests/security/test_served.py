"""Issue 15 against the served process (`comfy-broker serve`, over loopback): slow
clients are cut off and connections capped (item 4), and X-Forwarded-For is believed only
from BROKER_TRUSTED_PROXIES (item 9)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from broker.db.models import TokenKind
from broker.tenants.tokens import generate_token
from tests.fixtures.app import KEK_1, SECRET_KEY

TIMEOUT = 1.0  # BROKER_HEADER_TIMEOUT_SECONDS for these servers
MAX_CONNECTIONS = 20
LOADED_MACHINE_SLACK = 3.0  # seconds past the deadline a busy CI machine may take to act on it
CLI = str(Path(sys.executable).parent / "comfy-broker")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _serve(tmp_path: Path, **settings: str) -> Iterator[str]:
    port = _free_port()
    env = {
        **os.environ,
        "BROKER_ENV": "test",
        "BROKER_DATABASE_URL": f"sqlite:///{tmp_path / 'broker.db'}",
        "BROKER_KEYRING": f"k1:{KEK_1}",
        "BROKER_SECRET_KEY": SECRET_KEY,
        "BROKER_COMFYUI_URL": "http://127.0.0.1:9",
        "BROKER_HEADER_TIMEOUT_SECONDS": str(TIMEOUT),
        "BROKER_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "BROKER_LOG_LEVEL": "WARNING",
        **settings,
    }
    env.pop("BROKER_TEST_DATABASE_URL", None)
    upgrade = [CLI, "db", "upgrade"]  # our own entry point, fixed arguments
    subprocess.run(upgrade, env=env, cwd=tmp_path, check=True, capture_output=True)  # noqa: S603
    server = subprocess.Popen(  # noqa: S603
        [CLI, "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("comfy-broker serve did not start")
            time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=20)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _serve(tmp_path_factory.mktemp("served"), BROKER_AUTH_FAILURES_PER_MINUTE="3")


def _open(url: str, first_bytes: bytes = b"") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(TIMEOUT + 6)
    if first_bytes:
        sock.sendall(first_bytes)
    return sock


def _closed_after(sock: socket.socket) -> float:
    """Seconds until the server closes `sock` (it must, before the socket's timeout)."""
    started = time.monotonic()
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def test_slow_headers_and_bodies_are_cut_off(served: str) -> None:
    partial_headers = _open(served, b"GET /healthz HTTP/1.1\r\nHost: broker\r\nX-Slow: ")
    silent = _open(served)
    partial_body = _open(
        served,
        b"POST /prompt HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\n"
        b'Authorization: Bearer x\r\nContent-Length: 1000\r\n\r\n{"prompt":',
    )
    for sock in (partial_headers, silent, partial_body):
        with sock:
            assert _closed_after(sock) <= TIMEOUT + LOADED_MACHINE_SLACK
    assert httpx.get(f"{served}/healthz").status_code == 200


def test_a_header_sent_a_byte_at_a_time_still_has_one_deadline(served: str) -> None:
    with _open(served, b"G") as sock:
        started = time.monotonic()
        try:
            for byte in b"ET /healthz HTTP/1.1\r\nHost: broker\r\n":
                time.sleep(TIMEOUT / 4)
                sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            pass
        _closed_after(sock)
        assert time.monotonic() - started <= TIMEOUT + LOADED_MACHINE_SLACK


def test_connections_past_the_cap_are_closed_at_once(served: str) -> None:
    held = [_open(served, b"GET /healthz HTTP/1.1\r\n") for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.2)
    with _open(served, b"GET /healthz HTTP/1.1\r\n") as extra:
        assert _closed_after(extra) < TIMEOUT / 2
    for sock in held:  # the slow ones are cut at their deadline, and the server serves again
        with sock:
            _closed_after(sock)
    assert httpx.get(f"{served}/healthz").status_code == 200


def test_forwarded_for_is_not_believed_from_an_untrusted_peer(served: str) -> None:
    bad = {"Authorization": f"Bearer {generate_token(TokenKind.USER)}"}
    statuses = [
        httpx.get(f"{served}/usage", headers={**bad, "X-Forwarded-For": f"10.0.0.{n}"}).status_code
        for n in range(6)
    ]
    assert statuses == [401] * 3 + [429] * 3


def test_forwarded_for_is_believed_from_a_trusted_proxy(tmp_path: Path) -> None:
    for url in _serve(
        tmp_path, BROKER_AUTH_FAILURES_PER_MINUTE="3", BROKER_TRUSTED_PROXIES="127.0.0.1"
    ):
        bad = {"Authorization": f"Bearer {generate_token(TokenKind.USER)}"}
        for expected in [401] * 3 + [429]:
            response = httpx.get(f"{url}/usage", headers={**bad, "X-Forwarded-For": "10.0.0.1"})
            assert response.status_code == expected
        # Another client behind the proxy is another address.
        other = httpx.get(f"{url}/usage", headers={**bad, "X-Forwarded-For": "10.0.0.2"})
        assert other.status_code == 401
