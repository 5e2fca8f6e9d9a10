"""Files that hold secrets are the broker's alone: created 0600, and a keyring file that
group or others may read is refused in production (a warning elsewhere)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from sqlalchemy.engine import make_url

log = logging.getLogger("broker.files")
PRIVATE = 0o600


class FileModeError(Exception):
    """A secret file others may read; the message names the file and the fix."""


def create_private_sqlite_file(database_url: str) -> None:
    """Create the SQLite database file 0600 before SQLite does (it would use the umask,
    typically 0644); SQLite gives its -wal and -shm files the database file's mode."""
    database = make_url(database_url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE)
    except FileExistsError:
        return  # another process created it first
    os.close(descriptor)


def check_private(path: Path, setting: str, *, refuse: bool) -> None:
    """Refuse (`refuse`) or warn about a file that group or others may read."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # unreadable files are reported by whoever reads them
    if not mode & (stat.S_IRWXG | stat.S_IRWXO):
        return
    message = (
        f"{setting} {path} is readable by group or others (mode {stat.S_IMODE(mode):o}); "
        f"run: chmod 600 {path}"
    )
    if refuse:
        raise FileModeError(message)
    log.warning("files.not_private: %s", message)
