"""Recording a trajectory in one call: the same checks, state and learning as step by step."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sona_plugin import DimensionMismatch, InvalidValue, SonaEngine, SonaError

D = 32
_TIME_KEYS = {"created_at", "last_accessed", "latency_us", "timestamp"}


def _trajectories(seed: int, n: int = 40) -> list[dict]:
    """Trajectories of 0 to 7 steps (beyond the engines' max_trajectory_steps of 5)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((4, D)).astype(np.float32)
    out = []
    for i in range(n):
        q = (means[i % 4] + 0.3 * rng.standard_normal(D)).astype(np.float32)
        T = int(rng.integers(0, 8))
        H = (q + 0.1 * rng.standard_normal((T, D))).astype(np.float32)
        k = int(rng.integers(0, 6))
        out.append(
            {
                "q": q,
                "H": H,
                "rewards": [float(r) for r in rng.uniform(-1, 1, T)],
                "quality": float(rng.uniform()),
                "attention": None if i % 3 == 0 else rng.dirichlet(np.ones(k + 1), T).astype("f4"),
                "actions": [int(a) for a in rng.integers(0, 3, T)] if i % 4 == 1 else None,
                "route": f"r{i % 3}" if i % 2 else None,
                "context_ids": [f"c{i}"] if i % 5 == 0 else [],
            }
        )
    return out


def _per_step(eng: SonaEngine, t: dict) -> int:
    tid = eng.begin_trajectory(t["q"])
    for i, h in enumerate(t["H"]):
        att = () if t["attention"] is None else t["attention"][i]
        extra = {} if t["actions"] is None else {"action": t["actions"][i]}
        eng.add_step(tid, h, att, t["rewards"][i], **extra)
    b = eng._open[tid]
    if t["route"] is not None:
        b.set_route(t["route"])
    for c in t["context_ids"]:
        b.add_context(c)
    return eng.end_trajectory(tid, t["quality"])


def _batched(eng: SonaEngine, t: dict) -> int:
    return eng.record_trajectory(
        t["q"],
        t["H"],
        t["rewards"],
        t["quality"],
        t["attention"],
        actions=t["actions"],
        route=t["route"],
        context_ids=t["context_ids"],
    )


def _untimed(x):
    """``x`` without wall-clock fields (the two paths run at different times)."""
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if k not in _TIME_KEYS}
    if isinstance(x, list):
        return [_untimed(v) for v in x]
    return x


def _assert_same_state(a: SonaEngine, b: SonaEngine) -> None:
    arrays_a, meta_a = a._state()
    arrays_b, meta_b = b._state()
    assert arrays_a.keys() == arrays_b.keys()
    for k in arrays_a:  # bit for bit: MicroLoRA A, B and Adam state, buffers, patterns...
        assert arrays_a[k].dtype == arrays_b[k].dtype, k
        assert arrays_a[k].tobytes() == arrays_b[k].tobytes(), k
    for m in (meta_a, meta_b):  # step rows are [reward, action, latency_us, timestamp]
        for part in ("buffer", "recent", "open"):
            m[part]["steps"] = [row[:2] for row in m[part]["steps"]]
    assert _untimed(meta_a) == _untimed(meta_b)
    sa, sb = a.stats(), b.stats()
    assert sa == sb


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"keep_attention_weights": True},
        {"micro_lora_init": "zero_b"},
        {"trajectory_capacity": 7, "max_pending_signals": 4},
    ],
    ids=["default", "keep_attention", "zero_b", "small_buffers"],
)
def test_batched_and_per_step_recording_leave_bit_identical_state(config):
    cfg = {"hidden_dim": D, "max_trajectory_steps": 5, **config}
    per, bat = SonaEngine(**cfg), SonaEngine(**cfg)
    ts = _trajectories(0)
    ids_per = [_per_step(per, t) for t in ts[:25]]
    ids_bat = [_batched(bat, t) for t in ts[:25]]
    assert ids_per == ids_bat
    _assert_same_state(per, bat)
    assert per.stats()["micro_updates"] == 25 and per.micro_lora.delta_norm() > 0
    assert any(t.steps_dropped for t in bat._buffer.peek())
    # the background cycle sees the same trajectories, and learning goes on identically
    for e in (per, bat):
        e.run_background_cycle()
    for t in ts[25:]:
        _per_step(per, t)
        _batched(bat, t)
    _assert_same_state(per, bat)
    x = ts[0]["q"]
    np.testing.assert_array_equal(per.apply_lora(x), bat.apply_lora(x))


def test_batched_record_owns_its_arrays_and_accepts_lists_and_float64():
    eng = SonaEngine(D)
    t = _trajectories(1)[3]
    H = t["H"].copy()
    tid = eng.record_trajectory(t["q"], H, t["rewards"], t["quality"])
    H[:] = np.nan  # a caller reusing its buffer
    kept = eng._recent[tid]
    np.testing.assert_array_equal(np.stack([s.activations for s in kept.steps]), t["H"])
    ref = SonaEngine(D)
    ref.record_trajectory(t["q"], t["H"], t["rewards"], t["quality"])
    other = SonaEngine(D)
    other.record_trajectory(
        t["q"].tolist(), [h.astype(np.float64) for h in t["H"]], t["rewards"], t["quality"]
    )
    _assert_same_state(ref, other)


def _nan_at(x: np.ndarray, i: int, j: int) -> np.ndarray:
    x = x.copy()
    x[i, j] = np.nan
    return x


_H = np.ones((3, D), np.float32)
_R = [0.5, 0.5, 0.5]
_A = np.full((3, 4), 0.25, np.float32)

# (name, query, activations, rewards, quality, attention, actions)
BAD = [
    ("query of the wrong dimension", np.ones(D - 1), _H, _R, 0.5, None, None),
    ("empty query", [], _H, _R, 0.5, None, None),
    ("nan in query", _nan_at(_H, 0, 3)[0], _H, _R, 0.5, None, None),
    ("nan in step 1", _H[0], _nan_at(_H, 1, 5), _R, 0.5, None, None),
    ("inf in step 2", _H[0], _H * np.array([[1], [1], [np.inf]], np.float32), _R, 0.5, None, None),
    ("huge value in step 0", _H[0], _H * np.float32(1e20), _R, 0.5, None, None),
    ("step of the wrong dimension", _H[0], [_H[0], _H[1, :-2], _H[2]], _R, 0.5, None, None),
    ("steps of the wrong dimension", _H[0], np.ones((3, D + 1)), _R, 0.5, None, None),
    ("empty step", _H[0], [_H[0], [], _H[2]], _R, 0.5, None, None),
    ("nan reward", _H[0], _H, [0.5, math.nan, 0.5], 0.5, None, None),
    ("reward above 1", _H[0], _H, [0.5, 0.5, 1.5], 0.5, None, None),
    ("reward not a number", _H[0], _H, [0.5, "x", 0.5], 0.5, None, None),
    ("nan in attention", _H[0], _H, _R, 0.5, _nan_at(_A, 2, 0), None),
    ("negative action", _H[0], _H, _R, 0.5, None, [0, -1, 2]),
    ("fractional action", _H[0], _H, _R, 0.5, None, [0.5, 1, 2]),
    ("reward and activations bad: step order wins", _H[0], _nan_at(_H, 2, 0), [0.5, 2, 0], 0.5, None, None),
    ("nan quality", _H[0], _H, _R, math.nan, None, None),
    ("quality above 1", _H[0], _H, _R, 1.5, None, None),
]  # fmt: skip


def _error(fn):
    with pytest.raises(SonaError) as info:
        fn()
    return info.value


@pytest.mark.parametrize("name,q,H,R,quality,att,actions", BAD, ids=[b[0] for b in BAD])
def test_batched_record_refuses_what_the_per_step_path_refuses_with_its_message(
    name, q, H, R, quality, att, actions
):
    failed_step = []

    def per_step():
        eng = SonaEngine(D)
        tid = eng.begin_trajectory(q)
        for i in range(len(H)):
            failed_step[:] = [i]
            extra = {} if actions is None else {"action": actions[i]}
            eng.add_step(tid, H[i], () if att is None else att[i], R[i], **extra)
        failed_step.clear()
        eng.end_trajectory(tid, quality)

    expected = _error(per_step)
    eng = SonaEngine(D)
    eng.record_trajectory(np.ones(D), _H, _R, 0.9)
    before = (eng._state()[0]["micro.A"].copy(), eng.stats())
    got = _error(lambda: eng.record_trajectory(q, H, R, quality, att, actions=actions))
    assert type(got) is type(expected)
    suffix = f" (step {failed_step[0]})" if failed_step else ""
    assert str(got) == str(expected) + suffix
    # nothing recorded, no id used
    np.testing.assert_array_equal(eng._state()[0]["micro.A"], before[0])
    assert eng.stats() == before[1]
    assert eng.record_trajectory(np.ones(D), _H, _R, 0.9) == 2


@pytest.mark.parametrize(
    "kwargs,word",
    [
        ({"activations": np.ones(D, np.float32)}, "activations must be [steps, 32]"),
        ({"activations": np.ones((1, 3, D), np.float32)}, "activations must be [steps, 32]"),
        ({"rewards": [0.5, 0.5]}, "rewards has 2 entries, expected 3"),
        ({"rewards": 0.5}, "rewards must hold one entry per step"),
        ({"attention_weights": _A[:2]}, "attention_weights has 2 entries, expected 3"),
        ({"actions": [1]}, "actions has 1 entries, expected 3"),
        ({"latency_us": -1}, "latency_us must be >= 0"),
    ],
)
def test_batched_record_names_a_shape_that_does_not_give_one_entry_per_step(kwargs, word):
    eng = SonaEngine(D)
    args = {"query_embedding": _H[0], "activations": _H, "rewards": _R, "quality": 0.5, **kwargs}
    with pytest.raises((DimensionMismatch, InvalidValue)) as info:
        eng.record_trajectory(**args)
    assert word in str(info.value)
    assert eng.stats()["trajectories_started"] == 0


def test_a_trajectory_without_steps_learns_from_its_query_as_begin_end_does():
    q = _trajectories(2)[0]["q"]
    per, bat = SonaEngine(D), SonaEngine(D)
    per.end_trajectory(per.begin_trajectory(q), 0.9)
    bat.record_trajectory(q, np.zeros((0, D), np.float32), [], 0.9)
    bat2 = SonaEngine(D)
    bat2.record_trajectory(q, [], [], 0.9)
    _assert_same_state(per, bat)
    _assert_same_state(per, bat2)
    assert bat.stats()["micro_updates"] == 1
