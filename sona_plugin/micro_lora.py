"""MicroLoRA: a rank 1-2 residual adapter on the final hidden state, updated per feedback.

Forward: ``y = h + s * B (A h)`` with ``A`` (r x d) zero and ``B`` (d x r) small random
(the mirror of PEFT's zero-``B`` start), so the adapter is the identity until it learns,
and ``s = alpha / r``. Starting ``A`` at zero keeps learning local: the rows of ``A`` are
built only from inputs that received feedback, so an input dissimilar to all of them
(orthogonal in the limit) is left alone. With a random ``A`` every input would move.

Update: the instant loop hands in the upstream gradient ``g_t = dJ/dy_t`` of its
objective ``J`` at each recorded step and a per-step advantage ``a_t``; the parameter
gradients are (exactly, by the chain rule through ``y``)::

    dJ/dB = s * sum_t a_t g_t (A h_t)^T        dJ/dA = s * sum_t a_t (B^T g_t) h_t^T

One feedback takes one stabilised ascent step (DESIGN.md, measured on SmolLM2: each
stabiliser alone collapses or drifts; together they are stable over hundreds of
feedbacks): decay toward the initial adapter, global gradient clipping, an Adam step
(beta1 = 0), a cap on ``||s B A||_F`` (by rescaling ``A``), and a trust region on the change the step causes
on its own steps (the step is halved until it fits, else rejected).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

from . import kernels
from .errors import ConfigError, DimensionMismatch, InvalidValue

_MAX_HALVINGS = 6


@dataclass
class UpdateReport:
    """What one instant update did."""

    accepted: bool
    step_fraction: float
    divergence: float
    grad_norm: float
    delta_norm: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class MicroLoRA:
    """Rank 1-2 LoRA ``y = h + s B A h`` with a stabilised REINFORCE update.

    Args:
        hidden_dim: width d of the adapted vectors.
        rank: 1 or 2.
        alpha: LoRA alpha; scale ``s = alpha / rank``.
        lr: Adam step size.
        beta2: Adam second-moment decay.
        norm_cap: bound on ``||s B A||_F`` (so ``||y - h|| <= norm_cap * ||h||``).
        trust_region: bound on the divergence one update may cause on its own steps.
        decay: per update, ``A <- A - decay (A - A0)`` and ``B <- B - decay (B - B0)``.
        init: "zero_a" (A = 0, B small random: local updates) or "zero_b" (A small random,
            B = 0: PEFT's convention, DESIGN.md's measured instant-loop setting).
        grad_clip: global L2 norm bound of one update's gradient.
        seed: seed of ``A``'s initialisation.
    """

    def __init__(
        self,
        hidden_dim: int,
        rank: int = 2,
        alpha: float = 1.0,
        *,
        lr: float = 3e-3,
        beta2: float = 0.99,
        norm_cap: float = 0.3,
        trust_region: float = 0.05,
        decay: float = 0.01,
        grad_clip: float = 1.0,
        seed: int = 0,
        init: str = "zero_a",
    ):
        if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim <= 0:
            raise ConfigError(f"hidden_dim must be an integer > 0, got {hidden_dim!r}")
        if isinstance(rank, bool) or rank not in (1, 2):
            raise ConfigError(f"micro_lora_rank must be 1 or 2, got {rank!r}")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ConfigError(f"lora_alpha must be > 0, got {alpha!r}")
        self.hidden_dim, self.rank = hidden_dim, rank
        self.scale = float(alpha) / rank
        self.lr, self.beta2, self.norm_cap = lr, beta2, norm_cap
        self.trust_region, self.decay, self.grad_clip = trust_region, decay, grad_clip
        rng = np.random.default_rng(seed)
        if init not in ("zero_a", "zero_b"):
            raise ConfigError(f"micro_lora_init must be 'zero_a' or 'zero_b', got {init!r}")
        self.init = init
        if init == "zero_a":
            self.B0 = (rng.standard_normal((hidden_dim, rank)) / math.sqrt(hidden_dim)).astype(
                np.float32
            )
            self.A0 = np.zeros((rank, hidden_dim), np.float32)
        else:
            self.A0 = (rng.standard_normal((rank, hidden_dim)) / math.sqrt(hidden_dim)).astype(
                np.float32
            )
            self.B0 = np.zeros((hidden_dim, rank), np.float32)
        self._A = self.A0.copy()
        self._B = self.B0.copy()
        self._v = np.zeros(2 * rank * hidden_dim, np.float32)  # Adam second moment of [A | B]
        self.steps = 0
        self.rejected = 0

    # -- parameters -------------------------------------------------------------------
    @property
    def A(self) -> np.ndarray:
        return self._A

    @property
    def B(self) -> np.ndarray:
        return self._B

    def set_params(self, A: np.ndarray, B: np.ndarray) -> None:
        """Replace (A, B); shapes checked, arrays copied to float32 C order."""
        A = np.ascontiguousarray(A, np.float32)
        B = np.ascontiguousarray(B, np.float32)
        if A.shape != self._A.shape or B.shape != self._B.shape:
            raise DimensionMismatch(
                f"MicroLoRA params must have shapes {self._A.shape} and "
                f"{self._B.shape}, got {A.shape} and {B.shape}"
            )
        if not (np.isfinite(A).all() and np.isfinite(B).all()):
            raise InvalidValue("MicroLoRA params contain non-finite values")
        self._A, self._B = A, B

    def param_count(self) -> int:
        return self._A.size + self._B.size

    def delta_norm(self, A: np.ndarray | None = None, B: np.ndarray | None = None) -> float:
        """``||s B A||_F`` computed from the r x r Gram matrices."""
        A = self._A if A is None else A
        B = self._B if B is None else B
        g = float(np.vdot(B.T @ B, A @ A.T))
        return self.scale * math.sqrt(max(g, 0.0))

    # -- forward ----------------------------------------------------------------------
    def forward(self, x: np.ndarray | torch.Tensor, out: Any = None) -> np.ndarray | torch.Tensor:
        """``x + s B A x`` for x of shape [d] or [n, d] (float32 NumPy or CPU torch)."""
        return kernels.micro_lora_forward(x, self._A, self._B, self.scale, out)

    def forward_with(self, A: np.ndarray, B: np.ndarray, H: np.ndarray) -> np.ndarray:
        return kernels.micro_lora_forward(H, A, B, self.scale, None)

    # -- learning ---------------------------------------------------------------------
    def gradient(
        self,
        H: np.ndarray,
        G: np.ndarray,
        adv: np.ndarray,
        A: np.ndarray | None = None,
        B: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(dJ/dA, dJ/dB) for steps H [T, d], upstream gradients G [T, d], advantages [T]."""
        A = self._A if A is None else A
        B = self._B if B is None else B
        gA = np.zeros_like(A)
        gB = np.zeros_like(B)
        kernels.reinforce_accumulate(H, G, adv, A, B, self.scale, gA, gB)
        return gA, gB

    def update(
        self,
        H: np.ndarray,
        grad_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
        adv: np.ndarray,
        divergence: Callable[[np.ndarray, np.ndarray], float] | None,
    ) -> UpdateReport:
        """One stabilised ascent step on ``J = sum_t a_t J_t(y_t)``: the rule of
        :func:`~sona_plugin.kernels.micro_step`, decaying toward (A0, B0).

        Args:
            H: the recorded inputs h_t, [T, d] float32.
            grad_fn: ``grad_fn(A, B) -> G`` the upstream gradients dJ_t/dy_t [T, d] float32
                at (A, B).
            adv: per-step advantages a_t, [T] float32.
            divergence: ``divergence(A_new, B_new)`` the change the candidate causes on the
                steps, compared with the current adapter (KL, for instance); None: the mean
                relative output change ``||y_new - y_old|| / ||h||``.

        Raises:
            InvalidValue: the gradient is not finite (the adapter is left as it was).
        """
        accepted, frac, div, gnorm, dn, A, B, v = kernels.micro_step(
            H,
            adv,
            self._A,
            self._B,
            self.A0,
            self.B0,
            self._v,
            self.steps + 1,
            self.scale,
            self.lr,
            self.beta2,
            self.decay,
            self.grad_clip,
            self.norm_cap,
            self.trust_region,
            _MAX_HALVINGS,
            grad_fn,
            divergence,
        )
        return self._commit(A, B, v, accepted, frac, div, gnorm, dn)

    def update_fixed(self, H: np.ndarray, G: np.ndarray, adv: np.ndarray) -> UpdateReport:
        """:meth:`update` for an upstream gradient ``G`` that does not depend on (A, B), with
        the mean relative output change ``||y_new - y_old|| / ||h||`` as the trust-region
        divergence: the same rule, fused into one native call (``kernels.micro_update``)."""
        if self.init != "zero_a":  # the fused kernel decays A toward zero: zero-A only
            return self.update(H, lambda A, B: G, adv, None)
        A_out = np.empty_like(self._A)
        B_out = np.empty_like(self._B)
        v_out = np.empty_like(self._v)
        t = self.steps + 1
        accepted, frac, div, gnorm, dn = kernels.micro_update(
            H,
            G,
            adv,
            self._A,
            self._B,
            self.B0,
            self._v,
            t,
            self.scale,
            self.lr,
            self.beta2,
            self.decay,
            self.grad_clip,
            self.norm_cap,
            self.trust_region,
            _MAX_HALVINGS,
            A_out,
            B_out,
            v_out,
        )
        return self._commit(A_out, B_out, v_out, accepted, frac, div, gnorm, dn)

    def _commit(
        self,
        A: np.ndarray,
        B: np.ndarray,
        v: np.ndarray,
        accepted: bool,
        frac: float,
        div: float,
        gnorm: float,
        dn: float,
    ) -> UpdateReport:
        """Adopt one update's (A, B, v), whether or not the step was accepted, and count it."""
        self._A, self._B, self._v = A, B, v
        self.steps += 1
        self.rejected += int(not accepted)
        return UpdateReport(bool(accepted), frac, div, gnorm, dn)

    def shrink(self, factor: float) -> None:
        """Scale the delta by ``factor`` (after a hot-swap the BaseLoRA carries the lesson)."""
        self._A = (self._A * np.float32(factor)).astype(np.float32)

    # -- export -----------------------------------------------------------------------
    def to_lm_head_lora(self, W: np.ndarray | torch.Tensor) -> dict:
        """Exact PEFT LoRA factors for an ``lm_head`` of weight ``W`` [V, d].

        ``W (h + s B A h) = W h + (s W B)(A h)``, so with PEFT's scaling set to 1
        (``lora_alpha = r``): ``lora_A = A`` [r, d] and ``lora_B = s W B`` [V, r].
        """
        Wn = W.detach().cpu().float().numpy() if hasattr(W, "detach") else np.asarray(W, np.float32)
        if Wn.ndim != 2 or Wn.shape[1] != self.hidden_dim:
            raise DimensionMismatch(
                f"lm_head weight must be [vocab, {self.hidden_dim}], got {Wn.shape}",
                self.hidden_dim,
                Wn.shape[-1] if Wn.ndim else 0,
            )
        return {
            "lora_A": self._A.copy(),
            "lora_B": (self.scale * (Wn @ self._B)).astype(np.float32),
            "r": self.rank,
            "lora_alpha": self.rank,
        }

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {"A": self._A, "B": self._B, "A0": self.A0, "B0": self.B0, "v": self._v}
        meta = {
            "steps": self.steps,
            "rejected": self.rejected,
            "scale": self.scale,
            "init": self.init,
        }
        return arrays, meta

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        for k in ("A", "B", "A0", "B0", "v"):
            if k not in arrays:
                raise InvalidValue(f"MicroLoRA state lacks {k!r}")
        self.set_params(arrays["A"], arrays["B"])
        self.A0 = np.ascontiguousarray(arrays["A0"], np.float32)
        self.B0 = np.ascontiguousarray(arrays["B0"], np.float32)
        self._v = np.ascontiguousarray(arrays["v"], np.float32)
        self.steps, self.rejected = int(meta["steps"]), int(meta["rejected"])
