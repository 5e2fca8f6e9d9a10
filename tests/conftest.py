"""Test setup: a real database migrated with Alembic (SQLite by default, PostgreSQL when
BROKER_TEST_DATABASE_URL points at one), real crypto, the app driven over ASGI."""

from __future__ import annotations

import os

os.environ["BROKER_ENV"] = "test"

pytest_plugins = [
    "tests.fixtures.database",
    "tests.fixtures.app",
    "tests.fixtures.comfy_versions",  # before comfy, which imports it
    "tests.fixtures.comfy",
]
