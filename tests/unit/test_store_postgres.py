"""PostgresStore: the SQLite store's behaviours on PostgreSQL (each shared test runs on both
backends through ``open_store``), plus what only a shared server has: replicas migrating a
fresh database at once, records becoming visible in id order, durable commits whatever
the server's default, and connections the server dropped being replaced.

The PostgreSQL cases run against a throwaway server (tests/_postgres.py) and are skipped,
naming what is missing, where its binaries or psycopg are not installed (CI installs both).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sqlite3
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from sona_plugin.errors import (
    ConfigError,
    DuplicateFeedback,
    InvalidValue,
    StateError,
    UnknownRecord,
)
from sona_plugin.store import (
    SCHEMA_VERSION,
    FeedbackRecord,
    SqliteStore,
    TrajectoryStore,
    open_store,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/_postgres.py
import _postgres  # noqa: E402

try:
    import psycopg

    from sona_plugin.store import postgres as pg_store
    from sona_plugin.store.postgres import PostgresStore
except ImportError:  # the sqlite cases still run; the postgres ones skip
    psycopg = pg_store = PostgresStore = None

NO_PSYCOPG = "psycopg / psycopg-pool not installed: pip install 'sona_plugin[postgres]'"


def make(i: int) -> FeedbackRecord:
    rng = np.random.default_rng(i)
    return FeedbackRecord(
        response_id=f"resp-{i}",
        prompt=f"prompt {i} \u00e9\u4e2d\U0001f600",
        prompt_ids=[1, i, 2**40],
        response_ids=list(range(i % 7)),
        response_text=f"answer {i} \u00df",
        reward=float(rng.uniform(-1, 1)),
        embedding=rng.standard_normal(16).astype(np.float32),
        adapter_version=None if i % 3 == 0 else i,
        created_at=1.7e9 + i * 0.125,
        task=None if i % 2 else f"task-{i % 5}",
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
def pg_url(pg_server) -> str:
    """A fresh, empty database on the module's server."""
    return pg_server.create_database()


@pytest.fixture(params=["sqlite", "postgres"])
def new_url(request, tmp_path):
    """Makes URLs of fresh, empty stores of one backend."""
    if request.param == "sqlite":
        n = itertools.count()
        return lambda: f"sqlite://{tmp_path}/sona-{next(n)}.db"
    return request.getfixturevalue("pg_server").create_database


@pytest.fixture
def url(new_url) -> str:
    return new_url()


@pytest.fixture
def store(url):
    s = open_store(url)
    yield s
    s.close()


def raw(url: str):
    """A plain autocommit psycopg connection, for looking under the store."""
    return psycopg.connect(url, autocommit=True)


def set_schema_version(url: str, version: int) -> None:
    if url.startswith("sqlite://"):
        with sqlite3.connect(url[len("sqlite://") :]) as conn:
            conn.execute(f"PRAGMA user_version={version}")
        return
    with raw(url) as conn:
        conn.execute("UPDATE sona_schema SET version = %s", (version,))


def stored_version_and_rows(url: str) -> tuple[int, int]:
    if url.startswith("sqlite://"):
        conn = sqlite3.connect(url[len("sqlite://") :])
        try:
            return (
                conn.execute("PRAGMA user_version").fetchone()[0],
                conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0],
            )
        finally:
            conn.close()
    with raw(url) as conn:
        return (
            conn.execute("SELECT version FROM sona_schema").fetchone()[0],
            conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0],
        )


# ---- the SQLite store's behaviours, on both backends


def test_every_field_round_trips_and_survives_reopen(url):
    recs = [make(i) for i in range(6)]
    odd = make(6)  # float64 in; float32 out, bit for bit (signed zero, subnormal, extremes)
    odd.embedding = np.array([0.1, -0.0, 1e-45, 3.4e38, -2.5], dtype=np.float64)
    with open_store(url) as s:
        assert isinstance(s, TrajectoryStore)
        ids = [s.add(r) for r in recs + [odd]]
        assert ids == sorted(ids) and len(set(ids)) == 7
    with open_store(url) as s:  # a new store (new connections) on the same URL
        assert s.count() == 7
        for rid, r in zip(ids, recs + [odd]):
            got = s.get(r.response_id)
            assert got is not None and got.id == rid
            assert_same(got, r)
        assert s.get("resp-6").embedding.tobytes() == odd.embedding.astype(np.float32).tobytes()
        assert s.has("resp-3") and not s.has("resp-99")
        assert s.get("resp-99") is None
        assert [r.response_id for r in s.records()] == [f"resp-{i}" for i in range(7)]
        assert [r.id for r in s.records(since_id=ids[2], limit=2)] == ids[3:5]
        assert [r.id for r in s.records(since_id=ids[2], limit=None)] == ids[3:]
        assert s.count(since_id=ids[2]) == 4
        assert s.records(since_id=ids[-1]) == [] and s.count(since_id=ids[-1]) == 0
        assert s.records(limit=0) == []
        with pytest.raises(InvalidValue, match="limit must be >= 0 or None, got -1"):
            s.records(limit=-1)
        assert s.schema_version == SCHEMA_VERSION == 2


def test_two_stores_on_one_url_see_each_others_writes(new_url):
    url = new_url()
    with open_store(url) as a, open_store(url) as b:
        a.add(make(0))  # committed when add returns: another connection sees it at once
        assert b.has("resp-0")
        with pytest.raises(DuplicateFeedback, match="already stored"):
            b.add(make(0))
        b.add(make(1))
        assert a.count() == 2


def test_duplicate_response_id_is_refused_and_original_kept(store):
    first = make(4)
    store.add(first)
    dup = make(5)
    dup.response_id = first.response_id
    with pytest.raises(
        DuplicateFeedback, match="^feedback for response 'resp-4' already stored$"
    ) as ei:
        store.add(dup)
    assert isinstance(ei.value, InvalidValue)
    assert store.count() == 1
    assert_same(store.get("resp-4"), first)
    store.add(make(6))  # the failed insert left nothing open
    assert store.count() == 2


BAD_VALUES = [
    ("reward", float("nan"), "reward"),
    ("reward", 1.5, "reward must be a finite number in \\[-1, 1\\], got 1.5"),
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
    ("created_at", math.nan, "created_at"),
    ("task", 5, "task"),
    ("quarantined_at", math.nan, "quarantined_at"),
    ("quarantine_reason", "why", "quarantine_reason"),  # a reason on a live record
]


def test_bad_values_are_refused_naming_the_field_and_nothing_is_stored(store):
    store.add(make(0))
    problems = []
    for field, value, match in BAD_VALUES:
        r = make(1)
        setattr(r, field, value)
        try:
            store.add(r)
        except InvalidValue as e:
            if not re.search(match, str(e)):
                problems.append(f"{field}={value!r}: message {str(e)!r} lacks {match!r}")
        else:
            problems.append(f"{field}={value!r} was accepted")
    assert problems == []
    assert store.count() == 1 and not store.has("resp-1")


def test_concurrent_adds_from_eight_threads_all_land_with_distinct_ids(store):
    per, errors, got_ids = 25, [], []

    def worker(t: int) -> None:
        try:
            for j in range(per):
                r = make(t * per + j)
                got_ids.append(store.add(r))
                assert store.has(r.response_id)
                store.count()
        except BaseException as e:  # surfaced below; a thread's assert would be lost
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.count() == 8 * per
    recs = store.records()
    assert {r.response_id for r in recs} == {f"resp-{i}" for i in range(8 * per)}
    assert sorted(got_ids) == [r.id for r in recs] and len(set(got_ids)) == 8 * per


def test_quarantined_record_is_never_trained_on_and_still_blocks_new_feedback(url):
    with open_store(url) as s:
        ids = [s.add(make(i)) for i in range(4)]
        q = s.quarantine("resp-1", "prompt injection")
        assert q.id == ids[1] and q.quarantine_reason == "prompt injection"
        assert q.quarantined_at is not None and math.isfinite(q.quarantined_at)
        assert abs(q.quarantined_at - time.time()) < 3600  # unix seconds, not some epoch
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
    with open_store(url) as s:  # committed, not just cached
        assert s.count() == 3
        assert "resp-1" not in {r.response_id for r in s.records()}
        assert s.get("resp-1").quarantine_reason == "prompt injection"


def test_records_with_ids_returns_the_live_ones_oldest_first(url):
    with open_store(url) as s:
        ids = [s.add(make(i)) for i in range(1203)]  # more than one SQLite query's worth
        s.quarantine("resp-5")
        s.delete("resp-7")
        wanted = [ids[9], ids[5], ids[7], ids[0], ids[9], 10**9, *ids[600:1203]]
        got = s.records_with_ids(wanted)
        want = [ids[0], ids[9], *ids[600:1203]]  # the quarantined, deleted, unknown left out
        assert [r.id for r in got] == want
        assert_same(got[1], s.get("resp-9"))
        assert s.records_with_ids([]) == []


def test_delete_removes_the_record_for_good_and_ids_are_not_reused(url):
    with open_store(url) as s:
        ids = [s.add(make(i)) for i in range(3)]
        s.quarantine("resp-0")
        assert s.delete("resp-0") is None
        s.delete("resp-2")
        assert not s.has("resp-0") and s.get("resp-2") is None
    with open_store(url) as s:
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
    store.add(make(1))  # the failed call left nothing open


def test_list_records_fields_truncation_and_limits(store):
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
    assert len(store.list_records(limit=1000)) == 3
    for limit in (0, -1, 1001, 2.5, True, None, "10"):
        with pytest.raises(
            InvalidValue, match=re.escape(f"limit must be an int in 1..1000, got {limit!r}")
        ):
            store.list_records(limit=limit)


def test_prune_deletes_by_age_quarantined_or_not(store):
    for i in range(8):
        r = make(i)
        r.created_at = 1000.0 + i
        store.add(r)
    store.quarantine("resp-0")
    assert store.prune(1005.0, batch_size=2) == 5
    assert [r.created_at for r in store.records()] == [1005.0, 1006.0, 1007.0]
    assert not store.has("resp-0") and not store.has("resp-4") and store.has("resp-5")
    assert store.prune(1005.0) == 0
    for kwargs, match in (
        ({"older_than": math.nan}, "older_than"),
        ({"older_than": "yesterday"}, "older_than"),
        ({"older_than": 1e12, "batch_size": 0}, "batch_size"),
    ):
        with pytest.raises(InvalidValue, match=match):
            store.prune(**kwargs)
    assert store.count() == 3
    assert store.prune(1e12) == 3 and store.count() == 0


def test_closed_store_refuses_use(url):
    s = open_store(url)
    s.add(make(0))
    s.close()
    s.close()
    for call in (s.count, lambda: s.add(make(1)), lambda: s.get("resp-0"), s.records):
        with pytest.raises(StateError, match="closed"):
            call()


def test_newer_schema_is_refused_and_left_alone(url):
    with open_store(url) as s:
        s.add(make(0))
    set_schema_version(url, SCHEMA_VERSION + 1)
    with pytest.raises(
        StateError,
        match=f"schema version {SCHEMA_VERSION + 1}; this sona_plugin reads up to {SCHEMA_VERSION}",
    ):
        open_store(url)
    assert stored_version_and_rows(url) == (SCHEMA_VERSION + 1, 1)


# ---- PostgreSQL only


def test_schema_table_and_encodings_match_the_sqlite_store(pg_url, tmp_path):
    r = make(5)
    with PostgresStore(pg_url) as s:
        assert s.schema_version == SCHEMA_VERSION
        s.add(r)
    with SqliteStore(tmp_path / "twin.db") as s:
        s.add(r)
    cols = (
        "prompt_ids, response_ids, embedding, embedding_dim, reward, created_at, "
        "adapter_version, task"
    )
    with raw(pg_url) as conn:
        assert conn.execute("SELECT one_row, version FROM sona_schema").fetchall() == [
            (True, SCHEMA_VERSION)
        ]
        types = dict(
            conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_name = 'feedback'"
            ).fetchall()
        )
        default = conn.execute(
            "SELECT column_default FROM information_schema.columns "
            "WHERE table_name = 'feedback' AND column_name = 'id'"
        ).fetchone()[0]
        pg_row = conn.execute(f"SELECT {cols} FROM feedback").fetchone()
    assert (
        types["id"],
        types["embedding"],
        types["created_at"],
        types["reward"],
        types["quarantined_at"],
    ) == ("bigint", "bytea", "double precision", "double precision", "double precision")
    assert default.startswith("nextval(")
    with sqlite3.connect(tmp_path / "twin.db") as conn:
        lite_row = conn.execute(f"SELECT {cols} FROM feedback").fetchone()
    # token ids as the same JSON text, the embedding as the same little-endian float32 bytes
    assert pg_row == lite_row
    assert json.loads(pg_row[0]) == [1, 5, 2**40]
    assert pg_row[2] == r.embedding.astype("<f4").tobytes()


def open_at_once(url: str, n: int) -> tuple[list[BaseException], list[int]]:
    """``n`` threads open a store on ``url`` at the same moment and each adds a record."""
    barrier, errors, versions = threading.Barrier(n), [], []

    def replica(i: int) -> None:
        try:
            barrier.wait()
            with PostgresStore(url, min_size=1, max_size=2) as s:
                s.add(make(i))
                versions.append(s.schema_version)
        except BaseException as e:  # surfaced by the caller
            errors.append(e)

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors, versions


def test_replicas_opening_a_fresh_database_at_once_all_succeed(pg_server):
    for _round in range(3):
        url = pg_server.create_database()
        errors, versions = open_at_once(url, 4)
        assert errors == []
        assert versions == [SCHEMA_VERSION] * 4
        assert stored_version_and_rows(url) == (SCHEMA_VERSION, 4)


def test_records_become_visible_in_id_order(pg_url):
    """An add that drew its id but has not committed holds back later adds: a trainer that
    read up to id N never later finds a record below N."""
    with raw(pg_url) as conn, PostgresStore(pg_url) as s:
        conn.execute(
            "CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN IF NEW.response_id = 'resp-0' THEN PERFORM pg_sleep(2); END IF; "
            "RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER slow BEFORE INSERT ON feedback FOR EACH ROW "
            "EXECUTE FUNCTION slow_insert()"
        )
        errors: list[BaseException] = []

        def slow_add() -> None:
            try:
                s.add(make(0))
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=slow_add)
        t.start()
        deadline = time.monotonic() + 30
        while not conn.execute("SELECT is_called FROM feedback_id_seq").fetchone()[0]:
            assert time.monotonic() < deadline, "the slow add never drew its id"
            time.sleep(0.01)
        later = s.add(make(1))  # drawn after resp-0's id
        seen = [(r.response_id, r.id) for r in s.records()]
        t.join()
        assert errors == []
        assert [rid for rid, _ in seen] == ["resp-0", "resp-1"], seen
        assert seen[1][1] == later > seen[0][1]


def test_count_is_served_from_the_live_index(pg_url):
    with PostgresStore(pg_url) as s:
        for i in range(3):
            s.add(make(i))
        s.quarantine("resp-1")
        assert s.count() == 2
    with raw(pg_url) as conn:
        conn.execute("SET enable_seqscan = off")  # a 3-row table is scanned otherwise
        plan = "\n".join(
            row[0] for row in conn.execute("EXPLAIN " + pg_store._COUNT_SQL, (0,)).fetchall()
        )
    assert "feedback_live" in plan, plan


def test_prune_deletes_in_short_transactions(pg_url):
    with PostgresStore(pg_url) as s:
        for i in range(8):
            r = make(i)
            r.created_at = 1000.0 + i
            s.add(r)
        with raw(pg_url) as conn:
            conn.execute("CREATE TABLE deleted_in (xid BIGINT)")
            conn.execute(
                "CREATE FUNCTION log_delete() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN INSERT INTO deleted_in VALUES (txid_current()); RETURN OLD; "
                "END $$"
            )
            conn.execute(
                "CREATE TRIGGER log AFTER DELETE ON feedback FOR EACH ROW "
                "EXECUTE FUNCTION log_delete()"
            )
            assert s.prune(1005.0, batch_size=2) == 5
            # 5 rows, 2 per transaction: 3 committed transactions, not one long one
            assert conn.execute(
                "SELECT COUNT(*), COUNT(DISTINCT xid) FROM deleted_in"
            ).fetchone() == (5, 3)


def test_commits_are_durable_even_where_the_database_defaults_to_async(pg_url):
    dbname = urlsplit(pg_url).path.lstrip("/")
    with raw(pg_url) as conn:
        conn.execute(f'ALTER DATABASE "{dbname}" SET synchronous_commit = off')
    with raw(pg_url) as conn:
        assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "off"
    with PostgresStore(pg_url, min_size=2, max_size=2) as s:
        s.add(make(0))
        with s._connection() as a, s._connection() as b:  # every pooled connection
            assert [c.execute("SHOW synchronous_commit").fetchone()[0] for c in (a, b)] == [
                "on",
                "on",
            ]


def test_text_with_nul_is_refused_naming_the_field(pg_url):
    with PostgresStore(pg_url) as s:
        for field in ("prompt", "response_text", "task", "response_id"):
            r = make(1)
            setattr(r, field, "a\x00b")
            with pytest.raises(InvalidValue, match=f"^{field} must not contain NUL"):
                s.add(r)
        s.add(make(2))
        with pytest.raises(InvalidValue, match="reason must not contain NUL"):
            s.quarantine("resp-2", "x\x00")
        assert s.count() == 1 and s.get("resp-2").quarantined_at is None


def test_connections_dropped_by_the_server_are_replaced(pg_url):
    with PostgresStore(pg_url, min_size=2, max_size=2) as s:
        s.add(make(0))
        with raw(pg_url) as conn:  # a server restart or failover, as the store sees it
            killed = conn.execute(
                "SELECT COUNT(*) FILTER (WHERE pg_terminate_backend(pid)) FROM "
                "pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            ).fetchone()[0]
        assert killed >= 2
        assert s.count() == 1
        s.add(make(1))
        assert [r.response_id for r in s.records()] == ["resp-0", "resp-1"]


def test_open_store_dispatches_postgres_urls(pg_url, monkeypatch):
    rest = pg_url.partition("://")[2]
    schemes = ("postgresql", "postgres", "POSTGRESQL", "postgresql+psycopg")
    for i, scheme in enumerate(schemes):
        with open_store(f"{scheme}://{rest}") as s:
            assert isinstance(s, PostgresStore)
            s.add(make(i))
    with open_store(pg_url) as s:  # all four named the same database
        assert s.count() == 4
    with pytest.raises(InvalidValue, match="mysql"):
        open_store("mysql://host/db")
    # without the extra installed: a ConfigError that says what to install
    monkeypatch.delitem(sys.modules, "sona_plugin.store.postgres")
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(ConfigError, match=re.escape("pip install 'sona_plugin[postgres]'")):
        open_store(pg_url)


def test_unreachable_server_is_a_state_error_that_hides_the_password():
    if psycopg is None:
        _postgres.skip_or_fail(NO_PSYCOPG)
    url = f"postgresql://sona:s3cret@127.0.0.1:{_postgres.free_port()}/sona?password=s3cret"
    with pytest.raises(
        StateError, match="cannot open trajectory store postgresql://sona:\\*\\*\\*@127.0.0.1"
    ) as ei:
        PostgresStore(url)
    assert "s3cret" not in str(ei.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_size": -1}, "min_size must be an int >= 0, got -1"),
        (
            {"min_size": 4, "max_size": 2},
            "max_size must be an int >= max\\(1, min_size=4\\), got 2",
        ),
        ({"max_size": 0}, "max_size"),
        ({"timeout_s": 0}, "timeout_s"),
    ],
)
def test_pool_arguments_are_checked_before_connecting(kwargs, match):
    if psycopg is None:
        _postgres.skip_or_fail(NO_PSYCOPG)
    with pytest.raises(InvalidValue, match=match):
        PostgresStore("postgresql://nobody@127.0.0.1:1/none", **kwargs)
