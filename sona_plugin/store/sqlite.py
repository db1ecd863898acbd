"""The embedded trajectory store: one SQLite file, durable on every ``add``.

Durability: the database runs in WAL journal mode with ``synchronous=FULL``, and every
write (``add``, ``quarantine``, ``delete``, each batch of ``prune``) is its own committed
transaction, so the WAL is fsynced before it returns — an acknowledged record (or
quarantine, or deletion) survives a process kill and a power loss. WAL also lets other
processes read while one writes; writers from several processes wait up to
``busy_timeout_s`` for the write lock.

Schema versions live in SQLite's ``PRAGMA user_version``: 0 means an empty file (the v1
schema is created, then migrated like any v1 file), an older version is migrated step by
step in one transaction at open (a failed migration leaves the file as it was), and a
version newer than :data:`SCHEMA_VERSION` is refused with
:class:`~sona_plugin.errors.StateError` rather than misread.

Schema v2 adds quarantine and retention for stores that run for weeks:

- ``quarantined_at REAL`` (NULL: live) and ``quarantine_reason TEXT``. A timestamp rather
  than a 0/1 flag, so an operator sees when a record was pulled. A quarantined row stays
  in the table (``has`` still finds it, so a second feedback for that response is still
  refused) but ``records`` and ``count``, which the trainer reads, skip it.
- ``feedback_live``, a partial index on ``(id, quarantined_at)`` over live rows: ``count``
  (polled every second) reads this small index instead of the rows with their embeddings.
- ``feedback_created_at``, an index on ``created_at``, so ``prune`` finds old rows without
  scanning the table in each of its batches.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import DuplicateFeedback, InvalidValue, StateError, UnknownRecord
from .base import FeedbackRecord

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
"""The newest schema this code reads and writes."""

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS feedback (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    response_id     TEXT    NOT NULL UNIQUE,
    prompt          TEXT    NOT NULL,
    prompt_ids      TEXT    NOT NULL,
    response_ids    TEXT    NOT NULL,
    response_text   TEXT    NOT NULL,
    reward          REAL    NOT NULL,
    embedding       BLOB    NOT NULL,
    embedding_dim   INTEGER NOT NULL,
    adapter_version INTEGER,
    created_at      REAL    NOT NULL,
    task            TEXT
);
"""

# Statements that take a file from version N to N + 1, keyed by N. Each runs inside the
# migration's one transaction, so none may commit (no executescript, no VACUUM).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "ALTER TABLE feedback ADD COLUMN quarantined_at REAL",
        "ALTER TABLE feedback ADD COLUMN quarantine_reason TEXT",
        "CREATE INDEX feedback_live ON feedback (id, quarantined_at) WHERE quarantined_at IS NULL",
        "CREATE INDEX feedback_created_at ON feedback (created_at)",
    ),
}

_COLUMNS = (
    "id, response_id, prompt, prompt_ids, response_ids, response_text, reward, "
    "embedding, embedding_dim, adapter_version, created_at, task, quarantined_at, "
    "quarantine_reason"
)

# INDEXED BY pins the small covering index: without statistics the planner may pick the
# rowid range instead, which reads every row with its embedding. If the index were
# missing this fails loudly rather than silently scanning.
_COUNT_SQL = (
    "SELECT COUNT(*) FROM feedback INDEXED BY feedback_live WHERE id > ? AND quarantined_at IS NULL"
)

LIST_TEXT_CHARS = 200
"""``list_records`` cuts ``prompt`` and ``response_text`` to this many characters."""

LIST_LIMIT_MAX = 1000
"""The most rows one ``list_records`` call returns."""

PRUNE_BATCH = 1000
"""Rows ``prune`` deletes per transaction, so it never holds the write lock for long."""

IDS_PER_QUERY = 500
"""Row ids per query in ``records_with_ids`` (SQLite caps a statement's parameters)."""


def _token_ids(name: str, ids: object) -> list[int]:
    try:
        items = list(ids)  # type: ignore[call-overload]
    except TypeError:
        items = None
    if items is None or not all(
        isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in items
    ):
        raise InvalidValue(f"{name} must be a sequence of integer token ids, got {ids!r}")
    return [int(t) for t in items]


def _validated_row(r: FeedbackRecord) -> tuple:
    """The row to insert for ``r``; raises InvalidValue naming the first bad field."""
    if not isinstance(r.response_id, str) or not r.response_id:
        raise InvalidValue(f"response_id must be a non-empty str, got {r.response_id!r}")
    for name in ("prompt", "response_text"):
        if not isinstance(getattr(r, name), str):
            raise InvalidValue(f"{name} must be a str, got {type(getattr(r, name)).__name__}")
    reward = r.reward
    if (
        not isinstance(reward, numbers.Real)
        or isinstance(reward, bool)
        or not math.isfinite(float(reward))
        or not -1.0 <= float(reward) <= 1.0
    ):
        raise InvalidValue(f"reward must be a finite number in [-1, 1], got {reward!r}")
    try:
        emb = np.asarray(r.embedding, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InvalidValue(f"embedding must be a 1-D float array, got {r.embedding!r}") from e
    if emb.ndim != 1 or emb.size == 0:
        raise InvalidValue(f"embedding must be a non-empty 1-D array, got shape {emb.shape}")
    if not np.all(np.isfinite(emb)):
        bad = int(np.flatnonzero(~np.isfinite(emb))[0])
        raise InvalidValue(f"embedding must be finite, got {emb[bad]} at index {bad}")
    av = r.adapter_version
    if av is not None and (not isinstance(av, numbers.Integral) or isinstance(av, bool)):
        raise InvalidValue(f"adapter_version must be an int or None, got {av!r}")
    if not isinstance(r.created_at, numbers.Real) or not math.isfinite(float(r.created_at)):
        raise InvalidValue(f"created_at must be a finite timestamp, got {r.created_at!r}")
    if r.task is not None and not isinstance(r.task, str):
        raise InvalidValue(f"task must be a str or None, got {r.task!r}")
    qa, why = r.quarantined_at, r.quarantine_reason
    if qa is not None and (
        not isinstance(qa, numbers.Real) or isinstance(qa, bool) or not math.isfinite(float(qa))
    ):
        raise InvalidValue(f"quarantined_at must be a finite timestamp or None, got {qa!r}")
    if why is not None and (qa is None or not isinstance(why, str)):
        raise InvalidValue(
            f"quarantine_reason must be a str on a quarantined record and None "
            f"otherwise, got {why!r} with quarantined_at={qa!r}"
        )
    return (
        r.response_id,
        r.prompt,
        json.dumps(_token_ids("prompt_ids", r.prompt_ids)),
        json.dumps(_token_ids("response_ids", r.response_ids)),
        r.response_text,
        float(reward),
        emb.astype("<f4").tobytes(),
        int(emb.size),
        None if av is None else int(av),
        float(r.created_at),
        r.task,
        None if qa is None else float(qa),
        None if qa is None else (why or ""),
    )


def _record(row: tuple) -> FeedbackRecord:
    (
        id_,
        response_id,
        prompt,
        prompt_ids,
        response_ids,
        response_text,
        reward,
        emb,
        dim,
        adapter_version,
        created_at,
        task,
        quarantined_at,
        quarantine_reason,
    ) = row
    embedding = np.frombuffer(emb, dtype="<f4").astype(np.float32)
    if embedding.size != dim:
        raise StateError(
            f"feedback row {id_}: embedding holds {embedding.size} floats, embedding_dim says {dim}"
        )
    return FeedbackRecord(
        response_id=response_id,
        prompt=prompt,
        prompt_ids=json.loads(prompt_ids),
        response_ids=json.loads(response_ids),
        response_text=response_text,
        reward=reward,
        embedding=embedding,
        adapter_version=adapter_version,
        created_at=created_at,
        task=task,
        id=id_,
        quarantined_at=quarantined_at,
        quarantine_reason=quarantine_reason,
    )


def _unknown(response_id: object) -> UnknownRecord:
    return UnknownRecord(f"no feedback record for response {response_id!r}")


# Argument checks shared with the PostgreSQL store (store/postgres.py), so both backends
# refuse the same values with the same messages.
def _check_records_limit(limit: object) -> None:
    if limit is not None and limit < 0:  # type: ignore[operator]
        raise InvalidValue(f"limit must be >= 0 or None, got {limit}")


def _check_list_limit(limit: object) -> None:
    if (
        not isinstance(limit, numbers.Integral)
        or isinstance(limit, bool)
        or not 1 <= limit <= LIST_LIMIT_MAX
    ):
        raise InvalidValue(f"limit must be an int in 1..{LIST_LIMIT_MAX}, got {limit!r}")


def _check_prune_args(older_than: object, batch_size: object) -> None:
    if (
        not isinstance(older_than, numbers.Real)
        or isinstance(older_than, bool)
        or not math.isfinite(float(older_than))
    ):
        raise InvalidValue(f"older_than must be a finite unix time in seconds, got {older_than!r}")
    if (
        not isinstance(batch_size, numbers.Integral)
        or isinstance(batch_size, bool)
        or batch_size < 1
    ):
        raise InvalidValue(f"batch_size must be an int >= 1, got {batch_size!r}")


def _listed(row: tuple) -> dict:
    """One row of ``list_records`` (columns in the order both stores select them)."""
    id_, rid, reward, av, task, created_at, qa, why, prompt, text = row
    return {
        "id": id_,
        "response_id": rid,
        "reward": reward,
        "adapter_version": av,
        "task": task,
        "created_at": created_at,
        "quarantined": qa is not None,
        "quarantined_at": qa,
        "quarantine_reason": why,
        "prompt": prompt,
        "response_text": text,
    }


class SqliteStore:
    """A :class:`~sona_plugin.store.base.TrajectoryStore` in one SQLite file.

    Thread-safe: one connection shared under a lock. Several processes may open the same
    file (WAL mode); each ``add`` is one transaction.

    Args:
        path: The database file (created with its parent directories if missing), or
            ``":memory:"`` for a throw-away store.
        busy_timeout_s: How long a write waits for another process's write lock.

    Raises:
        StateError: The file is not a database, or its schema is newer than this code.
    """

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so no implicit
        # transaction is ever left open between calls.
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            self.path, timeout=busy_timeout_s, check_same_thread=False, isolation_level=None
        )
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            check = self._conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":  # a corrupt file opens, then fails every later call
                raise sqlite3.DatabaseError(f"PRAGMA quick_check: {check}")
            self._migrate()
        except sqlite3.DatabaseError as e:
            self._conn.close()
            self._conn = None
            raise StateError(f"cannot open trajectory store {self.path}: {e}") from e
        except BaseException:
            self._conn.close()
            self._conn = None
            raise

    def _migrate(self) -> None:
        """Bring the file to :data:`SCHEMA_VERSION` in one transaction (all steps or none)."""
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")  # serialise with another process migrating
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"trajectory store {self.path} has schema version {version}; "
                    f"this sona_plugin reads up to {SCHEMA_VERSION} (upgrade it)"
                )
            start = version
            if version == 0:
                # A new file takes the same path as an old one: one schema, one history.
                conn.execute(_SCHEMA_V1)
                version = 1
            while version < SCHEMA_VERSION:
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement)
                version += 1
            if version != start:
                # user_version lives in the file header, written in this same transaction
                conn.execute(f"PRAGMA user_version={version}")
                logger.info("trajectory store %s: schema v%d -> v%d", self.path, start, version)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @property
    def schema_version(self) -> int:
        """The schema version of the open file."""
        with self._lock:
            return self._connection().execute("PRAGMA user_version").fetchone()[0]

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StateError(f"trajectory store {self.path} is closed")
        return self._conn

    def add(self, record: FeedbackRecord) -> int:
        """Store ``record`` durably and return its row id.

        The record is committed (WAL fsynced, ``synchronous=FULL``) before this returns.
        ``record`` itself is not modified.

        Raises:
            InvalidValue: A field is out of range (reward outside [-1, 1] or not finite,
                empty response_id, non-finite or non-1-D embedding), or feedback for this
                response_id is already stored. Nothing is written in either case.
        """
        row = _validated_row(record)
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                cur = conn.execute(
                    "INSERT INTO feedback (response_id, prompt, prompt_ids, response_ids, "
                    "response_text, reward, embedding, embedding_dim, adapter_version, "
                    "created_at, task, quarantined_at, quarantine_reason) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
                conn.execute("COMMIT")
            except sqlite3.IntegrityError as e:
                conn.execute("ROLLBACK")
                raise DuplicateFeedback(
                    f"feedback for response {record.response_id!r} already stored"
                ) from e
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return int(cur.lastrowid)

    def get(self, response_id: str) -> FeedbackRecord | None:
        """The record for ``response_id`` (quarantined or not), or None."""
        with self._lock:
            row = (
                self._connection()
                .execute(f"SELECT {_COLUMNS} FROM feedback WHERE response_id = ?", (response_id,))
                .fetchone()
            )
        return None if row is None else _record(row)

    def has(self, response_id: str) -> bool:
        """Whether feedback for ``response_id`` is stored (quarantined records count, so a
        second feedback for a quarantined response is still refused)."""
        with self._lock:
            return (
                self._connection()
                .execute("SELECT 1 FROM feedback WHERE response_id = ?", (response_id,))
                .fetchone()
                is not None
            )

    def records(self, since_id: int = 0, limit: int | None = None) -> list[FeedbackRecord]:
        """Live records with row id > ``since_id``, oldest first, at most ``limit`` of them.

        Quarantined records are left out: this is what the trainer reads.
        """
        _check_records_limit(limit)
        with self._lock:
            rows = (
                self._connection()
                .execute(
                    f"SELECT {_COLUMNS} FROM feedback WHERE id > ? AND quarantined_at IS NULL "
                    f"ORDER BY id LIMIT ?",
                    (int(since_id), -1 if limit is None else int(limit)),
                )
                .fetchall()
            )
        return [_record(r) for r in rows]

    def records_with_ids(self, ids: Sequence[int]) -> list[FeedbackRecord]:
        """The live records among row ids ``ids``, oldest first (unknown, deleted and
        quarantined ids are left out); read in chunks of ``IDS_PER_QUERY``."""
        wanted = sorted({int(i) for i in ids})
        rows: list[tuple] = []
        with self._lock:
            conn = self._connection()
            for s in range(0, len(wanted), IDS_PER_QUERY):
                chunk = wanted[s : s + IDS_PER_QUERY]
                rows += conn.execute(
                    f"SELECT {_COLUMNS} FROM feedback WHERE quarantined_at IS NULL AND id IN "
                    f"({','.join('?' * len(chunk))}) ORDER BY id",
                    chunk,
                ).fetchall()
        return [_record(r) for r in rows]

    def count(self, since_id: int = 0) -> int:
        """How many live records have a row id above ``since_id`` (quarantined ones are not
        counted). Reads only the small ``feedback_live`` index, so polling it is cheap."""
        with self._lock:
            return self._connection().execute(_COUNT_SQL, (int(since_id),)).fetchone()[0]

    def quarantine(self, response_id: str, reason: str = "") -> FeedbackRecord:
        """Take the record for ``response_id`` out of training for good, keeping it stored.

        ``records`` and ``count`` skip it from now on; ``has`` and ``get`` still find it,
        so a second feedback for that response stays refused. Quarantining an already
        quarantined record changes nothing (a retried admin request is harmless): the
        first time and reason stand. Committed before this returns.

        Args:
            response_id: The response whose feedback to quarantine.
            reason: Why, for the operator (stored with the record).

        Returns:
            The record as now stored, with ``quarantined_at`` and ``quarantine_reason``.

        Raises:
            UnknownRecord: No record for ``response_id`` is stored.
            InvalidValue: ``reason`` is not a str.
        """
        if not isinstance(reason, str):
            raise InvalidValue(f"reason must be a str, got {reason!r}")
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "UPDATE feedback SET quarantined_at = ?, quarantine_reason = ? "
                    "WHERE response_id = ? AND quarantined_at IS NULL",
                    (time.time(), reason, response_id),
                )
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM feedback WHERE response_id = ?", (response_id,)
                ).fetchone()
                if row is None:
                    raise _unknown(response_id)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        logger.info("quarantined feedback for response %r: %s", response_id, reason or "-")
        return _record(row)

    def delete(self, response_id: str) -> None:
        """Remove the record for ``response_id`` for good (committed before this returns).

        Feedback for that response may be given again afterwards. Row ids are never
        reused (AUTOINCREMENT), so a trainer's ``since_id`` stays valid.

        Raises:
            UnknownRecord: No record for ``response_id`` is stored.
        """
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                cur = conn.execute("DELETE FROM feedback WHERE response_id = ?", (response_id,))
                if cur.rowcount == 0:
                    raise _unknown(response_id)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        logger.info("deleted feedback for response %r", response_id)

    def list_records(
        self, since_id: int = 0, limit: int = 100, include_quarantined: bool = True
    ) -> list[dict]:
        """A page of records for an admin view: row id > ``since_id``, oldest first.

        Each dict holds ``id``, ``response_id``, ``reward``, ``adapter_version``, ``task``,
        ``created_at``, ``quarantined`` (bool), ``quarantined_at``, ``quarantine_reason``,
        and ``prompt`` and ``response_text`` cut to :data:`LIST_TEXT_CHARS` characters (in
        SQL, so a long text is never read whole). No embeddings or token ids. Page on by
        passing the last ``id`` seen as ``since_id``.

        Raises:
            InvalidValue: ``limit`` is not an int in 1..:data:`LIST_LIMIT_MAX`.
        """
        _check_list_limit(limit)
        live_only = "" if include_quarantined else "AND quarantined_at IS NULL "
        with self._lock:
            rows = (
                self._connection()
                .execute(
                    "SELECT id, response_id, reward, adapter_version, task, created_at, "
                    "quarantined_at, quarantine_reason, substr(prompt, 1, ?), "
                    f"substr(response_text, 1, ?) FROM feedback WHERE id > ? {live_only}"
                    "ORDER BY id LIMIT ?",
                    (LIST_TEXT_CHARS, LIST_TEXT_CHARS, int(since_id), int(limit)),
                )
                .fetchall()
            )
        return [_listed(row) for row in rows]

    def prune(self, older_than: float, *, batch_size: int = PRUNE_BATCH) -> int:
        """Delete every record (quarantined or not) created before ``older_than``.

        Works in transactions of at most ``batch_size`` rows, each committed before the
        next, and lets other threads in between, so ``add`` never waits long behind a big
        prune. Interrupted, it leaves whole batches deleted and the rest intact.

        Args:
            older_than: Unix time in seconds; records with ``created_at`` below it go.
            batch_size: Rows per transaction.

        Returns:
            How many records were deleted.

        Raises:
            InvalidValue: ``older_than`` is not a finite number, or ``batch_size`` < 1.
        """
        _check_prune_args(older_than, batch_size)
        total = 0
        while True:
            with self._lock:
                conn = self._connection()
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    n = conn.execute(
                        "DELETE FROM feedback WHERE id IN (SELECT id FROM feedback "
                        "WHERE created_at < ? LIMIT ?)",
                        (float(older_than), int(batch_size)),
                    ).rowcount
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            total += n
            if n < batch_size:
                break
        if total:
            logger.info("pruned %d feedback records created before %s", total, older_than)
        return total

    def close(self) -> None:
        """Close the file; later calls raise StateError. Closing twice is harmless."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"
