"""Replicas on one PostgreSQL store learn as one: the instant log, feedback forwarded to the
replica that generated the response, bit-identical MicroLoRAs, a late replica catching up.

Tiny random models in transformers hosts (``sona_plugin.pipeline``) against a throwaway
server (tests/_postgres.py); the same on SmolLM2 with a vLLM replica is in
tests/integration/test_replicas_smollm2.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

try:
    from sona_plugin.integrations import _replica
    from sona_plugin.store.replication import ReplicaLog
except ImportError:  # psycopg missing: the pg_server fixture skips (or fails in CI)
    _replica = None

from _tiny import tiny_llama_and_tokenizer, wait_for

from sona_plugin.errors import DuplicateFeedback, StateError, UnknownResponse
from sona_plugin.store import open_store


@pytest.fixture
def url(pg_server) -> str:
    return pg_server.create_database()


def tiny_pipeline(url: str, state_dir, registry_dir):
    from sona_plugin import pipeline

    model, tok = tiny_llama_and_tokenizer()
    p = pipeline(
        model=model,
        tokenizer=tok,
        # a larger cap and step than the LM defaults: a few feedbacks move the weights
        sona_config={
            "logit_top_k": 5,
            "micro_lora_norm_cap": 0.5,
            "host": {"store_url": url, "registry_dir": str(registry_dir)},
        },
        state_dir=state_dir,
    )
    # no sentence-transformers model in unit tests: a constant embedding
    p._embedder = SimpleNamespace(
        encode=lambda texts, **kw: np.ones((len(texts), 384), np.float32) / np.sqrt(384)
    )
    return p


def generate(p, text: str) -> str:
    return p(text, max_new_tokens=6, do_sample=True)[0]["response_id"]


def digest(p) -> str:
    return _replica.micro_digest(*p._micro_arrays())


@pytest.fixture
def replicas(url, tmp_path):
    made = []

    def new(name: str):
        made.append(tiny_pipeline(url, tmp_path / name, tmp_path / "adapters"))
        return made[-1]

    yield new
    for p in made:
        p.close()


def test_feedback_at_either_replica_moves_both_microloras_identically(replicas, monkeypatch):
    monkeypatch.setattr(_replica, "FORWARD_CLAIM_S", 1.0)
    a, b = replicas("a"), replicas("b")
    start = digest(a)
    assert digest(b) == start  # b started from the snapshot a logged
    ids_a = [generate(a, w) for w in ("abc", "hello", "xyz", "queue")]
    ids_b = [generate(b, w) for w in ("dog", "cat")]

    # feedback for a's response given at b: forwarded to a, stored once, learned by both
    res = b.feedback(ids_a[0], liked=True)
    assert res["id"] == ids_a[0] and res["stored_id"] > 0 and res["instant"] is not None
    assert b.store.get(ids_a[0]).reward == 1.0
    assert a._replica.forwards_taken == 1 and b._replica.forwards_sent == 1
    for rid, p, liked in [(ids_a[1], a, False), (ids_b[0], a, True), (ids_a[2], b, True)]:
        p.feedback(rid, liked=liked)
    b.feedback(ids_b[1], reward=-0.5)  # its own
    assert wait_for(lambda: a._replica.stats()["applied_seq"] == b._replica.stats()["applied_seq"])
    assert wait_for(lambda: digest(a) == digest(b))
    assert digest(a) != start  # the feedback did move the weights
    A1, B1 = a._micro_arrays()
    A2, B2 = b._micro_arrays()
    assert np.abs(A1 - A2).max() == 0.0 and np.abs(B1 - B2).max() == 0.0
    assert a.store.count() == 5

    # one feedback per response, whichever replica is asked
    with pytest.raises(DuplicateFeedback):
        a.feedback(ids_a[0], liked=False)
    with pytest.raises(DuplicateFeedback):
        b.feedback(ids_a[0], liked=False)
    # nobody generated it: the forward is withdrawn and the client told
    t0 = time.monotonic()
    with pytest.raises(UnknownResponse, match="no replica"):
        b.feedback("never-generated", liked=True)
    assert time.monotonic() - t0 < 5.0
    assert a.store.count() == 5  # nothing stored for it


def test_a_late_replica_and_a_decay_follow_the_log(replicas, monkeypatch):
    monkeypatch.setattr(_replica, "SNAPSHOT_EVERY", 3)
    a = replicas("a")
    for w in ("abc", "hello", "xyz", "queue", "mango", "kiwi", "plum"):
        a.feedback(generate(a, w), liked=w < "m")
    a._replica.wake()  # what the thread does: snapshot when due, prune the older entries
    log = a._replica.log
    assert log.latest_snapshot() > 1
    assert wait_for(lambda: a._replica.stats()["last_snapshot_seq"] > 1)

    late = replicas("late")  # starts at the newest snapshot, reads the tail
    assert wait_for(lambda: digest(late) == digest(a))

    # a new BaseLoRA version's decay is logged once and applied everywhere
    before = a._micro_arrays()[0]
    a._replica.scale(0.5)
    assert wait_for(lambda: digest(late) == digest(a))
    np.testing.assert_array_equal(a._micro_arrays()[0], (before * np.float32(0.5)))
    assert late.learner_stats() is not None and "replica" in late.stats()


def test_the_drift_checks_norm_bound_holds_on_every_replica(replicas):
    """The trainer's drift check lowers the MicroLoRA's norm bound: a feedback taken at
    another replica is bounded by it too (its delta is applied everywhere), and a replica
    restoring an older state's bound (an older ``as_of``) does not raise it again."""
    a, b = replicas("a"), replicas("b")
    a.set_micro_norm_cap(1e-3, as_of=10)  # what Learner._bound_micro does on the trainer
    assert wait_for(lambda: b.engine.micro_lora.norm_cap == 1e-3)
    for w in ("abc", "hello", "xyz"):
        b.feedback(generate(b, w), liked=True)
    assert wait_for(lambda: digest(a) == digest(b))
    for p in (a, b):
        m = p.engine.micro_lora
        assert 0 < m.delta_norm() <= 1e-3 * (1 + 1e-4)
    b.set_micro_norm_cap(0.5, as_of=5)  # an older version's saved bound
    assert a._replica.log.norm_cap() == 1e-3
    assert (
        b.engine.micro_lora.norm_cap == 1e-3 and b.stats()["replica"]["micro_lora_norm_cap"] == 1e-3
    )
    late = replicas("late")  # joins under the deployment's bound, not its config's
    assert late.engine.micro_lora.norm_cap == 1e-3


def test_the_log_orders_snapshots_and_refuses_a_stale_one(url):
    store = open_store(url)
    try:
        log = ReplicaLog(store, "one")
        A, B = np.ones((2, 4), np.float32), np.zeros((4, 2), np.float32)
        assert log.start(A, B) == 1
        assert log.start(A * 2, B) is None  # the first replica's MicroLoRA wins
        s2 = log.append_delta("r1", A, B)
        assert log.append_snapshot(A, B, at_head=1) is None  # the log moved on
        s3 = log.append_snapshot(A * 2, B, at_head=s2)
        assert s3 == s2 + 1 and log.latest_snapshot() == s3
        assert [e.kind for e in log.entries(0)] == ["set", "delta", "set"]
        assert log.prune(s3) == 2 and log.catch_up_from(0) == s3 - 1
        e = log.entries(s3 - 1)[0]
        np.testing.assert_array_equal(e.apply(A, B)[0], A * 2)
        with pytest.raises(StateError, match="one MicroLoRA config"):
            e.apply(np.ones((3, 4), np.float32), B)  # a replica with another rank
        # a forward whose holder died stays claimed; the hourly prune removes it anyway
        fid = log.forward("r9", 0, 1.0)
        assert log.claim(fid) and log.outcome(fid) == ("claimed", None)
        assert log.prune_forwards(older_than_s=3600) == 0  # not old yet
        assert log.prune_forwards(older_than_s=-1) == 1
    finally:
        store.close()


def test_sona_train_takes_over_from_a_killed_trainer_and_trains_only_as_the_trainer(
    url, tmp_path, capsys
):
    import json

    from sona_plugin.cli import main
    from sona_plugin.store import FeedbackRecord
    from sona_plugin.store.leader import NOT_TRAINER, TrainerLease

    model, tok = tiny_llama_and_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    store = open_store(url)
    rng = np.random.default_rng(0)
    for i in range(24):
        store.add(
            FeedbackRecord(
                response_id=f"r{i}",
                prompt=f"prompt {i}",
                prompt_ids=rng.integers(2, 28, 5).tolist(),
                response_ids=[3 if i % 2 else 4] * 3,
                response_text="",
                reward=1.0 if i % 2 else -1.0,
                embedding=rng.standard_normal(384).astype(np.float32),
            )
        )
    store.close()
    argv = [
        "train",
        "--once",
        "--store-url",
        url,
        "--registry-dir",
        str(tmp_path / "adapters"),
        "--model",
        str(tmp_path / "model"),
        "--state-dir",
        str(tmp_path / "trainer"),
    ]
    # the trainer is killed (SIGKILL) mid-cycle: trained, not yet gated or published
    killed = subprocess.run(
        [sys.executable, "-m", "sona_plugin.cli", *argv],
        env={**os.environ, "SONA_FAILPOINT": "learner.trained", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    from sona_plugin.adapters import AdapterRegistry

    assert AdapterRegistry(tmp_path / "adapters").versions() == []  # nothing half-published
    other = TrainerLease(url)
    try:
        assert other.try_acquire()  # another trainer holds the lease: this one waits
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {
            "skipped": NOT_TRAINER
        }
    finally:
        other.close()
    # the lease is free (the killed trainer's session ended with it): this trainer takes
    # over and runs the cycle over all 24 records, none lost, published at most once
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report.get("new_records") == 24 and "skipped" not in report, report
    versions = [v.version for v in AdapterRegistry(tmp_path / "adapters").versions()]
    assert versions == ([report["version"]] if report.get("published") else []), report
    with pytest.raises(SystemExit, match="postgresql://"):
        main([*argv[:2], "--store-url", str(tmp_path / "x.db"), *argv[4:]])
