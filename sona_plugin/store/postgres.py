"""The shared trajectory store: one PostgreSQL database for every replica, durable on ``add``.

Needs the ``postgres`` extra (``pip install 'sona_plugin[postgres]'``: psycopg 3 and
psycopg-pool). It behaves like :class:`~sona_plugin.store.sqlite.SqliteStore`, record for
record and error for error; the same validation code refuses the same bad values.

Durability: every write (``add``, ``quarantine``, ``delete``, each batch of ``prune``) is
its own committed transaction, and each connection runs with ``synchronous_commit`` on
(switched back on if the server or database default is ``off``), so the commit record is
flushed before the call returns.

Row ids come from a ``BIGSERIAL`` sequence, so they only grow. Each ``add`` takes a
transaction-level advisory lock before it draws its id and holds it until its commit is
visible, so records become visible in id order: a trainer that has read up to id N never
later finds a new record below N (without the lock, two replicas' concurrent inserts could
commit out of order and ``records(since_id=N)`` would skip one for good). Adds are
serialised by it, as SQLite's write lock serialises them.

Schema versions are the same numbers as the SQLite store's (:data:`SCHEMA_VERSION`), kept
in a one-row ``sona_schema`` table: no table means an empty database (the v1 schema is
created, then migrated like any v1 database), an older version is migrated step by step in
one transaction under ``pg_advisory_xact_lock`` (two replicas starting at once take turns;
a failed migration leaves the database as it was), and a newer version is refused with
:class:`~sona_plugin.errors.StateError`. Tables live in the connection's ``search_path``
(``?options=-csearch_path%3Dsona`` in the URL puts them in schema ``sona``).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg_pool import ConnectionPool, PoolClosed

from ..errors import DuplicateFeedback, InvalidValue, StateError
from .base import FeedbackRecord
from .sqlite import (
    _COLUMNS,
    LIST_TEXT_CHARS,
    PRUNE_BATCH,
    SCHEMA_VERSION,
    _check_list_limit,
    _check_prune_args,
    _check_records_limit,
    _listed,
    _record,
    _unknown,
    _validated_row,
)

logger = logging.getLogger(__name__)

__all__ = ["PostgresStore"]

_SCHEMA_TABLE = """
CREATE TABLE sona_schema (
    one_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one_row),
    version INTEGER NOT NULL
)
"""

# The same columns as SQLite's v1 schema; token ids are the same JSON text.
_SCHEMA_V1 = """
CREATE TABLE feedback (
    id              BIGSERIAL        PRIMARY KEY,
    response_id     TEXT             NOT NULL UNIQUE,
    prompt          TEXT             NOT NULL,
    prompt_ids      TEXT             NOT NULL,
    response_ids    TEXT             NOT NULL,
    response_text   TEXT             NOT NULL,
    reward          DOUBLE PRECISION NOT NULL,
    embedding       BYTEA            NOT NULL,
    embedding_dim   INTEGER          NOT NULL,
    adapter_version BIGINT,
    created_at      DOUBLE PRECISION NOT NULL,
    task            TEXT
)
"""

# Statements that take a database from version N to N + 1, keyed by N (the steps of
# sqlite.py's _MIGRATIONS, in PostgreSQL's dialect). All run in the migration's one
# transaction; PostgreSQL DDL is transactional, so a failure undoes every step.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "ALTER TABLE feedback ADD COLUMN quarantined_at DOUBLE PRECISION",
        "ALTER TABLE feedback ADD COLUMN quarantine_reason TEXT",
        # count() reads this small index of live ids, not the rows with their embeddings
        "CREATE INDEX feedback_live ON feedback (id) WHERE quarantined_at IS NULL",
        "CREATE INDEX feedback_created_at ON feedback (created_at)",
    ),
}

# pg_advisory_xact_lock(key1, key2) keys: key1 = b"sona" names this package, key2 the lock.
_LOCK_NAMESPACE = 0x736F6E61
_LOCK_MIGRATE = 1
_LOCK_ADD = 2

_COUNT_SQL = "SELECT COUNT(*) FROM feedback WHERE id > %s AND quarantined_at IS NULL"


def _redacted(url: str) -> str:
    """``url`` with any password replaced by ``***``, for messages and logs."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hosts}" if colon else netloc
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _no_nul(name: str, value: object) -> None:
    # PostgreSQL TEXT cannot hold U+0000 (SQLite can); refuse it by name, before the write.
    if isinstance(value, str) and "\x00" in value:
        raise InvalidValue(
            f"{name} must not contain NUL characters (PostgreSQL text), "
            f"got one at index {value.index(chr(0))}"
        )


def _configure(conn: psycopg.Connection) -> None:
    """Make commits durable on this connection whatever the server's default."""
    if conn.execute("SHOW synchronous_commit").fetchone()[0] == "off":
        conn.execute("SET synchronous_commit = on")


class PostgresStore:
    """A :class:`~sona_plugin.store.base.TrajectoryStore` in a PostgreSQL database.

    Thread-safe: each call borrows a connection from a pool. Any number of processes and
    hosts may open the same database; each write is one transaction.

    Args:
        url: A libpq URL, ``postgresql://user:password@host:5432/dbname`` (``postgres://``
            works too; query parameters such as ``sslmode`` are passed to libpq).
        min_size: Connections the pool keeps open.
        max_size: The most connections the pool opens; a call waits for one beyond that.
        timeout_s: How long a call waits for a free connection (then
            ``psycopg_pool.PoolTimeout``).

    Raises:
        InvalidValue: ``min_size``/``max_size`` out of range.
        StateError: The server cannot be reached or refuses the login, the database holds
            something this code cannot read, or its schema is newer than this code.
    """

    def __init__(
        self, url: str, *, min_size: int = 1, max_size: int = 8, timeout_s: float = 30.0
    ) -> None:
        if not isinstance(url, str) or not url:
            raise InvalidValue(f"url must be a non-empty postgresql:// URL, got {url!r}")
        if not isinstance(min_size, int) or isinstance(min_size, bool) or min_size < 0:
            raise InvalidValue(f"min_size must be an int >= 0, got {min_size!r}")
        if (
            not isinstance(max_size, int)
            or isinstance(max_size, bool)
            or max_size < max(1, min_size)
        ):
            raise InvalidValue(
                f"max_size must be an int >= max(1, min_size={min_size}), got {max_size!r}"
            )
        if (
            not isinstance(timeout_s, (int, float))
            or isinstance(timeout_s, bool)
            or not math.isfinite(timeout_s)
            or timeout_s <= 0
        ):
            raise InvalidValue(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
        self.url = _redacted(url)
        self._conninfo = url  # with its password: the trainer lease connects on its own
        self._close_lock = threading.Lock()
        self._pool: ConnectionPool | None = None
        try:
            # One direct connection first: a wrong host or password fails at once with
            # libpq's own message, not after the pool's timeout.
            with psycopg.connect(url, autocommit=True) as conn:
                _configure(conn)
                self._migrate(conn)
            self._pool = ConnectionPool(
                url,
                min_size=min_size,
                max_size=max_size,
                timeout=timeout_s,
                kwargs={"autocommit": True},
                configure=_configure,
                # a connection the server dropped (restart, failover) is replaced, not used
                check=ConnectionPool.check_connection,
                name="sona-store",
                open=False,
            )
            self._pool.open(wait=True, timeout=timeout_s)
        except psycopg.Error as e:
            self._close_pool()
            raise StateError(f"cannot open trajectory store {self.url}: {e}") from e
        except BaseException:
            self._close_pool()
            raise

    def _migrate(self, conn: psycopg.Connection) -> None:
        """Bring the database to :data:`SCHEMA_VERSION` in one transaction."""
        with conn.transaction():
            # Held to the end of this transaction: a second replica starting now waits
            # here, then finds the schema done.
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NAMESPACE, _LOCK_MIGRATE))
            version = self._read_version(conn)
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"trajectory store {self.url} has schema version {version}; "
                    f"this sona_plugin reads up to {SCHEMA_VERSION} (upgrade it)"
                )
            start = version
            if version == 0:
                conn.execute(_SCHEMA_TABLE)
                conn.execute(_SCHEMA_V1)
                version = 1
            while version < SCHEMA_VERSION:
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement)
                version += 1
            if version != start:
                conn.execute(
                    "INSERT INTO sona_schema (one_row, version) VALUES (TRUE, %s) "
                    "ON CONFLICT (one_row) DO UPDATE SET version = EXCLUDED.version",
                    (version,),
                )
                logger.info("trajectory store %s: schema v%d -> v%d", self.url, start, version)

    def _read_version(self, conn: psycopg.Connection) -> int:
        if conn.execute("SELECT to_regclass('sona_schema')").fetchone()[0] is None:
            return 0
        row = conn.execute("SELECT version FROM sona_schema").fetchone()
        if row is None:
            raise StateError(f"trajectory store {self.url}: table sona_schema has no row")
        return int(row[0])

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        pool = self._pool
        if pool is None:
            raise StateError(f"trajectory store {self.url} is closed")
        try:
            with pool.connection() as conn:
                yield conn
        except PoolClosed as e:
            raise StateError(f"trajectory store {self.url} is closed") from e

    @property
    def schema_version(self) -> int:
        """The schema version of the database."""
        with self._connection() as conn:
            return self._read_version(conn)

    def add(self, record: FeedbackRecord) -> int:
        """Store ``record`` durably and return its row id.

        The record is committed (commit record flushed) before this returns. ``record``
        itself is not modified.

        Raises:
            InvalidValue: A field is out of range (as for SQLite, plus a NUL character in a
                text field), or feedback for this response_id is already stored
                (:class:`~sona_plugin.errors.DuplicateFeedback`). Nothing is written.
        """
        row = _validated_row(record)
        for name in ("response_id", "prompt", "response_text", "task", "quarantine_reason"):
            _no_nul(name, getattr(record, name))
        with self._connection() as conn:
            try:
                with conn.transaction():
                    conn.execute(
                        "SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NAMESPACE, _LOCK_ADD)
                    )
                    new_id = conn.execute(
                        "INSERT INTO feedback (response_id, prompt, prompt_ids, response_ids, "
                        "response_text, reward, embedding, embedding_dim, adapter_version, "
                        "created_at, task, quarantined_at, quarantine_reason) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                        "RETURNING id",
                        row,
                    ).fetchone()[0]
            except psycopg.errors.UniqueViolation as e:
                raise DuplicateFeedback(
                    f"feedback for response {record.response_id!r} already stored"
                ) from e
        return int(new_id)

    def get(self, response_id: str) -> FeedbackRecord | None:
        """The record for ``response_id`` (quarantined or not), or None."""
        with self._connection() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM feedback WHERE response_id = %s", (response_id,)
            ).fetchone()
        return None if row is None else _record(row)

    def has(self, response_id: str) -> bool:
        """Whether feedback for ``response_id`` is stored (quarantined records count, so a
        second feedback for a quarantined response is still refused)."""
        with self._connection() as conn:
            return (
                conn.execute(
                    "SELECT 1 FROM feedback WHERE response_id = %s", (response_id,)
                ).fetchone()
                is not None
            )

    def records(self, since_id: int = 0, limit: int | None = None) -> list[FeedbackRecord]:
        """Live records with row id > ``since_id``, oldest first, at most ``limit`` of them.

        Quarantined records are left out: this is what the trainer reads.
        """
        _check_records_limit(limit)
        with self._connection() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM feedback WHERE id > %s AND quarantined_at IS NULL "
                f"ORDER BY id LIMIT %s",
                (int(since_id), None if limit is None else int(limit)),
            ).fetchall()
        return [_record(r) for r in rows]

    def records_with_ids(self, ids: Sequence[int]) -> list[FeedbackRecord]:
        """The live records among row ids ``ids``, oldest first (unknown, deleted and
        quarantined ids are left out)."""
        wanted = sorted({int(i) for i in ids})
        if not wanted:
            return []
        with self._connection() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM feedback WHERE id = ANY(%s) AND quarantined_at IS NULL "
                f"ORDER BY id",
                (wanted,),
            ).fetchall()
        return [_record(r) for r in rows]

    def count(self, since_id: int = 0) -> int:
        """How many live records have a row id above ``since_id`` (quarantined ones are not
        counted). Served from the small ``feedback_live`` index, so polling it is cheap."""
        with self._connection() as conn:
            return int(conn.execute(_COUNT_SQL, (int(since_id),)).fetchone()[0])

    def quarantine(self, response_id: str, reason: str = "") -> FeedbackRecord:
        """Take the record for ``response_id`` out of training for good, keeping it stored.

        As :meth:`SqliteStore.quarantine <sona_plugin.store.sqlite.SqliteStore.quarantine>`:
        ``records``/``count`` skip it from now on, ``has``/``get`` still find it, and a
        second quarantine keeps the first time and reason. Committed before this returns.

        Raises:
            UnknownRecord: No record for ``response_id`` is stored.
            InvalidValue: ``reason`` is not a str (or holds a NUL character).
        """
        if not isinstance(reason, str):
            raise InvalidValue(f"reason must be a str, got {reason!r}")
        _no_nul("reason", reason)
        with self._connection() as conn, conn.transaction():
            conn.execute(
                "UPDATE feedback SET quarantined_at = %s, quarantine_reason = %s "
                "WHERE response_id = %s AND quarantined_at IS NULL",
                (time.time(), reason, response_id),
            )
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM feedback WHERE response_id = %s", (response_id,)
            ).fetchone()
            if row is None:
                raise _unknown(response_id)
        logger.info("quarantined feedback for response %r: %s", response_id, reason or "-")
        return _record(row)

    def delete(self, response_id: str) -> None:
        """Remove the record for ``response_id`` for good (committed before this returns).

        Feedback for that response may be given again afterwards. Row ids are never
        reused (a sequence), so a trainer's ``since_id`` stays valid.

        Raises:
            UnknownRecord: No record for ``response_id`` is stored.
        """
        with self._connection() as conn:
            cur = conn.execute("DELETE FROM feedback WHERE response_id = %s", (response_id,))
            if cur.rowcount == 0:
                raise _unknown(response_id)
        logger.info("deleted feedback for response %r", response_id)

    def list_records(
        self, since_id: int = 0, limit: int = 100, include_quarantined: bool = True
    ) -> list[dict]:
        """A page of records for an admin view: row id > ``since_id``, oldest first.

        The same dicts as :meth:`SqliteStore.list_records
        <sona_plugin.store.sqlite.SqliteStore.list_records>`: texts cut to
        :data:`~sona_plugin.store.sqlite.LIST_TEXT_CHARS` characters by the server, no
        embeddings or token ids.

        Raises:
            InvalidValue: ``limit`` is not an int in 1..1000.
        """
        _check_list_limit(limit)
        live_only = "" if include_quarantined else "AND quarantined_at IS NULL "
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT id, response_id, reward, adapter_version, task, created_at, "
                "quarantined_at, quarantine_reason, substr(prompt, 1, %s), "
                f"substr(response_text, 1, %s) FROM feedback WHERE id > %s {live_only}"
                "ORDER BY id LIMIT %s",
                (LIST_TEXT_CHARS, LIST_TEXT_CHARS, int(since_id), int(limit)),
            ).fetchall()
        return [_listed(row) for row in rows]

    def prune(self, older_than: float, *, batch_size: int = PRUNE_BATCH) -> int:
        """Delete every record (quarantined or not) created before ``older_than``.

        Each batch of at most ``batch_size`` rows is its own transaction on a connection
        borrowed for that batch alone, so adds never wait long behind a big prune.
        Interrupted, it leaves whole batches deleted and the rest intact.

        Returns:
            How many records were deleted.

        Raises:
            InvalidValue: ``older_than`` is not a finite number, or ``batch_size`` < 1.
        """
        _check_prune_args(older_than, batch_size)
        total = 0
        while True:
            with self._connection() as conn:
                n = conn.execute(
                    "DELETE FROM feedback WHERE id IN (SELECT id FROM feedback "
                    "WHERE created_at < %s LIMIT %s)",
                    (float(older_than), int(batch_size)),
                ).rowcount
            total += n
            if n < batch_size:
                break
        if total:
            logger.info("pruned %d feedback records created before %s", total, older_than)
        return total

    def _close_pool(self) -> None:
        with self._close_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def close(self) -> None:
        """Close the pool's connections; later calls raise StateError. Closing twice is
        harmless."""
        self._close_pool()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PostgresStore({self.url!r})"
