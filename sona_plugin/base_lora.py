"""BaseLoRA: the slower, higher-rank adapter (rank 4-16), one LoRA pair per layer.

In the core engine the BaseLoRA holds what the background loop consolidates; with a
host model (transformers, vLLM) the trained adapter is a PEFT LoRA and this container
is its NumPy view. Layer ``l`` computes ``y = x + (alpha / r) B_l A_l x``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors.numpy import load_file, save_file

from . import kernels
from .errors import ConfigError, DimensionMismatch, InvalidValue, StateError

if TYPE_CHECKING:
    import torch


class BaseLoRA:
    """Per-layer LoRA pairs ``A_l`` [r, d] (small random) and ``B_l`` [d, r] (zero)."""

    def __init__(
        self,
        hidden_dim: int,
        rank: int = 8,
        num_layers: int = 12,
        alpha: float | None = None,
        seed: int = 0,
    ):
        for name, v in (
            ("hidden_dim", hidden_dim),
            ("base_lora_rank", rank),
            ("num_layers", num_layers),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be an integer > 0, got {v!r}")
        self.hidden_dim, self.rank, self.num_layers = hidden_dim, rank, num_layers
        self._alpha = float(alpha if alpha is not None else rank)
        rng = np.random.default_rng(seed + 1)
        self.A = [
            (rng.standard_normal((rank, hidden_dim)) / math.sqrt(hidden_dim)).astype(np.float32)
            for _ in range(num_layers)
        ]
        self.B = [np.zeros((hidden_dim, rank), np.float32) for _ in range(num_layers)]

    @property
    def alpha(self) -> float:
        return self._alpha

    def set_alpha(self, alpha: float) -> None:
        if not (math.isfinite(alpha) and alpha > 0):
            raise InvalidValue(f"alpha must be > 0, got {alpha!r}")
        self._alpha = float(alpha)

    @property
    def scale(self) -> float:
        return self._alpha / self.rank

    def _check_layer(self, layer_idx: int) -> int:
        if (
            isinstance(layer_idx, bool)
            or not isinstance(layer_idx, (int, np.integer))
            or not 0 <= layer_idx < self.num_layers
        ):
            raise InvalidValue(
                f"layer index must be in [0, {self.num_layers - 1}], got {layer_idx!r}"
            )
        return int(layer_idx)

    def forward_layer(
        self,
        layer_idx: int,
        x: np.ndarray | torch.Tensor,
        out: np.ndarray | torch.Tensor | None = None,
    ) -> np.ndarray | torch.Tensor:
        """``x + (alpha / r) B_l A_l x`` for x [d] or [n, d]."""
        l = self._check_layer(layer_idx)
        return kernels.micro_lora_forward(x, self.A[l], self.B[l], self.scale, out)

    def delta(self, layer_idx: int) -> np.ndarray:
        """The dense update ``(alpha / r) B_l A_l`` [d, d]."""
        l = self._check_layer(layer_idx)
        return (self.scale * (self.B[l] @ self.A[l])).astype(np.float32)

    def merge_weights(
        self, model_weights: np.ndarray | torch.Tensor, layer_idx: int
    ) -> np.ndarray | torch.Tensor:
        """``W + (alpha / r) B_l A_l`` for a square weight ``W`` [d, d]; same type as ``W``.

        For a layer ``y = W x`` the merged weight computes ``W x + delta x``: the adapter
        folded in (what ``peft``'s ``merge_and_unload`` does).
        """
        d = self.delta(layer_idx)
        shape = tuple(model_weights.shape)
        if shape != d.shape:
            raise DimensionMismatch(
                f"model_weights must have shape {d.shape}, got {shape}",
                d.shape[0],
                shape[0] if shape else 0,
            )
        if hasattr(model_weights, "detach"):
            import torch

            return model_weights + torch.from_numpy(d).to(model_weights.dtype)
        return (np.asarray(model_weights) + d).astype(np.asarray(model_weights).dtype)

    def param_count(self) -> int:
        return 2 * self.rank * self.hidden_dim * self.num_layers

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {}
        for l in range(self.num_layers):
            arrays[f"layers.{l}.lora_A"] = self.A[l]
            arrays[f"layers.{l}.lora_B"] = self.B[l]
        meta = {
            "hidden_dim": self.hidden_dim,
            "rank": self.rank,
            "num_layers": self.num_layers,
            "alpha": self._alpha,
        }
        return arrays, meta

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        if (meta["hidden_dim"], meta["rank"], meta["num_layers"]) != (
            self.hidden_dim,
            self.rank,
            self.num_layers,
        ):
            raise DimensionMismatch(
                f"BaseLoRA state is {meta['num_layers']} layers of rank "
                f"{meta['rank']} at {meta['hidden_dim']}-d, expected "
                f"{self.num_layers} x rank {self.rank} at {self.hidden_dim}-d"
            )
        self.A = [
            np.ascontiguousarray(arrays[f"layers.{l}.lora_A"], np.float32)
            for l in range(self.num_layers)
        ]
        self.B = [
            np.ascontiguousarray(arrays[f"layers.{l}.lora_B"], np.float32)
            for l in range(self.num_layers)
        ]
        self._alpha = float(meta["alpha"])

    def save(self, path: str | Path) -> None:
        """Write a safetensors file (tensors plus shape metadata)."""
        arrays, meta = self.state_dict()
        save_file(arrays, str(path), metadata={k: str(v) for k, v in meta.items()})

    @classmethod
    def load(cls, path: str | Path) -> BaseLoRA:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "np") as f:
                m = f.metadata() or {}
            arrays = load_file(str(path))
            meta = {
                "hidden_dim": int(m["hidden_dim"]),
                "rank": int(m["rank"]),
                "num_layers": int(m["num_layers"]),
                "alpha": float(m["alpha"]),
            }
        except (OSError, KeyError, ValueError) as e:
            raise StateError(f"cannot load BaseLoRA from {path}: {e}") from e
        obj = cls(meta["hidden_dim"], meta["rank"], meta["num_layers"], meta["alpha"])
        obj.load_state_dict(arrays, meta)
        return obj
