"""SonaEngine: learning moves the adapter the right way, state survives, bad input is refused."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from sona_plugin import (
    ConfigError,
    DimensionMismatch,
    InvalidValue,
    LearningSignal,
    SonaConfig,
    SonaEngine,
    SonaError,
    UnknownTrajectory,
)

D = 64


def clusters(seed: int, d: int = D, k: int = 4, sigma: float = 0.3):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, d)).astype(np.float32)

    def sample(c: int) -> np.ndarray:
        return (means[c] + sigma * rng.standard_normal(d)).astype(np.float32)

    return means, sample


def one_step_feedback(engine: SonaEngine, h: np.ndarray, quality: float) -> int:
    """A single-step trajectory ended with ``quality``: one feedback, learned at once."""
    tid = engine.begin_trajectory(h)
    engine.add_step(tid, h, np.ones(4, np.float32) / 4, 0.5)
    engine.end_trajectory(tid, quality)
    return tid


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_identity_before_learning():
    eng = SonaEngine(D)
    x = np.random.default_rng(0).standard_normal(D).astype(np.float32)
    np.testing.assert_array_equal(eng.apply_lora(x), x)
    np.testing.assert_array_equal(eng.apply_micro_lora(x), x)
    np.testing.assert_array_equal(eng.apply_base_lora(x), x)


@pytest.mark.parametrize("init", ["zero_a", "zero_b"])
def test_one_positive_feedback_moves_the_output_and_a_negative_one_the_other_way(init):
    _, sample = clusters(1)
    h = sample(0)
    pos, neg = SonaEngine(D, micro_lora_init=init), SonaEngine(D, micro_lora_init=init)
    one_step_feedback(pos, h, 1.0)
    one_step_feedback(neg, h, 0.0)
    d_pos = pos.apply_micro_lora(h) - h
    d_neg = neg.apply_micro_lora(h) - h
    assert np.linalg.norm(d_pos) > 1e-4 * np.linalg.norm(h)
    assert np.linalg.norm(d_neg) > 1e-4 * np.linalg.norm(h)
    # the objective is the alignment <h/|h|, y>: a like raises it, a dislike lowers it
    u = h / np.linalg.norm(h)
    assert float(u @ d_pos) > 0 > float(u @ d_neg)
    cos = float(d_pos @ d_neg / (np.linalg.norm(d_pos) * np.linalg.norm(d_neg)))
    assert cos < -0.9


def test_feedback_on_an_ended_trajectory_learns_at_once():
    _, sample = clusters(2)
    h = sample(1)
    eng = SonaEngine(D)
    tid = eng.begin_trajectory(h)
    eng.add_step(tid, h, (), 0.9)
    eng.end_trajectory(tid, 0.5)  # neutral: the baseline starts at quality_threshold 0.5
    before = eng.apply_micro_lora(h)
    rep = eng.learn_from_feedback(LearningSignal.positive(trajectory_id=tid))
    assert rep.update.accepted and rep.advantage > 0
    assert rel(eng.apply_micro_lora(h), before) > 1e-4


def test_an_update_waits_while_a_cycle_holds_the_lock_and_flush_applies_it():
    _, sample = clusters(2)
    h = sample(1)
    eng = SonaEngine(D)
    tid = eng.begin_trajectory(h)
    eng.add_step(tid, h, (), 0.9)
    with eng._learn_lock:  # as a background cycle would
        eng.end_trajectory(tid, 0.95)  # returns without blocking
        assert eng.stats()["instant_pending"] == 1
    np.testing.assert_array_equal(eng.apply_micro_lora(h), h)
    reports = eng.flush()
    assert len(reports) == 1 and reports[0].update.accepted
    assert rel(eng.apply_micro_lora(h), h) > 1e-4


def test_twenty_likes_on_one_cluster_change_it_more_than_a_far_cluster():
    means, sample = clusters(3)
    eng = SonaEngine(D)
    near = np.stack([sample(0) for _ in range(10)])
    far = np.stack([sample(2) for _ in range(10)])
    for _ in range(20):
        one_step_feedback(eng, sample(0), 0.95)
    change_near = np.mean([rel(eng.apply_micro_lora(x), x) for x in near])
    change_far = np.mean([rel(eng.apply_micro_lora(x), x) for x in far])
    assert change_near >= 1e-2
    assert change_far < change_near / 2


@pytest.mark.parametrize("init", ["zero_a", "zero_b"])
def test_hundreds_of_feedbacks_stay_bounded(init):
    _, sample = clusters(4)
    rng = np.random.default_rng(0)
    eng = SonaEngine(D, micro_lora_init=init)
    for _ in range(400):
        one_step_feedback(eng, sample(int(rng.integers(4))), float(rng.uniform()))
    cfg = eng.config
    assert eng.micro_lora.delta_norm() <= cfg.micro_lora_norm_cap + 1e-5
    x = sample(0)
    y = eng.apply_micro_lora(x)
    assert np.isfinite(y).all()
    assert rel(y, x) <= cfg.micro_lora_norm_cap + 1e-5


def test_lm_head_objective_raises_the_liked_tokens_log_prob():
    rng = np.random.default_rng(5)
    V = 50
    W = rng.standard_normal((V, D)).astype(np.float32) / math.sqrt(D)
    H = rng.standard_normal((6, D)).astype(np.float32)
    tokens = rng.integers(V, size=6)

    def logprob(eng: SonaEngine) -> float:
        Y = eng.apply_micro_lora(H)
        z = Y @ W.T
        z = z - z.max(1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return float(lp[np.arange(6), tokens].sum())

    results = {}
    for quality in (1.0, 0.0):
        eng = SonaEngine(D)
        eng.set_output_head(W)
        before = logprob(eng)
        tid = eng.begin_trajectory(H[0])
        for h, t in zip(H, tokens):
            top = np.argsort(-(W @ h))[:20]
            eng.add_step(tid, h, (), 0.0, action=int(t), topk_ids=top)
        eng.end_trajectory(tid, quality)
        results[quality] = logprob(eng) - before
    assert results[1.0] > 0 > results[0.0]


def test_router_reward_raises_the_route_for_similar_queries_only():
    # near and far queries: unit embeddings around orthogonal topic directions (dissimilar
    # sentences have cosine ~0.1 under MiniLM; orthogonal is the clean case)
    rng = np.random.default_rng(6)
    topics, _ = np.linalg.qr(rng.standard_normal((D, 3)))

    def sample(c: int) -> np.ndarray:
        v = topics[:, c] + 0.05 * rng.standard_normal(D)
        return (v / np.linalg.norm(v)).astype(np.float32)

    eng = SonaEngine(SonaConfig(hidden_dim=D))
    for r in (0, 1, 2):
        eng.add_route(r)
    q_far = sample(2)
    p0_near = eng.route_probabilities(sample(0))[1]
    p0_far = eng.route_probabilities(q_far)[1]
    for _ in range(15):
        q = sample(0)
        tid = eng.start_trajectory(q)
        eng.record_step(tid, 1, 0.8, 100)
        eng.end_trajectory(tid, 0.95)
        # route 2 is bad for cluster 0
        tid = eng.start_trajectory(q)
        eng.record_step(tid, 2, 0.8, 100)
        eng.end_trajectory(tid, 0.05)
    p_near = eng.route_probabilities(sample(0))[1]
    p_far = eng.route_probabilities(q_far)[1]
    assert p_near > p0_near + 0.3
    assert p_far < p0_far + 0.05  # not raised for the dissimilar topic
    assert abs(p_far - p0_far) < (p_near - p0_near) / 3


def test_background_cycle_runs_on_any_number_and_consolidates():
    _, sample = clusters(7)
    eng = SonaEngine(D)
    h = sample(0)
    one_step_feedback(eng, h, 1.0)
    micro_before = eng.apply_micro_lora(h) - h
    lora_before = eng.apply_lora(h) - h
    res = eng.run_background_cycle()
    assert res.trajectories_processed == 1 and res.patterns_extracted == 1
    assert res.consolidated, res.status
    # the lesson moved into the BaseLoRA: the base delta now points the same way ...
    base_delta = eng.apply_base_lora(h) - h
    assert float(base_delta @ micro_before) > 0
    # ... and the MicroLoRA shrank, so apply_lora does not count it twice
    assert np.linalg.norm(eng.apply_micro_lora(h) - h) < np.linalg.norm(micro_before)
    assert rel(eng.apply_lora(h) - h, lora_before) < 0.5
    assert eng.stats()["background_cycles"] == 1


def test_force_learn_with_nothing_says_so():
    msg = SonaEngine(D).force_learn()
    assert "no trajectories" in msg


def test_background_thread_runs_cycles_off_the_callers_path():
    _, sample = clusters(8)
    eng = SonaEngine(SonaConfig(hidden_dim=D, background_trigger_count=5))
    eng.start_background(poll_s=0.01)
    try:
        for _ in range(5):
            tid = eng.begin_trajectory(sample(0))
            eng.add_step(tid, sample(0), (), 0.5)
            eng.end_trajectory(tid, 0.9)
        assert eng.tick() is None  # the thread does the work, not the caller
        eng.coordinator._thread.join(0.0)
        for _ in range(500):
            if eng.stats()["background_cycles"]:
                break
            import time

            time.sleep(0.01)
        assert eng.stats()["background_cycles"] == 1
        assert eng.coordinator.last_error is None
    finally:
        eng.stop_background()
    assert not eng.coordinator.running


def _fill(eng: SonaEngine) -> None:
    _, sample = clusters(9)
    rng = np.random.default_rng(1)
    for i in range(30):
        one_step_feedback(eng, sample(i % 4), float(rng.uniform()))
    eng.run_background_cycle()
    for i in range(5):  # pending work: buffered, queued and open trajectories
        tid = eng.begin_trajectory(sample(i % 4))
        eng.add_step(tid, sample(i % 4), (0.5, 0.5), 0.1, action=3)
        if i < 2:
            eng.end_trajectory(tid, 0.7)
        elif i < 4:
            with eng._learn_lock:  # queued instant updates survive a save too
                eng.end_trajectory(tid, 0.7)


def test_save_load_round_trip_is_exact(tmp_path: Path):
    eng = SonaEngine(D)
    _fill(eng)
    eng.save(tmp_path / "a")
    back = SonaEngine.load(tmp_path / "a")
    back.save(tmp_path / "b")
    for f in ("state.safetensors", "state.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    x = clusters(9)[1](1)
    np.testing.assert_array_equal(back.apply_lora(x), eng.apply_lora(x))
    assert back.stats() == eng.stats()
    assert [p.id for p in back.find_patterns(x, 3)] == [p.id for p in eng.find_patterns(x, 3)]
    assert back.stats()["instant_pending"] == 2
    # and both keep learning identically
    for e in (eng, back):
        e.flush()
        e.run_background_cycle()
    np.testing.assert_array_equal(back.apply_lora(x), eng.apply_lora(x))


def test_a_launch_config_that_differs_wins_and_the_difference_is_logged(tmp_path, caplog):
    eng = SonaEngine(D)
    _fill(eng)
    eng.save(tmp_path / "a")
    launch = SonaConfig(hidden_dim=D, micro_lora_lr=0.0005)
    with caplog.at_level("WARNING", logger="sona_plugin.engine"):
        back = SonaEngine.load(tmp_path / "a", launch)
    assert back.config.micro_lora.lr == 0.0005
    assert "launch config wins" in caplog.text
    assert f"micro_lora.lr: {eng.config.micro_lora.lr!r} -> 0.0005" in caplog.text
    assert "rank" not in caplog.text  # only the fields that differ


def test_a_state_saved_by_a_newer_version_loads_and_names_the_fields_it_ignores(tmp_path, caplog):
    """A downgrade after a new option: the saved config has fields this version lacks."""
    eng = SonaEngine(D)
    _fill(eng)
    eng.save(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "state.json").read_text())
    meta["config"]["gate"]["a_future_gate_option"] = 3
    meta["config"]["a_future_section"] = {"x": 1}
    (tmp_path / "a" / "state.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="sona_plugin.engine"):
        back = SonaEngine.load(tmp_path / "a")
    assert "gate.a_future_gate_option" in caplog.text and "a_future_section" in caplog.text
    assert back.config == eng.config
    x = clusters(9)[1](1)
    np.testing.assert_array_equal(back.apply_lora(x), eng.apply_lora(x))


def _digest(eng: SonaEngine, path: Path) -> str:
    eng.save(path)
    h = hashlib.sha256()
    for f in ("state.safetensors", "state.json"):
        h.update((path / f).read_bytes())
    return h.hexdigest()


x_ok = np.ones(D, np.float32)


def _nan_at(i: int) -> np.ndarray:
    v = x_ok.copy()
    v[i] = np.nan
    return v


BAD_INPUTS = [
    (
        "wrong dimension",
        DimensionMismatch,
        "dimension",
        lambda e, t: e.apply_micro_lora(np.ones(D + 1, np.float32)),
    ),
    (
        "wrong dimension begin",
        DimensionMismatch,
        "dimension",
        lambda e, t: e.begin_trajectory(np.ones(D - 3)),
    ),
    (
        "wrong dimension step",
        DimensionMismatch,
        "dimension",
        lambda e, t: e.add_step(t, np.ones(7), (), 0.5),
    ),
    ("empty vector", InvalidValue, "empty", lambda e, t: e.apply_lora(np.zeros(0, np.float32))),
    ("empty embedding", InvalidValue, "empty", lambda e, t: e.begin_trajectory([])),
    ("nan in vector", InvalidValue, "non-finite", lambda e, t: e.apply_micro_lora(_nan_at(5))),
    (
        "inf in step",
        InvalidValue,
        "non-finite",
        lambda e, t: e.add_step(t, np.full(D, np.inf), (), 0.5),
    ),
    ("nan in find", InvalidValue, "non-finite", lambda e, t: e.find_patterns(_nan_at(0), 3)),
    ("nan quality", InvalidValue, "quality", lambda e, t: e.end_trajectory(t, float("nan"))),
    ("inf quality", InvalidValue, "quality", lambda e, t: e.end_trajectory(t, float("inf"))),
    ("quality > 1", InvalidValue, "quality", lambda e, t: e.end_trajectory(t, 1.5)),
    ("quality < 0", InvalidValue, "quality", lambda e, t: e.end_trajectory(t, -0.5)),
    ("nan reward", InvalidValue, "reward", lambda e, t: e.add_step(t, x_ok, (), float("nan"))),
    ("reward out of range", InvalidValue, "reward", lambda e, t: e.add_step(t, x_ok, (), 1e9)),
    (
        "feedback quality out of range",
        InvalidValue,
        "quality",
        lambda e, t: e.learn_from_feedback(LearningSignal(quality=2.0)),
    ),
    (
        "unknown trajectory",
        UnknownTrajectory,
        "never started",
        lambda e, t: e.add_step(999999, x_ok, (), 0.5),
    ),
    (
        "negative trajectory id",
        UnknownTrajectory,
        "never started",
        lambda e, t: e.end_trajectory(-1, 0.5),
    ),
    ("ended trajectory", UnknownTrajectory, "already ended", lambda e, t: e.end_trajectory(1, 0.5)),
    ("k = 0", InvalidValue, "k", lambda e, t: e.find_patterns(x_ok, 0)),
    ("k < 0", InvalidValue, "k", lambda e, t: e.find_patterns(x_ok, -1)),
    ("layer out of range", InvalidValue, "layer", lambda e, t: e.apply_base_lora(99, x_ok)),
    ("negative layer", InvalidValue, "layer", lambda e, t: e.apply_base_lora(-1, x_ok)),
    ("rank 0", ConfigError, "micro_lora_rank", lambda e, t: SonaEngine(D, micro_lora_rank=0)),
    ("rank 3", ConfigError, "micro_lora_rank", lambda e, t: SonaEngine(D, micro_lora_rank=3)),
    ("dimension 0", ConfigError, "hidden_dim", lambda e, t: SonaEngine(0)),
    ("negative dimension", ConfigError, "hidden_dim", lambda e, t: SonaEngine(-1)),
    (
        "disabled then nan",
        InvalidValue,
        "non-finite",
        lambda e, t: (e.set_enabled(False), e.apply_micro_lora(_nan_at(1))),
    ),
]


@pytest.mark.parametrize("name,err,word,call", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_a_named_error_and_changes_nothing(tmp_path, name, err, word, call):
    eng = SonaEngine(D)
    _fill(eng)
    open_id = eng.begin_trajectory(x_ok)
    before = _digest(eng, tmp_path / "before")
    with pytest.raises(err) as info:
        call(eng, open_id)
    assert isinstance(info.value, SonaError)
    assert word in str(info.value)
    eng.set_enabled(True)
    assert _digest(eng, tmp_path / "after") == before


def test_disabled_engine_returns_input_and_learns_nothing():
    _, sample = clusters(10)
    eng = SonaEngine(D)
    h = sample(0)
    eng.set_enabled(False)
    assert not eng.is_enabled()
    one_step_feedback(eng, h, 1.0)
    eng.set_enabled(True)
    np.testing.assert_array_equal(eng.apply_micro_lora(h), h)
    assert eng.stats()["micro_updates"] == 0


def test_types_in_types_out():
    import torch

    eng = SonaEngine(D)
    one_step_feedback(eng, clusters(11)[1](0), 1.0)
    x64 = np.random.default_rng(0).standard_normal(D)
    y64 = eng.apply_lora(x64)
    assert y64.dtype == np.float64
    xt = torch.from_numpy(x64.astype(np.float32))
    yt = eng.apply_micro_lora(xt)
    assert isinstance(yt, torch.Tensor) and yt.dtype == torch.float32
    np.testing.assert_allclose(yt.numpy(), eng.apply_micro_lora(x64.astype(np.float32)), rtol=1e-6)
    batch = np.stack([x64, 2 * x64]).astype(np.float32)
    yb = eng.apply_micro_lora(batch)
    np.testing.assert_allclose(yb[1], eng.apply_micro_lora(batch[1]), rtol=1e-5)


def test_stats_are_json_and_use_the_seeds_names():
    import json

    eng = SonaEngine(D)
    _fill(eng)
    s = json.loads(eng.get_stats())
    for key in (
        "trajectories_buffered",
        "patterns_stored",
        "micro_updates",
        "background_cycles",
        "trajectories_dropped",
    ):
        assert key in s
    assert s["micro_updates"] == 32 and s["instant_pending"] == 2


def test_buffer_drops_are_counted_and_recording_never_blocks():
    eng = SonaEngine(SonaConfig(hidden_dim=D, trajectory_capacity=3))
    for _ in range(5):
        tid = eng.begin_trajectory(x_ok)
        eng.end_trajectory(tid, 0.5)
    s = eng.stats()
    assert s["trajectories_buffered"] == 3 and s["trajectories_dropped"] == 2


def test_micro_lora_exports_exact_lm_head_factors():
    rng = np.random.default_rng(12)
    eng = SonaEngine(D)
    for _ in range(5):
        one_step_feedback(eng, rng.standard_normal(D).astype(np.float32), 1.0)
    W = rng.standard_normal((30, D)).astype(np.float32)
    f = eng.micro_lora.to_lm_head_lora(W)
    h = rng.standard_normal(D).astype(np.float32)
    folded = W @ h + f["lora_B"] @ (f["lora_A"] @ h) * (f["lora_alpha"] / f["r"])
    np.testing.assert_allclose(folded, W @ eng.apply_micro_lora(h), rtol=1e-4, atol=1e-5)
