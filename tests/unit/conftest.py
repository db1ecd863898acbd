"""Fixtures shared by the unit tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/_postgres.py
import _postgres  # noqa: E402

NO_PSYCOPG = "psycopg / psycopg-pool not installed: pip install 'sona_plugin[postgres]'"


@pytest.fixture(scope="session")
def pg_server():
    """A throwaway PostgreSQL server (``initdb``/``pg_ctl`` on 127.0.0.1, a temp dir) for
    the whole session; tests take fresh databases from it with ``create_database()``."""
    why = _postgres.unavailable()
    if why:
        _postgres.skip_or_fail(why)
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        _postgres.skip_or_fail(NO_PSYCOPG)
    with _postgres.postgres_server() as server:
        yield server
