"""One trainer among replicas: a lease taken through the shared PostgreSQL database.

Every replica of a deployment stores feedback in one :class:`~.postgres.PostgresStore`;
only one of them should run loop B (train, gate, publish adapter versions). The replica
that holds a PostgreSQL session-level advisory lock is the trainer. :class:`TrainerLease`
holds it on a connection of its own (not one of the store's pool: the lock lasts as long
as that session), and :func:`only_while_leading` runs a function only while it is held.

The lock key is the first 8 bytes of SHA-256 of the lease's name, as a signed 64-bit int
(``pg_try_advisory_lock(bigint)``); the store's own locks use the two-int form, which
PostgreSQL keeps in a separate key space, so the two never collide. Advisory locks are
per database: replicas on one database elect one trainer whatever their ``search_path``.
A transaction-pooling proxy (PgBouncer ``pool_mode=transaction``) cannot hold a session
lock; connect the lease directly or through session pooling.

How soon the lease changes hands when its holder goes away:

- The holder process dies (SIGKILL, crash, OOM kill): its kernel closes the socket, the
  server ends the session at once and the lock is free; the next ``try_acquire`` of
  another replica (the coordinator polls every ``poll_s``, 1 s by default) takes it.
  Measured on loopback by ``tests/unit/test_leader_postgres.py`` (kill -9 of the holder to
  the other process holding the lease, polling every 5 ms): 11-23 ms.
- The holder's machine or network goes away without closing the socket: the lease's
  connection sets TCP keepalives on both ends, libpq's ``keepalives_idle`` 5 s,
  ``keepalives_interval`` 2 s, ``keepalives_count`` 3 (and ``tcp_user_timeout`` 11 s where
  libpq has it, >= 12) for the client, the same ``tcp_keepalives_*`` / ``tcp_user_timeout``
  session settings for the server's end. The server drops the silent session, and frees
  the lock, about ``idle + interval * count = 5 + 2 * 3 = 11`` s after the last traffic;
  the old holder's own check (``held``, each ``try_acquire``) fails within the same bound.
  Values given in the URL (``?keepalives_idle=30``) win on the client's end.

This elects one trainer in the normal course; it is not a fencing token. A cycle already
running when its replica loses the lease (a partition) runs to its end: until then, two
replicas may both be training.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ..errors import InvalidValue
from .postgres import PostgresStore, _redacted

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_NAME",
    "NOT_TRAINER",
    "TrainerLease",
    "lease_for",
    "lease_key",
    "only_while_leading",
]

DEFAULT_NAME = "sona-trainer"
NOT_TRAINER = "not the trainer"

KEEPALIVES_IDLE_S = 5
KEEPALIVES_INTERVAL_S = 2
KEEPALIVES_COUNT = 3
# A silent peer is given up after this long, idle or not (TCP_USER_TIMEOUT also caps the
# keepalive probes, so it must not be shorter than them).
DEAD_PEER_S = KEEPALIVES_IDLE_S + KEEPALIVES_INTERVAL_S * KEEPALIVES_COUNT
CONNECT_TIMEOUT_S = 10


def lease_key(name: str) -> int:
    """The advisory-lock key of ``name``: the first 8 bytes of its SHA-256, big-endian, as a
    signed 64-bit int (PostgreSQL's ``bigint``)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def _client_params(url: str) -> dict[str, Any]:
    """libpq parameters of the lease's connection: ``url``'s own, plus keepalives and a
    connect timeout where ``url`` sets none."""
    params: dict[str, Any] = {
        "keepalives": 1,
        "keepalives_idle": KEEPALIVES_IDLE_S,
        "keepalives_interval": KEEPALIVES_INTERVAL_S,
        "keepalives_count": KEEPALIVES_COUNT,
        "connect_timeout": CONNECT_TIMEOUT_S,
        "application_name": "sona-trainer-lease",
    }
    if psycopg.pq.version() >= 120000:
        params["tcp_user_timeout"] = DEAD_PEER_S * 1000
    params.update(conninfo_to_dict(url))
    return params


def _server_settings(conn: psycopg.Connection) -> None:
    """The server's end of the socket gives a silent client up as fast as the client gives
    up the server (ignored, and reading 0, on a Unix socket), and an idle lease session is
    never ended by ``idle_session_timeout``."""
    version = conn.info.server_version
    settings = [
        ("tcp_keepalives_idle", KEEPALIVES_IDLE_S),
        ("tcp_keepalives_interval", KEEPALIVES_INTERVAL_S),
        ("tcp_keepalives_count", KEEPALIVES_COUNT),
    ]
    if version >= 120000:
        settings.append(("tcp_user_timeout", DEAD_PEER_S * 1000))
    if version >= 140000:
        settings.append(("idle_session_timeout", 0))
    for name, value in settings:
        conn.execute("SELECT set_config(%s, %s, false)", (name, str(value)))


class TrainerLease:
    """The trainer's lease: a session-level advisory lock on one dedicated connection.

    Thread-safe. Nothing is connected until the first :meth:`try_acquire`; a connection
    that died (server restart, ``pg_terminate_backend``, partition) loses the lease, and
    the next :meth:`try_acquire` connects again. :meth:`close` gives the lease up and
    closes the connection; the object may be used again afterwards.

    Args:
        url: A libpq URL of the shared database (the store's). Its password is never shown
            in messages, logs, :meth:`stats` or ``repr``.
        name: What is elected: replicas using the same name on one database share one
            lease.

    Raises:
        InvalidValue: ``url`` is not a libpq URL, or ``name`` is empty.
    """

    def __init__(self, url: str, name: str = DEFAULT_NAME) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidValue(f"name must be a non-empty str, got {name!r}")
        if not isinstance(url, str) or not url:
            raise InvalidValue(f"url must be a non-empty postgresql:// URL, got {url!r}")
        self.url = _redacted(url)
        try:
            self._params = _client_params(url)
        except psycopg.Error as e:
            raise InvalidValue(
                f"url must be a libpq URL, got {self.url!r}: {self._scrub(e)}"
            ) from None
        self.name = name
        self.key = lease_key(name)
        self._lock = threading.RLock()  # one round trip on the connection at a time
        self._conn: psycopg.Connection | None = None
        self._held = False
        self.acquired_at: float | None = None  # wall clock of the current hold
        self.checked_at: float | None = None  # wall clock of the last answer from the server
        self.attempts = 0  # pg_try_advisory_lock calls (and connects) while not holding
        self.acquisitions = 0
        self.losses = 0  # holds ended by a dead connection, not by release()
        self.last_error: str | None = None

    def _scrub(self, error: BaseException) -> str:
        text = f"{type(error).__name__}: {error}"
        password = getattr(self, "_params", {}).get("password")
        return text.replace(password, "***") if password else text

    # -- under self._lock -----------------------------------------------------------------
    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        self._held = False
        self.acquired_at = None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection: nothing to save
                logger.debug("closing the trainer lease's connection failed", exc_info=True)

    def _failed(self, action: str, error: psycopg.Error) -> None:
        was_held = self._held
        first = self.last_error is None
        self.last_error = self._scrub(error)
        self._disconnect()
        if was_held:
            self.losses += 1
            logger.warning(
                "trainer lease %r on %s lost (%s): %s",
                self.name,
                self.url,
                action,
                self.last_error,
            )
        elif first:  # one warning per streak of failures; the rest at debug level
            logger.warning(
                "trainer lease %r on %s: %s failed: %s",
                self.name,
                self.url,
                action,
                self.last_error,
            )
        else:
            logger.debug("trainer lease %r: %s failed: %s", self.name, action, self.last_error)

    def _alive(self) -> bool:
        """Whether the held lease's session still answers (False: the lease is lost)."""
        if not self._held or self._conn is None:
            return False
        try:
            self._conn.execute("SELECT 1")
        except psycopg.Error as e:
            self._failed("liveness check", e)
            return False
        self.checked_at = time.time()
        return True

    # -- public ---------------------------------------------------------------------------
    @property
    def held(self) -> bool:
        """Whether this process holds the lease now: held, and its session still answers a
        ``SELECT 1`` (a dead connection makes it False; the next :meth:`try_acquire`
        connects again)."""
        with self._lock:
            return self._alive()

    def try_acquire(self) -> bool:
        """Take the lease if it is free; never waits for another holder.

        Returns:
            True if this process holds the lease now (it took it, or already held it and
            its session still answers); False if another session holds it, or the
            database cannot be reached (logged, and kept in ``stats()["last_error"]``).
        """
        with self._lock:
            if self._alive():
                return True
            self.attempts += 1
            try:
                if self._conn is None:
                    conn = psycopg.connect(autocommit=True, **self._params)
                    self._conn = conn
                    _server_settings(conn)
                row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,))
                got = row.fetchone()[0]
            except psycopg.Error as e:
                self._failed("acquiring", e)
                return False
            self.checked_at = time.time()
            self.last_error = None
            if got:
                self._held = True
                self.acquired_at = self.checked_at
                self.acquisitions += 1
                logger.info(
                    "this process is the trainer now (lease %r on %s, backend pid %d)",
                    self.name,
                    self.url,
                    self._conn.info.backend_pid,
                )
            return bool(got)

    def release(self) -> None:
        """Give the lease up (another replica may take it at once); keeps the connection
        for a later :meth:`try_acquire`. Releasing a lease not held does nothing."""
        with self._lock:
            if not self._held or self._conn is None:
                return
            self._held = False
            self.acquired_at = None
            try:
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
            except psycopg.Error:  # the session is gone, and the lock with it
                self._disconnect()
            logger.info("trainer lease %r on %s released", self.name, self.url)

    def close(self) -> None:
        """Give the lease up and close its connection (closing twice is harmless). The
        lock is released explicitly first: the server frees a closed session's locks only
        once its backend has exited, which under load comes later than the close."""
        with self._lock:
            if self._held:
                self.release()
            self._disconnect()

    def stats(self) -> dict:
        """The lease as last seen, JSON-serialisable, without a round trip to the server
        (so a stats request never waits on a partitioned network): ``holder`` is as of
        ``checked_at``; ``*_at`` are wall-clock epoch seconds."""
        conn = self._conn
        return {
            "name": self.name,
            "holder": self._held,
            "acquired_at": self.acquired_at,
            "checked_at": self.checked_at,
            "attempts": self.attempts,
            "acquisitions": self.acquisitions,
            "losses": self.losses,
            "backend_pid": conn.info.backend_pid if conn is not None and self._held else None,
            "last_error": self.last_error,
            "url": self.url,
        }

    def __enter__(self) -> TrainerLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TrainerLease({self.url!r}, name={self.name!r}, holder={self._held})"


_SKIP: Any = object()


def only_while_leading(
    lease: TrainerLease, fn: Callable[..., Any], *, otherwise: Any = _SKIP
) -> Callable[..., Any]:
    """``fn``, run only while ``lease`` is held: each call first ``lease.try_acquire()``s.

    Args:
        lease: The trainer's lease.
        fn: What only the trainer runs (loop B's ``learn``, loop C's ``deep_cycle``).
        otherwise: What a call returns on a replica that is not the trainer; by default
            a new ``{"skipped": "not the trainer"}`` each time.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if lease.try_acquire():
            return fn(*args, **kwargs)
        return {"skipped": NOT_TRAINER} if otherwise is _SKIP else otherwise

    return wrapper


def lease_for(store: object, name: str = DEFAULT_NAME) -> TrainerLease | None:
    """The trainer lease on ``store``'s database when it is a :class:`PostgresStore`
    (replicas share it), else None (a SQLite store has one host: nothing to elect)."""
    if isinstance(store, PostgresStore):
        return TrainerLease(store._conninfo, name)
    return None
