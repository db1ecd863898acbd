"""Loop B, the background loop: patterns, and consolidation of the instant lesson.

A cycle takes every buffered trajectory (any number, no minimum):

1. adds their query embeddings and qualities to the ReasoningBank and extracts patterns
   (k-means++, weighted by quality);
2. consolidates the MicroLoRA into the BaseLoRA's output layer ``L = num_layers - 1``
   by minimising, over the cycle's recorded activations ``h_t`` (``A`` fixed, as in
   LoRA-FA; the minimiser over ``B`` is an exact batch of r-by-r solves),

       ``L(theta) = mean_t || D_base(h_t; theta) - (D_base(h_t; theta_old) + D_micro(h_t)) ||^2
                    + lambda * sum_i F_i (theta_i - theta*_i)^2``

   (``D`` the adapters' residual deltas; the second term the EWC++ penalty of earlier
   tasks), feeding the online Fisher with the Gauss-Newton diagonal of this Gaussian
   model and the task-boundary test with the gradient at the old parameters. The MicroLoRA then keeps only the part the BaseLoRA did not
   absorb (its ``B`` shrinks by the fit's relative residual): its lesson now lives in
   the BaseLoRA, and ``apply_lora`` does not count it twice.

With a host model (transformers, vLLM) the BaseLoRA is a PEFT adapter trained on
stored feedback instead; that trainer lives with the integrations.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import kernels
from ..base_lora import BaseLoRA
from ..config import SonaConfig
from ..ewc import EwcPlusPlus
from ..micro_lora import MicroLoRA
from ..reasoning_bank import ReasoningBank
from ..types import Trajectory

_MAX_SAMPLES = 256


@dataclass
class BackgroundResult:
    """What one background cycle did."""

    trajectories_processed: int = 0
    patterns_extracted: int = 0
    patterns_total: int = 0
    consolidated: bool = False
    consolidation_loss_before: float = 0.0
    consolidation_loss_after: float = 0.0
    micro_residual: float = 1.0
    ewc_penalty: float = 0.0
    task_boundary: bool = False
    skipped: list[str] = field(default_factory=list)
    elapsed_ms: float = 0.0

    @property
    def status(self) -> str:
        s = (
            f"processed {self.trajectories_processed} trajectories, "
            f"{self.patterns_extracted} patterns extracted ({self.patterns_total} stored)"
        )
        if self.consolidated:
            s += (
                f", consolidated MicroLoRA into BaseLoRA (loss {self.consolidation_loss_before:.3g}"
                f" -> {self.consolidation_loss_after:.3g})"
            )
        if self.skipped:
            s += "; skipped: " + "; ".join(self.skipped)
        return s

    def to_dict(self) -> dict:
        d = asdict(self)
        d["status"] = self.status
        return d


class BackgroundLoop:
    """Runs background cycles over drained trajectories."""

    def __init__(
        self,
        config: SonaConfig,
        bank: ReasoningBank,
        base: BaseLoRA,
        micro: MicroLoRA,
        ewc: EwcPlusPlus,
    ):
        self.config, self.bank, self.base, self.micro, self.ewc = config, bank, base, micro, ewc
        self.layer = base.num_layers - 1
        self.cycles = 0
        self._rng = np.random.default_rng(config.seed + 7)
        self.ewc.register(self._params())

    def _params(self) -> dict[str, np.ndarray]:
        return {"lora_A": self.base.A[self.layer], "lora_B": self.base.B[self.layer]}

    def run_cycle(self, trajectories: list[Trajectory]) -> BackgroundResult:
        t0 = time.perf_counter()
        res = BackgroundResult(trajectories_processed=len(trajectories))
        if not trajectories:
            res.skipped.append("no trajectories")
        e = self.config.embed_dim
        usable = [
            t
            for t in trajectories
            if t.query_embedding.shape[0] == e and t.final_quality is not None
        ]
        if usable:
            self.bank.add_trajectories(
                np.stack([t.query_embedding for t in usable]),
                np.array([t.final_quality for t in usable]),
                [_route_of(t) for t in usable],
            )
        if trajectories:
            res.patterns_extracted = len(self.bank.extract_patterns())
        res.patterns_total = self.bank.pattern_count
        self._consolidate(trajectories, res)
        self.cycles += 1
        res.elapsed_ms = (time.perf_counter() - t0) * 1e3
        return res

    def _consolidate(self, trajectories: list[Trajectory], res: BackgroundResult) -> None:
        d = self.config.hidden_dim
        rows = [s.activations for t in trajectories for s in t.steps if s.activations.shape[0] == d]
        rows += [
            t.query_embedding
            for t in trajectories
            if not t.steps and t.query_embedding.shape[0] == d
        ]
        if not rows:
            res.skipped.append("consolidation: no activations of the adapted width")
            return
        if self.micro.delta_norm() == 0.0:
            res.skipped.append("consolidation: the MicroLoRA has learned nothing yet")
            return
        if len(rows) > _MAX_SAMPLES:
            rows = [rows[i] for i in self._rng.choice(len(rows), _MAX_SAMPLES, replace=False)]
        H = np.ascontiguousarray(np.stack(rows), np.float32)
        base, layer = self.base, self.layer
        s, A, B_old = base.scale, base.A[layer], base.B[layer]
        n = len(H)
        target = (kernels.micro_lora_forward(H, A, B_old, s, None) - H) + (
            self.micro.forward(H) - H
        )
        tnorm = float(np.mean(np.sum(target * target, axis=1)))
        Z = (H @ A.T).astype(np.float64)  # [n, r]: A h_t

        def loss_of(B: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
            err = kernels.micro_lora_forward(H, A, B, s, None) - H - target
            gA, gB = np.zeros_like(A), np.zeros_like(B)
            kernels.reinforce_accumulate(H, err, np.full(n, 2.0 / n, np.float32), A, B, s, gA, gB)
            return float(np.mean(np.sum(err * err, axis=1))), {"lora_A": gA, "lora_B": gB}

        loss0, grads = loss_of(B_old)
        res.consolidation_loss_before = loss0
        res.task_boundary = bool(self.ewc.detect_task_boundary(grads=grads))
        if res.task_boundary:
            self.ewc.start_new_task(self._params())
        # The EWC++ penalty is diagonal and quadratic, lambda sum_k F_k (B - B*_k)^2, so it is
        # read off its gradient: at B = 0 it is -2 lambda sum_k F_k B*_k, its slope 2 lambda F.
        zeros = {"lora_A": np.zeros_like(A), "lora_B": np.zeros_like(B_old)}
        ones = {"lora_A": np.ones_like(A), "lora_B": np.ones_like(B_old)}
        pg0 = self.ewc.penalty_grad(zeros)["lora_B"].astype(np.float64)
        lam_F = (self.ewc.penalty_grad(ones)["lora_B"] - pg0) / 2.0  # [d, r]
        # B minimises mean_t ||s B z_t - target_t||^2 + lambda sum F (B - B*)^2 with A fixed
        # (LoRA-FA): per output row i, (s^2/n Z^T Z + diag(lam_F_i + eps)) b_i =
        # s/n Z^T target_i - pg0_i / 2. A batch of d r-by-r solves, exact.
        M = (s * s / n) * (Z.T @ Z)
        eps = 1e-6 * (np.trace(M) / M.shape[0] + 1e-12)
        lhs = M[None, :, :] + np.einsum("ij,jk->ijk", lam_F + eps, np.eye(M.shape[0]))
        rhs = (s / n) * (target.astype(np.float64).T @ Z) - pg0 / 2.0  # [d, r]
        B_new = np.linalg.solve(lhs, rhs[:, :, None])[:, :, 0].astype(np.float32)
        loss, _ = loss_of(B_new)
        if not (np.isfinite(B_new).all() and math.isfinite(loss)):
            res.skipped.append("consolidation: the solve was not finite")
            return
        # Fisher of the Gaussian consolidation model (Gauss-Newton diagonal): s^2/n sum_t z_tj^2
        fisher_b = np.broadcast_to((s * s / n) * np.sum(Z * Z, axis=0), B_new.shape)
        self.ewc.update_fisher(
            {"lora_A": np.zeros_like(A), "lora_B": np.sqrt(fisher_b).astype(np.float32)}
        )
        base.B[layer] = B_new
        res.ewc_penalty = float(self.ewc.penalty(self._params()))
        res.consolidated = True
        res.consolidation_loss_after = loss
        # the part of the micro lesson the base did not absorb stays in the MicroLoRA
        res.micro_residual = min(1.0, math.sqrt(loss / tnorm)) if tnorm > 0 else 1.0
        self.micro.shrink(res.micro_residual)


def _route_of(t: Trajectory) -> str | None:
    if t.route is not None:
        return t.route
    actions = [s.action for s in t.steps if s.action is not None]
    return str(actions[-1]) if actions else None
