"""Pure NumPy versions of the native kernels: the fallback and the test reference.

Same functions, signatures, checks (in the same order) and error messages as
``sona_plugin._native``.  Import :mod:`sona_plugin.kernels` instead of this
module; it picks the backend.  Besides them, :func:`micro_step` is the MicroLoRA
update rule itself, the one NumPy copy: :func:`micro_update` (the native kernel's
reference) and ``MicroLoRA.update`` both call it.

Inputs are float32 (int64 for ``labels``), C-contiguous NumPy arrays or CPU
torch tensors; nothing is converted or copied, outputs are written in place.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import numpy as np

from sona_plugin.errors import DimensionMismatch, InvalidValue

_F32_MAX = float(np.finfo(np.float32).max)

# Allocator for omitted outputs when the input is not a numpy.ndarray:
# fn(like, shape, dtype_name) -> array.  Registered by sona_plugin.kernels.
_alloc: Callable[[Any, tuple[int, ...], str], Any] | None = None


def set_allocator(fn: Callable[[Any, tuple[int, ...], str], Any] | None) -> None:
    global _alloc
    _alloc = fn


def set_error_types(dimension_mismatch: type, invalid_value: type) -> None:
    """Accepted for symmetry with ``_native``; this module always raises the package's errors."""


def _dtype_name(obj: Any) -> str:
    dt = getattr(obj, "dtype", None)
    return "" if dt is None else str(dt).removeprefix("torch.")


def _is_array_like(obj: Any) -> bool:
    if hasattr(obj, "__dlpack__") or hasattr(obj, "__array_interface__"):
        return True
    try:
        memoryview(obj)
    except TypeError:
        return False
    return True


def _arr(obj: Any, name: str, dtype: str = "float32", writable: bool = False) -> np.ndarray:
    """A zero-copy ndarray view of ``obj`` after the same checks as the native module."""
    if not isinstance(obj, np.ndarray):
        if getattr(obj, "requires_grad", False):
            raise InvalidValue(f"{name} requires grad; pass {name}.detach()")
        got = _dtype_name(obj)
        if not _is_array_like(obj):
            if got:
                raise InvalidValue(f"{name} must be a C-contiguous {dtype} array, got {got}")
            raise InvalidValue(
                f"{name} must be a C-contiguous {dtype} array (NumPy array or CPU torch tensor), "
                f"got {type(obj).__name__}"
            )
        dev = getattr(obj, "device", None)
        if dev is not None and getattr(dev, "type", str(dev)) != "cpu":
            raise InvalidValue(f"{name} must be on the CPU, got device {dev}")
        if got not in ("", dtype):
            raise InvalidValue(f"{name} must be a C-contiguous {dtype} array, got {got}")
        obj = np.asarray(obj)  # CPU torch tensors and buffers: a view, no copy
    if obj.dtype != np.dtype(dtype):
        raise InvalidValue(f"{name} must be a C-contiguous {dtype} array, got {obj.dtype}")
    if not obj.flags.c_contiguous:
        raise InvalidValue(
            f"{name} must be a C-contiguous {dtype} array, got a non-contiguous array"
        )
    if not obj.flags.aligned:
        raise InvalidValue(f"{name} must be a C-contiguous {dtype} array, got an unaligned array")
    if writable and not obj.flags.writeable:
        raise InvalidValue(f"{name} is read-only")
    return obj


def _ndim(a: np.ndarray, name: str, ndim: int, layout: str) -> None:
    if a.ndim != ndim:
        raise InvalidValue(f"{name} must be {ndim}-D {layout}, got {a.ndim}-D")


def _scale(scale: float) -> np.float32:
    s = float(scale)
    if not (math.isfinite(s) and abs(s) <= _F32_MAX):
        raise InvalidValue(f"scale must be finite (as float32), got {s:g}")
    return np.float32(s)


def _alloc_like(like: Any, shape: tuple[int, ...], dtype: str) -> Any:
    if isinstance(like, np.ndarray) or _alloc is None:
        return np.empty(shape, dtype)
    return _alloc(like, shape, dtype)


def _check_finite(a: np.ndarray, name: str) -> None:
    if a.size and not np.isfinite(a).all():
        flat = int(np.flatnonzero(~np.isfinite(a))[0])
        idx = np.unravel_index(flat, a.shape)
        where = str(int(idx[0])) if a.ndim == 1 else "(" + ", ".join(str(int(i)) for i in idx) + ")"
        raise InvalidValue(f"{name} contains a non-finite value at index {where}")


def _shape(a: np.ndarray) -> str:
    return str(tuple(int(s) for s in a.shape))


def micro_lora_forward(x: Any, A: Any, B: Any, scale: float, out: Any = None) -> Any:
    """out = x + scale * B @ (A @ x) for x [d] or each row of x [n, d]; returns out."""
    xa = _arr(x, "x")
    if xa.ndim not in (1, 2):
        raise InvalidValue(f"x must be 1-D [d] or 2-D [n, d], got {xa.ndim}-D")
    if xa.size == 0:
        raise InvalidValue(f"x is empty, shape {_shape(xa)}")
    Aa = _arr(A, "A")
    _ndim(Aa, "A", 2, "[r, d]")
    r, d = Aa.shape
    if r == 0:
        raise InvalidValue("A has 0 rows; the rank r must be >= 1")
    if xa.shape[-1] != d:
        raise DimensionMismatch(f"x has dimension {xa.shape[-1]}, expected {d}", d, xa.shape[-1])
    Ba = _arr(B, "B")
    _ndim(Ba, "B", 2, "[d, r]")
    if Ba.shape[0] != d:
        raise DimensionMismatch(f"B has {Ba.shape[0]} rows, expected {d}", d, Ba.shape[0])
    if Ba.shape[1] != r:
        raise DimensionMismatch(f"B has {Ba.shape[1]} columns, expected {r}", r, Ba.shape[1])
    s = _scale(scale)
    if out is None:
        out = _alloc_like(x, xa.shape, "float32")
    oa = _arr(out, "out", writable=True)
    if oa.shape != xa.shape:
        same = oa.ndim == xa.ndim
        i = xa.ndim - 1 if same and oa.shape[0] == xa.shape[0] else 0
        raise DimensionMismatch(
            f"out has shape {_shape(oa)}, expected {_shape(xa)}",
            xa.shape[i] if same else None,
            oa.shape[i] if same else None,
        )
    if any(np.may_share_memory(oa, a) for a in (xa, Aa, Ba)):
        raise InvalidValue("out must not share memory with x, A or B")
    _check_finite(xa, "x")
    u = xa @ Aa.T  # [..., r]
    np.add(xa, (s * u) @ Ba.T, out=oa)
    return out


def _step_inputs(H: Any, G: Any, adv: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """H [T, d], G [T, d], adv [T] as arrays, their layouts checked in the native order."""
    Ha = _arr(H, "H")
    _ndim(Ha, "H", 2, "[T, d]")
    Ga = _arr(G, "G")
    _ndim(Ga, "G", 2, "[T, d]")
    adva = _arr(adv, "adv")
    _ndim(adva, "adv", 1, "[T]")
    return Ha, Ga, adva


def _step_arrays(H: Any, G: Any, adv: Any, A: Any, B: Any) -> tuple[np.ndarray, ...]:
    """H [T, d], G [T, d], adv [T], A [r, d], B [d, r] as checked arrays, in the native order."""
    Ha, Ga, adva = _step_inputs(H, G, adv)
    Aa = _arr(A, "A")
    _ndim(Aa, "A", 2, "[r, d]")
    Ba = _arr(B, "B")
    _ndim(Ba, "B", 2, "[d, r]")
    return Ha, Ga, adva, Aa, Ba


def _check_steps(Ha: np.ndarray, Ga: np.ndarray, adva: np.ndarray, T: int, d: int) -> None:
    """Shapes of the recorded steps H [T, d], their gradients G [T, d] and advantages [T]."""
    if Ha.shape[1] != d:
        raise DimensionMismatch(f"H has dimension {Ha.shape[1]}, expected {d}", d, Ha.shape[1])
    if Ga.shape[0] != T:
        raise DimensionMismatch(f"G has {Ga.shape[0]} rows, expected {T}", T, Ga.shape[0])
    if Ga.shape[1] != d:
        raise DimensionMismatch(f"G has dimension {Ga.shape[1]}, expected {d}", d, Ga.shape[1])
    if adva.shape[0] != T:
        raise DimensionMismatch(f"adv has length {adva.shape[0]}, expected {T}", T, adva.shape[0])


def _checked_steps(H: Any, G: Any, adv: Any, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """H [T, d], G [T, d], adv [T] checked for layout, shape and finiteness."""
    Ha, Ga, adva = _step_inputs(H, G, adv)
    _check_steps(Ha, Ga, adva, Ha.shape[0], d)
    _check_finite(adva, "adv")
    _check_finite(Ha, "H")
    _check_finite(Ga, "G")
    return Ha, Ga, adva


def reinforce_accumulate(
    H: Any, G: Any, adv: Any, A: Any, B: Any, scale: float, grad_A: Any, grad_B: Any
) -> None:
    """grad_B += s sum_t adv_t g_t (A h_t)^T ; grad_A += s sum_t adv_t (B^T g_t) h_t^T, in place."""
    Ha, Ga, adva, Aa, Ba = _step_arrays(H, G, adv, A, B)
    T = Ha.shape[0]
    r, d = Aa.shape
    if r == 0:
        raise InvalidValue("A has 0 rows; the rank r must be >= 1")
    _check_steps(Ha, Ga, adva, T, d)
    if Ba.shape[0] != d:
        raise DimensionMismatch(f"B has {Ba.shape[0]} rows, expected {d}", d, Ba.shape[0])
    if Ba.shape[1] != r:
        raise DimensionMismatch(f"B has {Ba.shape[1]} columns, expected {r}", r, Ba.shape[1])
    s = _scale(scale)
    gA = _arr(grad_A, "grad_A", writable=True)
    _ndim(gA, "grad_A", 2, "[r, d]")
    if gA.shape != Aa.shape:
        raise DimensionMismatch(f"grad_A has shape {_shape(gA)}, expected {_shape(Aa)}")
    gB = _arr(grad_B, "grad_B", writable=True)
    _ndim(gB, "grad_B", 2, "[d, r]")
    if gB.shape != Ba.shape:
        raise DimensionMismatch(f"grad_B has shape {_shape(gB)}, expected {_shape(Ba)}")
    for a in (Ha, Ga, adva, Aa, Ba):
        if np.may_share_memory(gA, a) or np.may_share_memory(gB, a):
            raise InvalidValue("grad_A and grad_B must not share memory with H, G, adv, A or B")
    if np.may_share_memory(gA, gB):
        raise InvalidValue("grad_A and grad_B must not share memory with each other")
    _check_finite(adva, "adv")
    _check_finite(Ha, "H")
    _check_finite(Ga, "G")
    if T == 0:
        return
    w = s * adva  # [T]
    a = Ha @ Aa.T  # [T, r]: A h_t
    b = Ga @ Ba  # [T, r]: B^T g_t
    gB += (Ga * w[:, None]).T @ a
    gA += (b * w[:, None]).T @ Ha


def _row_norms(P: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", P, P))


def cosine_topk(P: Any, q: Any, k: int, P_norms: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows of P by cosine similarity to q: (idx int64[k'], sims float32[k']), k' = min(k, m)."""
    Pa = _arr(P, "P")
    _ndim(Pa, "P", 2, "[m, d]")
    qa = _arr(q, "q")
    _ndim(qa, "q", 1, "[d]")
    m, d = Pa.shape
    if qa.shape[0] != d:
        raise DimensionMismatch(f"q has dimension {qa.shape[0]}, expected {d}", d, qa.shape[0])
    k = operator.index(k)  # ints only, like the native binding
    if k <= 0:
        raise InvalidValue(f"k must be > 0, got {k}")
    if P_norms is not None:
        pn = _arr(P_norms, "P_norms")
        _ndim(pn, "P_norms", 1, "[m]")
        if pn.shape[0] != m:
            raise DimensionMismatch(
                f"P_norms has length {pn.shape[0]}, expected {m}", m, pn.shape[0]
            )
    _check_finite(qa, "q")
    kk = min(k, m)
    if kk == 0:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    if P_norms is None:
        pn = _row_norms(Pa)
    qn = np.sqrt(np.dot(qa, qa))
    den = pn * qn
    with np.errstate(divide="ignore", invalid="ignore"):
        sims = np.where(den > 0, (Pa @ qa) / np.where(den > 0, den, 1), 0).astype(np.float32)
    key = np.where(np.isnan(sims), -np.inf, sims)
    # argpartition is the partial selection; ties broken by index via the stable sort below.
    cand = np.arange(m) if kk == m else np.argpartition(-key, kk - 1)[:kk]
    if kk < m:  # include every row tied with the k-th best so the lowest indices win
        cand = np.flatnonzero(key >= key[cand].min())
    order = cand[np.lexsort((cand, -key[cand]))][:kk]
    return order.astype(np.int64), sims[order]


def kmeans_assign(X: Any, C: Any, labels: Any = None, sq_dists: Any = None) -> tuple[Any, Any]:
    """Nearest centroid by squared L2 (ties: lowest index); fills and returns (labels, sq_dists)."""
    Xa = _arr(X, "X")
    _ndim(Xa, "X", 2, "[n, d]")
    Ca = _arr(C, "C")
    _ndim(Ca, "C", 2, "[k, d]")
    n, d = Xa.shape
    k = Ca.shape[0]
    if Ca.shape[1] != d:
        raise DimensionMismatch(f"C has dimension {Ca.shape[1]}, expected {d}", d, Ca.shape[1])
    if k == 0:
        raise InvalidValue("C has no centroids (k = 0)")
    if labels is None:
        labels = _alloc_like(X, (n,), "int64")
    la = _arr(labels, "labels", "int64", writable=True)
    _ndim(la, "labels", 1, "[n]")
    if la.shape[0] != n:
        raise DimensionMismatch(f"labels has length {la.shape[0]}, expected {n}", n, la.shape[0])
    if sq_dists is None:
        sq_dists = _alloc_like(X, (n,), "float32")
    da = _arr(sq_dists, "sq_dists", writable=True)
    _ndim(da, "sq_dists", 1, "[n]")
    if da.shape[0] != n:
        raise DimensionMismatch(f"sq_dists has length {da.shape[0]}, expected {n}", n, da.shape[0])
    for a in (Xa, Ca):
        if np.may_share_memory(la, a) or np.may_share_memory(da, a):
            raise InvalidValue("labels and sq_dists must not share memory with X or C")
    if np.may_share_memory(la, da):
        raise InvalidValue("labels and sq_dists must not share memory with each other")
    _check_finite(Ca, "C")
    _check_finite(Xa, "X")
    if n:
        D = (
            np.einsum("ij,ij->i", Xa, Xa)[:, None]
            - np.float32(2) * (Xa @ Ca.T)
            + np.einsum("ij,ij->i", Ca, Ca)[None, :]
        )
        np.maximum(D, 0, out=D)
        best = np.argmin(D, axis=1)
        la[:] = best
        da[:] = D[np.arange(n), best]
    return labels, sq_dists


_MAX_RANK = 8


def _delta_norm(A64: np.ndarray, B64: np.ndarray, s: float) -> float:
    """``||s B A||_F`` from the r x r Gram matrices."""
    return s * math.sqrt(max(float(np.sum((B64.T @ B64) * (A64 @ A64.T))), 0.0))


def _output_change(H: np.ndarray, A: np.ndarray, B: np.ndarray, scale: float) -> Callable:
    """``(A_n, B_n) -> mean_t ||s (B_n A_n - B A) h_t|| / ||h_t||``, in float64."""
    f64 = np.float64
    H64 = H.astype(f64)
    inv_n = 1.0 / (np.sqrt(np.einsum("ij,ij->i", H64, H64)) + 1e-12)
    q = (H64 @ A.astype(f64).T) @ B.astype(f64).T  # [T, d]: B A h_t

    def divergence(An: np.ndarray, Bn: np.ndarray) -> float:
        diff = scale * ((H64 @ An.astype(f64).T) @ Bn.astype(f64).T - q)
        return float(np.mean(np.sqrt(np.einsum("ij,ij->i", diff, diff)) * inv_n))

    return divergence


def micro_step(
    H: np.ndarray,
    adv: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    A0: np.ndarray | None,
    B0: np.ndarray,
    v: np.ndarray,
    t: int,
    scale: float,
    lr: float,
    beta2: float,
    decay: float,
    grad_clip: float,
    norm_cap: float,
    trust_region: float,
    max_halvings: int,
    grad_fn: Callable[[np.ndarray, np.ndarray], Any],
    divergence: Callable[[np.ndarray, np.ndarray], float] | None = None,
) -> tuple[bool, float, float, float, float, np.ndarray, np.ndarray, np.ndarray]:
    """The MicroLoRA update rule, once, for every caller: :func:`micro_update` (the
    reference of the native kernel) and ``MicroLoRA.update``.

    1. decay toward the initial adapter: ``A <- (1 - decay) A + decay A0`` (A0 None: zero),
       ``B <- (1 - decay) B + decay B0``;
    2. the gradient ``g`` of ``sum_t adv_t G_t . y_t``, ``y_t = h_t + s B A h_t``, at the
       decayed parameters, ``G = grad_fn(A, B)`` [T, d] being evaluated there too;
    3. global clipping ``g <- g min(1, grad_clip / ||g||)``;
    4. Adam with beta1 = 0 on theta = [A.ravel() | B.ravel()]:
       ``v <- beta2 v + (1 - beta2) g^2``, ``step = lr g / (sqrt(v / (1 - beta2^t)) + eps)``;
    5. candidates ``theta + frac step`` for frac = 1, 1/2, ... (max_halvings + 1 tries), each
       with ``||s B A||_F`` capped at norm_cap by rescaling A, until
       ``divergence(A_n, B_n) <= trust_region``; if none fits, the decayed parameters.
       ``divergence`` None: the mean relative output change on the rows of H against the
       undecayed (A, B), ``mean_t ||s (B_n A_n - B A) h_t|| / ||h_t||``.

    H [T, d] and adv [T] are checked here together with the G that grad_fn returns (a
    float32 array, as the kernels take it); A, B, A0, B0 and v are the caller's float32
    arrays. Parameters, their candidates and v are rounded to float32 where they are
    stored; the gradient, the Adam step and every reduction are float64.

    Returns:
        ``(accepted, frac, div, gnorm, delta_norm, A_new, B_new, v_new)``: frac is 0 and
        (A_new, B_new) the decayed parameters when rejected; gnorm is before clipping.

    Raises:
        InvalidValue: the gradient is not finite (nothing is returned, nothing changes).
    """
    f64 = np.float64
    s = float(scale)
    r, d = A.shape
    # decayed parameters (float32, as stored)
    A_dec = (1.0 - decay) * A.astype(f64)
    if A0 is not None:
        A_dec += decay * A0.astype(f64)
    Ad = A_dec.astype(np.float32)
    Bd = ((1.0 - decay) * B.astype(f64) + decay * B0.astype(f64)).astype(np.float32)
    Ad64, Bd64 = Ad.astype(f64), Bd.astype(f64)
    Ha, Ga, adva = _checked_steps(H, grad_fn(Ad, Bd), adv, d)
    H64, G64 = Ha.astype(f64), Ga.astype(f64)
    w = s * adva.astype(f64)
    with np.errstate(all="ignore"):  # a non-finite A, B or B0 is reported just below
        a = H64 @ Ad64.T  # [T, r]: A h_t
        b = G64 @ Bd64  # [T, r]: B^T g_t
        g = np.concatenate([((b * w[:, None]).T @ H64).ravel(), ((G64 * w[:, None]).T @ a).ravel()])
        gnorm = math.sqrt(float(np.dot(g, g)))
    if not math.isfinite(gnorm):
        raise InvalidValue("gradient is not finite")
    if gnorm > grad_clip:
        g *= grad_clip / gnorm
    c = math.sqrt(1.0 - beta2**t)
    v_new = beta2 * v.astype(f64) + (1.0 - beta2) * (g * g)
    step = g * (lr * c) / (np.sqrt(v_new) + 1e-8 * c)
    v_new = v_new.astype(np.float32)
    theta = np.concatenate([Ad64.ravel(), Bd64.ravel()])
    if divergence is None:
        divergence = _output_change(Ha, A, B, s)
    n_a = r * d
    frac, div = 1.0, 0.0
    for _ in range(max_halvings + 1):
        new = (theta + frac * step).astype(np.float32)
        An, Bn = new[:n_a].reshape(r, d), new[n_a:].reshape(d, r)
        An64, Bn64 = An.astype(f64), Bn.astype(f64)
        dn = _delta_norm(An64, Bn64, s)
        if dn > norm_cap:
            An = (An64 * (norm_cap / dn)).astype(np.float32)
            dn = norm_cap
        div = float(divergence(An, Bn))
        if div <= trust_region:
            return True, frac, div, gnorm, dn, An, Bn, v_new
        frac *= 0.5
    # the decay still applies: an over-large step is refused, ageing is not
    return False, 0.0, div, gnorm, _delta_norm(Ad64, Bd64, s), Ad, Bd, v_new


def micro_update(
    H: Any,
    G: Any,
    adv: Any,
    A: Any,
    B: Any,
    B0: Any,
    v: Any,
    t: int,
    scale: float,
    lr: float,
    beta2: float,
    decay: float,
    grad_clip: float,
    norm_cap: float,
    trust_region: float,
    max_halvings: int,
    A_out: Any,
    B_out: Any,
    v_out: Any,
) -> tuple[bool, float, float, float, float]:
    """One stabilised Adam step of the MicroLoRA ``y = h + s B A h``; returns
    ``(accepted, frac, div, gnorm, delta_norm)`` and writes A_out, B_out, v_out.

    :func:`micro_step` for an upstream gradient G that does not depend on (A, B):
    decay toward (0, B0); the gradient of ``sum_t adv_t G_t . y_t`` at the decayed
    parameters; global clipping; Adam (beta1 = 0) on theta = [A.ravel() | B.ravel()]
    with second moment v; then steps of fraction 1, 1/2, ... (max_halvings + 1 tries),
    each with ``||s B A||_F`` capped at norm_cap (by rescaling A), until the mean
    relative output change on the rows of H (against the undecayed A, B) is
    <= trust_region; if none fits, the decayed parameters are written.

    Precision (the native kernel follows the same steps): parameters, their
    candidates and v_out are rounded to float32 where they are stored; the
    gradient, the Adam step and every reduction are float64.
    """
    Ha, Ga, adva, Aa, Ba = _step_arrays(H, G, adv, A, B)
    B0a = _arr(B0, "B0")
    _ndim(B0a, "B0", 2, "[d, r]")
    va = _arr(v, "v")
    _ndim(va, "v", 1, "[2*r*d]")
    T = Ha.shape[0]
    r, d = Aa.shape
    n = 2 * r * d
    if r == 0:
        raise InvalidValue("A has 0 rows; the rank r must be >= 1")
    if r > _MAX_RANK:
        raise InvalidValue(f"the rank r must be <= {_MAX_RANK}, got {r}")
    if T == 0:
        raise InvalidValue("H has no rows; T must be >= 1")
    _check_steps(Ha, Ga, adva, T, d)
    for name, M in (("B", Ba), ("B0", B0a)):
        if M.shape[0] != d:
            raise DimensionMismatch(f"{name} has {M.shape[0]} rows, expected {d}", d, M.shape[0])
        if M.shape[1] != r:
            raise DimensionMismatch(f"{name} has {M.shape[1]} columns, expected {r}", r, M.shape[1])
    if va.shape[0] != n:
        raise DimensionMismatch(f"v has length {va.shape[0]}, expected {n}", n, va.shape[0])
    s = float(_scale(scale))
    t = operator.index(t)  # ints only, like the native binding
    if t < 1:
        raise InvalidValue(f"t must be >= 1, got {t}")
    max_halvings = operator.index(max_halvings)
    if max_halvings < 0:
        raise InvalidValue(f"max_halvings must be >= 0, got {max_halvings}")
    lr, beta2, decay = float(lr), float(beta2), float(decay)
    grad_clip, norm_cap, trust_region = float(grad_clip), float(norm_cap), float(trust_region)
    if not 0.0 <= beta2 < 1.0:
        raise InvalidValue(f"beta2 must be in [0, 1), got {beta2:g}")
    for name, val in (
        ("lr", lr),
        ("decay", decay),
        ("grad_clip", grad_clip),
        ("norm_cap", norm_cap),
        ("trust_region", trust_region),
    ):
        if math.isnan(val):
            raise InvalidValue(f"{name} must not be NaN")
    outs = []
    for name, obj, want in (("A_out", A_out, Aa), ("B_out", B_out, Ba), ("v_out", v_out, va)):
        o = _arr(obj, name, writable=True)
        _ndim(o, name, want.ndim, {"A_out": "[r, d]", "B_out": "[d, r]", "v_out": "[2*r*d]"}[name])
        if o.shape != want.shape:
            i = 0 if o.shape[0] != want.shape[0] else 1
            raise DimensionMismatch(
                f"{name} has shape {_shape(o)}, expected {_shape(want)}", want.shape[i], o.shape[i]
            )
        outs.append(o)
    Ao, Bo, vo = outs
    for o in outs:
        if any(np.may_share_memory(o, a) for a in (Ha, Ga, adva, Aa, Ba, B0a, va)):
            raise InvalidValue("A_out, B_out and v_out must not share memory with the inputs")
    if np.may_share_memory(Ao, Bo) or np.may_share_memory(Ao, vo) or np.may_share_memory(Bo, vo):
        raise InvalidValue("A_out, B_out and v_out must not share memory with each other")
    _check_finite(adva, "adv")
    _check_finite(Ha, "H")
    _check_finite(Ga, "G")

    accepted, frac, div, gnorm, dn, An, Bn, vn = micro_step(
        Ha,
        adva,
        Aa,
        Ba,
        None,
        B0a,
        va,
        t,
        s,
        lr,
        beta2,
        decay,
        grad_clip,
        norm_cap,
        trust_region,
        max_halvings,
        lambda A_dec, B_dec: Ga,
    )
    Ao[...] = An
    Bo[...] = Bn
    vo[...] = vn
    return accepted, frac, div, gnorm, dn
