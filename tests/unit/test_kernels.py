"""sona_plugin.kernels: native C++ kernels against the NumPy reference, at every SIMD level.

Tolerances: float32 results may differ between the two implementations by their
summation order.  The rounding error of a float32 dot product is bounded by
~d·eps times the sum of |terms|, so each comparison scales its tolerance with
that magnitude (computed in float64 from |inputs|): 1e-5 relative to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sona_plugin import _kernels_numpy as ref
from sona_plugin import kernels as K
from sona_plugin.errors import DimensionMismatch, InvalidValue

IMPLS = [
    pytest.param(K, id="native"),
    pytest.param(ref, id="numpy"),
]
LEVELS = K.simd_levels()
F32 = np.float32
HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEEDS = st.integers(0, 2**32 - 1)


@contextmanager
def simd(level: str):
    old = K.BACKEND.simd
    K.set_simd_level(level)
    try:
        yield
    finally:
        K.set_simd_level(old)


def randn(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(F32)


def assert_close(got, want, magnitude, rel=1e-5):
    """|got - want| <= rel * (magnitude + 1), elementwise; magnitude ~ sum of |terms|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err = np.abs(got - want)
    tol = rel * (np.asarray(magnitude, np.float64) + 1.0)
    assert np.all(err <= tol), f"max err {err.max()} (tol there {tol.flat[np.argmax(err - tol)]})"


# ---------------------------------------------------------------- backend --


def test_backend_is_native_unless_numpy_requested():
    # Fails when the extension did not build/import (instead of silently testing NumPy twice).
    if os.environ.get("SONA_KERNELS", "").lower() == "numpy":
        assert (K.BACKEND.name, K.BACKEND.simd) == ("numpy", "none")
    else:
        assert K.BACKEND.name == "native"
        assert K.BACKEND.simd in ("avx512", "avx2", "neon", "scalar")
        assert K.micro_lora_forward.__module__ == "sona_plugin._native"
        assert K.BACKEND.simd in LEVELS and "native" in K.BACKEND.describe()


_numpy_requested = os.environ.get("SONA_KERNELS", "").lower() == "numpy"
native_only = pytest.mark.skipif(_numpy_requested, reason="SIMD levels of the native kernels")


@native_only
def test_simd_level_choice_matches_cpu():
    from sona_plugin import _native

    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    words = set(flags.split())
    cap = os.environ.get("SONA_SIMD", "")
    if words and not cap:
        expected = (
            "avx512" if "avx512f" in words else "avx2" if {"avx2", "fma"} <= words else "scalar"
        )
        assert LEVELS[0] == expected
        assert _native.simd_level() == expected == K.BACKEND.simd
    assert LEVELS[-1] == "scalar"


@native_only
def test_set_simd_level_validates():
    with pytest.raises(InvalidValue, match="unknown SIMD level 'sse9'"):
        K.set_simd_level("sse9")
    unsupported = [lv for lv in ("avx512", "avx2", "neon") if lv not in LEVELS]
    for lv in unsupported:
        with pytest.raises(InvalidValue, match="does not support"):
            K.set_simd_level(lv)
    for lv in LEVELS:
        with simd(lv):
            assert K.BACKEND.simd == lv
    assert K.BACKEND.simd == LEVELS[0]


def _run_python(code: str, **env: str) -> dict:
    full_env = {**os.environ, **env}
    res = subprocess.run(
        [sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


_SUBPROCESS_CODE = """
import json, numpy as np
from sona_plugin import kernels as K
rng = np.random.default_rng(7)
x = rng.standard_normal((3, 64)).astype(np.float32)
A = rng.standard_normal((2, 64)).astype(np.float32)
B = rng.standard_normal((64, 2)).astype(np.float32)
y = K.micro_lora_forward(x, A, B, 0.5)
idx, sims = K.cosine_topk(x, x[1], 2)
lab, _ = K.kmeans_assign(x, x[::-1].copy())
print(json.dumps({"name": K.BACKEND.name, "simd": K.BACKEND.simd, "y": y.tolist(),
                  "idx": idx.tolist(), "sims": sims.tolist(), "lab": lab.tolist(),
                  "fn": K.micro_lora_forward.__module__}))
"""


def _subprocess_inputs():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 64)).astype(F32)
    A = rng.standard_normal((2, 64)).astype(F32)
    B = rng.standard_normal((64, 2)).astype(F32)
    return x, A, B


def test_numpy_fallback_selectable_by_env():
    out = _run_python(_SUBPROCESS_CODE, SONA_KERNELS="numpy")
    assert out["name"] == "numpy" and out["simd"] == "none"
    assert out["fn"] == "sona_plugin._kernels_numpy"
    x, A, B = _subprocess_inputs()
    assert_close(out["y"], K.micro_lora_forward(x, A, B, 0.5), 100.0)
    idx, sims = K.cosine_topk(x, x[1], 2)
    assert out["idx"] == idx.tolist() and out["idx"][0] == 1
    assert_close(out["sims"], sims, 1.0)
    assert out["lab"] == K.kmeans_assign(x, x[::-1].copy())[0].tolist() == [2, 1, 0]


def test_simd_env_caps_level():
    out = _run_python(_SUBPROCESS_CODE, SONA_SIMD="scalar", SONA_KERNELS="")
    assert out["name"] == "native" and out["simd"] == "scalar"
    x, A, B = _subprocess_inputs()
    assert_close(out["y"], K.micro_lora_forward(x, A, B, 0.5), 100.0)


# ----------------------------------------------------- micro_lora_forward --


def _lora_magnitude(x, A, B, s):
    x64, A64, B64 = (np.abs(a.astype(np.float64)) for a in (x, A, B))
    return x64 + abs(s) * (x64 @ A64.T) @ B64.T


@HYP
@given(
    n=st.integers(0, 40),  # 0: a single 1-D vector
    d=st.integers(1, 600),
    r=st.one_of(st.integers(1, 2), st.integers(3, 20)),
    scale=st.floats(-4, 4),
    seed=SEEDS,
)
def test_micro_lora_forward_matches_reference(n, d, r, scale, seed):
    rng = np.random.default_rng(seed)
    x = randn(rng, n, d) if n else randn(rng, d)
    A, B = randn(rng, r, d), randn(rng, d, r)
    want = ref.micro_lora_forward(x, A, B, scale)
    mag = _lora_magnitude(x, A, B, scale)
    for level in LEVELS:
        with simd(level):
            out = np.full_like(x, np.nan)
            assert K.micro_lora_forward(x, A, B, scale, out) is out
            assert_close(out, want, mag)
            fresh = K.micro_lora_forward(x, A, B, scale)
            assert type(fresh) is np.ndarray and fresh.dtype == F32 and fresh.shape == x.shape
            np.testing.assert_array_equal(fresh, out)


def test_micro_lora_reference_is_right():
    # Independent float64 check of the reference (the native is compared against it).
    rng = np.random.default_rng(1)
    x, A, B = randn(rng, 4, 33), randn(rng, 2, 33), randn(rng, 33, 2)
    want = x.astype(np.float64) + 0.7 * (B.astype(np.float64) @ (A.astype(np.float64) @ x.T)).T
    assert_close(ref.micro_lora_forward(x, A, B, 0.7), want, _lora_magnitude(x, A, B, 0.7))
    assert_close(K.micro_lora_forward(x, A, B, 0.7), want, _lora_magnitude(x, A, B, 0.7))


@pytest.mark.parametrize("impl", IMPLS)
@HYP
@given(
    n=st.integers(0, 5),
    d=st.integers(1, 300),
    data=st.data(),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
)
def test_non_finite_x_raises_with_index(impl, n, d, data, bad):
    rng = np.random.default_rng(0)
    x = randn(rng, n, d) if n else randn(rng, d)
    A, B = randn(rng, 2, d), randn(rng, d, 2)
    pos = tuple(data.draw(st.integers(0, s - 1)) for s in x.shape)
    x[pos] = bad
    # Only the first non-finite element is reported, so plant another one later.
    flat = np.ravel_multi_index(pos, x.shape)
    if flat + 1 < x.size:
        x.flat[flat + 1] = np.nan
    snapshot = [a.copy() for a in (x, A, B)]
    where = str(pos[0]) if x.ndim == 1 else f"({pos[0]}, {pos[1]})"
    levels = LEVELS if impl is K else [None]
    for level in levels:
        with simd(level) if level else _nullctx():
            with pytest.raises(InvalidValue) as ei:
                impl.micro_lora_forward(x, A, B, 1.0, np.empty_like(x))
            assert str(ei.value) == f"x contains a non-finite value at index {where}"
    for a, b in zip((x, A, B), snapshot, strict=True):
        np.testing.assert_array_equal(a, b)


@contextmanager
def _nullctx():
    yield


@pytest.mark.parametrize("impl", IMPLS)
def test_micro_lora_forward_errors(impl):
    rng = np.random.default_rng(0)
    x, A, B = randn(rng, 256), randn(rng, 2, 256), randn(rng, 256, 2)
    with pytest.raises(DimensionMismatch, match=r"^x has dimension 100, expected 256$") as ei:
        impl.micro_lora_forward(randn(rng, 100), A, B, 1.0)
    assert (ei.value.expected, ei.value.actual) == (256, 100)
    with pytest.raises(DimensionMismatch, match="B has 2 columns, expected 3") as ei:
        impl.micro_lora_forward(x, randn(rng, 3, 256), B, 1.0)
    assert (ei.value.expected, ei.value.actual) == (3, 2)
    with pytest.raises(DimensionMismatch, match="B has 255 rows, expected 256"):
        impl.micro_lora_forward(x, A, randn(rng, 255, 2), 1.0)
    with pytest.raises(DimensionMismatch, match=r"out has shape \(255,\), expected \(256,\)"):
        impl.micro_lora_forward(x, A, B, 1.0, randn(rng, 255))
    with pytest.raises(InvalidValue, match="x must be a C-contiguous float32 array, got float64"):
        impl.micro_lora_forward(x.astype(np.float64), A, B, 1.0)
    with pytest.raises(InvalidValue, match="A must be a C-contiguous float32 array, got float64"):
        impl.micro_lora_forward(x, A.astype(np.float64), B, 1.0)
    with pytest.raises(InvalidValue, match="out must be a C-contiguous float32 array, got int64"):
        impl.micro_lora_forward(x, A, B, 1.0, np.empty(256, np.int64))
    with pytest.raises(InvalidValue, match="B must be .*got a non-contiguous array"):
        impl.micro_lora_forward(x, A, B.T.copy().T, 1.0)
    with pytest.raises(InvalidValue, match="got list"):
        impl.micro_lora_forward([1.0] * 256, A, B, 1.0)
    with pytest.raises(InvalidValue, match=r"x is empty, shape \(0,\)"):
        impl.micro_lora_forward(np.empty(0, F32), A, B, 1.0)
    with pytest.raises(InvalidValue, match="x must be 1-D"):
        impl.micro_lora_forward(np.ones((1, 1, 256), F32), A, B, 1.0)
    with pytest.raises(InvalidValue, match="scale must be finite"):
        impl.micro_lora_forward(x, A, B, float("inf"))
    with pytest.raises(InvalidValue, match="out must not share memory"):
        impl.micro_lora_forward(x, A, B, 1.0, x)
    ro = np.empty_like(x)
    ro.flags.writeable = False
    with pytest.raises(InvalidValue, match="out is read-only"):
        impl.micro_lora_forward(x, A, B, 1.0, ro)
    # Read-only inputs are fine.
    x.flags.writeable = False
    assert impl.micro_lora_forward(x, A, B, 1.0).shape == (256,)


def test_error_messages_identical_between_backends():
    rng = np.random.default_rng(0)
    x, A, B = randn(rng, 3, 16), randn(rng, 2, 16), randn(rng, 16, 2)
    cases = [
        (x.astype(np.float16), A, B, 1.0),
        (x, A[:, :8], B, 1.0),
        (x[:, ::2], A, B, 1.0),
        (x, A, B[:8], 1.0),
        (x, A, B, np.nan),
        (x, A, B, 1.0, np.empty((3, 15), F32)),
        (x, A, B, 1.0, np.empty((1, 3, 16), F32)),
        (x, A, B, 1.0, np.empty((3, 16), np.int64)),
        ("abc", A, B, 1.0),
    ]
    for args in cases:
        msgs = []
        for impl in (K, ref):
            with pytest.raises((InvalidValue, DimensionMismatch)) as ei:
                impl.micro_lora_forward(*args)
            msgs.append((type(ei.value), str(ei.value)))
        assert msgs[0] == msgs[1]


def test_numpy_fast_path_and_generic_path_agree():
    from sona_plugin import _native

    assert _native.numpy_fast_path()  # exact ndarrays skip DLPack (the 256-d latency path)

    class Sub(np.ndarray):  # not an exact ndarray: goes through DLPack / buffer import
        pass

    rng = np.random.default_rng(8)
    x, A, B = randn(rng, 3, 40), randn(rng, 2, 40), randn(rng, 40, 2)
    out = np.empty_like(x).view(Sub)
    K.micro_lora_forward(x.view(Sub), A.view(Sub), B, 0.5, out)
    np.testing.assert_array_equal(out, K.micro_lora_forward(x, A, B, 0.5))
    with pytest.raises(InvalidValue, match="x must be a C-contiguous float32 array, got float64"):
        K.micro_lora_forward(x.astype(np.float64).view(Sub), A, B, 0.5)
    with pytest.raises(InvalidValue, match="non-contiguous"):
        K.micro_lora_forward(x[:, ::2].copy().view(Sub)[:, ::2], A[:, :10], B[:10], 0.5)


# ------------------------------------------------------------------ torch --


@pytest.mark.parametrize("impl", IMPLS)
def test_torch_tensors_in_place_without_copies(impl):
    rng = np.random.default_rng(3)
    x, A, B = randn(rng, 5, 256), randn(rng, 2, 256), randn(rng, 256, 2)
    xt, At, Bt = (torch.from_numpy(a.copy()) for a in (x, A, B))
    out_t = torch.full_like(xt, float("nan"))
    ptr = out_t.data_ptr()
    res = impl.micro_lora_forward(xt, At, Bt, 0.25, out_t)
    assert res is out_t and out_t.data_ptr() == ptr
    want = ref.micro_lora_forward(x, A, B, 0.25)
    assert_close(out_t.numpy(), want, _lora_magnitude(x, A, B, 0.25))
    # 1-D tensor, omitted out: a new torch tensor.
    fresh = impl.micro_lora_forward(xt[0], At, Bt, 0.25)
    assert isinstance(fresh, torch.Tensor) and fresh.dtype == torch.float32
    assert_close(fresh.numpy(), want[0], _lora_magnitude(x[0], A, B, 0.25))
    # Gradients accumulate into torch tensors in place.
    gA, gB = torch.zeros(2, 256), torch.zeros(256, 2)
    pa, pb = gA.data_ptr(), gB.data_ptr()
    impl.reinforce_accumulate(xt, xt, torch.ones(5), At, Bt, 1.0, gA, gB)
    assert gA.data_ptr() == pa and gB.data_ptr() == pb and float(gA.abs().sum()) > 0
    labels, dists = impl.kmeans_assign(xt, xt[:2].clone())
    assert labels.dtype == torch.int64 and labels[:2].tolist() == [0, 1]
    assert dists.dtype == torch.float32
    with pytest.raises(InvalidValue, match="x must be a C-contiguous float32 array, got float64"):
        impl.micro_lora_forward(xt.double(), At, Bt, 1.0)
    with pytest.raises(InvalidValue, match="non-contiguous"):
        impl.micro_lora_forward(xt, At, Bt.T.contiguous().T, 1.0)
    with pytest.raises(InvalidValue, match=r"x requires grad; pass x\.detach\(\)"):
        impl.micro_lora_forward(xt.clone().requires_grad_(), At, Bt, 1.0)


# --------------------------------------------------- reinforce_accumulate --


def _grads_float64(H, G, adv, A, B, s):
    H, G, adv, A, B = (a.astype(np.float64) for a in (H, G, adv, A, B))
    gB = s * (G * adv[:, None]).T @ (H @ A.T)
    gA = s * ((G @ B) * adv[:, None]).T @ H
    mB = abs(s) * (np.abs(G * adv[:, None])).T @ (np.abs(H) @ np.abs(A).T)
    mA = abs(s) * ((np.abs(G) @ np.abs(B)) * np.abs(adv[:, None])).T @ np.abs(H)
    return gA, gB, mA, mB


@HYP
@given(
    T=st.integers(0, 40),
    d=st.integers(1, 600),
    r=st.one_of(st.integers(1, 2), st.integers(3, 20)),
    scale=st.floats(-4, 4),
    seed=SEEDS,
)
def test_reinforce_accumulate_matches_reference(T, d, r, scale, seed):
    rng = np.random.default_rng(seed)
    H, G, adv = randn(rng, T, d), randn(rng, T, d), randn(rng, T)
    A, B = randn(rng, r, d), randn(rng, d, r)
    gA0, gB0 = randn(rng, r, d), randn(rng, d, r)
    wantA, wantB = gA0.copy(), gB0.copy()
    ref.reinforce_accumulate(H, G, adv, A, B, scale, wantA, wantB)
    _, _, mA, mB = _grads_float64(H, G, adv, A, B, scale)
    for level in LEVELS:
        with simd(level):
            gA, gB = gA0.copy(), gB0.copy()
            assert K.reinforce_accumulate(H, G, adv, A, B, scale, gA, gB) is None
            assert_close(gA, wantA, mA + np.abs(gA0))
            assert_close(gB, wantB, mB + np.abs(gB0))


def test_reinforce_gradients_are_exact_autograd_gradients():
    rng = np.random.default_rng(5)
    T, d, r, s = 6, 40, 2, 0.3
    H, G, adv, A, B = (
        randn(rng, T, d),
        randn(rng, T, d),
        randn(rng, T),
        randn(rng, r, d),
        randn(rng, d, r),
    )
    At = torch.tensor(A, dtype=torch.float64, requires_grad=True)
    Bt = torch.tensor(B, dtype=torch.float64, requires_grad=True)
    Ht, Gt, advt = (torch.tensor(a, dtype=torch.float64) for a in (H, G, adv))
    Y = Ht + s * (Ht @ At.T) @ Bt.T  # y_t = h_t + s B A h_t
    (advt * (Gt * Y).sum(1)).sum().backward()
    _, _, mA, mB = _grads_float64(H, G, adv, A, B, s)
    for impl in (K, ref):
        gA, gB = np.zeros((r, d), F32), np.zeros((d, r), F32)
        impl.reinforce_accumulate(H, G, adv, A, B, s, gA, gB)
        assert_close(gA, At.grad.numpy(), mA)
        assert_close(gB, Bt.grad.numpy(), mB)
        impl.reinforce_accumulate(H, G, adv, A, B, s, gA, gB)  # accumulates: twice the gradient
        assert_close(gA, 2 * At.grad.numpy(), 2 * mA)


@pytest.mark.parametrize("impl", IMPLS)
@HYP
@given(
    T=st.integers(1, 8),
    d=st.integers(1, 100),
    which=st.sampled_from(["H", "G", "adv"]),
    data=st.data(),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
)
def test_reinforce_non_finite_leaves_gradients_untouched(impl, T, d, which, data, bad):
    rng = np.random.default_rng(1)
    arrs = {"H": randn(rng, T, d), "G": randn(rng, T, d), "adv": randn(rng, T)}
    A, B = randn(rng, 2, d), randn(rng, d, 2)
    pos = tuple(data.draw(st.integers(0, s - 1)) for s in arrs[which].shape)
    arrs[which][pos] = bad
    gA, gB = randn(rng, 2, d), randn(rng, d, 2)
    gA0, gB0 = gA.copy(), gB.copy()
    where = str(pos[0]) if len(pos) == 1 else f"({pos[0]}, {pos[1]})"
    with pytest.raises(InvalidValue) as ei:
        impl.reinforce_accumulate(arrs["H"], arrs["G"], arrs["adv"], A, B, 1.0, gA, gB)
    assert str(ei.value) == f"{which} contains a non-finite value at index {where}"
    np.testing.assert_array_equal(gA, gA0)
    np.testing.assert_array_equal(gB, gB0)


@pytest.mark.parametrize("impl", IMPLS)
def test_reinforce_accumulate_errors(impl):
    rng = np.random.default_rng(0)
    H, G, adv, A, B = (
        randn(rng, 4, 8),
        randn(rng, 4, 8),
        randn(rng, 4),
        randn(rng, 2, 8),
        randn(rng, 8, 2),
    )
    gA, gB = np.zeros((2, 8), F32), np.zeros((8, 2), F32)
    with pytest.raises(DimensionMismatch, match="H has dimension 7, expected 8"):
        impl.reinforce_accumulate(randn(rng, 4, 7), G, adv, A, B, 1.0, gA, gB)
    with pytest.raises(DimensionMismatch, match="G has 3 rows, expected 4"):
        impl.reinforce_accumulate(H, G[:3], adv, A, B, 1.0, gA, gB)
    with pytest.raises(DimensionMismatch, match="adv has length 5, expected 4") as ei:
        impl.reinforce_accumulate(H, G, randn(rng, 5), A, B, 1.0, gA, gB)
    assert (ei.value.expected, ei.value.actual) == (4, 5)
    with pytest.raises(DimensionMismatch, match=r"grad_B has shape \(2, 8\), expected \(8, 2\)"):
        impl.reinforce_accumulate(H, G, adv, A, B, 1.0, gA, gA.copy())
    with pytest.raises(InvalidValue, match="adv must be a C-contiguous float32 array, got float64"):
        impl.reinforce_accumulate(H, G, adv.astype(np.float64), A, B, 1.0, gA, gB)
    with pytest.raises(InvalidValue, match="must not share memory"):
        impl.reinforce_accumulate(H, G, adv, A, B, 1.0, A, gB)
    assert not gA.any() and not gB.any()


# ------------------------------------------------------------ cosine_topk --


def _check_topk(P, q, k, idx, sims, tol=1e-5):
    """Properties any correct answer has, with float32 near-ties allowed to go either way."""
    m = P.shape[0]
    kk = min(k, m)
    assert idx.dtype == np.int64 and sims.dtype == F32 and idx.shape == sims.shape == (kk,)
    assert len(set(idx.tolist())) == kk and (idx >= 0).all() and (idx < m).all()
    P64, q64 = P.astype(np.float64), q.astype(np.float64)
    den = np.linalg.norm(P64, axis=1) * np.linalg.norm(q64)
    exact = np.where(den > 0, (P64 @ q64) / np.where(den > 0, den, 1), 0.0)
    assert_close(sims, exact[idx], 0.0, tol)
    assert np.all(np.diff(sims.astype(np.float64)) <= tol)  # best first
    if kk < m:  # nothing left out beats what was returned
        rest = np.setdiff1d(np.arange(m), idx)
        assert exact[rest].max() <= sims.min() + tol


@HYP
@given(
    m=st.integers(0, 300),
    d=st.integers(1, 600),
    k=st.integers(1, 20),
    zero_rows=st.integers(0, 3),
    with_norms=st.booleans(),
    seed=SEEDS,
)
def test_cosine_topk_matches_reference(m, d, k, zero_rows, with_norms, seed):
    rng = np.random.default_rng(seed)
    P, q = randn(rng, m, d), randn(rng, d)
    P[: min(zero_rows, m)] = 0
    norms = np.linalg.norm(P, axis=1).astype(F32) if with_norms else None
    want_idx, want_sims = ref.cosine_topk(P, q, k, norms)
    _check_topk(P, q, k, want_idx, want_sims)
    for level in LEVELS:
        with simd(level):
            idx, sims = K.cosine_topk(P, q, k, norms)
            _check_topk(P, q, k, idx, sims)
            assert_close(sims, want_sims, 0.0)
            # Same ranking as the reference wherever the similarities are not near-tied.
            differ = idx != want_idx
            assert_close(sims[differ], want_sims[differ], 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_cosine_topk_ties_and_zeros(impl):
    P = np.array([[0, 0], [1, 0], [2, 0], [0, 1], [1, 0], [-1, 0]], F32)
    idx, sims = impl.cosine_topk(P, np.array([3, 0], F32), 4)
    assert idx.tolist() == [1, 2, 4, 0]  # exact ties -> lower index first; zero row scores 0
    np.testing.assert_allclose(sims, [1, 1, 1, 0], atol=1e-6)
    idx, sims = impl.cosine_topk(P, np.zeros(2, F32), 3)  # zero q: everything 0
    assert idx.tolist() == [0, 1, 2] and sims.tolist() == [0, 0, 0]
    idx, sims = impl.cosine_topk(P, np.array([-1, 0], F32), 100)  # k > m
    assert idx.tolist() == [5, 0, 3, 1, 2, 4]
    idx, sims = impl.cosine_topk(np.empty((0, 2), F32), np.ones(2, F32), 3)
    assert idx.shape == sims.shape == (0,) and idx.dtype == np.int64


def test_cosine_topk_large_m_partial_selection():
    rng = np.random.default_rng(11)
    P, q = randn(rng, 20000, 64), randn(rng, 64)
    P[12345] = 3 * q  # the best match, cosine 1
    idx, sims = K.cosine_topk(P, q, 5)
    assert idx[0] == 12345 and abs(sims[0] - 1) < 1e-5
    _check_topk(P, q, 5, idx, sims)


@pytest.mark.parametrize("impl", IMPLS)
@given(k=st.integers(-5, 0))
@settings(max_examples=5, deadline=None)
def test_cosine_topk_errors(impl, k):
    P, q = np.ones((4, 3), F32), np.ones(3, F32)
    with pytest.raises(InvalidValue, match=rf"^k must be > 0, got {k}$"):
        impl.cosine_topk(P, q, k)
    with pytest.raises(DimensionMismatch, match="q has dimension 4, expected 3"):
        impl.cosine_topk(P, np.ones(4, F32), 1)
    with pytest.raises(DimensionMismatch, match="P_norms has length 3, expected 4"):
        impl.cosine_topk(P, q, 1, np.ones(3, F32))
    with pytest.raises(InvalidValue, match="q must be a C-contiguous float32 array, got float64"):
        impl.cosine_topk(P, np.ones(3), 1)
    with pytest.raises(InvalidValue, match=r"^q contains a non-finite value at index 2$"):
        impl.cosine_topk(P, np.array([1, 2, np.inf], F32), 1)


# ---------------------------------------------------------- kmeans_assign --


@HYP
@given(
    n=st.integers(0, 40),
    d=st.integers(1, 600),
    k=st.integers(1, 20),
    seed=SEEDS,
)
def test_kmeans_assign_matches_reference(n, d, k, seed):
    rng = np.random.default_rng(seed)
    X, C = randn(rng, n, d), randn(rng, k, d)
    C[rng.integers(0, k)] = C[0]  # a duplicated centroid: exact tie, lowest index wins
    want_lab, want_d = ref.kmeans_assign(X, C)
    X64, C64 = X.astype(np.float64), C.astype(np.float64)
    D = ((X64[:, None, :] - C64[None]) ** 2).sum(-1)  # exact distances
    mag = (X64**2).sum(1)[:, None] + (C64**2).sum(1)[None] + 2 * np.abs(X64) @ np.abs(C64).T
    for level in LEVELS:
        with simd(level):
            lab, dist = np.full(n, -1, np.int64), np.full(n, np.nan, F32)
            res = K.kmeans_assign(X, C, lab, dist)
            assert res[0] is lab and res[1] is dist
            rows = np.arange(n)
            assert_close(dist, want_d, mag[rows, want_lab])
            # A different label is only allowed for a near-tie.
            assert_close(D[rows, lab], D[rows, want_lab], mag[rows, want_lab])
            assert ((lab >= 0) & (lab < k)).all()
            dup = np.flatnonzero(np.equal(C, C[0]).all(axis=1))
            assert not np.isin(lab, dup[1:]).any()  # never a later copy of centroid 0


@pytest.mark.parametrize("impl", IMPLS)
def test_kmeans_assign_ties_pick_lowest_index(impl):
    rng = np.random.default_rng(4)
    C = randn(rng, 7, 21)  # 7 centroids: a group of four and a remainder of three
    X = C[[2, 5, 6, 0]] + np.float32(0.01) * randn(rng, 4, 21)
    C[5] = C[6] = C[2]  # copies of centroid 2 later on, including in the remainder
    C[3] = C[0]
    levels = LEVELS if impl is K else [None]
    for level in levels:
        with simd(level) if level else _nullctx():
            labels, _ = impl.kmeans_assign(X, C)
            assert labels.tolist() == [2, 2, 2, 0]
            labels, dists = impl.kmeans_assign(X, np.repeat(C[:1], 7, axis=0))
            assert labels.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("impl", IMPLS)
def test_kmeans_assign_planted_clusters(impl):
    rng = np.random.default_rng(2)
    k, d, per = 6, 48, 30
    centers = 20 * randn(rng, k, d)
    truth = np.repeat(np.arange(k), per)
    X = (centers[truth] + randn(rng, k * per, d)).astype(F32)
    perm = rng.permutation(k * per)
    X, truth = X[perm].copy(), truth[perm]
    labels, dists = impl.kmeans_assign(X, centers)
    assert labels.dtype == np.int64 and labels.tolist() == truth.tolist()
    exact = ((X.astype(np.float64) - centers[truth]) ** 2).sum(1)
    np.testing.assert_allclose(dists, exact, rtol=1e-3, atol=0.05)
    assert (dists >= 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_kmeans_assign_errors(impl):
    X, C = np.ones((5, 3), F32), np.ones((2, 3), F32)
    with pytest.raises(DimensionMismatch, match="C has dimension 4, expected 3"):
        impl.kmeans_assign(X, np.ones((2, 4), F32))
    with pytest.raises(InvalidValue, match=r"C has no centroids \(k = 0\)"):
        impl.kmeans_assign(X, np.ones((0, 3), F32))
    with pytest.raises(InvalidValue, match="labels must be a C-contiguous int64 array, got int32"):
        impl.kmeans_assign(X, C, np.empty(5, np.int32))
    with pytest.raises(DimensionMismatch, match="sq_dists has length 4, expected 5"):
        impl.kmeans_assign(X, C, None, np.empty(4, F32))
    with pytest.raises(InvalidValue, match="X must be a C-contiguous float32 array, got float64"):
        impl.kmeans_assign(X.astype(np.float64), C)
    Xb = X.copy()
    Xb[3, 1] = np.nan
    with pytest.raises(InvalidValue, match=r"^X contains a non-finite value at index \(3, 1\)$"):
        impl.kmeans_assign(Xb, C)


# ------------------------------------------- large inputs (GIL released) --


def test_large_inputs_match_reference_at_every_level():
    from sona_plugin import _native

    rng = np.random.default_rng(9)
    x, A, B = randn(rng, 64, 515), randn(rng, 2, 515), randn(rng, 515, 2)
    H, G, adv = randn(rng, 64, 515), randn(rng, 64, 515), randn(rng, 64)
    P, q = randn(rng, 2000, 70), randn(rng, 70)
    X, C = randn(rng, 300, 33), randn(rng, 9, 33)
    # All of these are above the GIL-release threshold.
    assert min(x.size, H.size, P.size, X.shape[0] * C.size) >= _native.GIL_RELEASE_MIN_WORK
    want_y = ref.micro_lora_forward(x, A, B, 0.5)
    want_gA, want_gB = np.zeros((2, 515), F32), np.zeros((515, 2), F32)
    ref.reinforce_accumulate(H, G, adv, A, B, 0.5, want_gA, want_gB)
    _, _, mA, mB = _grads_float64(H, G, adv, A, B, 0.5)
    want_lab, want_d = ref.kmeans_assign(X, C)
    for level in LEVELS:
        with simd(level):
            assert_close(K.micro_lora_forward(x, A, B, 0.5), want_y, _lora_magnitude(x, A, B, 0.5))
            gA, gB = np.zeros((2, 515), F32), np.zeros((515, 2), F32)
            K.reinforce_accumulate(H, G, adv, A, B, 0.5, gA, gB)
            assert_close(gA, want_gA, mA)
            assert_close(gB, want_gB, mB)
            idx, sims = K.cosine_topk(P, q, 10)
            _check_topk(P, q, 10, idx, sims)
            lab, dist = K.kmeans_assign(X, C)
            assert lab.tolist() == want_lab.tolist()
            np.testing.assert_allclose(dist, want_d, rtol=1e-4, atol=1e-3)
            bad = x.copy()
            bad[40, 300] = np.nan
            with pytest.raises(InvalidValue, match=r"index \(40, 300\)$"):
                K.micro_lora_forward(bad, A, B, 0.5)


def test_concurrent_calls_from_threads():
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(10)
    A, B = randn(rng, 2, 256), randn(rng, 256, 2)
    xs = [randn(rng, 128, 256) for _ in range(4)]
    want = [K.micro_lora_forward(x, A, B, 0.1) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: [K.micro_lora_forward(x, A, B, 0.1) for _ in range(20)], xs))
    for g, w in zip(got, want, strict=True):
        for y in g:
            np.testing.assert_array_equal(y, w)


def test_the_hosts_torch_apply_takes_the_kernel_or_torch_ops_with_one_result():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    A = rng.standard_normal((2, 16)).astype(np.float32)
    B = rng.standard_normal((16, 2)).astype(np.float32)
    h = torch.from_numpy(rng.standard_normal((3, 5, 16)).astype(np.float32))
    fast = K.apply_micro_lora_torch(h, A, B, 0.5)  # float32 CPU: the kernel
    slow = K.apply_micro_lora_torch(h.clone().requires_grad_(True), A, B, 0.5)  # torch ops
    want = h.numpy() + 0.5 * (h.numpy() @ A.T) @ B.T
    assert fast.shape == h.shape and slow.requires_grad
    np.testing.assert_allclose(fast.numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(slow.detach().numpy(), want, rtol=1e-5, atol=1e-5)
    as64 = K.apply_micro_lora_torch(h.double(), A, B, 0.5)
    assert as64.dtype == torch.float64
