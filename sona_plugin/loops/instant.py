"""Loop A, the instant loop: one feedback -> one stabilised MicroLoRA update.

The objective for a trajectory with reward ``R`` (its quality, in [0, 1]) is
``J = a * sum_t J_t(y_t)`` with the advantage ``a = R - b``, ``b`` a running baseline
that starts at ``quality_threshold`` (so the very first feedback already has a non-zero
advantage, unlike the seeds' learning signal). ``J_t`` depends on what the step is:

* **LM head** (``W`` [V, d] set with ``set_output_head``; steps carry the chosen token):
  ``J_t = log softmax(W y_t)[token]`` over the step's recorded top-k ids plus the token,
  so ``dJ_t/dy_t = W_y - sum_j p_j W_j`` (the top-k approximation of ``W^T(e_y - p)``:
  it drops the probability mass outside the top-k, about 1-5 % for k = 64 on SmolLM2).
  Trust region: mean KL between the old and new top-k distributions <= epsilon.
* **Router** (steps carry a route id; keys ``K`` [R, e] per route): the policy is
  ``pi(route | y) = softmax(K y_hat / tau)`` with ``y_hat = y / ||y||``,
  ``J_t = log pi(route_t | y)``, ``dJ_t/dy = (I - y_hat y_hat^T)(K_route - sum_j p_j K_j)
  / (tau ||y||)``; the keys learn by the same objective (``dJ/dK_j = (1[j = route] - p_j)
  y_hat / tau``), so a reward for a route raises it for queries similar (in cosine) to
  the rewarded one. Trust region: mean KL of the route policy.
* **Plain activations** (the seeds' ``add_step(activations, attention, reward)`` with no
  head): ``J_t = <h_t / ||h_t||, y_t>``, the alignment of the adapted output with the
  rewarded activation; ``dJ_t/dy = h_t / ||h_t||``. A like strengthens the output's
  component along what the model produced, a dislike weakens it, near that input only
  (the update is proportional to ``(A h)^T (A x)``). Trust region: mean relative output
  change ``||y_new - y_old|| / ||h||``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..config import SonaConfig
from ..micro_lora import MicroLoRA, UpdateReport
from ..types import Trajectory, TrajectoryStep

if TYPE_CHECKING:
    import torch
    from numpy.typing import ArrayLike


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _unit(Y: np.ndarray) -> np.ndarray:
    return (Y / (np.linalg.norm(Y, axis=-1, keepdims=True) + 1e-12)).astype(np.float32)


def _kl_rows(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=-1)))


@dataclass
class InstantReport:
    """Result of one instant update."""

    trajectory_id: int | None
    advantage: float
    baseline: float
    update: UpdateReport

    def to_dict(self) -> dict:
        d = {
            "trajectory_id": self.trajectory_id,
            "advantage": self.advantage,
            "baseline": self.baseline,
        }
        d.update(self.update.to_dict())
        return d


class RouteKeys:
    """Per-route key vectors of the router policy ``softmax(K y / tau)``."""

    def __init__(self, dim: int, tau: float, lr: float):
        self.dim, self.tau, self.lr = dim, tau, lr
        self.ids: list[int] = []
        self.index: dict[int, int] = {}
        self.K = np.zeros((0, dim), np.float32)

    def ensure(self, route: int) -> int:
        i = self.index.get(route)
        if i is None:
            i = len(self.ids)
            self.ids.append(route)
            self.index[route] = i
            self.K = np.vstack([self.K, np.zeros((1, self.dim), np.float32)])
        return i

    def probs(self, Y: np.ndarray) -> np.ndarray:
        """``softmax(K y_hat / tau)`` per row, ``y_hat = y / ||y||`` (scale-free routing)."""
        return _softmax((_unit(Y) @ self.K.T) / self.tau)

    def grad_y(self, Y: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """``d log pi(route | y) / dy = (I - y_hat y_hat^T) (K_route - p K) / (tau ||y||)``."""
        n = np.linalg.norm(Y, axis=1, keepdims=True) + 1e-12
        U = Y / n
        g = (self.K[idx] - self.probs(Y) @ self.K) / self.tau
        g = g - np.sum(g * U, axis=1, keepdims=True) * U
        return (g / n).astype(np.float32)


class InstantLoop:
    """Applies feedback to the MicroLoRA (and the router keys) at once."""

    def __init__(self, config: SonaConfig, micro: MicroLoRA):
        self.config = config
        self.micro = micro
        self.baseline = float(config.quality_threshold)
        self.routes = RouteKeys(config.hidden_dim, config.route_temperature, config.route_lr)
        self.head: np.ndarray | None = None
        self.updates = 0
        self.rejected = 0
        self.skipped = 0
        self.lock = threading.Lock()

    def set_output_head(self, W: ArrayLike | torch.Tensor) -> None:
        Wn = W.detach().cpu().float().numpy() if hasattr(W, "detach") else np.asarray(W, np.float32)
        if Wn.ndim != 2 or Wn.shape[1] != self.config.hidden_dim:
            from ..errors import DimensionMismatch

            raise DimensionMismatch(
                f"output head must be [vocab, {self.config.hidden_dim}], got {Wn.shape}",
                self.config.hidden_dim,
                Wn.shape[-1] if Wn.ndim else 0,
            )
        self.head = np.ascontiguousarray(Wn, np.float32)

    # ------------------------------------------------------------------------------
    def learn(self, trajectory: Trajectory, quality: float) -> InstantReport | None:
        """One update from an ended trajectory judged ``quality`` in [0, 1].

        Returns None (and counts a skip) for a trajectory with no step whose embedding
        is not as wide as the MicroLoRA: there is nothing to adapt.
        """
        steps = trajectory.steps
        if not steps:
            H = trajectory.query_embedding[None, :]
            if H.shape[1] != self.config.hidden_dim:
                # no step and an embedding of another width: nothing the MicroLoRA can use
                self.skipped += 1
                return None
            actions: list[int | None] = [None]
        else:
            H = np.stack([s.activations for s in steps]).astype(np.float32, copy=False)
            actions = [s.action for s in steps]
        with self.lock:
            adv = quality - self.baseline
            advs = np.full(len(H), adv, np.float32)
            route_idx = None
            if (
                all(a is not None for a in actions)
                and self.head is not None
                and steps
                and steps[0].topk_ids is not None
            ):
                grad_fn, div = self._lm_objective(H, steps)
            elif all(a is not None for a in actions) and steps and self.head is None:
                route_idx = np.array([self.routes.ensure(int(a)) for a in actions])
                grad_fn, div = self._router_objective(H, route_idx)
            else:
                grad_fn = div = None
            if grad_fn is None:
                report = self.micro.update_fixed(H, _unit(H), advs)
            else:
                report = self.micro.update(H, grad_fn, advs, div)
            if route_idx is not None:
                self._update_route_keys(H, route_idx, adv)
            self.baseline = (
                self.config.baseline_momentum * self.baseline
                + (1 - self.config.baseline_momentum) * quality
            )
            self.updates += 1
            self.rejected += int(not report.accepted)
            return InstantReport(trajectory.id, adv, self.baseline, report)

    def learn_gradient(
        self, embedding: np.ndarray, gradient: np.ndarray, quality: float
    ) -> InstantReport:
        """An update from an explicit gradient d(objective)/d(output) at ``embedding``."""
        H = embedding[None, :].astype(np.float32)
        G = gradient[None, :].astype(np.float32)
        with self.lock:
            adv = quality - self.baseline
            report = self.micro.update_fixed(H, G, np.full(1, adv, np.float32))
            self.baseline = (
                self.config.baseline_momentum * self.baseline
                + (1 - self.config.baseline_momentum) * quality
            )
            self.updates += 1
            self.rejected += int(not report.accepted)
            return InstantReport(None, adv, self.baseline, report)

    # -- objectives -------------------------------------------------------------------
    def _lm_objective(
        self, H: np.ndarray, steps: Sequence[TrajectoryStep]
    ) -> tuple[Callable, Callable]:
        W = self.head
        rows = []
        targets = []
        for s in steps:
            ids = np.asarray(s.topk_ids, np.int64)
            if s.action not in set(ids.tolist()):
                ids = np.append(ids, s.action)
            rows.append(ids)
            targets.append(int(np.flatnonzero(ids == s.action)[0]))
        k = max(len(r) for r in rows)
        # pad with the target id (duplicates only matter through their probability mass,
        # and a padded copy of the target is masked out below)
        idx = np.stack([np.pad(r, (0, k - len(r)), constant_values=r[0]) for r in rows])
        mask = np.stack([np.arange(k) < len(r) for r in rows])
        Wk = W[idx]  # [T, k, d]
        m = self.micro

        def probs(Y: np.ndarray):
            z = np.einsum("tkd,td->tk", Wk, Y)
            z = np.where(mask, z, -np.inf)
            return _softmax(z)

        def grad_fn(A: np.ndarray, B: np.ndarray):
            Y = m.forward_with(A, B, H)
            p = probs(Y)
            G = Wk[np.arange(len(H)), targets] - np.einsum("tk,tkd->td", p, Wk)
            return G.astype(np.float32)

        def div(A: np.ndarray, B: np.ndarray):
            return _kl_rows(probs(m.forward(H)), probs(m.forward_with(A, B, H)))

        return grad_fn, div

    def _router_objective(self, H: np.ndarray, idx: np.ndarray) -> tuple[Callable, Callable]:
        keys = self.routes
        m = self.micro

        def grad_fn(A: np.ndarray, B: np.ndarray):
            return keys.grad_y(m.forward_with(A, B, H), idx)

        def div(A: np.ndarray, B: np.ndarray):
            return _kl_rows(keys.probs(m.forward(H)), keys.probs(m.forward_with(A, B, H)))

        return grad_fn, div

    def _update_route_keys(self, H: np.ndarray, idx: np.ndarray, adv: float) -> None:
        """One policy-gradient step on the keys: dJ/dK_j = a (1[j = route] - p_j) y_hat / tau."""
        keys = self.routes
        Y = _unit(self.micro.forward(H))
        p = keys.probs(Y)
        onehot = np.zeros_like(p)
        onehot[np.arange(len(H)), idx] = 1.0
        gK = adv * ((onehot - p).T @ Y) / keys.tau
        K = keys.K + keys.lr * gK
        # keys stay in a ball of radius c: the sharpest policy has a logit gap of 2c / tau,
        # and a query dissimilar to every rewarded one keeps its logits near zero
        c = self.config.route_key_norm_cap
        K *= np.minimum(1.0, c / (np.linalg.norm(K, axis=1, keepdims=True) + 1e-12))
        keys.K = K.astype(np.float32)

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {"route_keys": self.routes.K}
        meta = {
            "baseline": self.baseline,
            "updates": self.updates,
            "rejected": self.rejected,
            "skipped": self.skipped,
            "route_ids": self.routes.ids,
        }
        # the output head is the host model's weight, set again by the integration: not state
        return arrays, meta

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self.baseline = float(meta["baseline"])
        self.updates, self.rejected = int(meta["updates"]), int(meta["rejected"])
        self.skipped = int(meta["skipped"])
        self.routes.ids = [int(r) for r in meta["route_ids"]]
        self.routes.index = {r: i for i, r in enumerate(self.routes.ids)}
        self.routes.K = np.ascontiguousarray(arrays["route_keys"], np.float32)
