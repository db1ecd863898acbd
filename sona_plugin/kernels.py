"""Numeric kernels of sona_plugin, native (C++/SIMD) when available, NumPy otherwise.

This is the only module that knows which implementation runs:

* ``sona_plugin._native`` (nanobind extension; SIMD level picked from the CPU at
  import, capped by ``$SONA_SIMD=scalar|avx2|avx512``), unless it fails to import
  or ``$SONA_KERNELS=numpy``;
* ``sona_plugin._kernels_numpy`` otherwise (identical checks and messages).

``BACKEND`` says which one was chosen.  Functions (all float32; arrays are
C-contiguous NumPy arrays or CPU torch tensors, used without copies; wrong
dtype/layout raises :class:`~sona_plugin.errors.InvalidValue`, wrong shapes
:class:`~sona_plugin.errors.DimensionMismatch`):

``micro_lora_forward(x, A, B, scale, out=None) -> out``
    ``out = x + scale * B @ (A @ x)`` for x ``[d]`` or each row of x ``[n, d]``;
    A ``[r, d]``, B ``[d, r]``.  Every x element must be finite.
``reinforce_accumulate(H, G, adv, A, B, scale, grad_A, grad_B) -> None``
    In place: ``grad_B += s Σ_t adv_t g_t (A h_t)ᵀ``, ``grad_A += s Σ_t adv_t (Bᵀ g_t) h_tᵀ``
    (the gradients of ``Σ_t adv_t g_t·y_t``, ``y_t = h_t + s B A h_t``).
    Nothing is modified if H, G or adv holds a non-finite value.
``cosine_topk(P, q, k, P_norms=None) -> (idx int64[k'], sims float32[k'])``
    ``k' = min(k, m)`` rows of P ``[m, d]`` most cosine-similar to q, best first,
    ties to the lower index; zero rows / zero q have similarity 0.  Results are
    NumPy arrays.  ``P_norms`` (row L2 norms) is computed when omitted.
``kmeans_assign(X, C, labels=None, sq_dists=None) -> (labels, sq_dists)``
    Nearest centroid by squared L2 distance (ties to the lower index).
``micro_update(...)``
    One stabilised Adam step of the MicroLoRA for a fixed upstream gradient, fused.
``micro_step(...)``
    The same rule for an upstream gradient that depends on (A, B) and any divergence;
    NumPy only (its callbacks are Python), and the reference ``micro_update`` follows.

Omitted outputs are allocated with the input's array type (NumPy or torch).
The native functions are bound directly as module attributes, so a call costs
no Python-level wrapper (~0.15 µs for a 256-d ``micro_lora_forward``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from sona_plugin import _kernels_numpy
from sona_plugin.errors import DimensionMismatch, InvalidValue

__all__ = [
    "BACKEND",
    "Backend",
    "apply_micro_lora_torch",
    "cosine_topk",
    "kmeans_assign",
    "micro_lora_forward",
    "micro_step",
    "micro_update",
    "reinforce_accumulate",
    "set_simd_level",
    "simd_levels",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    """Which kernel implementation runs: ``name`` "native" | "numpy", ``simd`` level or "none"."""

    name: str
    simd: str

    def describe(self) -> str:
        if self.name == "native":
            return f"native C++ kernels (SIMD: {self.simd})"
        return "NumPy reference kernels (no native extension)"


def _empty(like: Any, shape: tuple[int, ...], dtype: str) -> Any:
    """A new C-contiguous array of ``like``'s type (torch imported only for torch inputs)."""
    if isinstance(like, np.ndarray):
        return np.empty(shape, dtype)
    if type(like).__module__.split(".", 1)[0] == "torch":
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype), device=like.device)
    return np.empty(shape, dtype)


def _load_native() -> Any:
    choice = os.environ.get("SONA_KERNELS", "").strip().lower()
    if choice == "numpy":
        log.info("sona_plugin kernels: NumPy (SONA_KERNELS=numpy)")
        return None
    if choice not in ("", "auto", "native"):
        log.warning("ignoring SONA_KERNELS=%r (expected auto, native or numpy)", choice)
    try:
        from sona_plugin import _native
    except ImportError as exc:
        if choice == "native":
            raise
        log.warning("sona_plugin kernels: native extension unavailable (%s); using NumPy", exc)
        return None
    _native.set_error_types(DimensionMismatch, InvalidValue)
    _native.set_allocator(_empty)
    log.info("sona_plugin kernels: native, SIMD %s", _native.simd_level())
    return _native


_native = _load_native()
_impl: Any = _native if _native is not None else _kernels_numpy
_kernels_numpy.set_allocator(_empty)

BACKEND = (
    Backend("native", _native.simd_level()) if _native is not None else Backend("numpy", "none")
)

# Bound directly: no Python wrapper between the caller and the kernel.
micro_lora_forward = _impl.micro_lora_forward
reinforce_accumulate = _impl.reinforce_accumulate
cosine_topk = _impl.cosine_topk
kmeans_assign = _impl.kmeans_assign
micro_update = _impl.micro_update
micro_step = _kernels_numpy.micro_step  # callbacks in Python: one NumPy implementation


def apply_micro_lora_torch(h: Any, A: np.ndarray, B: np.ndarray, scale: float) -> Any:
    """``h + scale * B (A h)`` over the last axis of a torch tensor, for the hosts' hooks.

    Float32 CPU tensors outside autograd go through :func:`micro_lora_forward` (the C++
    kernel); anything else (GPU, other dtypes, a tensor a gradient must flow through) takes
    the same product in torch ops on its device.
    """
    import torch

    if h.requires_grad or h.device.type != "cpu" or h.dtype != torch.float32:
        At = torch.from_numpy(A).to(h.device, h.dtype)
        Bt = torch.from_numpy(B).to(h.device, h.dtype)
        return h + scale * (h @ At.T) @ Bt.T
    x = h.contiguous()
    out = torch.empty_like(x)
    d = x.shape[-1]
    micro_lora_forward(x.view(-1, d), A, B, scale, out.view(-1, d))
    return out


def simd_levels() -> list[str]:
    """SIMD levels the native kernels can use on this CPU, highest first ([] for NumPy)."""
    return list(_native.supported_simd_levels()) if _native is not None else []


def set_simd_level(name: str) -> None:
    """Switch the native kernels to another supported SIMD level and update ``BACKEND``.

    Raises InvalidValue for an unknown level, one this CPU lacks, or the NumPy backend.
    Not meant to be called while other threads run kernels.
    """
    global BACKEND
    if _native is None:
        raise InvalidValue(f"SIMD level {name!r} needs the native kernels; the backend is NumPy")
    _native.set_simd_level(name)
    BACKEND = Backend("native", _native.simd_level())
