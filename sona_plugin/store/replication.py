"""Replicas that learn as one: the instant updates as one ordered log in PostgreSQL, and
feedback handed to the replica that holds the response.

Every replica of a deployment shares one :class:`~.postgres.PostgresStore`. Two tables
sit beside its ``feedback`` table (created on first use, ``IF NOT EXISTS``):

``sona_instant_log``
    The MicroLoRA's history, one row per change, numbered by ``seq``: ``set`` (the whole
    A and B: a snapshot), ``delta`` (add dA and dB: one feedback's instant update) or
    ``scale`` (A times ``factor``: the decay after a new BaseLoRA version). A replica's
    MicroLoRA is the latest ``set`` at or below what it has read, with every later row
    applied in ``seq`` order; every replica applies the same float32 operations to the same
    values in the same order, so all of them hold bit-identical weights once they have
    read the same ``seq``. Appends take a transaction-level advisory lock and hold it
    until their commit is visible, so rows become visible in ``seq`` order (as the
    store's own ``add``): a replica that has read up to N never later finds a row below N.
    Each append sends ``NOTIFY sona_instant``; a trainer that moves the registry's CURRENT
    sends ``NOTIFY sona_registry``.

``sona_micro_bound``
    One row: the MicroLoRA's norm bound (``||s·B·A||_F``) that the trainer's drift check
    last set, with ``as_of``, the last feedback record that check covered. Every replica
    bounds its instant updates by it (a ``delta`` is computed by the replica that took the
    feedback, under its own bound, and applied everywhere). A write with an older
    ``as_of`` than the row's (a replica restoring an older version's state) changes
    nothing.

``sona_forward``
    A feedback posted to a replica that did not generate the response. The replica that
    received it inserts a ``pending`` row and sends ``NOTIFY sona_forward``; the replica
    holding the response's recording claims it (``pending`` -> ``claimed``, one winner),
    stores the record and logs its instant update as if the feedback had come to it, then
    writes the outcome (``done`` with the result, ``duplicate``, ``error``). The receiving
    replica waits for that outcome; when nobody claims the row in time it cancels it
    (``pending`` -> ``cancelled``, so a late claim cannot succeed) and answers "unknown
    response". Nothing is written per generated request: the cost is paid only by a
    feedback that reaches another replica (one round trip through the database and the
    holder's wake-up, measured in ``benchmarks/replicas.py``).

:class:`Listener` holds a dedicated connection that ``LISTEN``s on the three channels; replicas
also poll, so a lost notification (a dropped connection) delays a change by at most one
poll.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg

from ..errors import InvalidValue, StateError
from .postgres import _LOCK_NAMESPACE, PostgresStore

logger = logging.getLogger(__name__)

__all__ = ["FORWARD_STATES", "Forward", "Listener", "LogEntry", "ReplicaLog", "replica_log_for"]

# pg_advisory_xact_lock(key1, key2) keys beside the store's (1: migrate, 2: add)
_LOCK_SCHEMA = 3
_LOCK_APPEND = 4

INSTANT_CHANNEL = "sona_instant"
FORWARD_CHANNEL = "sona_forward"
REGISTRY_CHANNEL = "sona_registry"
FORWARD_STATES = ("pending", "claimed", "done", "duplicate", "error", "cancelled")

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS sona_instant_log (
        seq         BIGSERIAL        PRIMARY KEY,
        kind        TEXT             NOT NULL CHECK (kind IN ('set', 'delta', 'scale')),
        replica     TEXT             NOT NULL,
        response_id TEXT,
        a           BYTEA,
        b           BYTEA,
        shape_a     TEXT,
        shape_b     TEXT,
        factor      DOUBLE PRECISION,
        created_at  DOUBLE PRECISION NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS sona_forward (
        id           BIGSERIAL        PRIMARY KEY,
        response_id  TEXT             NOT NULL,
        idx          INTEGER          NOT NULL,
        reward       DOUBLE PRECISION NOT NULL,
        store_id     TEXT,
        state        TEXT             NOT NULL DEFAULT 'pending',
        requested_by TEXT             NOT NULL,
        claimed_by   TEXT,
        result       TEXT,
        requested_at DOUBLE PRECISION NOT NULL,
        finished_at  DOUBLE PRECISION
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS sona_micro_bound (
        one_row  BOOLEAN          PRIMARY KEY DEFAULT TRUE CHECK (one_row),
        norm_cap DOUBLE PRECISION NOT NULL,
        as_of    BIGINT           NOT NULL,
        set_by   TEXT             NOT NULL,
        set_at   DOUBLE PRECISION NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS sona_forward_pending ON sona_forward (id) WHERE state = 'pending'",
)

_LOG_COLUMNS = "seq, kind, replica, response_id, a, b, shape_a, shape_b, factor, created_at"


def replica_name() -> str:
    """A name for this process among the replicas: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class LogEntry:
    """One row of the instant log."""

    seq: int
    kind: str  # "set" | "delta" | "scale"
    replica: str  # who appended it
    response_id: str | None  # the feedback of a "delta"
    a: np.ndarray | None  # "set": A; "delta": dA
    b: np.ndarray | None  # "set": B; "delta": dB
    factor: float | None  # "scale"
    created_at: float

    def apply(self, A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) after this entry, as new float32 arrays (the inputs are not changed).

        ``scale`` multiplies A as :meth:`MicroLoRA.shrink` does, so a decay reaches the
        same bits whether it was applied locally or read from the log."""
        if self.a is not None and (self.a.shape != A.shape or self.b.shape != B.shape):
            raise StateError(
                f"instant log entry {self.seq} has shapes {self.a.shape}/{self.b.shape}, "
                f"this replica's MicroLoRA {A.shape}/{B.shape}: replicas of one "
                "deployment must run one MicroLoRA config (hidden size, rank)"
            )
        if self.kind == "set":
            return self.a.copy(), self.b.copy()
        if self.kind == "delta":
            return (A + self.a).astype(np.float32), (B + self.b).astype(np.float32)
        return (A * np.float32(self.factor)).astype(np.float32), B.copy()


@dataclass(frozen=True)
class Forward:
    """A feedback waiting for the replica that holds its response."""

    id: int
    response_id: str
    index: int
    reward: float
    store_id: str | None
    requested_by: str


def _blob(x: np.ndarray | None) -> tuple[bytes | None, str | None]:
    if x is None:
        return None, None
    x = np.ascontiguousarray(x, np.float32)
    return x.tobytes(), json.dumps(list(x.shape))


def _array(blob: bytes | None, shape: str | None) -> np.ndarray | None:
    if blob is None:
        return None
    return np.frombuffer(bytes(blob), np.float32).reshape(json.loads(shape)).copy()


def _entry(row: tuple) -> LogEntry:
    seq, kind, replica, rid, a, b, sa, sb, factor, at = row
    return LogEntry(int(seq), kind, replica, rid, _array(a, sa), _array(b, sb), factor, at)


class ReplicaLog:
    """The instant log and the forwarded feedback of one deployment (module docstring).

    Thread-safe: every call borrows a connection from the store's pool.

    Args:
        store: The deployment's shared store.
        name: This replica's name in the log (default: :func:`replica_name`).
    """

    def __init__(self, store: PostgresStore, name: str | None = None) -> None:
        self.store = store
        self.name = name or replica_name()
        with store._connection() as conn, conn.transaction():
            # two replicas starting at once: one creates, the other finds them made
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NAMESPACE, _LOCK_SCHEMA))
            for statement in _SCHEMA:
                conn.execute(statement)

    # -- the instant log ------------------------------------------------------------------
    def _append(
        self,
        kind: str,
        *,
        response_id: str | None = None,
        a: np.ndarray | None = None,
        b: np.ndarray | None = None,
        factor: float | None = None,
        if_head: int | None = None,
        if_empty: bool = False,
    ) -> int | None:
        (ab, sa), (bb, sb) = _blob(a), _blob(b)
        with self.store._connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NAMESPACE, _LOCK_APPEND))
            if if_head is not None or if_empty:
                head = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM sona_instant_log").fetchone()
                if (if_empty and head[0] != 0) or (if_head is not None and head[0] != if_head):
                    return None
            seq = conn.execute(
                "INSERT INTO sona_instant_log (kind, replica, response_id, a, b, shape_a, "
                "shape_b, factor, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "RETURNING seq",
                (kind, self.name, response_id, ab, bb, sa, sb, factor, time.time()),
            ).fetchone()[0]
            conn.execute("SELECT pg_notify(%s, %s)", (INSTANT_CHANNEL, str(seq)))
        return int(seq)

    def append_delta(self, response_id: str, dA: np.ndarray, dB: np.ndarray) -> int:
        """Log one feedback's instant update; returns its ``seq``."""
        return self._append("delta", response_id=response_id, a=dA, b=dB)

    def append_scale(self, factor: float) -> int:
        """Log a decay of the MicroLoRA (``A *= factor``); returns its ``seq``."""
        f = float(factor)
        if not (np.isfinite(f) and 0.0 <= f <= 1.0):
            raise InvalidValue(f"factor must be in [0, 1], got {factor!r}")
        return self._append("scale", factor=f)

    def append_snapshot(self, A: np.ndarray, B: np.ndarray, *, at_head: int) -> int | None:
        """Log the whole MicroLoRA, only if the log's last ``seq`` is still ``at_head`` (the
        state the caller has read up to); returns its ``seq``, or None when the log moved
        on meanwhile (nothing written)."""
        return self._append("set", a=A, b=B, if_head=at_head)

    def start(self, A: np.ndarray, B: np.ndarray) -> int | None:
        """Log ``A``/``B`` as the first snapshot when the log is empty (the first replica of a
        deployment starts everyone from its MicroLoRA); None when it was not empty."""
        return self._append("set", a=A, b=B, if_empty=True)

    def head(self) -> int:
        """The last ``seq`` (0: an empty log)."""
        with self.store._connection() as conn:
            return int(
                conn.execute("SELECT COALESCE(MAX(seq), 0) FROM sona_instant_log").fetchone()[0]
            )

    def entries(self, after: int, limit: int = 1000) -> list[LogEntry]:
        """Up to ``limit`` entries with ``seq > after``, oldest first."""
        with self.store._connection() as conn:
            rows = conn.execute(
                f"SELECT {_LOG_COLUMNS} FROM sona_instant_log WHERE seq > %s ORDER BY seq LIMIT %s",
                (after, limit),
            ).fetchall()
        return [_entry(r) for r in rows]

    def catch_up_from(self, after: int) -> int:
        """Where a replica that has read up to ``after`` starts reading: ``after`` itself
        when every later entry is still in the log, else just below the latest snapshot
        (older entries were pruned)."""
        with self.store._connection() as conn:
            first, snap = conn.execute(
                "SELECT MIN(seq), MAX(seq) FILTER (WHERE kind = 'set') FROM sona_instant_log"
            ).fetchone()
        if first is None or snap is None:
            return after
        if after >= first - 1 and after >= 0:
            return after
        return int(snap) - 1

    def latest_snapshot(self) -> int | None:
        """The ``seq`` of the newest ``set`` entry (None: none)."""
        with self.store._connection() as conn:
            row = conn.execute(
                "SELECT MAX(seq) FROM sona_instant_log WHERE kind = 'set'"
            ).fetchone()
        return None if row[0] is None else int(row[0])

    def prune(self, before_seq: int) -> int:
        """Delete entries below ``before_seq`` (callers keep the latest snapshot); returns
        how many went."""
        with self.store._connection() as conn:
            cur = conn.execute("DELETE FROM sona_instant_log WHERE seq < %s", (before_seq,))
            return cur.rowcount

    # -- the MicroLoRA's norm bound ------------------------------------------------------------
    def set_norm_cap(self, cap: float, as_of: int) -> float:
        """Make ``cap`` every replica's MicroLoRA norm bound, unless the bound in the store
        was set as of a later record than ``as_of``; returns the bound in force."""
        c = float(cap)
        if not (np.isfinite(c) and c > 0):
            raise InvalidValue(f"norm_cap must be a positive number, got {cap!r}")
        with self.store._connection() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO sona_micro_bound (norm_cap, as_of, set_by, set_at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (one_row) DO UPDATE SET "
                "norm_cap = EXCLUDED.norm_cap, as_of = EXCLUDED.as_of, "
                "set_by = EXCLUDED.set_by, set_at = EXCLUDED.set_at "
                "WHERE sona_micro_bound.as_of <= EXCLUDED.as_of",
                (c, int(as_of), self.name, time.time()),
            )
            conn.execute("SELECT pg_notify(%s, %s)", (INSTANT_CHANNEL, "bound"))
            return float(conn.execute("SELECT norm_cap FROM sona_micro_bound").fetchone()[0])

    def norm_cap(self) -> float | None:
        """The deployment's MicroLoRA norm bound (None: no drift check has set one)."""
        with self.store._connection() as conn:
            row = conn.execute("SELECT norm_cap FROM sona_micro_bound").fetchone()
        return None if row is None else float(row[0])

    def notify_published(self, version: int) -> None:
        """Tell the replicas that the registry's CURRENT now names ``version``."""
        with self.store._connection() as conn:
            conn.execute("SELECT pg_notify(%s, %s)", (REGISTRY_CHANNEL, str(version)))

    # -- forwarded feedback ---------------------------------------------------------------
    def forward(
        self, response_id: str, index: int, reward: float, store_id: str | None = None
    ) -> int:
        """Ask the replica holding ``response_id`` to take this feedback; returns the
        request's id (see :meth:`outcome`)."""
        with self.store._connection() as conn, conn.transaction():
            fid = conn.execute(
                "INSERT INTO sona_forward (response_id, idx, reward, store_id, requested_by, "
                "requested_at) VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
                (response_id, index, reward, store_id, self.name, time.time()),
            ).fetchone()[0]
            conn.execute("SELECT pg_notify(%s, %s)", (FORWARD_CHANNEL, str(fid)))
        return int(fid)

    def pending_forwards(self, limit: int = 100) -> list[Forward]:
        """Unclaimed forwarded feedback, oldest first (other replicas' requests only)."""
        with self.store._connection() as conn:
            rows = conn.execute(
                "SELECT id, response_id, idx, reward, store_id, requested_by FROM sona_forward "
                "WHERE state = 'pending' AND requested_by <> %s ORDER BY id LIMIT %s",
                (self.name, limit),
            ).fetchall()
        return [Forward(int(r[0]), r[1], int(r[2]), float(r[3]), r[4], r[5]) for r in rows]

    def _move(self, fid: int, frm: str, to: str, **cols: Any) -> bool:
        sets = ", ".join(f"{k} = %s" for k in ["state", *cols])
        with self.store._connection() as conn:
            cur = conn.execute(
                f"UPDATE sona_forward SET {sets} WHERE id = %s AND state = %s",
                (to, *cols.values(), fid, frm),
            )
            return cur.rowcount == 1

    def claim(self, fid: int) -> bool:
        """Take forwarded feedback ``fid`` for this replica; False when another replica
        claimed it or its requester gave up."""
        return self._move(fid, "pending", "claimed", claimed_by=self.name)

    def finish(self, fid: int, state: str, result: dict | str) -> None:
        """Record the outcome of a claimed forward (``done``, ``duplicate`` or ``error``)."""
        if state not in ("done", "duplicate", "error"):
            raise InvalidValue(f"state must be done, duplicate or error, got {state!r}")
        text = json.dumps(result) if isinstance(result, dict) else str(result)
        self._move(fid, "claimed", state, result=text, finished_at=time.time())

    def cancel(self, fid: int) -> bool:
        """Withdraw an unclaimed request; False when a replica has claimed it already."""
        return self._move(fid, "pending", "cancelled", finished_at=time.time())

    def outcome(self, fid: int) -> tuple[str, str | None]:
        """(state, result text) of forwarded feedback ``fid``."""
        with self.store._connection() as conn:
            row = conn.execute(
                "SELECT state, result FROM sona_forward WHERE id = %s", (fid,)
            ).fetchone()
        if row is None:
            raise StateError(f"forwarded feedback {fid} is gone from the store")
        return row[0], row[1]

    def await_outcome(
        self, fid: int, claim_timeout_s: float, done_timeout_s: float, poll_s: float = 0.005
    ) -> tuple[str, str | None]:
        """Wait for forwarded feedback ``fid``: up to ``claim_timeout_s`` for a replica to
        claim it (then it is cancelled: ``("cancelled", None)``), and once claimed up to
        ``done_timeout_s`` more for the outcome (then ``("claimed", None)``)."""
        t0 = time.monotonic()
        claimed_at = None
        while True:
            state, result = self.outcome(fid)
            if state not in ("pending", "claimed"):
                return state, result
            now = time.monotonic()
            if state == "pending" and now - t0 >= claim_timeout_s and self.cancel(fid):
                return "cancelled", None
            if state == "claimed":
                claimed_at = claimed_at or now
                if now - claimed_at >= done_timeout_s:
                    return "claimed", None
            time.sleep(poll_s)

    def prune_forwards(self, older_than_s: float = 3600.0) -> int:
        """Delete forwards older than ``older_than_s`` seconds, settled or not: a requester
        waits at most ``FORWARD_CLAIM_S + FORWARD_DONE_S`` (33 s), so an older row still
        pending or claimed belongs to a replica that died and will never be read."""
        with self.store._connection() as conn:
            cur = conn.execute(
                "DELETE FROM sona_forward WHERE requested_at < %s",
                (time.time() - older_than_s,),
            )
            return cur.rowcount


class Listener:
    """``LISTEN`` on the replica channels on a connection of its own.

    :meth:`wait` returns as soon as a notification arrives (or after ``timeout``); a dead
    connection is reopened at the next call, and the caller's poll covers what was missed.
    """

    def __init__(self, store: PostgresStore) -> None:
        self._conninfo = store._conninfo
        self._url = store.url
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()

    def _connect(self) -> psycopg.Connection:
        conn = psycopg.connect(
            self._conninfo, autocommit=True, application_name="sona-replica-listener"
        )
        conn.execute(f"LISTEN {INSTANT_CHANNEL}")
        conn.execute(f"LISTEN {FORWARD_CHANNEL}")
        conn.execute(f"LISTEN {REGISTRY_CHANNEL}")
        return conn

    def wait(self, timeout: float) -> set[str]:
        """The channels notified within ``timeout`` seconds (empty: none, or no connection;
        then it sleeps out the timeout)."""
        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._connect()
                got: set[str] = set()
                for n in self._conn.notifies(timeout=timeout, stop_after=1):
                    got.add(n.channel)
                # drain whatever else is queued without waiting
                for n in self._conn.notifies(timeout=0):
                    got.add(n.channel)
                return got
            except psycopg.Error as e:
                logger.warning("replica listener on %s: %s; polling meanwhile", self._url, e)
                self.close_locked()
        time.sleep(timeout)
        return set()

    def close_locked(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()


def replica_log_for(store: object) -> ReplicaLog | None:
    """A :class:`ReplicaLog` on ``store`` when it is a PostgreSQL store (replicas may share
    it), else None (a SQLite store has one server: nothing to replicate)."""
    if isinstance(store, PostgresStore):
        return ReplicaLog(store)
    return None
