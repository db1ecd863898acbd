"""ReasoningBank: weighted k-means++ patterns, lookup, merge/decay/prune, errors, persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sona_plugin.config import SonaConfig
from sona_plugin.errors import DimensionMismatch, InvalidValue, SonaError, StateError
from sona_plugin.reasoning_bank import ReasoningBank
from sona_plugin.types import LearnedPattern

D = 256


def planted(seed: int, k: int = 8, n: int = 1000, d: int = D, sigma: float = 0.5):
    """n points from k Gaussian clusters: means ~ N(0, I), spread sigma."""
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((k, d)).astype(np.float32)
    y = rng.integers(0, k, n)
    X = (mu[y] + sigma * rng.standard_normal((n, d))).astype(np.float32)
    return X, y, mu


def bank_with(X, quality=1.0, **cfg) -> ReasoningBank:
    cfg.setdefault("embedding_dim", X.shape[1])
    b = ReasoningBank(SonaConfig(**cfg))
    for x in X:
        b.add_trajectory(x, quality)
    return b


def nearest(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    d = (X * X).sum(1)[:, None] - 2 * X @ C.T + (C * C).sum(1)[None, :]
    return d.argmin(1)


def snapshot(b: ReasoningBank):
    arrays, meta = b.state_dict()
    return {k: v.copy() for k, v in arrays.items()}, json.dumps(meta, sort_keys=True)


def assert_same_state(a, b):
    assert a[1] == b[1]
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        np.testing.assert_array_equal(a[0][k], b[0][k])


# --------------------------------------------------------------------------- clustering
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_planted_clusters_are_recovered(seed):
    X, y, mu = planted(seed)
    b = bank_with(X, pattern_clusters=8, seed=seed)
    patterns = b.extract_patterns()
    assert len(patterns) == b.pattern_count == 8
    assert b.trajectory_count == 0
    assert sum(p.cluster_size for p in patterns) == 1000
    C = np.stack([p.centroid for p in patterns])
    labels = nearest(X, C)
    purity = sum(np.bincount(y[labels == c]).max() for c in np.unique(labels)) / len(y)
    assert purity >= 0.95
    # every true mean has its own pattern
    assert len(set(nearest(mu, C).tolist())) == 8


def test_find_patterns_returns_the_query_clusters_pattern_first():
    X, y, mu = planted(7)
    b = bank_with(X, pattern_clusters=8)
    b.extract_patterns()
    C = np.stack([p.centroid for p in b.patterns])
    rng = np.random.default_rng(99)
    for j in range(8):
        q = mu[j] + 0.5 * rng.standard_normal(D).astype(np.float32)
        best = b.find_patterns(q, 3)
        assert len(best) == 3
        assert best[0] is b.patterns[int(nearest(mu[j : j + 1], C)[0])]
        scored = b.find_patterns_with_scores(q, 3)
        sims = [s for _, s in scored]
        assert sims == sorted(sims, reverse=True)
        assert sims[0] == pytest.approx(
            float(q @ best[0].centroid / np.linalg.norm(q) / np.linalg.norm(best[0].centroid)),
            abs=1e-5,
        )


def test_find_patterns_counts_accesses():
    X, _, _ = planted(3)
    b = bank_with(X[:200], pattern_clusters=4)
    b.extract_patterns()
    before = {p.id: (p.access_count, p.last_accessed) for p in b.patterns}
    hit = b.find_patterns(X[0], 2)
    for p in b.patterns:
        n0, t0 = before[p.id]
        if any(p is h for h in hit):
            assert p.access_count == n0 + 1 and p.last_accessed >= t0
        else:
            assert p.access_count == n0


def test_single_trajectory_gives_one_pattern():
    b = ReasoningBank(SonaConfig(embedding_dim=8))
    assert b.extract_patterns() == []
    e = np.arange(1, 9, dtype=np.float32)
    b.add_trajectory(e, 0.8, route="r1")
    (p,) = b.extract_patterns()
    np.testing.assert_array_equal(p.centroid, e)
    assert p.cluster_size == 1 and p.avg_quality == pytest.approx(0.8)
    assert p.total_weight == pytest.approx(0.8) and p.route_stats == {
        "r1": [1.0, pytest.approx(0.8)]
    }
    assert b.get_pattern(p.id) is p and b.get_pattern(p.id + 1) is None


def test_fewer_distinct_points_than_k():
    rng = np.random.default_rng(0)
    pts = rng.standard_normal((3, 16)).astype(np.float32)
    b = ReasoningBank(SonaConfig(embedding_dim=16, pattern_clusters=50))
    for i in range(30):
        b.add_trajectory(pts[i % 3], 0.5)
    patterns = b.extract_patterns()
    assert sorted(p.cluster_size for p in patterns) == [10, 10, 10]
    for p in patterns:
        assert min(np.abs(p.centroid - x).max() for x in pts) < 1e-6


def test_extraction_is_deterministic_for_a_seed():
    X, _, _ = planted(5, n=300)
    runs = []
    for _ in range(2):
        b = bank_with(X, pattern_clusters=20, seed=11)
        runs.append(np.stack([p.centroid for p in b.extract_patterns()]))
    np.testing.assert_array_equal(runs[0], runs[1])


def test_quality_weighting_pulls_the_centroid():
    rng = np.random.default_rng(1)
    a, c = np.zeros(32, np.float32), np.zeros(32, np.float32)
    a[0], c[1] = 10.0, 10.0  # one cluster (k=1) mixing points near a and near c
    A = (a + 0.1 * rng.standard_normal((50, 32))).astype(np.float32)
    Cp = (c + 0.1 * rng.standard_normal((50, 32))).astype(np.float32)

    def centroid(q_c: float) -> np.ndarray:
        b = ReasoningBank(SonaConfig(embedding_dim=32, pattern_clusters=1))
        for x in A:
            b.add_trajectory(x, 1.0)
        for x in Cp:
            b.add_trajectory(x, q_c)
        (p,) = b.extract_patterns()
        return p

    low, high = centroid(0.0), centroid(1.0)
    assert np.linalg.norm(low.centroid - a) < 0.1 * np.linalg.norm(high.centroid - a)
    assert low.avg_quality > 0.99 and high.avg_quality == pytest.approx(1.0)
    assert low.cluster_size == high.cluster_size == 100
    # an explicit weight overrides the quality-derived one
    b = ReasoningBank(SonaConfig(embedding_dim=32, pattern_clusters=1))
    for x in A:
        b.add_trajectory(x, 1.0)
    for x in Cp:
        b.add_trajectory(x, 0.0, weight=1.0)
    (p,) = b.extract_patterns()
    assert np.linalg.norm(p.centroid - a) == pytest.approx(np.linalg.norm(p.centroid - c), rel=0.05)


def test_small_clusters_are_dropped_and_counted():
    X, _, _ = planted(2, k=2, n=60, d=16)
    b = bank_with(X, pattern_clusters=3, pattern_min_cluster_size=2)
    b.add_trajectory(np.full(16, 40.0, np.float32), 1.0)  # a lone far outlier: its own cluster
    patterns = b.extract_patterns()
    assert b.stats()["clusters_dropped"] == 1
    assert sum(p.cluster_size for p in patterns) == 60


def test_route_stats_and_route_quality():
    rng = np.random.default_rng(4)
    u, v = np.zeros(16, np.float32), np.zeros(16, np.float32)
    u[0], v[1] = 1.0, 1.0
    b = ReasoningBank(SonaConfig(embedding_dim=16, pattern_clusters=2))
    for i in range(40):
        b.add_trajectory(
            u + 0.01 * rng.standard_normal(16),
            0.9 if i % 2 else 0.1,
            route="fast" if i % 2 else "slow",
        )
        b.add_trajectory(v + 0.01 * rng.standard_normal(16), 0.3, route="fast")
    b.extract_patterns()
    near_u = b.route_quality(u, k=1)
    assert near_u == pytest.approx({"fast": 0.9, "slow": 0.1})
    near_v = b.route_quality(v, k=1)
    assert near_v == pytest.approx({"fast": 0.3})
    pu = b.find_patterns(u, 1)[0]
    assert pu.route_stats["fast"][0] == 20 and pu.route_stats["slow"][0] == 20


# ------------------------------------------------------------------------ bank upkeep
def _pattern(c, q=0.5, w=1.0, n=1) -> LearnedPattern:
    return LearnedPattern(
        id=0,
        centroid=np.asarray(c, np.float32),
        cluster_size=n,
        total_weight=w,
        avg_quality=q,
        quality_sq_sum=w * q * q,
    )


def test_near_duplicates_merge_on_add():
    b = ReasoningBank(SonaConfig(embedding_dim=4, pattern_merge_similarity=0.98))
    p1 = b.add_pattern(_pattern([1, 0, 0, 0], q=1.0, w=1.0, n=2))
    p2 = b.add_pattern(_pattern([1, 0.05, 0, 0], q=0.0, w=3.0, n=1))
    assert p2 is p1 and b.pattern_count == 1
    assert p1.cluster_size == 3 and p1.total_weight == pytest.approx(4.0)
    assert p1.avg_quality == pytest.approx(0.25)
    np.testing.assert_allclose(p1.centroid, [1, 0.0375, 0, 0], rtol=1e-6)
    p3 = b.add_pattern(_pattern([0, 1, 0, 0]))
    assert p3 is not p1 and b.pattern_count == 2 and p3.id > p1.id
    # the near-duplicate lookup sees the merged centroid
    assert b.find_patterns([1, 0.0375, 0, 0], 1)[0] is p1


def test_extraction_merges_into_existing_pattern():
    X, _, _ = planted(8, k=3, n=300, d=32)
    b = bank_with(X, pattern_clusters=3)
    first = b.extract_patterns()
    ids = sorted(p.id for p in first)
    for x in X[:150]:
        b.add_trajectory(x, 1.0)
    second = b.extract_patterns()
    assert b.pattern_count == 3 and {p.id for p in second} <= set(ids)
    assert sum(p.cluster_size for p in b.patterns) == 450
    assert b.stats()["patterns_merged"] == len(second)


def test_merge_similar():
    loose = SonaConfig(embedding_dim=4, pattern_merge_similarity=0.999)
    b = ReasoningBank(loose)
    b.add_pattern(_pattern([1, 0, 0, 0]))
    b.add_pattern(_pattern([1, 0.1, 0, 0]))  # cosine 0.995: kept apart at 0.999
    b.add_pattern(_pattern([0, 0, 1, 0]))
    assert b.pattern_count == 3 and b.merge_similar() == 0
    strict = ReasoningBank(SonaConfig(embedding_dim=4, pattern_merge_similarity=0.99))
    strict.load_state_dict(*b.state_dict())
    assert strict.merge_similar() == 1
    assert strict.pattern_count == 2
    assert sorted(p.cluster_size for p in strict.patterns) == [1, 2]
    assert {p.id for p in strict.patterns} == {0, 2}  # the older id survives
    assert strict.find_patterns([1, 0.05, 0, 0], 1)[0].cluster_size == 2


def test_decay_lowers_weight():
    b = ReasoningBank(SonaConfig(embedding_dim=4, pattern_decay=0.5))
    p = b.add_pattern(_pattern([1, 2, 3, 4], w=2.0))
    b.decay()
    assert p.total_weight == pytest.approx(1.0)
    b.decay(0.1)
    assert p.total_weight == pytest.approx(0.1)
    with pytest.raises(InvalidValue, match="factor"):
        b.decay(1.5)
    assert p.total_weight == pytest.approx(0.1)


def test_prune_removes_low_quality_unused_patterns():
    cfg = SonaConfig(embedding_dim=4, pattern_prune_quality=0.2, pattern_prune_min_accesses=1)
    b = ReasoningBank(cfg)
    weak = b.add_pattern(_pattern([1, 0, 0, 0], q=0.05))
    used = b.add_pattern(_pattern([0, 1, 0, 0], q=0.05))
    good = b.add_pattern(_pattern([0, 0, 1, 0], q=0.9))
    assert b.find_patterns([0, 1, 0, 0], 1) == [used]
    assert b.prune() == 1
    assert b.get_pattern(weak.id) is None
    assert b.get_pattern(used.id) is used and b.get_pattern(good.id) is good
    assert b.pattern_count == 2 and b.stats()["patterns_pruned"] == 1
    b.decay(0.0)  # no weight left: everything goes
    assert b.prune() == 2 and b.pattern_count == 0


def test_max_patterns_keeps_the_strongest():
    b = ReasoningBank(SonaConfig(embedding_dim=4, max_patterns=2))
    b.add_pattern(_pattern([1, 0, 0, 0], q=0.9, w=5))
    b.add_pattern(_pattern([0, 1, 0, 0], q=0.1, w=1))
    b.add_pattern(_pattern([0, 0, 1, 0], q=0.8, w=5))
    assert b.pattern_count == 2
    assert sorted(p.avg_quality for p in b.patterns) == [0.8, 0.9]
    assert b.stats()["patterns_evicted"] == 1


def test_strong_patterns_and_clear():
    b = ReasoningBank(SonaConfig(embedding_dim=4, pattern_quality_threshold=0.7))
    b.add_pattern(_pattern([1, 0, 0, 0], q=0.9))
    b.add_pattern(_pattern([0, 1, 0, 0], q=0.5))
    assert [p.avg_quality for p in b.strong_patterns()] == [0.9]
    b.add_trajectory([1, 1, 1, 1], 0.5)
    last_id = max(p.id for p in b.patterns)
    b.clear()
    assert (
        b.pattern_count == 0 and b.trajectory_count == 0 and b.find_patterns([1, 0, 0, 0], 3) == []
    )
    assert b.add_pattern(_pattern([1, 0, 0, 0])).id > last_id


def test_pending_pool_is_bounded_and_drops_the_oldest():
    b = ReasoningBank(SonaConfig(embedding_dim=2, trajectory_capacity=10))
    for i in range(15):
        b.add_trajectory([float(i), 1.0], 0.5)
    assert b.trajectory_count == 10 and b.dropped == 5
    arrays, _ = b.state_dict()
    np.testing.assert_array_equal(arrays["pending_embeddings"][:, 0], np.arange(5, 15))
    assert b.stats()["dropped"] == 5


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "emb,exc,words",
    [
        (np.zeros(7, np.float32), DimensionMismatch, ["embedding", "8"]),
        (np.zeros((2, 8), np.float32), DimensionMismatch, ["embedding", "1-D"]),
        (np.zeros(0, np.float32), InvalidValue, ["embedding", "empty"]),
        (np.r_[np.zeros(7), np.nan].astype(np.float32), InvalidValue, ["embedding", "non-finite"]),
        (np.r_[np.zeros(7), np.inf], InvalidValue, ["embedding", "non-finite"]),
        ("abc", InvalidValue, ["embedding"]),
    ],
)
def test_bad_embedding_raises_and_changes_nothing(emb, exc, words):
    b = ReasoningBank(SonaConfig(embedding_dim=8))
    b.add_trajectory(np.ones(8), 0.5)
    b.add_pattern(_pattern(np.ones(8)))
    before = snapshot(b)
    with pytest.raises(exc) as ei:
        b.add_trajectory(emb, 0.5)
    assert isinstance(ei.value, SonaError)
    for w in words:
        assert w in str(ei.value)
    assert_same_state(before, snapshot(b))
    if exc is DimensionMismatch and emb.ndim == 1:
        assert (ei.value.expected, ei.value.actual) == (8, 7)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"quality": float("nan")}, ["quality"]),
        ({"quality": 1.5}, ["quality", "1.5"]),
        ({"quality": -0.1}, ["quality"]),
        ({"quality": 0.5, "weight": 0.0}, ["weight", "> 0"]),
        ({"quality": 0.5, "weight": float("inf")}, ["weight"]),
        ({"quality": 0.5, "route": 3}, ["route"]),
    ],
)
def test_bad_quality_weight_route_raise_and_change_nothing(kwargs, words):
    b = ReasoningBank(SonaConfig(embedding_dim=4))
    b.add_trajectory(np.ones(4), 0.5)
    before = snapshot(b)
    with pytest.raises(InvalidValue) as ei:
        b.add_trajectory(np.ones(4), **kwargs)
    for w in words:
        assert w in str(ei.value)
    assert_same_state(before, snapshot(b))


@pytest.mark.parametrize(
    "query,k,exc,words",
    [
        (np.ones(4), 0, InvalidValue, ["k", "> 0", "got 0"]),
        (np.ones(4), -2, InvalidValue, ["k", "got -2"]),
        (np.ones(4), 1.5, InvalidValue, ["k"]),
        (np.ones(5), 1, DimensionMismatch, ["query", "5", "expected 4"]),
        ([1.0, np.nan, 0, 0], 1, InvalidValue, ["query", "non-finite"]),
        ([], 1, InvalidValue, ["query", "empty"]),
    ],
)
def test_bad_lookup_raises_and_changes_nothing(query, k, exc, words):
    b = ReasoningBank(SonaConfig(embedding_dim=4))
    b.add_pattern(_pattern([1, 0, 0, 0]))
    before = snapshot(b)
    with pytest.raises(exc) as ei:
        b.find_patterns(query, k)
    for w in words:
        assert w in str(ei.value)
    assert_same_state(before, snapshot(b))


def test_bad_pattern_is_refused():
    b = ReasoningBank(SonaConfig(embedding_dim=4))
    with pytest.raises(DimensionMismatch, match="centroid"):
        b.add_pattern(_pattern([1, 0, 0]))
    with pytest.raises(InvalidValue, match="avg_quality"):
        b.add_pattern(_pattern([1, 0, 0, 0], q=2.0))
    with pytest.raises(InvalidValue, match="total_weight"):
        b.add_pattern(_pattern([1, 0, 0, 0], w=float("nan")))
    assert b.pattern_count == 0


# ----------------------------------------------------------------------- persistence
def test_state_round_trip_through_safetensors_and_json(tmp_path):
    X, _, _ = planted(6, n=400, d=64)
    cfg = {"embedding_dim": 64, "pattern_clusters": 6, "trajectory_capacity": 30}
    b = bank_with(X, quality=0.8, **cfg)
    b.extract_patterns()
    b.find_patterns(X[0], 2)
    for i, x in enumerate(X[:50]):  # a pending pool that has wrapped around
        b.add_trajectory(x, 0.3, route=f"r{i % 3}")
    arrays, meta = b.state_dict()
    save_file(arrays, str(tmp_path / "bank.safetensors"))
    (tmp_path / "bank.json").write_text(json.dumps(meta))

    assert b.dropped == (400 - 30) + (50 - 30)
    c = ReasoningBank(SonaConfig(**cfg))
    c.load_state_dict(
        load_file(str(tmp_path / "bank.safetensors")),
        json.loads((tmp_path / "bank.json").read_text()),
    )
    assert c.stats() == b.stats()
    assert_same_state(snapshot(b), snapshot(c))
    rng = np.random.default_rng(0)
    for _ in range(5):
        q = rng.standard_normal(64).astype(np.float32)
        rb = b.find_patterns_with_scores(q, 3)
        rc = c.find_patterns_with_scores(q, 3)
        assert [(p.id, s) for p, s in rb] == [(p.id, s) for p, s in rc]
    # the next extraction (same pending pool, same k-means++ draw) matches too
    pb, pc = b.extract_patterns(), c.extract_patterns()
    assert [p.id for p in pb] == [p.id for p in pc]
    for x, y in zip(pb, pc, strict=True):
        np.testing.assert_array_equal(x.centroid, y.centroid)
        assert x.route_stats == y.route_stats and x.total_weight == y.total_weight
    assert c.stats() == b.stats()


def test_load_refuses_foreign_or_corrupt_state():
    b = ReasoningBank(SonaConfig(embedding_dim=4))
    b.add_pattern(_pattern([1, 0, 0, 0]))
    arrays, meta = b.state_dict()
    other = ReasoningBank(SonaConfig(embedding_dim=8))
    with pytest.raises(DimensionMismatch, match="embed_dim"):
        other.load_state_dict(arrays, meta)
    target = ReasoningBank(SonaConfig(embedding_dim=4))
    target.add_pattern(_pattern([0, 1, 0, 0]))
    before = snapshot(target)
    with pytest.raises(StateError):
        target.load_state_dict({k: v for k, v in arrays.items() if k != "centroids"}, meta)
    with pytest.raises(StateError, match="format"):
        target.load_state_dict(arrays, {**meta, "format": "something else"})
    with pytest.raises(StateError, match="centroids"):
        target.load_state_dict({**arrays, "centroids": np.zeros((3, 4), np.float32)}, meta)
    assert_same_state(before, snapshot(target))


def test_stats_are_json_serialisable():
    X, _, _ = planted(1, n=100, d=16)
    b = bank_with(X, pattern_clusters=4)
    b.extract_patterns()
    s = json.loads(json.dumps(b.stats()))
    assert s["pattern_count"] == 4 and s["extractions"] == 1 and s["patterns_created"] == 4


def test_batch_add_equals_one_by_one_and_refuses_bad_rows():
    cfg = SonaConfig(hidden_dim=16, pattern_clusters=3)
    rng = np.random.default_rng(3)
    E = rng.standard_normal((40, 16)).astype(np.float32)
    Q = rng.uniform(size=40)
    routes = [str(i % 3) for i in range(40)]
    a, b = ReasoningBank(cfg), ReasoningBank(cfg)
    for e, q, r in zip(E, Q, routes):
        a.add_trajectory(e, float(q), r)
    b.add_trajectories(E, Q, routes)
    pa, pb = a.extract_patterns(), b.extract_patterns()
    assert [p.avg_quality for p in pa] == pytest.approx([p.avg_quality for p in pb])
    bad = E.copy()
    bad[7, 3] = np.inf
    with pytest.raises(InvalidValue):
        b.add_trajectories(bad, Q)
    with pytest.raises(InvalidValue):
        b.add_trajectories(E, np.full(40, 1.5))
    assert b.trajectory_count == 0
