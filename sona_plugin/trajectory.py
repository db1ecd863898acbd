"""Recording trajectories: a bounded buffer that never blocks, and a builder."""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import DimensionMismatch, InvalidValue, SonaError
from .types import Trajectory, TrajectoryStep, check_unit

_F32 = np.dtype(np.float32)
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
    # the common case, a float32 vector of the right length, in a few cheap operations;
    # anything else (or a non-finite value) takes the general path, which names the fault
    if type(x) is np.ndarray and x.dtype is _F32 and x.ndim == 1:
        n = x.shape[0]
        if (n or allow_empty) and (dim is None or n == dim):
            y = x.copy() if copy else x
            # y.dot(y) is finite iff every element is (barring overflow past 1e19)
            if not n or math.isfinite(y.dot(y)):
                return y
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
        return self._end(check_unit("quality", final_quality))

    def _end(self, quality: float) -> Trajectory:
        """:meth:`build` with ``quality`` already checked (the engine checks it first)."""
        t = self.trajectory
        t.final_quality = quality
        if not t.latency_us:
            t.latency_us = int(self.elapsed() * 1e6)
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
    if type(attention_weights) is tuple and not attention_weights:  # the default: none
        a = np.zeros(0, np.float32) if keep_attention else _EMPTY
    else:
        a = as_vector(
            "attention_weights", attention_weights, None, allow_empty=True, copy=keep_attention
        )
        if not keep_attention:
            a = _EMPTY
    if action is not None:
        action = _check_action(action)
    if latency_us < 0:
        raise InvalidValue(f"latency_us must be >= 0, got {latency_us!r}")
    return TrajectoryStep(h, a, r, action, int(latency_us), topk_ids, topk_logprobs)


def _check_action(action: Any) -> int:
    try:
        ok = not isinstance(action, bool) and int(action) == action and action >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InvalidValue(f"action must be a non-negative integer, got {action!r}")
    return int(action)


def make_steps(
    activations: Any,
    rewards: Any,
    dim: int | None,
    *,
    attention_weights: Any = None,
    actions: Any = None,
    keep_attention: bool = False,
    max_steps: int | None = None,
) -> tuple[list[TrajectoryStep], int]:
    """The checked steps of a whole trajectory, as :func:`make_step` makes them one by one.

    Args:
        activations: ``[T, dim]``, one row per step (a float32 array is checked in one
            pass; a sequence of T vectors works too).
        rewards: T rewards in [-1, 1].
        dim: the width every row must have (None: any).
        attention_weights: None (no attention) or T vectors, one per step (a ``[T, k]``
            array or a sequence; lengths may differ), checked and kept as by make_step.
        actions: None or T non-negative integers (the token or route of each step).
        keep_attention: keep the attention weights (make_step's ``keep_attention``).
        max_steps: keep at most this many steps (all are checked); None: all.

    Returns:
        The steps kept, and how many were dropped beyond ``max_steps``.

    Raises:
        DimensionMismatch: ``activations`` is not ``[T, dim]``, or rewards, attention
            weights or actions do not hold one entry per step.
        InvalidValue, DimensionMismatch: a step make_step refuses; the message is
            make_step's with `` (step i)`` appended, for the first bad step in step order.
    """
    if hasattr(activations, "detach"):  # torch tensor
        activations = activations.detach().cpu().numpy()
    try:
        H = np.asarray(activations, dtype=np.float32)
    except (TypeError, ValueError):
        H = None  # ragged or not numbers: the per-step checks below name the step
    # an empty sequence (shape (0,)) is a trajectory of no steps
    if H is not None and H.ndim != 2 and (H.ndim != 1 or H.shape[0] != 0):
        raise DimensionMismatch(
            f"activations must be [steps, {dim if dim is not None else 'd'}], one row "
            f"per step, got shape {H.shape}"
        )
    if H is not None and H.ndim == 1:
        H = H.reshape(0, 0)
    n = _step_count("activations", activations) if H is None else H.shape[0]
    _step_count("rewards", rewards, n)
    if attention_weights is not None:
        _step_count("attention_weights", attention_weights, n)
    if actions is not None:
        _step_count("actions", actions, n)
    keep = n if max_steps is None else min(n, max_steps)
    if H is not None:
        try:
            return _steps_fast(
                H, rewards, dim, attention_weights, actions, keep_attention, keep
            ), n - keep
        except SonaError:
            pass  # the per-step checks below raise the first fault in step order
    steps = [
        _at_step(
            i,
            make_step,
            activations[i],
            () if attention_weights is None else attention_weights[i],
            rewards[i],
            dim,
            action=None if actions is None else actions[i],
            keep_attention=keep_attention,
        )
        for i in range(n)
    ]
    return steps[:keep], n - keep


def _step_count(name: str, values: Any, expected: int | None = None) -> int:
    try:
        n = len(values)
    except TypeError:
        raise InvalidValue(
            f"{name} must hold one entry per step, got {type(values).__name__}"
        ) from None
    if expected is not None and n != expected:
        raise DimensionMismatch(
            f"{name} has {n} entries, expected {expected} (one per step)", expected, n
        )
    return n


def _at_step(i: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, its SonaError's message extended with `` (step i)``."""
    try:
        return fn(*args, **kwargs)
    except DimensionMismatch as e:
        raise type(e)(f"{e} (step {i})", e.expected, e.actual) from None
    except SonaError as e:
        raise type(e)(f"{e} (step {i})") from None


def _steps_fast(
    H: np.ndarray,
    rewards: Any,
    dim: int | None,
    attention_weights: Any,
    actions: Any,
    keep_attention: bool,
    keep: int,
) -> list[TrajectoryStep]:
    """The steps from a float32 ``[T, d]`` array, the whole array checked at once.

    Accepts only what make_step accepts step by step; raises SonaError on anything else
    (including what make_step would accept but this pass cannot tell, like squares that
    overflow only summed over all steps), and the caller then runs make_step per step.
    """
    n, d = H.shape
    if n and (d == 0 or (dim is not None and d != dim)):
        raise InvalidValue("activations: not [T, dim]")
    flat = H.reshape(-1)
    if not math.isfinite(flat.dot(flat)):
        raise InvalidValue("activations: not finite")
    rs = [check_unit("reward", r, -1.0, 1.0) for r in rewards]
    acts = [None] * n if actions is None else [_check_action(a) for a in actions]
    if attention_weights is None:
        att = [np.zeros(0, np.float32) for _ in range(keep)] if keep_attention else None
    elif (
        type(attention_weights) is np.ndarray
        and attention_weights.dtype is _F32
        and attention_weights.ndim == 2
    ):
        flat = attention_weights.reshape(-1)
        if not math.isfinite(flat.dot(flat)):
            raise InvalidValue("attention_weights: not finite")
        att = list(np.array(attention_weights[:keep])) if keep_attention else None
    else:
        att = [
            as_vector("attention_weights", w, None, allow_empty=True, copy=keep_attention)
            for w in attention_weights
        ]
        att = att[:keep] if keep_attention else None
    # one owned copy (a caller may reuse its buffer); each step holds a row of it
    Hc = np.array(H if keep == n else H[:keep], dtype=np.float32, order="C")
    now = time.time()
    return [
        TrajectoryStep(Hc[i], _EMPTY if att is None else att[i], rs[i], acts[i], 0, None, None, now)
        for i in range(keep)
    ]
