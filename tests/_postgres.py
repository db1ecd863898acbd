"""A throwaway PostgreSQL server for tests: ``initdb`` into a temporary directory, serve on
127.0.0.1 at a free port (unix socket in the same directory), stop and delete it at the end.

PostgreSQL refuses to run as root, so under root the server's commands run as the
``postgres`` user through ``runuser``. The binaries are looked up on PATH, then in Debian's
``/usr/lib/postgresql/<version>/bin`` (where the ``postgresql`` package puts them, off PATH).

    with postgres_server() as server:       # or unavailable() -> why not
        url = server.create_database()       # a fresh, empty database
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_TOOLS = ("initdb", "pg_ctl", "postgres")


def find_tool(name: str) -> str | None:
    """The path of PostgreSQL's ``name`` binary, newest Debian version first, or None."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else -1,
    )
    return candidates[-1] if candidates else None


def _as_root() -> bool:
    return os.geteuid() == 0


def unavailable() -> str | None:
    """Why no test server can be started here (for ``pytest.skip``), or None."""
    missing = [t for t in _TOOLS if find_tool(t) is None]
    if missing:
        return (
            f"PostgreSQL server binaries not found ({', '.join(missing)}); install the "
            f"Debian 'postgresql' package (CI does)"
        )
    if _as_root():
        if shutil.which("runuser") is None:
            return "running as root and 'runuser' is missing (PostgreSQL refuses root)"
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A running throwaway server; ``url(db)`` and ``create_database()`` give URLs."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.data = root / "data"
        self.log = root / "server.log"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg
        from psycopg import sql

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no server log)"


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    if _as_root():
        args = ["runuser", "-u", "postgres", "--", *args]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a throwaway server, yield it, then stop it (``-m immediate``) and delete it.

    Raises:
        RuntimeError: :func:`unavailable` says why, or the server would not start (the
            message holds its log).
    """
    why = unavailable()
    if why:
        raise RuntimeError(why)
    initdb, pg_ctl = find_tool("initdb"), find_tool("pg_ctl")
    # not pytest's tmp_path: its parents are root-only, and the server runs as postgres
    root = Path(tempfile.mkdtemp(prefix="sona-pg-"))
    started = None
    try:
        (root / "sock").mkdir()
        if _as_root():
            for path in (root, root / "sock"):
                shutil.chown(path, user="postgres")
        done = _run(
            [
                initdb,
                "-D",
                str(root / "data"),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr[-2000:]}")
        for _attempt in range(3):  # the free port may be taken before the server binds it
            server = PostgresServer(root, free_port())
            done = _run(
                [
                    pg_ctl,
                    "start",
                    "-w",
                    "-t",
                    "60",
                    "-D",
                    str(server.data),
                    "-l",
                    str(server.log),
                    "-o",
                    f"-h 127.0.0.1 -p {server.port} -k {root / 'sock'}",
                ]
            )
            if done.returncode == 0:
                started = server
                break
        if started is None:
            raise RuntimeError(
                f"pg_ctl start failed ({done.returncode}): {done.stderr}\n{server.log_tail()}"
            )
        yield started
    finally:
        if started is not None:
            _run([pg_ctl, "stop", "-m", "immediate", "-w", "-D", str(started.data)])
        shutil.rmtree(root)


def skip_or_fail(reason: str) -> None:
    """Skip a PostgreSQL test that cannot run here, or fail it where the environment
    promises PostgreSQL (``SONA_REQUIRE_POSTGRES=1``, set by ``.ci/run``): a skipped test
    proves nothing in CI."""
    import pytest

    if os.environ.get("SONA_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL is required here (SONA_REQUIRE_POSTGRES=1): {reason}")
    pytest.skip(reason)
