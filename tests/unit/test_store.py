"""SqliteStore: every field round-trips, acknowledged feedback survives kill -9, bad input
is refused without a trace, threads do not lose writes, newer schemas are refused, v1 files
are migrated, and the operator's quarantine/delete/list/prune do what the trainer relies on."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sona_plugin.errors import DuplicateFeedback, InvalidValue, StateError, UnknownRecord
from sona_plugin.store import (
    SCHEMA_VERSION,
    FeedbackRecord,
    SqliteStore,
    TrajectoryStore,
    open_store,
)
from sona_plugin.store import sqlite as sqlite_store

REPO = Path(__file__).resolve().parents[2]

# One source of truth for the records the crash subprocess writes and the test expects.
_MAKE_SRC = """
import numpy as np
from sona_plugin.store import FeedbackRecord

def make(i):
    rng = np.random.default_rng(i)
    return FeedbackRecord(
        response_id=f"resp-{i}", prompt=f"prompt {i} \\u00e9\\u4e2d", prompt_ids=[1, i, 2 ** 40],
        response_ids=list(range(i % 7)), response_text=f"answer {i}",
        reward=float(rng.uniform(-1, 1)), embedding=rng.standard_normal(16).astype(np.float32),
        adapter_version=None if i % 3 == 0 else i, created_at=1.7e9 + i * 0.125,
        task=None if i % 2 else f"task-{i % 5}")
"""
_ns: dict = {}
exec(_MAKE_SRC, _ns)
make = _ns["make"]

_WRITER_SRC = (
    _MAKE_SRC
    + """
import sys
from sona_plugin.store import SqliteStore
store = SqliteStore(sys.argv[1])
for i in range(int(sys.argv[2])):
    store.add(make(i))
    print(f"ACK {i}", flush=True)
"""
)


def assert_same(got: FeedbackRecord, want: FeedbackRecord) -> None:
    for name in (
        "response_id",
        "prompt",
        "prompt_ids",
        "response_ids",
        "response_text",
        "reward",
        "adapter_version",
        "created_at",
        "task",
        "quarantined_at",
        "quarantine_reason",
    ):
        assert getattr(got, name) == getattr(want, name), name
    assert got.embedding.dtype == np.float32
    assert got.embedding.tobytes() == np.asarray(want.embedding, np.float32).tobytes()


@pytest.fixture
def store(tmp_path):
    s = SqliteStore(tmp_path / "sona.db")
    yield s
    s.close()


def test_every_field_round_trips_and_survives_reopen(tmp_path):
    path = tmp_path / "state" / "sona.db"  # parent directory created on demand
    recs = [make(i) for i in range(6)]
    with SqliteStore(path) as s:
        assert isinstance(s, TrajectoryStore)
        ids = [s.add(r) for r in recs]
        assert ids == sorted(ids) and len(set(ids)) == 6
    with SqliteStore(path) as s:
        assert s.count() == 6
        for rid, r in zip(ids, recs):
            got = s.get(r.response_id)
            assert got is not None and got.id == rid
            assert_same(got, r)
        assert s.has("resp-3") and not s.has("resp-99")
        assert s.get("resp-99") is None
        assert [r.response_id for r in s.records()] == [f"resp-{i}" for i in range(6)]
        assert [r.id for r in s.records(since_id=ids[2], limit=2)] == ids[3:5]
        assert s.records(since_id=ids[-1]) == []
        assert s.records(limit=0) == []


def test_embedding_of_another_dtype_is_stored_as_float32(store):
    r = make(0)
    r.embedding = np.array([0.1, -2.5, 3e38], dtype=np.float64)
    store.add(r)
    got = store.get(r.response_id).embedding
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, r.embedding.astype(np.float32))


def test_durability_settings(store):
    assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store.schema_version == SCHEMA_VERSION


@pytest.mark.parametrize("kill_after", [0, 9, 37])
def test_acknowledged_records_survive_kill_9(tmp_path, kill_after):
    path = tmp_path / "sona.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER_SRC, str(path), "100000"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    acked = -1
    try:
        for line in proc.stdout:
            acked = int(line.split()[1])
            if acked == kill_after:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert acked == kill_after
    with SqliteStore(path) as s:
        n = s.count()
        assert n >= kill_after + 1  # every ACKed record is there
        recs = s.records()
        assert len(recs) == n
        for i, r in enumerate(recs):  # and so is nothing torn or out of order
            assert_same(r, make(i))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("reward", float("nan"), "reward"),
        ("reward", 1.5, "reward"),
        ("reward", -2, "reward"),
        ("reward", math.inf, "reward"),
        ("reward", "0.5", "reward"),
        ("response_id", "", "response_id"),
        ("response_id", 7, "response_id"),
        ("embedding", np.array([1.0, np.nan], np.float32), "embedding"),
        ("embedding", np.array([1.0, np.inf], np.float32), "embedding"),
        ("embedding", np.ones((2, 3), np.float32), "embedding"),
        ("embedding", np.ones(0, np.float32), "embedding"),
        ("prompt_ids", [1, 2.5], "prompt_ids"),
        ("response_ids", None, "response_ids"),
        ("adapter_version", "v1", "adapter_version"),
        ("quarantined_at", math.nan, "quarantined_at"),
        ("quarantine_reason", "why", "quarantine_reason"),  # a reason on a live record
    ],
)
def test_bad_values_are_refused_and_nothing_is_stored(store, field, value, match):
    store.add(make(0))
    r = make(1)
    setattr(r, field, value)
    with pytest.raises(InvalidValue, match=match) as ei:
        store.add(r)
    if field == "reward":
        assert str(value) in str(ei.value)  # the message shows the value seen
    assert store.count() == 1
    assert not store.has("resp-1")


def test_duplicate_response_id_is_refused_and_original_kept(store):
    first = make(4)
    store.add(first)
    dup = make(5)
    dup.response_id = first.response_id
    with pytest.raises(InvalidValue, match="feedback for response 'resp-4' already stored"):
        store.add(dup)
    assert store.count() == 1
    assert_same(store.get("resp-4"), first)
    store.add(make(6))  # the failed insert left no transaction open
    assert store.count() == 2


def test_concurrent_adds_from_four_threads_all_land(store):
    per, errors = 50, []

    def worker(t: int) -> None:
        try:
            for j in range(per):
                r = make(t * per + j)
                store.add(r)
                assert store.has(r.response_id)
                store.count()
        except BaseException as e:  # surfaced below; a thread's assert would be lost
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.count() == 4 * per
    recs = store.records()
    assert {r.response_id for r in recs} == {f"resp-{i}" for i in range(4 * per)}
    assert len({r.id for r in recs}) == 4 * per


def test_two_stores_on_one_file_see_each_others_writes(tmp_path):
    with SqliteStore(tmp_path / "s.db") as a, SqliteStore(tmp_path / "s.db") as b:
        a.add(make(0))
        assert b.has("resp-0")
        with pytest.raises(InvalidValue, match="already stored"):
            b.add(make(0))
        b.add(make(1))
        assert a.count() == 2


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "sona.db"
    with SqliteStore(path) as s:
        s.add(make(0))
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match=f"schema version {SCHEMA_VERSION + 1}"):
        SqliteStore(path)
    conn = sqlite3.connect(path)  # refusing did not rewrite the version or the data
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    assert conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 1
    conn.close()


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    path = tmp_path / "sona.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="cannot open"):
        SqliteStore(path)


def test_a_damaged_database_is_refused_at_open_naming_the_file(tmp_path):
    """A file whose header is intact but whose pages are damaged opens in SQLite and then
    fails every call; ``PRAGMA quick_check`` at open refuses it at once."""
    path = tmp_path / "sona.db"
    s = SqliteStore(path)
    for i in range(300):
        s.add(make(i))
    s.close()
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 6 * page
    for off in range(2 * page, 5 * page, 7):  # scribble over pages 3-5, header untouched
        data[off] = (data[off] * 31 + 17) % 256
    path.write_bytes(bytes(data))
    with pytest.raises(StateError, match=str(path)):
        SqliteStore(path)


def test_closed_store_refuses_use(tmp_path):
    s = SqliteStore(tmp_path / "sona.db")
    s.close()
    s.close()
    with pytest.raises(StateError, match="closed"):
        s.count()
    with pytest.raises(StateError, match="closed"):
        s.add(make(0))


def test_open_store_urls(tmp_path):
    for arg in (f"sqlite://{tmp_path}/a.db", str(tmp_path / "b.db"), tmp_path / "c.db"):
        s = open_store(arg)
        assert isinstance(s, SqliteStore)
        s.add(make(0))
        s.close()
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["a.db", "b.db", "c.db"]
    with SqliteStore(tmp_path / "a.db") as s:
        assert s.has("resp-0")
    with pytest.raises(StateError, match="cannot open trajectory store"):
        open_store("postgresql://user@127.0.0.1:1/db")  # nothing listens on port 1
    with pytest.raises(InvalidValue, match="mysql"):
        open_store("mysql://host/db")
    with pytest.raises(InvalidValue, match="names no file"):
        open_store("sqlite://")


# The v1 schema exactly as sona_plugin 0.x wrote it, kept here (not imported) so the
# migration test keeps testing real v1 files whatever the module's constants become.
_V1_DDL = """
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


def write_v1_file(path: Path, r: FeedbackRecord, extra_sql: str = "") -> int:
    """A v1 store file holding ``r``, written with plain sqlite3; returns its row id."""
    conn = sqlite3.connect(path)
    conn.executescript(_V1_DDL + extra_sql)
    emb = np.asarray(r.embedding, np.float32)
    cur = conn.execute(
        "INSERT INTO feedback (response_id, prompt, prompt_ids, response_ids, response_text, "
        "reward, embedding, embedding_dim, adapter_version, created_at, task) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            r.response_id,
            r.prompt,
            json.dumps(r.prompt_ids),
            json.dumps(r.response_ids),
            r.response_text,
            r.reward,
            emb.astype("<f4").tobytes(),
            emb.size,
            r.adapter_version,
            r.created_at,
            r.task,
        ),
    )
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    return int(cur.lastrowid)


def schema_of(path: Path) -> list[tuple]:
    conn = sqlite3.connect(path)
    rows = sorted(conn.execute("SELECT type, name, sql FROM sqlite_master").fetchall(), key=str)
    conn.close()
    return rows


def test_v1_file_is_migrated_to_v2_keeping_its_record(tmp_path):
    path = tmp_path / "v1.db"
    rid = write_v1_file(path, make(4))
    with SqliteStore(path) as s:
        assert s.schema_version == 2 == SCHEMA_VERSION
        assert s.count() == 1
        got = s.get("resp-4")
        assert got.id == rid and got.quarantined_at is None
        assert_same(got, make(4))
        s.quarantine("resp-4", "migrated and quarantined")  # the v2 columns work
        assert s.count() == 0
        assert s.add(make(5)) > rid
    with SqliteStore(path) as s:  # a second open finds v2 and migrates nothing
        assert s.schema_version == 2
        assert [r.response_id for r in s.records()] == ["resp-5"]
    with SqliteStore(tmp_path / "fresh.db"):
        pass
    # a migrated file and a new one have the same tables, columns and indexes
    assert schema_of(path) == schema_of(tmp_path / "fresh.db")


def test_a_failed_migration_leaves_the_v1_file_as_it_was(tmp_path):
    """The second v1->v2 step fails on a hand-edited file; the first must be undone too."""
    path = tmp_path / "v1.db"
    write_v1_file(path, make(2), "ALTER TABLE feedback ADD COLUMN quarantine_reason TEXT;")
    before = schema_of(path)
    with pytest.raises(StateError, match=str(path)):
        SqliteStore(path)
    assert schema_of(path) == before  # no quarantined_at column, no index
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert conn.execute("SELECT response_id FROM feedback").fetchall() == [("resp-2",)]
    conn.close()


def test_quarantined_record_is_never_trained_on_and_still_blocks_new_feedback(tmp_path):
    path = tmp_path / "sona.db"
    with SqliteStore(path) as s:
        ids = [s.add(make(i)) for i in range(4)]
        q = s.quarantine("resp-1", "prompt injection")
        assert q.id == ids[1] and q.quarantine_reason == "prompt injection"
        assert q.quarantined_at is not None and math.isfinite(q.quarantined_at)
        assert_same(
            q,
            replace(make(1), quarantined_at=q.quarantined_at, quarantine_reason="prompt injection"),
        )
        assert [r.response_id for r in s.records()] == ["resp-0", "resp-2", "resp-3"]
        assert s.count() == 3 and s.count(since_id=ids[0]) == 2
        assert s.has("resp-1")
        with pytest.raises(DuplicateFeedback, match="resp-1"):
            s.add(make(1))
        again = s.quarantine("resp-1", "other reason")  # a retried request changes nothing
        assert (again.quarantined_at, again.quarantine_reason) == (
            q.quarantined_at,
            "prompt injection",
        )
    with SqliteStore(path) as s:  # committed, not just cached
        assert s.count() == 3
        assert "resp-1" not in {r.response_id for r in s.records()}
        assert s.get("resp-1").quarantine_reason == "prompt injection"


def test_count_reads_the_small_live_index(store):
    plan = store._conn.execute("EXPLAIN QUERY PLAN " + sqlite_store._COUNT_SQL, (0,)).fetchall()
    assert "COVERING INDEX feedback_live" in str(plan), plan


def test_delete_removes_the_record_for_good(tmp_path):
    path = tmp_path / "sona.db"
    with SqliteStore(path) as s:
        ids = [s.add(make(i)) for i in range(3)]
        s.quarantine("resp-0")
        assert s.delete("resp-0") is None
        s.delete("resp-2")
        assert not s.has("resp-0") and s.get("resp-2") is None
    with SqliteStore(path) as s:
        assert [r.response_id for r in s.records()] == ["resp-1"]
        assert [d["response_id"] for d in s.list_records()] == ["resp-1"]
        # the deleted newest id is not handed out again: a trainer's since_id stays valid
        assert s.add(make(2)) > ids[2]


@pytest.mark.parametrize("op", ["quarantine", "delete"])
def test_unknown_response_id_raises_unknown_record_naming_it(store, op):
    store.add(make(0))
    with pytest.raises(UnknownRecord, match="'resp-404'") as ei:
        getattr(store, op)("resp-404")
    assert isinstance(ei.value, InvalidValue)
    assert store.count() == 1 and store.has("resp-0")
    store.add(make(1))  # the failed call left no transaction open


def test_list_records_fields_and_truncation(store):
    long = make(0)
    long.prompt = "\u00e9\u4e2d" * 150  # 300 characters, 750 bytes of UTF-8
    long.response_text = "x" * 199 + "yz"
    store.add(long)
    store.add(make(1))
    store.add(make(2))
    store.quarantine("resp-1", "spam")
    rows = store.list_records()
    assert [d["response_id"] for d in rows] == ["resp-0", "resp-1", "resp-2"]
    first = rows[0]
    assert set(first) == {
        "id",
        "response_id",
        "reward",
        "adapter_version",
        "task",
        "created_at",
        "quarantined",
        "quarantined_at",
        "quarantine_reason",
        "prompt",
        "response_text",
    }
    assert first["prompt"] == long.prompt[:200] and len(first["prompt"]) == 200
    assert first["response_text"] == "x" * 199 + "y"
    assert (first["reward"], first["adapter_version"], first["task"], first["created_at"]) == (
        long.reward,
        long.adapter_version,
        long.task,
        long.created_at,
    )
    assert first["quarantined"] is False and first["quarantine_reason"] is None
    assert rows[1]["quarantined"] is True and rows[1]["quarantine_reason"] == "spam"
    assert rows[1]["quarantined_at"] is not None
    assert rows[2]["prompt"] == make(2).prompt  # short texts are whole
    assert [d["response_id"] for d in store.list_records(include_quarantined=False)] == [
        "resp-0",
        "resp-2",
    ]
    page = store.list_records(since_id=first["id"], limit=1)
    assert [d["response_id"] for d in page] == ["resp-1"]


@pytest.mark.parametrize("limit", [0, -1, 1001, 2.5, True, None, "10"])
def test_list_records_limit_must_be_1_to_1000(store, limit):
    store.add(make(0))
    with pytest.raises(InvalidValue, match=f"limit must be an int in 1..1000, got {limit!r}"):
        store.list_records(limit=limit)


def test_list_records_limit_bounds_are_accepted(store):
    for i in range(3):
        store.add(make(i))
    assert len(store.list_records(limit=1)) == 1
    assert len(store.list_records(limit=1000)) == 3


def test_prune_deletes_by_age_in_short_transactions(store):
    for i in range(8):
        r = make(i)
        r.created_at = 1000.0 + i
        store.add(r)
    store.quarantine("resp-0")  # quarantined or not, old records go
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)
    assert store.prune(1005.0, batch_size=2) == 5
    store._conn.set_trace_callback(None)
    # 5 rows, 2 per transaction: 3 committed transactions, not one long one
    assert statements.count("COMMIT") == 3
    assert [r.created_at for r in store.records()] == [1005.0, 1006.0, 1007.0]
    assert not store.has("resp-0") and not store.has("resp-4") and store.has("resp-5")
    assert store.prune(1005.0) == 0
    assert store.prune(1e12) == 3 and store.count() == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"older_than": math.nan}, "older_than"),
        ({"older_than": "yesterday"}, "older_than"),
        ({"older_than": 1e12, "batch_size": 0}, "batch_size"),
    ],
)
def test_prune_refuses_bad_arguments_and_deletes_nothing(store, kwargs, match):
    store.add(make(0))
    with pytest.raises(InvalidValue, match=match):
        store.prune(**kwargs)
    assert store.count() == 1
