"""`comfy-broker doctor`: check a deployment the way its first user would trip on it.

Each check reads what is there (settings, database, keyring, Redis, every ComfyUI server)
and says what it found and, for a problem, the fix. Nothing is changed.
"""

from __future__ import annotations

import asyncio
import stat
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError

from broker import __version__
from broker.db.migrations import schema_problem
from broker.db.models import ComfyKey
from broker.db.session import create_engine
from broker.proxy.pool import is_leaky_version
from broker.settings import DEV_SECRETS_FILE, Environment, KeyMode, Settings

if TYPE_CHECKING:
    from broker.keys.service import KeyCustody

TIMEOUT_SECONDS = 5.0


class Status(StrEnum):
    OK = "ok"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True)
class Finding:
    area: str
    status: Status
    found: str
    fix: str = ""


def ok(area: str, found: str) -> Finding:
    return Finding(area, Status.OK, found)


def warning(area: str, found: str, fix: str) -> Finding:
    return Finding(area, Status.WARNING, found, fix)


def error(area: str, found: str, fix: str) -> Finding:
    return Finding(area, Status.ERROR, found, fix)


async def diagnose(settings: Settings) -> list[Finding]:
    findings = [*check_settings(settings)]
    custody, keyring_findings = _custody(settings)
    findings += keyring_findings
    findings += await check_database(settings, custody)
    findings += await check_redis(settings)
    async with httpx.AsyncClient(timeout=TIMEOUT_SECONDS) as http:
        for url in settings.comfyui_urls:
            findings += await check_comfyui(http, url, settings)
    return findings


def check_settings(settings: Settings) -> list[Finding]:
    area = "settings"
    findings = [ok(area, f"comfy-key-broker {__version__}, BROKER_ENV={settings.ENV.value}")]
    production = settings.ENV is Environment.PRODUCTION
    if settings.KEYRING_FILE is not None:
        findings.append(_file_privacy(settings.KEYRING_FILE, production))
        if not production and settings.KEYRING_FILE == DEV_SECRETS_FILE:
            findings.append(warning(area, f"development keyring {DEV_SECRETS_FILE}",
                                    "for production set BROKER_KEYRING (or BROKER_KEYRING_FILE) "
                                    "and BROKER_SECRET_KEY, and BROKER_ENV=production"))  # fmt: skip
    if settings.ADMIN_TOKEN is None:
        findings.append(ok(area, "no BROKER_ADMIN_TOKEN: operator tokens come from the CLI"))
    if production and settings.is_sqlite:
        findings.append(warning(area, "SQLite in production: one broker process only",
                                "use PostgreSQL for replicas (docs/deploy.md)"))  # fmt: skip
    return findings


def _file_privacy(path: Any, production: bool) -> Finding:
    area = "settings"
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        return error(area, f"keyring file {path} unreadable ({type(exc).__name__})",
                     "check BROKER_KEYRING_FILE")  # fmt: skip
    if mode & 0o077:
        found = f"keyring file {path} is readable by others (mode {mode:04o})"
        fix = f"chmod 600 {path}"
        return error(area, found, fix) if production else warning(area, found, fix)
    return ok(area, f"keyring file {path} is private (mode {mode:04o})")


def _custody(settings: Settings) -> tuple[KeyCustody | None, list[Finding]]:
    from broker.keys.service import KeyCustody
    from broker.settings import ConfigurationError

    try:
        custody = KeyCustody.from_settings(settings)
    except ConfigurationError as exc:
        return None, [error("keyring", str(exc), "set BROKER_KEYRING and BROKER_SECRET_KEY")]
    keyring = custody.keyring
    found = f"KEKs {', '.join(keyring.key_ids)}; primary {keyring.primary_id}"
    return custody, [ok("keyring", found)]


async def check_database(settings: Settings, custody: KeyCustody | None) -> list[Finding]:
    area = "database"
    engine = create_engine(settings.DATABASE_URL)
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
            server = engine.dialect.name, engine.dialect.server_version_info
        findings = [ok(area, f"{server[0]} {'.'.join(map(str, server[1] or ()))} reachable")]
        problem = await schema_problem(settings.DATABASE_URL)
        if problem is not None:
            return [*findings, error(area, "not at this broker's schema", problem)]
        findings.append(ok(area, "migrated to the latest revision"))
        if custody is not None:
            findings += await _stored_keys(engine, custody)
        return findings
    except (SQLAlchemyError, OSError) as exc:
        return [error(area, f"unreachable: {type(exc).__name__}: {_first_line(exc)}",
                      "check BROKER_DATABASE_URL and that the server runs")]  # fmt: skip
    finally:
        await engine.dispose()


async def _stored_keys(engine: Any, custody: KeyCustody) -> list[Finding]:
    """Every stored Comfy key must name a KEK the keyring has."""
    statement = select(ComfyKey.kek_id, func.count()).group_by(ComfyKey.kek_id)
    async with engine.connect() as connection:
        rows = (await connection.execute(statement)).all()
    counts: dict[str, int] = {kek_id: count for kek_id, count in rows}  # noqa: C416
    keyring = custody.keyring
    missing = {kek: n for kek, n in counts.items() if kek not in keyring.key_ids}
    if missing:
        listed = ", ".join(f"{n} under {kek!r}" for kek, n in sorted(missing.items()))
        return [error("keyring", f"stored keys sealed under KEKs not in the keyring: {listed}",
                      "add those KEKs to BROKER_KEYRING (then `comfy-broker keys rewrap`) "
                      "and restart every broker process")]  # fmt: skip
    total = sum(counts.values())
    old = sum(n for kek, n in counts.items() if kek != keyring.primary_id)
    if old:
        return [warning("keyring", f"{old} of {total} stored keys not under the primary KEK",
                        "run `comfy-broker keys rewrap`")]  # fmt: skip
    return [ok("keyring", f"all {total} stored keys open with this keyring")]


async def check_redis(settings: Settings) -> list[Finding]:
    if settings.REDIS_URL is None:
        return [ok("redis", "not configured (fine for one broker process)")]
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    client = Redis.from_url(settings.REDIS_URL.get_secret_value())
    try:
        await asyncio.wait_for(client.ping(), TIMEOUT_SECONDS)
        info = await client.info("server")
        return [ok("redis", f"reachable, Redis {info.get('redis_version', '?')}")]
    except (RedisError, OSError, TimeoutError) as exc:
        return [error("redis", f"unreachable: {type(exc).__name__}",
                      "check BROKER_REDIS_URL and that Redis runs")]  # fmt: skip
    finally:
        await client.aclose()


async def check_comfyui(http: httpx.AsyncClient, url: str, settings: Settings) -> list[Finding]:
    from broker.comfy.client import ComfyClient

    comfy = ComfyClient(http, url)
    area = f"comfyui {comfy.url}"
    try:
        response = await http.get(f"{comfy.base_url}/system_stats")
        response.raise_for_status()
        system = response.json().get("system", {})
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        return [error(area, f"unreachable: {type(exc).__name__}",
                      "start ComfyUI, or fix BROKER_COMFYUI_URL(S)")]  # fmt: skip
    version = str(system.get("comfyui_version") or "unknown")
    argv = [str(arg) for arg in system.get("argv") or []]
    findings = [ok(area, f"reachable, ComfyUI {version}")]
    if is_leaky_version(version):
        findings.append(warning(area, f"ComfyUI {version} leaks Comfy keys (/queue, api_logs)",
                                "upgrade ComfyUI (see docs/security.md); meanwhile keep it "
                                "reachable only from the broker"))  # fmt: skip
    if "--cache-none" not in argv:
        findings.append(warning(area, "runs without --cache-none: one user's cached API-node "
                                "result can answer another's identical graph",
                                "start ComfyUI with --cache-none"))  # fmt: skip
    if settings.KEY_MODE is KeyMode.SEALED:
        findings.append(_sealed_mode(area, argv))
    return findings


def _sealed_mode(area: str, argv: list[str]) -> Finding:
    """Sealed mode works only if ComfyUI sends its Comfy API calls to the broker."""
    base = next((argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--comfy-api-base"), "")
    base = base or next((a.split("=", 1)[1] for a in argv if a.startswith("--comfy-api-base=")), "")
    if base.rstrip("/").endswith("/comfy-api"):
        return ok(area, f"sealed mode: --comfy-api-base {base}")
    return error(area, "sealed mode, but ComfyUI does not call the broker for Comfy API calls",
                 "start ComfyUI with --comfy-api-base http://<broker>/comfy-api")  # fmt: skip


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:160] if str(exc) else ""
