"""The embedded trajectory store: one SQLite file, durable on every ``add``.

Durability: the database runs in WAL journal mode with ``synchronous=FULL``, and every
``add`` is its own committed transaction, so the WAL is fsynced before ``add`` returns —
an acknowledged record survives a process kill and a power loss. WAL also lets other
processes read while one writes; writers from several processes wait up to
``busy_timeout_s`` for the write lock.

Schema versions live in SQLite's ``PRAGMA user_version``: 0 means an empty file (the
schema is created), a version newer than :data:`SCHEMA_VERSION` is refused with
:class:`~sona_plugin.errors.StateError` rather than misread.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import sqlite3
import threading
from pathlib import Path

import numpy as np

from ..errors import DuplicateFeedback, InvalidValue, StateError
from .base import FeedbackRecord

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
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

_COLUMNS = ("id, response_id, prompt, prompt_ids, response_ids, response_text, reward, "
            "embedding, embedding_dim, adapter_version, created_at, task")


def _token_ids(name: str, ids: object) -> list[int]:
    try:
        items = list(ids)  # type: ignore[call-overload]
    except TypeError:
        items = None
    if items is None or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                for t in items):
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
    if (not isinstance(reward, numbers.Real) or isinstance(reward, bool)
            or not math.isfinite(float(reward)) or not -1.0 <= float(reward) <= 1.0):
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
    return (
        r.response_id, r.prompt,
        json.dumps(_token_ids("prompt_ids", r.prompt_ids)),
        json.dumps(_token_ids("response_ids", r.response_ids)),
        r.response_text, float(reward),
        emb.astype("<f4").tobytes(), int(emb.size),
        None if av is None else int(av), float(r.created_at), r.task,
    )


def _record(row: tuple) -> FeedbackRecord:
    (id_, response_id, prompt, prompt_ids, response_ids, response_text, reward, emb,
     dim, adapter_version, created_at, task) = row
    embedding = np.frombuffer(emb, dtype="<f4").astype(np.float32)
    if embedding.size != dim:
        raise StateError(f"feedback row {id_}: embedding holds {embedding.size} floats, "
                         f"embedding_dim says {dim}")
    return FeedbackRecord(
        response_id=response_id, prompt=prompt, prompt_ids=json.loads(prompt_ids),
        response_ids=json.loads(response_ids), response_text=response_text,
        reward=reward, embedding=embedding, adapter_version=adapter_version,
        created_at=created_at, task=task, id=id_,
    )


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
            self.path, timeout=busy_timeout_s, check_same_thread=False, isolation_level=None)
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
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")  # serialise with another process migrating
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StateError(f"trajectory store {self.path} has schema version {version}; "
                                 f"this sona_plugin reads up to {SCHEMA_VERSION} (upgrade it)")
            if version == 0:
                conn.execute(_SCHEMA_V1)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                logger.info("created trajectory store schema v%d in %s", SCHEMA_VERSION,
                            self.path)
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
                    "created_at, task) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
                conn.execute("COMMIT")
            except sqlite3.IntegrityError as e:
                conn.execute("ROLLBACK")
                raise DuplicateFeedback(f"feedback for response {record.response_id!r} already "
                                   f"stored") from e
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return int(cur.lastrowid)

    def get(self, response_id: str) -> FeedbackRecord | None:
        """The record for ``response_id``, or None."""
        with self._lock:
            row = self._connection().execute(
                f"SELECT {_COLUMNS} FROM feedback WHERE response_id = ?",
                (response_id,)).fetchone()
        return None if row is None else _record(row)

    def has(self, response_id: str) -> bool:
        """Whether feedback for ``response_id`` is stored."""
        with self._lock:
            return self._connection().execute(
                "SELECT 1 FROM feedback WHERE response_id = ?", (response_id,)
            ).fetchone() is not None

    def records(self, since_id: int = 0, limit: int | None = None) -> list[FeedbackRecord]:
        """Records with row id > ``since_id``, oldest first, at most ``limit`` of them."""
        if limit is not None and limit < 0:
            raise InvalidValue(f"limit must be >= 0 or None, got {limit}")
        with self._lock:
            rows = self._connection().execute(
                f"SELECT {_COLUMNS} FROM feedback WHERE id > ? ORDER BY id LIMIT ?",
                (int(since_id), -1 if limit is None else int(limit))).fetchall()
        return [_record(r) for r in rows]

    def count(self, since_id: int = 0) -> int:
        """How many records are stored (with a row id above ``since_id``)."""
        with self._lock:
            return self._connection().execute("SELECT COUNT(*) FROM feedback WHERE id > ?",
                                              (int(since_id),)).fetchone()[0]

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
