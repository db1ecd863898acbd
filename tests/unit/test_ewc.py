"""EWC++: online Fisher, forgetting prevented, torch autograd parity, boundaries, memory, state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from sona_plugin.config import SonaConfig
from sona_plugin.errors import DimensionMismatch, InvalidValue, SonaError, StateError
from sona_plugin.ewc import EwcPlusPlus

D = 12


def cfg(**kw) -> SonaConfig:
    base = {"ewc_lambda": 1.0, "ewc_min_lambda": 0.0, "ewc_max_lambda": 1000.0}
    base.update(kw)
    return SonaConfig(**base)


def regression_task(rng, dims, w_true, n=400, noise=0.3):
    """Linear regression whose inputs live on ``dims`` only."""
    X = np.zeros((n, D))
    X[:, dims] = rng.standard_normal((n, len(dims)))
    y = X @ w_true + noise * rng.standard_normal(n)
    return X, y


def loss(w, X, y) -> float:
    return float(np.mean((X @ w - y) ** 2))


def grad(w, X, y) -> np.ndarray:
    return 2 * X.T @ (X @ w - y) / len(y)


def train(w, X, y, steps, lr, ewc=None):
    for _ in range(steps):
        g = {"w": grad(w, X, y)}
        if ewc is not None:
            g = ewc.apply_constraints(g, {"w": w})
        w = w - lr * g["w"]
    return w


def test_penalty_keeps_task_a_parameters_near_their_optimum():
    rng = np.random.default_rng(0)
    w_a = rng.standard_normal(D)
    w_b = rng.standard_normal(D)
    XA, yA = regression_task(rng, list(range(0, 8)), w_a)  # A uses dims 0-7
    XB, yB = regression_task(rng, list(range(4, 12)), w_b)  # B uses dims 4-11 (4-7 shared)

    w = train(np.zeros(D), XA, yA, 300, 0.1)
    w_star = np.linalg.lstsq(XA, yA, rcond=None)[0]
    assert loss(w, XA, yA) < 0.15 and np.allclose(w[:8], w_star[:8], atol=1e-2)

    results = {}
    for lam in (0.0, 100.0):
        ewc = EwcPlusPlus(cfg(ewc_gamma=0.9))
        ewc.register({"w": w})
        for i in range(0, len(yA), 10):  # per-minibatch gradients at the A optimum
            ewc.update_fisher({"w": grad(w, XA[i : i + 10], yA[i : i + 10])})
        ewc.start_new_task({"w": w})
        assert ewc.set_lambda(lam) == lam
        wb = train(w.copy(), XB, yB, 300, 0.05, ewc)
        results[lam] = (np.linalg.norm(wb[:8] - w[:8]), loss(wb, XA, yA), loss(wb, XB, yB))

    drift_plain, loss_a_plain, loss_b_plain = results[0.0]
    drift_ewc, loss_a_ewc, loss_b_ewc = results[100.0]
    assert drift_ewc < 0.5 * drift_plain
    assert loss_a_ewc < 0.5 * loss_a_plain
    # B is learned either way; with the penalty it pays for remembering A
    assert loss_b_plain < 0.15 < loss_b_ewc < 0.5 * loss(w, XB, yB)


def test_online_fisher_formula():
    ewc = EwcPlusPlus(cfg(ewc_gamma=0.8))
    g1, g2, g3, g4, g5, g6 = (
        np.array([1.0, -2.0]),
        np.array([3.0, 0.5]),
        np.array([0.5, 1.0]),
        np.array([2.0, 0.0]),
        np.array([1.0, 1.0]),
        np.array([0.0, 4.0]),
    )
    # warm start: the running mean while 1/n > 1 - gamma (n <= 5 here) ...
    ewc.update_fisher({"p": g1})
    np.testing.assert_allclose(ewc.fisher["p"], g1**2, rtol=1e-6)
    ewc.update_fisher({"p": torch.tensor(g2)})
    np.testing.assert_allclose(ewc.fisher["p"], (g1**2 + g2**2) / 2, rtol=1e-6)
    for g in (g3, g4, g5):
        ewc.update_fisher({"p": g})
    mean5 = (g1**2 + g2**2 + g3**2 + g4**2 + g5**2) / 5
    np.testing.assert_allclose(ewc.fisher["p"], mean5, rtol=1e-6)
    # ... then the EMA F <- gamma F + (1 - gamma) g^2
    ewc.update_fisher({"p": g6})
    np.testing.assert_allclose(ewc.fisher["p"], 0.8 * mean5 + 0.2 * g6**2, rtol=1e-5)
    assert ewc.fisher["p"].dtype == np.float32 and ewc.fisher_updates == 6

    mean = EwcPlusPlus(cfg(ewc_online=False))
    mean.update_fisher({"p": g1})
    mean.update_fisher({"p": g2})
    np.testing.assert_allclose(mean.fisher["p"], (g1**2 + g2**2) / 2, rtol=1e-6)


def _remember(ewc, rng, shapes, tasks=1):
    for _ in range(tasks):
        for _ in range(5):
            ewc.update_fisher({n: rng.standard_normal(s) for n, s in shapes.items()})
        ewc.start_new_task({n: rng.standard_normal(s) for n, s in shapes.items()})


def test_torch_penalty_is_differentiable_and_matches_penalty_grad():
    rng = np.random.default_rng(1)
    shapes = {"lora_A": (2, 6), "lora_B": (6, 2)}
    ewc = EwcPlusPlus(cfg(ewc_lambda=3.0))
    _remember(ewc, rng, shapes, tasks=2)
    np_params = {n: rng.standard_normal(s) for n, s in shapes.items()}
    params = {
        n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in np_params.items()
    }
    pen = ewc.penalty(params)
    assert pen.dtype == torch.float64 and pen.dim() == 0 and pen.requires_grad
    assert pen.item() == pytest.approx(ewc.penalty(np_params), rel=1e-6)
    assert pen.item() > 0
    pen.backward()
    pg = ewc.penalty_grad(params)
    pg_np = ewc.penalty_grad(np_params)
    for n in shapes:
        assert isinstance(pg[n], torch.Tensor) and pg[n].dtype == torch.float64
        torch.testing.assert_close(params[n].grad, pg[n], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(pg_np[n], params[n].grad.numpy(), rtol=1e-5)
        assert pg_np[n].dtype == np.float64
    # float32 tensors stay float32 and the result enters a loss
    p32 = {
        n: torch.tensor(v, dtype=torch.float32, requires_grad=True) for n, v in np_params.items()
    }
    total = (p32["lora_A"] ** 2).sum() + ewc.penalty(p32)
    assert total.dtype == torch.float32
    total.backward()
    assert p32["lora_B"].grad is not None and p32["lora_B"].grad.abs().sum() > 0


def test_no_task_means_no_penalty():
    ewc = EwcPlusPlus(cfg())
    p = {"w": np.ones(3)}
    assert ewc.penalty(p) == 0.0
    np.testing.assert_array_equal(ewc.penalty_grad(p)["w"], np.zeros(3))
    g = {"w": np.array([1.0, 2.0, 3.0])}
    np.testing.assert_array_equal(ewc.apply_constraints(g, p)["w"], g["w"])


def test_apply_constraints_adds_the_penalty_gradient():
    rng = np.random.default_rng(2)
    ewc = EwcPlusPlus(cfg(ewc_lambda=2.0))
    _remember(ewc, rng, {"w": (4,)})
    p, g = {"w": rng.standard_normal(4)}, {"w": rng.standard_normal(4)}
    out = ewc.apply_constraints(g, p)
    np.testing.assert_allclose(out["w"], g["w"] + ewc.penalty_grad(p)["w"])
    assert not np.allclose(out["w"], g["w"])
    # numerical check of penalty_grad against the penalty itself
    eps, i = 1e-6, 2
    hi, lo = {"w": p["w"].copy()}, {"w": p["w"].copy()}
    hi["w"][i] += eps
    lo["w"][i] -= eps
    fd = (ewc.penalty(hi) - ewc.penalty(lo)) / (2 * eps)
    assert ewc.penalty_grad(p)["w"][i] == pytest.approx(fd, rel=1e-4)
    with pytest.raises(InvalidValue, match="torch"):
        ewc.apply_constraints({"w": torch.zeros(4)}, p)


# ------------------------------------------------------------------------- checking
def test_names_and_shapes_are_checked():
    ewc = EwcPlusPlus(cfg())
    ewc.register({"a": np.zeros((2, 3)), "b": np.zeros(4)})
    ewc.update_fisher({"a": np.ones((2, 3)), "b": np.ones(4)})
    before = ewc.state_dict()
    with pytest.raises(DimensionMismatch) as ei:
        ewc.update_fisher({"a": np.ones((3, 2)), "b": np.ones(4)})
    assert "'a'" in str(ei.value) and "(3, 2)" in str(ei.value) and "(2, 3)" in str(ei.value)
    assert ei.value.expected == (2, 3) and ei.value.actual == (3, 2)
    with pytest.raises(DimensionMismatch, match="lacks parameter 'b'"):
        ewc.update_fisher({"a": np.ones((2, 3))})
    with pytest.raises(DimensionMismatch, match="unknown parameter 'c'"):
        ewc.penalty({"a": np.ones((2, 3)), "b": np.ones(4), "c": np.ones(1)})
    with pytest.raises(DimensionMismatch, match="'b'"):
        ewc.penalty({"a": torch.ones(2, 3), "b": torch.ones(5)})
    with pytest.raises(DimensionMismatch, match="'a'"):
        ewc.start_new_task({"a": np.ones(6), "b": np.ones(4)})
    with pytest.raises(DimensionMismatch):
        ewc.register({"a": np.zeros((2, 3))})
    after = ewc.state_dict()
    assert json.dumps(before[1]) == json.dumps(after[1])
    for k in before[0]:
        np.testing.assert_array_equal(before[0][k], after[0][k])


def test_non_finite_gradients_are_refused_without_change():
    ewc = EwcPlusPlus(cfg())
    ewc.update_fisher({"a": np.ones(3), "b": np.ones(2)})
    before = ewc.fisher
    with pytest.raises(InvalidValue, match=r"grads\['b'\].*non-finite"):
        ewc.update_fisher({"a": np.full(3, 5.0), "b": np.array([1.0, np.nan])})
    with pytest.raises(InvalidValue, match="non-finite"):
        ewc.update_fisher({"a": torch.tensor([1.0, float("inf"), 0.0]), "b": torch.ones(2)})
    for n in before:
        np.testing.assert_array_equal(before[n], ewc.fisher[n])
    assert ewc.fisher_updates == 1
    with pytest.raises(SonaError):
        ewc.detect_task_boundary(loss=float("nan"))
    with pytest.raises(InvalidValue, match="exactly one"):
        ewc.detect_task_boundary()


def test_start_new_task_without_fisher_is_reported_as_skipped(caplog):
    ewc = EwcPlusPlus(cfg(ewc_lambda=2.0))
    with caplog.at_level("WARNING", logger="sona_plugin.ewc"):
        assert ewc.start_new_task({"w": np.ones(2)}) is False
    assert "update_fisher" in caplog.text
    assert ewc.task_count == 0 and ewc.lambda_ == 2.0
    ewc.update_fisher({"w": np.ones(2)})
    assert ewc.start_new_task({"w": np.ones(2)}) is True and ewc.task_count == 1
    with pytest.raises(InvalidValue, match="non-finite"):
        ewc.start_new_task({"w": np.array([1.0, np.inf])})


# ----------------------------------------------------------------------- boundaries
def test_boundary_fires_on_a_shift_and_not_on_a_stationary_stream():
    rng = np.random.default_rng(3)
    ewc = EwcPlusPlus(cfg(ewc_fisher_samples=50, ewc_boundary_threshold=2.0))
    fired = [ewc.detect_task_boundary(loss=1.0 + 0.1 * rng.standard_normal()) for _ in range(2000)]
    assert not any(fired)
    # a single spike (a hard batch) does not fire either
    assert not ewc.detect_task_boundary(loss=5.0)
    assert not any(
        ewc.detect_task_boundary(loss=1.0 + 0.1 * rng.standard_normal()) for _ in range(20)
    )
    shifted = [ewc.detect_task_boundary(loss=2.0 + 0.1 * rng.standard_normal()) for _ in range(10)]
    assert shifted.index(True) <= 3 and sum(shifted) == 1
    assert ewc.boundaries_detected == 1
    # the new regime is the new normal
    assert not any(
        ewc.detect_task_boundary(loss=2.0 + 0.1 * rng.standard_normal()) for _ in range(500)
    )


def test_boundary_from_gradient_norms():
    rng = np.random.default_rng(4)
    ewc = EwcPlusPlus(cfg(ewc_fisher_samples=30))
    quiet = [
        ewc.detect_task_boundary(grads={"w": 0.1 * rng.standard_normal(16)}) for _ in range(300)
    ]
    assert not any(quiet)
    loud = [ewc.detect_task_boundary(grads={"w": 1.0 * rng.standard_normal(16)}) for _ in range(5)]
    assert sum(loud) == 1 and ewc.boundaries_detected == 1


# ----------------------------------------------------------------- memory and lambda
def test_task_memory_is_bounded_and_merging_preserves_the_penalty_gradient():
    rng = np.random.default_rng(5)
    ewc = EwcPlusPlus(cfg(ewc_max_tasks=3, ewc_lambda=1.0))
    shapes = {"w": (5,), "m": (2, 2)}
    _remember(ewc, rng, shapes, tasks=3)
    assert ewc.task_count == 3
    p = {n: rng.standard_normal(s) for n, s in shapes.items()}
    ewc.set_lambda(1.0)
    g3 = ewc.penalty_grad(p)
    _remember(ewc, rng, shapes, tasks=4)
    assert ewc.task_count == 3 and ewc.stats()["tasks_merged"] == 7
    ewc.set_lambda(1.0)
    g_before = ewc.penalty_grad(p)
    assert not np.allclose(g_before["w"], g3["w"])
    ewc.consolidate_all_tasks()
    assert ewc.task_count == 1
    g_after = ewc.penalty_grad(p)
    for n in shapes:  # Σ F_t(θ−θ_t) = (Σ F_t)(θ − θ̄): consolidation keeps the pull
        np.testing.assert_allclose(g_after[n], g_before[n], rtol=1e-4, atol=1e-6)


def test_lambda_is_clamped_and_grows_with_tasks():
    rng = np.random.default_rng(6)
    ewc = EwcPlusPlus(SonaConfig(ewc_lambda=1000.0, ewc_min_lambda=100.0, ewc_max_lambda=2000.0))
    assert ewc.lambda_ == 1000.0
    assert ewc.set_lambda(1e9) == 2000.0 and ewc.set_lambda(-5) == 100.0
    with pytest.raises(InvalidValue, match="lambda"):
        ewc.set_lambda(float("nan"))
    assert ewc.lambda_ == 100.0
    seen = []
    for _ in range(40):
        _remember(ewc, rng, {"w": (3,)})
        seen.append(ewc.lambda_)
    assert seen[0] > 100.0 and seen == sorted(seen)
    assert all(100.0 <= v <= 2000.0 for v in seen) and seen[-1] == 2000.0


# ----------------------------------------------------------------------- persistence
def test_state_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(7)
    c = cfg(ewc_max_tasks=2, ewc_fisher_samples=20)
    ewc = EwcPlusPlus(c)
    shapes = {"layer.0.lora_A": (2, 8), "layer.0.lora_B": (8, 2)}
    _remember(ewc, rng, shapes, tasks=3)
    for _ in range(4):
        ewc.update_fisher({n: rng.standard_normal(s) for n, s in shapes.items()})
    for _ in range(15):
        ewc.detect_task_boundary(loss=float(rng.random()))
    arrays, meta = ewc.state_dict()
    save_file(arrays, str(tmp_path / "ewc.safetensors"))
    (tmp_path / "ewc.json").write_text(json.dumps(meta))

    back = EwcPlusPlus(c)
    back.load_state_dict(
        load_file(str(tmp_path / "ewc.safetensors")),
        json.loads((tmp_path / "ewc.json").read_text()),
    )
    assert back.stats() == ewc.stats() and back.names == ewc.names
    p = {n: rng.standard_normal(s) for n, s in shapes.items()}
    assert back.penalty(p) == ewc.penalty(p) and back.lambda_ == ewc.lambda_
    for n in shapes:
        np.testing.assert_array_equal(back.fisher[n], ewc.fisher[n])
        np.testing.assert_array_equal(back.penalty_grad(p)[n], ewc.penalty_grad(p)[n])
    stream = [float(v) for v in rng.random(30)] + [5.0] * 5
    assert [ewc.detect_task_boundary(loss=v) for v in stream] == [
        back.detect_task_boundary(loss=v) for v in stream
    ]
    g = {n: rng.standard_normal(s) for n, s in shapes.items()}
    ewc.update_fisher(g)
    back.update_fisher(g)
    ewc.start_new_task(p)
    back.start_new_task(p)
    assert back.penalty(p) == ewc.penalty(p) and back.task_count == ewc.task_count


def test_load_refuses_corrupt_state():
    rng = np.random.default_rng(8)
    ewc = EwcPlusPlus(cfg())
    _remember(ewc, rng, {"w": (3,)})
    arrays, meta = ewc.state_dict()
    fresh = EwcPlusPlus(cfg())
    with pytest.raises(StateError, match="task0.theta.w"):
        fresh.load_state_dict({k: v for k, v in arrays.items() if k != "task0.theta.w"}, meta)
    with pytest.raises(StateError, match="shape"):
        fresh.load_state_dict({**arrays, "fisher.w": np.zeros(4, np.float32)}, meta)
    with pytest.raises(StateError, match="format"):
        fresh.load_state_dict(arrays, {**meta, "format": "x"})
    assert fresh.task_count == 0 and fresh.names == []
