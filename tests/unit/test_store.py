"""SqliteStore: every field round-trips, acknowledged feedback survives kill -9, bad input
is refused without a trace, threads do not lose writes, newer schemas are refused."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from sona_plugin.errors import InvalidValue, StateError
from sona_plugin.store import (
    SCHEMA_VERSION,
    FeedbackRecord,
    SqliteStore,
    TrajectoryStore,
    open_store,
)

REPO = Path(__file__).resolve().parents[2]

# One source of truth for the records the crash subprocess writes and the test expects.
_MAKE_SRC = '''
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
'''
_ns: dict = {}
exec(_MAKE_SRC, _ns)
make = _ns["make"]

_WRITER_SRC = _MAKE_SRC + '''
import sys
from sona_plugin.store import SqliteStore
store = SqliteStore(sys.argv[1])
for i in range(int(sys.argv[2])):
    store.add(make(i))
    print(f"ACK {i}", flush=True)
'''


def assert_same(got: FeedbackRecord, want: FeedbackRecord) -> None:
    for name in ("response_id", "prompt", "prompt_ids", "response_ids", "response_text",
                 "reward", "adapter_version", "created_at", "task"):
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
    proc = subprocess.Popen([sys.executable, "-c", _WRITER_SRC, str(path), "100000"],
                            stdout=subprocess.PIPE, text=True, env=env)
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


@pytest.mark.parametrize(("field", "value", "match"), [
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
])
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
    with pytest.raises(StateError, match="PostgreSQL store is not implemented yet"):
        open_store("postgresql://user@host/db")
    with pytest.raises(InvalidValue, match="mysql"):
        open_store("mysql://host/db")
    with pytest.raises(InvalidValue, match="names no file"):
        open_store("sqlite://")
