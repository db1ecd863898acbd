"""Type stub of the nanobind extension ``sona_plugin._native`` (ext/src): float32 SIMD
kernels. Use :mod:`sona_plugin.kernels`, which falls back to ``_kernels_numpy`` (the same
functions and errors) when the extension is missing."""

from collections.abc import Callable
from typing import Any

GIL_RELEASE_MIN_WORK: int

def micro_lora_forward(x: Any, A: Any, B: Any, scale: float, out: Any = None) -> Any:
    """out = x + scale * B @ (A @ x), per row of x; allocates out if None; returns out."""

def reinforce_accumulate(
    H: Any, G: Any, adv: Any, A: Any, B: Any, scale: float, grad_A: Any, grad_B: Any
) -> None:
    """grad_B += s sum_t adv_t g_t (A h_t)^T; grad_A += s sum_t adv_t (B^T g_t) h_t^T."""

def cosine_topk(P: Any, q: Any, k: int, P_norms: Any = None) -> tuple[Any, Any]:
    """Top-k rows of P by cosine similarity to q: (idx int64[k'], sims float32[k'])."""

def kmeans_assign(X: Any, C: Any, labels: Any = None, sq_dists: Any = None) -> tuple[Any, Any]:
    """Nearest centroid (squared L2) per row of X: (labels int64[n], sq_dists float32[n])."""

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
    """One stabilised Adam step of the MicroLoRA; returns (accepted, frac, div, gnorm,
    delta_norm)."""

def simd_level() -> str: ...
def supported_simd_levels() -> list[str]: ...
def set_simd_level(name: str) -> None: ...
def set_error_types(dimension_mismatch: type, invalid_value: type) -> None: ...
def set_allocator(fn: Callable[[Any, tuple[int, ...], str], Any] | None) -> None: ...
def numpy_fast_path() -> bool: ...
