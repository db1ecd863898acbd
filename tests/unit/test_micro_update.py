"""kernels.micro_update: the fused MicroLoRA update step, native against the NumPy reference.

The reference (``_kernels_numpy.micro_update``) is itself checked against a naive
transcription of the specification that forms the full d x d update matrices.
Both implementations compute the gradient, the Adam step and every reduction in
float64 and round to float32 at the same points, so they agree far more closely
than the tolerances here (rtol 1e-4, atol 1e-6); draws whose accept decisions lie
within 1e-4 (relative) of the trust-region threshold are skipped, since there an
honest rounding difference may flip the decision.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager, nullcontext

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
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
HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RTOL, ATOL = 1e-4, 1e-6
SENTINEL = F32(-1234.5)

# Keyword order of the scalar arguments (between v and the outputs).
SCALARS = (
    "t",
    "scale",
    "lr",
    "beta2",
    "decay",
    "grad_clip",
    "norm_cap",
    "trust_region",
    "max_halvings",
)


@contextmanager
def simd(level: str):
    old = K.BACKEND.simd
    K.set_simd_level(level)
    try:
        yield
    finally:
        K.set_simd_level(old)


def make_case(
    seed: int,
    T: int,
    d: int,
    r: int,
    *,
    a_scale: float = 0.1,
    b_noise: float = 0.05,
    v_scale: float = 1e-4,
    **hyper,
) -> tuple[list[np.ndarray], dict]:
    """Inputs [H, G, adv, A, B, B0, v] and the scalar hyper-parameters (defaults overridable)."""
    rng = np.random.default_rng(seed)
    H = rng.standard_normal((T, d)).astype(F32)
    G = rng.standard_normal((T, d)).astype(F32)
    adv = rng.standard_normal(T).astype(F32)
    A = (a_scale * rng.standard_normal((r, d))).astype(F32)
    B0 = (rng.standard_normal((d, r)) / math.sqrt(d)).astype(F32)
    B = (B0 + b_noise * rng.standard_normal((d, r))).astype(F32)
    v = (v_scale * rng.random(2 * r * d)).astype(F32)
    hp = dict(
        t=3,
        scale=0.5,
        lr=3e-3,
        beta2=0.99,
        decay=0.01,
        grad_clip=1.0,
        norm_cap=0.3,
        trust_region=0.05,
        max_halvings=6,
    )
    hp.update(hyper)
    return [H, G, adv, A, B, B0, v], hp


def outputs(r: int, d: int) -> list[np.ndarray]:
    return [
        np.full((r, d), SENTINEL, F32),
        np.full((d, r), SENTINEL, F32),
        np.full(2 * r * d, SENTINEL, F32),
    ]


def call(impl, arrays, hp, outs=None):
    r, d = arrays[3].shape
    outs = outputs(r, d) if outs is None else outs
    res = impl.micro_update(*arrays, *(hp[k] for k in SCALARS), *outs)
    return res, outs


def try_divs(arrays, hp) -> list[float]:
    """The reference's divergence at each try (1, 1/2, ...) up to the one it stops at."""
    divs = []
    for k in range(hp["max_halvings"] + 1):
        res, _ = call(ref, arrays, {**hp, "max_halvings": k})
        if res[0]:  # accepted at an earlier try: that try is the last one made
            divs.append(res[2])
            break
        divs.append(res[2])
    return divs


def borderline(arrays, hp) -> bool:
    tr = hp["trust_region"]
    return any(abs(dv - tr) <= 1e-4 * abs(tr) + 1e-12 for dv in try_divs(arrays, hp))


def assert_same(got, want):
    (acc_g, frac_g, div_g, gn_g, dn_g), outs_g = got
    (acc_w, frac_w, div_w, gn_w, dn_w), outs_w = want
    assert isinstance(acc_g, bool) and all(
        isinstance(x, float) for x in (frac_g, div_g, gn_g, dn_g)
    )
    assert (acc_g, frac_g) == (acc_w, frac_w)
    np.testing.assert_allclose([div_g, gn_g, dn_g], [div_w, gn_w, dn_w], rtol=RTOL, atol=ATOL)
    for og, ow in zip(outs_g, outs_w):
        np.testing.assert_allclose(og, ow, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------- semantics --


def naive(arrays, hp):
    """The specification transcribed literally (full d x d matrices, float64 arithmetic,
    float32 rounding where parameters are stored)."""
    H, G, adv, A, B, B0, v = (np.asarray(a, np.float64) for a in arrays)
    r, d = A.shape
    s = float(F32(hp["scale"]))
    decay, beta2, lr, t = hp["decay"], hp["beta2"], hp["lr"], hp["t"]
    Ad = ((1 - decay) * A).astype(F32).astype(np.float64)
    Bd = ((1 - decay) * B + decay * B0).astype(F32).astype(np.float64)
    gB = s * sum(adv[i] * np.outer(G[i], Ad @ H[i]) for i in range(len(H)))
    gA = s * sum(adv[i] * np.outer(Bd.T @ G[i], H[i]) for i in range(len(H)))
    g = np.concatenate([gA.ravel(), gB.ravel()])
    gnorm = float(np.linalg.norm(g))
    if gnorm > hp["grad_clip"]:
        g = g * (hp["grad_clip"] / gnorm)
    v_new = beta2 * v + (1 - beta2) * g * g
    c = math.sqrt(1 - beta2**t)
    step = g * (lr * c) / (np.sqrt(v_new) + 1e-8 * c)
    theta = np.concatenate([Ad.ravel(), Bd.ravel()])
    Y_old = H + s * (B @ A @ H.T).T
    inv_n = 1 / (np.linalg.norm(H, axis=1) + 1e-12)
    frac, div = 1.0, 0.0
    for _ in range(hp["max_halvings"] + 1):
        new = (theta + frac * step).astype(F32).astype(np.float64)
        An, Bn = new[: r * d].reshape(r, d), new[r * d :].reshape(d, r)
        dn = s * np.linalg.norm(Bn @ An)
        if dn > hp["norm_cap"]:
            An = (An * (hp["norm_cap"] / dn)).astype(F32).astype(np.float64)
            dn = hp["norm_cap"]
        Y_new = H + s * (Bn @ An @ H.T).T
        div = float(np.mean(np.linalg.norm(Y_new - Y_old, axis=1) * inv_n))
        if div <= hp["trust_region"]:
            return (True, frac, div, gnorm, dn), [An, Bn, v_new.astype(F32)]
        frac *= 0.5
    return (False, 0.0, div, gnorm, s * np.linalg.norm(Bd @ Ad)), [Ad, Bd, v_new.astype(F32)]


REGIMES = {  # hyper-parameters and the outcome they must produce
    "accept_full_step": (dict(lr=1e-4, trust_region=1.0, norm_cap=math.inf), (True, 1.0)),
    "norm_capped": (dict(a_scale=1.0, lr=1e-3, trust_region=10.0, norm_cap=0.05), (True, 1.0)),
    "halved": (dict(lr=1e-1, t=1, decay=0.0, trust_region=0.05, norm_cap=math.inf), (True, None)),
    "rejected": (dict(lr=1.0, t=1, decay=0.0, trust_region=1e-6, max_halvings=3), (False, 0.0)),
    "clipped": (dict(grad_clip=1e-3, trust_region=1.0, norm_cap=math.inf), (True, 1.0)),
}


@pytest.mark.parametrize("regime", list(REGIMES))
def test_reference_follows_the_specification(regime):
    hyper, (acc, frac) = REGIMES[regime]
    arrays, hp = make_case(7, 4, 96, 2, **hyper)
    (got_acc, got_frac, div, gnorm, dn), outs = call(ref, arrays, hp)
    assert got_acc == acc and (frac is None and 0 < got_frac < 1 or got_frac == frac)
    if regime == "norm_capped":
        assert dn == hp["norm_cap"]
    if regime == "clipped":
        assert gnorm > hp["grad_clip"]
    assert_same(((got_acc, got_frac, div, gnorm, dn), outs), naive(arrays, hp))


def test_reference_gradient_is_reinforce_accumulate():
    """Zero decay and v, beta2 = 0: the Adam step is lr * sign(g) (up to eps), so its sign
    pattern is the gradient's, which must be the REINFORCE kernel's."""
    arrays, hp = make_case(
        3,
        3,
        40,
        2,
        decay=0.0,
        beta2=0.0,
        v_scale=0.0,
        t=1,
        lr=1e-3,
        trust_region=10.0,
        norm_cap=math.inf,
    )
    H, G, adv, A, B, _, _ = arrays
    (acc, frac, *_), (Ao, Bo, vo) = call(ref, arrays, hp)
    assert acc and frac == 1.0
    gA, gB = np.zeros_like(A), np.zeros_like(B)
    K.reinforce_accumulate(H, G, adv, A, B, hp["scale"], gA, gB)
    g = np.concatenate([gA.ravel(), gB.ravel()]).astype(np.float64)
    g *= min(1.0, hp["grad_clip"] / np.linalg.norm(g))
    np.testing.assert_allclose(vo, g * g, rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(Ao - A, 1e-3 * np.sign(gA), rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(Bo - B, 1e-3 * np.sign(gB), rtol=1e-3, atol=1e-7)


# ---------------------------------------------------- native == reference --


@pytest.mark.parametrize("regime", list(REGIMES))
def test_regimes_match_reference_at_every_level(regime):
    hyper, _ = REGIMES[regime]
    for r in (1, 2, 3, 8):
        arrays, hp = make_case(11 + r, 5, 130, r, **hyper)
        want = call(ref, arrays, hp)
        for level in LEVELS:
            with simd(level):
                assert_same(call(K, arrays, hp), want)


@HYP
@given(
    T=st.integers(1, 8),
    d=st.integers(1, 300),
    r=st.integers(1, 2),
    seed=st.integers(0, 2**32 - 1),
    a_scale=st.sampled_from([0.0, 0.01, 0.1, 1.0]),
    v_scale=st.sampled_from([0.0, 1e-6, 1e-3]),
    t=st.integers(1, 40),
    scale=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    lr=st.sampled_from([1e-4, 1e-3, 3e-3, 1e-2, 0.1]),
    beta2=st.sampled_from([0.0, 0.9, 0.99, 0.999]),
    decay=st.sampled_from([0.0, 0.01, 0.1]),
    grad_clip=st.sampled_from([0.01, 1.0, 100.0, math.inf]),
    norm_cap=st.sampled_from([0.01, 0.3, math.inf]),
    trust_region=st.sampled_from([1e-4, 1e-3, 0.01, 0.05, 1.0]),
    max_halvings=st.integers(0, 6),
)
def test_matches_reference(T, d, r, seed, a_scale, v_scale, **hyper):
    arrays, hp = make_case(seed, T, d, r, a_scale=a_scale, v_scale=v_scale, **hyper)
    assume(not borderline(arrays, hp))
    want = call(ref, arrays, hp)
    for level in LEVELS:
        with simd(level):
            assert_same(call(K, arrays, hp), want)


def test_large_input_releases_gil_and_matches():
    from sona_plugin import _native

    T, d = 40, 512
    assert T * d >= _native.GIL_RELEASE_MIN_WORK
    arrays, hp = make_case(5, T, d, 2, lr=0.02, t=1, trust_region=0.01)
    assert not borderline(arrays, hp)
    want = call(ref, arrays, hp)
    for level in LEVELS:
        with simd(level):
            assert_same(call(K, arrays, hp), want)


# ------------------------------------------------------------------ errors --


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("which", ["H", "G", "adv"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_raise_and_leave_outputs_untouched(impl, which, bad):
    T, d, r = 3, 37, 2
    for level in LEVELS if impl is K else [None]:
        arrays, hp = make_case(2, T, d, r)
        idx = {"H": (1, 20), "G": (2, 36), "adv": (1,)}[which]
        arrays[{"H": 0, "G": 1, "adv": 2}[which]][idx] = bad
        where = str(idx[0]) if len(idx) == 1 else f"({idx[0]}, {idx[1]})"
        outs = outputs(r, d)
        with (
            simd(level) if level else nullcontext(),
            pytest.raises(
                InvalidValue,
                match=rf"{which} contains a non-finite value at index {re_escape(where)}",
            ),
        ):
            call(impl, arrays, hp, outs)
        for o in outs:
            assert (o == SENTINEL).all()


def re_escape(s: str) -> str:
    return re.escape(s)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_gradient_raises_and_leaves_outputs_untouched(impl):
    arrays, hp = make_case(4, 2, 16, 2)
    arrays[3][0, 5] = np.inf  # A: the decayed A, hence the gradient, is not finite
    outs = outputs(2, 16)
    with pytest.raises(InvalidValue, match="gradient is not finite"):
        call(impl, arrays, hp, outs)
    for o in outs:
        assert (o == SENTINEL).all()


def _shape_cases():
    T, d, r = 3, 16, 2
    arrays, hp = make_case(0, T, d, r)
    H, G, adv, A, B, B0, v = arrays
    z = np.zeros
    # (name, replaced argument index, value, expected, actual)
    return (
        arrays,
        hp,
        [
            ("H dim", 0, z((T, d + 1), F32), d, d + 1),
            ("G rows", 1, z((T + 1, d), F32), T, T + 1),
            ("G dim", 1, z((T, d - 1), F32), d, d - 1),
            ("adv len", 2, z(T + 2, F32), T, T + 2),
            ("B rows", 4, z((d + 1, r), F32), d, d + 1),
            ("B cols", 4, z((d, r + 1), F32), r, r + 1),
            ("B0 rows", 5, z((d - 1, r), F32), d, d - 1),
            ("B0 cols", 5, z((d, 1), F32), r, 1),
            ("v len", 6, z(2 * r * d - 1, F32), 2 * r * d, 2 * r * d - 1),
            ("A_out rows", 7, z((r + 1, d), F32), r, r + 1),
            ("A_out cols", 7, z((r, d + 2), F32), d, d + 2),
            ("B_out", 8, z((d, r + 1), F32), r, r + 1),
            ("v_out", 9, z(2 * r * d + 1, F32), 2 * r * d, 2 * r * d + 1),
        ],
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_wrong_shapes_raise_dimension_mismatch(impl):
    arrays, hp, cases = _shape_cases()
    r, d = arrays[3].shape
    for name, i, val, expected, actual in cases:
        args = list(arrays) + outputs(r, d)
        args[i] = val
        with pytest.raises(DimensionMismatch) as ei:
            call(impl, args[:7], hp, args[7:])
        assert (ei.value.expected, ei.value.actual) == (expected, actual), name


def _invalid_cases():
    T, d, r = 3, 16, 2
    arrays, hp = make_case(0, T, d, r)
    H, G, adv, A, B, B0, v = arrays
    out = outputs(r, d)
    ro = np.zeros((r, d), F32)
    ro.flags.writeable = False
    cases = [
        ("A has 0 rows; the rank r must be >= 1", {3: np.zeros((0, d), F32)}, {}),
        ("the rank r must be <= 8, got 9", {3: np.zeros((9, d), F32)}, {}),
        ("H has no rows; T must be >= 1", {0: np.zeros((0, d), F32)}, {}),
        ("H must be 2-D", {0: H[0]}, {}),
        ("v must be 1-D", {6: v.reshape(2, -1)}, {}),
        ("A must be a C-contiguous float32 array, got float64", {3: A.astype(np.float64)}, {}),
        (
            "G must be a C-contiguous float32 array, got a non-contiguous",
            {1: np.asfortranarray(G)},
            {},
        ),
        ("t must be >= 1, got 0", {}, {"t": 0}),
        ("max_halvings must be >= 0, got -1", {}, {"max_halvings": -1}),
        ("beta2 must be in", {}, {"beta2": 1.0}),
        ("lr must not be NaN", {}, {"lr": math.nan}),
        ("trust_region must not be NaN", {}, {"trust_region": math.nan}),
        ("scale must be finite", {}, {"scale": math.inf}),
        ("A_out is read-only", {7: ro}, {}),
        ("must not share memory with the inputs", {7: A}, {}),
        (
            "must not share memory with each other",
            {8: out[2][: 2 * d].reshape(d, r), 9: out[2]},
            {},
        ),
    ]
    return arrays, hp, out, cases


@pytest.mark.parametrize("impl", IMPLS)
def test_invalid_arguments_raise_invalid_value(impl):
    arrays, hp, out, cases = _invalid_cases()
    for msg, repl, hrepl in cases:
        args = list(arrays) + list(out)
        for i, val in repl.items():
            args[i] = val
        with pytest.raises(InvalidValue, match=re_escape(msg)):
            call(impl, args[:7], {**hp, **hrepl}, args[7:])


def test_error_messages_identical_between_backends():
    _, _, shape_cases = _shape_cases()
    arrays, hp, out, invalid_cases = _invalid_cases()  # (the cases refer to these arrays)
    r, d = arrays[3].shape
    all_cases = [({i: val}, {}) for _, i, val, _, _ in shape_cases]
    all_cases += [(repl, hrepl) for _, repl, hrepl in invalid_cases]
    all_cases += [({0: np.where(np.arange(d) == 3, np.nan, arrays[0]).astype(F32)}, {})]
    for repl, hrepl in all_cases:
        msgs = []
        for impl in (K, ref):
            args = list(arrays) + outputs(r, d)
            for i, val in repl.items():
                args[i] = val
            with pytest.raises((InvalidValue, DimensionMismatch)) as ei:
                call(impl, args[:7], {**hp, **hrepl}, args[7:])
            msgs.append(
                (
                    type(ei.value),
                    str(ei.value),
                    getattr(ei.value, "expected", None),
                    getattr(ei.value, "actual", None),
                )
            )
        assert msgs[0] == msgs[1]


# ------------------------------------------------------------------- torch --


@pytest.mark.parametrize("impl", IMPLS)
def test_torch_tensors_written_in_place(impl):
    arrays, hp = make_case(9, 3, 64, 2, lr=0.02, t=1, trust_region=0.01)
    want = call(ref, arrays, hp)
    outs = [torch.from_numpy(o) for o in outputs(2, 64)]
    res = impl.micro_update(
        *(torch.from_numpy(a) for a in arrays), *(hp[k] for k in SCALARS), *outs
    )
    assert_same((res, [o.numpy() for o in outs]), want)
