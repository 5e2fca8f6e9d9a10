"""A last line of defence for log output: Comfy keys, broker tokens and `?token=` values
are replaced by `[redacted]` in every record, tracebacks included, whatever logged it
(the broker, uvicorn's access and websocket lines, libraries)."""

from __future__ import annotations

import json
import logging
import re
from urllib.parse import unquote_plus

SECRET_PATTERNS = (
    re.compile(r"comfyui-[A-Za-z0-9_\-]{8,}"),
    re.compile(r"cbk_(?:op|adm|svc|usr|cap)_[A-Za-z0-9_\-]{8,}"),
    re.compile(r"(?<=[?&]token=)[^&\s\"']+"),
)
# Every query parameter a token is accepted under (the websocket's `?token=`).
QUERY_TOKEN_PARAMETERS = frozenset({"token"})
# And those redacted from logged URLs: tokens, and sealed mode's egress grants (a grant is
# the authorization of the URL that carries it; broker/egress/capabilities.py).
LOGGED_SECRET_PARAMETERS = QUERY_TOKEN_PARAMETERS | {"cbk_grant"}
# A query parameter as it appears in a logged URL, name still percent-encoded.
QUERY_PARAMETER = re.compile(r"(?P<name>(?<=[?&])[^=&\s\"'#?]+)=(?P<value>[^&\s\"'#]*)")
REDACTED = "[redacted]"
LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access")
_traceback_formatter = logging.Formatter()


_literal_secrets: set[str] = set()


def redact_text(text: str) -> str:
    for pattern in SECRET_PATTERNS:
        text = pattern.sub(REDACTED, text)
    if "=" in text:
        text = QUERY_PARAMETER.sub(_redact_token_parameter, text)
    for secret in _literal_secrets:
        text = text.replace(secret, REDACTED)
    return text


def _redact_token_parameter(match: re.Match[str]) -> str:
    """The server decodes parameter names (`?%74oken=` is `?token=`), so decide on the
    decoded name."""
    if unquote_plus(match["name"]) in LOGGED_SECRET_PARAMETERS:
        return f"{match['name']}={REDACTED}"
    return match[0]


def redact_literally(secret: str) -> None:
    """Also redact this exact value (a configured secret no pattern recognises)."""
    _literal_secrets.add(secret)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(record.getMessage())
        record.args = None
        for key, value in vars(record).items():
            if key not in STANDARD_ATTRIBUTES and isinstance(value, str):
                setattr(record, key, redact_text(value))
        if record.exc_info:
            record.exc_text = redact_text(_traceback_formatter.formatException(record.exc_info))
            record.exc_info = None
        return True


def install_redaction() -> None:
    """Attach the filter to every handler of the root and uvicorn loggers (handler
    filters see records propagated from every child logger; logger filters do not)."""
    for name in LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())


STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}  # fmt: skip


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(
            (key, value) for key, value in vars(record).items() if key not in STANDARD_ATTRIBUTES
        )
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


def configure_logging(level: str, json_lines: bool) -> None:
    """Log to stderr, redacted, as JSON lines or text. Leaves an already configured
    root logger alone (tests, embedding applications)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if json_lines
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
