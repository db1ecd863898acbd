"""Recording trajectories: a bounded buffer that never blocks, and a builder."""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import numpy as np

from .errors import DimensionMismatch, InvalidValue
from .types import Trajectory, TrajectoryStep, check_unit

_EMPTY = np.zeros(0, np.float32)
_EMPTY.flags.writeable = False


def as_vector(
    name: str, x: Any, dim: int | None = None, *, allow_empty: bool = False, copy: bool = False
) -> np.ndarray:
    """``x`` as a 1-D float32 array, checked: length ``dim`` (if given), non-empty, finite.

    A float32 NumPy array is used as is unless ``copy`` (what the engine keeps, it owns:
    a caller may reuse its buffer); anything else (lists, float64, torch tensors) is
    converted once.
    """
    if copy and type(x) is np.ndarray:
        x = np.array(x, dtype=np.float32)
    elif type(x) is not np.ndarray or x.dtype != np.float32:
        if hasattr(x, "detach"):  # torch tensor
            x = x.detach().cpu().numpy()
        try:
            x = np.asarray(x, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise InvalidValue(f"{name} must be a vector of numbers: {e}") from None
    if x.ndim != 1:
        raise DimensionMismatch(f"{name} must be 1-D, got shape {x.shape}")
    n = x.shape[0]
    if n == 0 and not allow_empty:
        raise InvalidValue(f"{name} is empty")
    if dim is not None and n != dim:
        raise DimensionMismatch(f"{name} has dimension {n}, expected {dim}", dim, n)
    # x.dot(x) is finite iff every element is (barring overflow past 1e19, which we also refuse)
    if n and not np.isfinite(x.dot(x)):
        bad = np.flatnonzero(~np.isfinite(x))
        where = f"index {int(bad[0])}" if bad.size else "a value too large to square"
        raise InvalidValue(f"{name} contains a non-finite value at {where}")
    return x


class TrajectoryBuffer:
    """Bounded buffer of ended trajectories.

    ``record`` never blocks on a full buffer: the new trajectory is dropped and counted
    (the seeds' semantics). The lock is held only for an append or a swap, so a recorder
    never waits on a drain for longer than that.
    """

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise InvalidValue(f"capacity must be > 0, got {capacity}")
        self._capacity = capacity
        self._items: collections.deque[Trajectory] = collections.deque()
        self._lock = threading.Lock()
        self._dropped = 0
        self._recorded = 0

    def record(self, trajectory: Trajectory) -> bool:
        """Append; returns False (and counts a drop) when full."""
        with self._lock:
            if len(self._items) >= self._capacity:
                self._dropped += 1
                return False
            self._items.append(trajectory)
            self._recorded += 1
            return True

    def drain(self) -> list[Trajectory]:
        """Take every buffered trajectory, oldest first."""
        with self._lock:
            items, self._items = self._items, collections.deque()
        return list(items)

    def peek(self) -> list[Trajectory]:
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def is_empty(self) -> bool:
        return not self._items

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def dropped_count(self) -> int:
        return self._dropped

    @property
    def recorded_count(self) -> int:
        return self._recorded

    def restore(self, items: list[Trajectory], recorded: int, dropped: int) -> None:
        with self._lock:
            self._items = collections.deque(items)
            self._recorded, self._dropped = recorded, dropped


class TrajectoryBuilder:
    """Builds one trajectory step by step (the seeds' builder).

    Vectors are checked as they arrive, so a bad step is refused with an error and the
    steps already added are kept.
    """

    def __init__(
        self,
        id: int,
        query_embedding: Any,
        hidden_dim: int | None = None,
        embedding_dim: int | None = None,
        max_steps: int = 50,
    ):
        self.hidden_dim = hidden_dim
        self.max_steps = max_steps
        self._t0 = time.perf_counter()
        self.trajectory = Trajectory(
            id=id,
            query_embedding=as_vector("query_embedding", query_embedding, embedding_dim, copy=True),
        )

    @property
    def id(self) -> int:
        return self.trajectory.id

    def add_step(
        self,
        activations: Any,
        attention_weights: Any = (),
        reward: float = 0.0,
        *,
        action: int | None = None,
        latency_us: int = 0,
        topk_ids: np.ndarray | None = None,
        topk_logprobs: np.ndarray | None = None,
    ) -> None:
        """Add a step; ``reward`` in [-1, 1]."""
        step = make_step(
            activations,
            attention_weights,
            reward,
            self.hidden_dim,
            action=action,
            latency_us=latency_us,
            topk_ids=topk_ids,
            topk_logprobs=topk_logprobs,
        )
        self.append(step)

    def append(self, step: TrajectoryStep) -> None:
        t = self.trajectory
        if len(t.steps) >= self.max_steps:
            t.steps_dropped += 1
            return
        t.steps.append(step)

    def set_route(self, route: str) -> None:
        self.trajectory.route = str(route)

    def add_context(self, context_id: str) -> None:
        self.trajectory.context_ids.append(str(context_id))

    def step_count(self) -> int:
        return len(self.trajectory.steps)

    def elapsed(self) -> float:
        """Seconds since the trajectory began."""
        return time.perf_counter() - self._t0

    def build(self, final_quality: float) -> Trajectory:
        """End the trajectory with its quality in [0, 1]."""
        q = check_unit("quality", final_quality)
        t = self.trajectory
        t.final_quality = q
        t.latency_us = int(self.elapsed() * 1e6) if not t.latency_us else t.latency_us
        return t


def make_step(
    activations: Any,
    attention_weights: Any,
    reward: float,
    dim: int | None,
    *,
    action: int | None = None,
    latency_us: int = 0,
    topk_ids: Any = None,
    topk_logprobs: Any = None,
    keep_attention: bool = False,
) -> TrajectoryStep:
    """A checked TrajectoryStep (reward in [-1, 1], activations of length ``dim``).

    Attention weights are checked, and kept only if ``keep_attention``: no learning rule
    here reads them, and they are half of a step's bytes.
    """
    r = check_unit("reward", reward, -1.0, 1.0)
    h = as_vector("activations", activations, dim, copy=True)
    a = as_vector(
        "attention_weights", attention_weights, None, allow_empty=True, copy=keep_attention
    )
    if not keep_attention:
        a = _EMPTY
    if action is not None and (isinstance(action, bool) or int(action) != action or action < 0):
        raise InvalidValue(f"action must be a non-negative integer, got {action!r}")
    if latency_us < 0:
        raise InvalidValue(f"latency_us must be >= 0, got {latency_us!r}")
    return TrajectoryStep(
        h, a, r, None if action is None else int(action), int(latency_us), topk_ids, topk_logprobs
    )
