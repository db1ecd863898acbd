"""EWC++: online Fisher information, task boundaries, adaptive lambda and a task memory.

Elastic weight consolidation keeps parameters that mattered for earlier tasks near the
values they had then, with the quadratic penalty ``λ Σ_tasks Σ_i F_i (θ_i − θ*_i)²``
(Kirkpatrick et al. 2017). EWC++ (Chaudhry et al. 2018, "Riemannian Walk for
Incremental Learning") and online EWC (Schwarz et al. 2018, "Progress & Compress")
estimate the diagonal Fisher ``F`` as an exponential moving average of squared gradients
instead of one pass per task. Here the parameter set is named (a dict, e.g. the BaseLoRA
``lora_A``/``lora_B`` tensors) and every dict passed in is checked against the
registered names and shapes: a mismatch raises, it is never skipped.

State is kept in NumPy float32; the methods accept NumPy arrays or torch tensors and
answer in the caller's type, dtype and device. torch is imported only when a tensor is
passed in.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any

import numpy as np

from .config import SonaConfig
from .errors import DimensionMismatch, InvalidValue, StateError

logger = logging.getLogger(__name__)

_FORMAT = "sona_plugin.ewc"
_VERSION = 1
_WARMUP = 8  # observations before the boundary detector may fire
_PATIENCE = 3  # consecutive outliers needed to declare a boundary
_LAMBDA_GROWTH = 1.1  # λ multiplier per new task (then clamped)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".", 1)[0] == "torch"


def _to_numpy(name: str, x: Any) -> np.ndarray:
    if _is_torch(x):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InvalidValue(f"{name} must be an array of numbers: {e}") from None


class _Task:
    """One remembered task: its Fisher ``F`` and optimum ``θ*`` per parameter."""

    __slots__ = ("fisher", "theta", "merged")

    def __init__(self, fisher: dict[str, np.ndarray], theta: dict[str, np.ndarray], merged: int):
        self.fisher = fisher
        self.theta = theta
        self.merged = merged  # how many original tasks this entry stands for

    @staticmethod
    def combine(a: _Task, b: _Task) -> _Task:
        """Fisher summed, ``θ* = (F_a θ_a + F_b θ_b) / (F_a + F_b)`` (plain mean where F = 0).

        ``F_a(θ−θ_a)² + F_b(θ−θ_b)² = (F_a+F_b)(θ−θ*)² + const``, so the merged entry has
        the same penalty gradient as the two it replaces.
        """
        fisher, theta = {}, {}
        for n in a.fisher:
            fa, fb = a.fisher[n].astype(np.float64), b.fisher[n].astype(np.float64)
            ta, tb = a.theta[n].astype(np.float64), b.theta[n].astype(np.float64)
            f = fa + fb
            with np.errstate(invalid="ignore", divide="ignore"):
                t = np.where(f > 0, (fa * ta + fb * tb) / f, 0.5 * (ta + tb))
            fisher[n] = f.astype(np.float32)
            theta[n] = t.astype(np.float32)
        return _Task(fisher, theta, a.merged + b.merged)


class EwcPlusPlus:
    """EWC++ over a named parameter set.

    Args:
        config: uses ``ewc_lambda`` (initial λ), ``ewc_min_lambda``/``ewc_max_lambda``
            (bounds of λ), ``ewc_gamma`` (Fisher decay γ), ``ewc_online``,
            ``ewc_fisher_samples`` (window of the boundary detector), ``ewc_max_tasks``
            (size of the task memory) and ``ewc_boundary_threshold`` (z-score).

    The first dict passed to any method registers the parameter set if :meth:`register`
    was not called. λ adapts: it starts at ``ewc_lambda`` and grows by 10 % at every
    :meth:`start_new_task` (each remembered task adds knowledge to protect), always
    clamped to ``[ewc_min_lambda, ewc_max_lambda]``; :meth:`set_lambda` overrides it.

    Typical use in a training cycle::

        ewc.register(params)                       # once: names and shapes
        for batch in data:                         # per step
            grads = ...
            ewc.update_fisher(grads)
            if ewc.detect_task_boundary(grads=grads):
                ewc.start_new_task(params)         # remember (F, θ*) of the task just left
            loss = task_loss + ewc.penalty(params)  # torch: differentiable
    """

    def __init__(self, config: SonaConfig):
        self.config = config
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._fisher: dict[str, np.ndarray] = {}
        self._fisher_updates = 0  # since the last start_new_task
        self._tasks: list[_Task] = []
        self._lambda = float(config.ewc_lambda)
        self._window: deque[float] = deque(maxlen=max(config.ewc_fisher_samples, _WARMUP))
        self._suspects: list[float] = []
        self._boundaries = 0
        self._last_z = 0.0
        self._torch_cache: dict[tuple[str, str], list[_Task]] = {}
        self._torch_cache_key: dict[tuple[str, str], int] = {}
        self._version = 0  # bumped whenever the task memory changes

    # --------------------------------------------------------------- names, shapes
    def register(self, params: dict[str, Any]) -> None:
        """Record the parameter names and shapes every later call is checked against.

        Registering again with the same names and shapes is a no-op; anything else while
        state exists raises DimensionMismatch (call :meth:`reset` first).
        """
        if not isinstance(params, dict) or not params:
            raise InvalidValue(
                f"params must be a non-empty dict of name -> array, got "
                f"{type(params).__name__} {params!r:.80}"
            )
        shapes = {str(n): _shape(v) for n, v in params.items()}
        if self._shapes is not None:
            self._check(params, "params")
            return
        self._shapes = shapes
        self._fisher = {n: np.zeros(s, dtype=np.float32) for n, s in shapes.items()}

    def _check(self, d: dict[str, Any], what: str) -> None:
        if self._shapes is None:
            self.register(d)
            return
        if not isinstance(d, dict):
            raise InvalidValue(f"{what} must be a dict of name -> array, got {type(d).__name__}")
        missing = [n for n in self._shapes if n not in d]
        if missing:
            raise DimensionMismatch(
                f"{what} lacks parameter {missing[0]!r} (expected shape "
                f"{self._shapes[missing[0]]}); registered: "
                f"{sorted(self._shapes)}",
                self._shapes[missing[0]],
                None,
            )
        extra = [n for n in d if n not in self._shapes]
        if extra:
            raise DimensionMismatch(
                f"{what} has unknown parameter {extra[0]!r} (shape "
                f"{_shape(d[extra[0]])}); "
                f"registered: {sorted(self._shapes)}",
                None,
                _shape(d[extra[0]]),
            )
        for n, exp in self._shapes.items():
            got = _shape(d[n])
            if got != exp:
                raise DimensionMismatch(f"{what}[{n!r}] has shape {got}, expected {exp}", exp, got)

    def _numpy(self, d: dict[str, Any], what: str) -> dict[str, np.ndarray]:
        """Checked, finite float32 NumPy copies of ``d``'s arrays, in registration order."""
        self._check(d, what)
        out = {}
        for n in self._shapes:  # type: ignore[union-attr]
            a = _to_numpy(f"{what}[{n!r}]", d[n])
            if not np.isfinite(a).all():
                bad = int(np.flatnonzero(~np.isfinite(a.ravel()))[0])
                raise InvalidValue(f"{what}[{n!r}] contains a non-finite value at flat index {bad}")
            out[n] = a
        return out

    @property
    def names(self) -> list[str]:
        """Registered parameter names (empty before :meth:`register`)."""
        return list(self._shapes or {})

    # ----------------------------------------------------------------------- Fisher
    def update_fisher(self, grads: dict[str, Any]) -> None:
        """Fold one gradient sample into the diagonal Fisher estimate.

        Online (``ewc_online``, EWC++): ``F ← γF + (1−γ)g²`` with ``γ = ewc_gamma``
        (Chaudhry et al. 2018; Schwarz et al. 2018), warm-started as the running mean
        ``F ← F + (g² − F)/n`` while ``1/n > 1−γ``. Otherwise the running mean of ``g²``
        over the current task, ``F ← F + (g² − F)/n``. ``grads`` should be per-example or
        small-batch gradients of the log-likelihood (empirical Fisher).

        Raises:
            DimensionMismatch: a missing, extra or wrongly shaped parameter.
            InvalidValue: a non-finite gradient; the state is then unchanged.
        """
        g = self._numpy(grads, "grads")
        self._fisher_updates += 1
        if self.config.ewc_online:
            # warm start: a running mean of g² for the first 1/(1−γ) samples, then the EMA
            # F ← γF + (1−γ)g² (otherwise the first samples' Fisher is scaled by 1−γ and
            # the penalty is inert until tens of updates have accumulated)
            w = np.float32(max(1.0 - self.config.ewc_gamma, 1.0 / self._fisher_updates))
            for n, gn in g.items():
                f = self._fisher[n]
                f += (gn * gn - f) * w
        else:
            inv = np.float32(1.0 / self._fisher_updates)
            for n, gn in g.items():
                f = self._fisher[n]
                f += (gn * gn - f) * inv

    @property
    def fisher(self) -> dict[str, np.ndarray]:
        """Copies of the current task's Fisher estimate."""
        return {n: f.copy() for n, f in self._fisher.items()}

    @property
    def fisher_updates(self) -> int:
        """Gradient samples folded into the current task's Fisher."""
        return self._fisher_updates

    # ---------------------------------------------------------------- boundaries
    def detect_task_boundary(
        self, grads: dict[str, Any] | None = None, loss: float | None = None
    ) -> bool:
        """Whether the training signal has shifted enough to call it a new task.

        The statistic is the loss if given, else the global L2 norm of ``grads``. It is
        compared with the last ``ewc_fisher_samples`` values by a robust z-score,
        ``z = (x − median) / (1.4826 · MAD)`` (Iglewicz & Hoaglin 1993; 1.4826·MAD
        estimates σ for Gaussian data), so that one spike (a hard batch) does not inflate
        the reference spread the way it would a standard deviation. The test is
        one-sided: a loss or gradient that falls is learning, not a new task. A boundary
        is declared when ``z > ewc_boundary_threshold`` for 3 consecutive observations,
        after a warm-up of 8. On a boundary the window restarts from those 3 values (the
        new regime); the caller decides whether to :meth:`start_new_task`. The detector
        changes neither the Fisher nor λ.

        The persistence requirement is what makes the default threshold (2.0) usable: a
        stationary Gaussian stream exceeds z = 2 about 2 % of the time, three times in a
        row about once in 10⁵ observations, while a real shift persists.

        Args:
            grads: gradients by name (checked like every other call), or
            loss: a scalar loss. Exactly one of the two.

        Raises:
            InvalidValue: neither or both given, or a non-finite value.
        """
        if (grads is None) == (loss is None):
            raise InvalidValue("detect_task_boundary needs exactly one of grads or loss")
        if loss is not None:
            try:
                x = float(loss.item() if _is_torch(loss) else loss)
            except (TypeError, ValueError, RuntimeError):
                raise InvalidValue(f"loss must be a finite scalar, got {loss!r:.80}") from None
            if not math.isfinite(x):
                raise InvalidValue(f"loss must be a finite scalar, got {x}")
        else:
            g = self._numpy(grads, "grads")  # type: ignore[arg-type]
            x = math.sqrt(sum(float(np.dot(a.ravel(), a.ravel())) for a in g.values()))
            if not math.isfinite(x):
                raise InvalidValue("the gradient norm overflows float32")
        if len(self._window) < _WARMUP:
            self._window.append(x)
            self._last_z = 0.0
            return False
        ref = np.fromiter(self._window, dtype=np.float64, count=len(self._window))
        med = float(np.median(ref))
        scale = 1.4826 * float(np.median(np.abs(ref - med)))
        z = (x - med) / max(scale, 1e-3 * abs(med), 1e-12)
        self._last_z = z
        self._window.append(x)
        if z <= self.config.ewc_boundary_threshold:
            self._suspects.clear()
            return False
        self._suspects.append(x)
        if len(self._suspects) < _PATIENCE:
            return False
        self._boundaries += 1
        logger.info("EWC++ task boundary %d detected (z = %.2f)", self._boundaries, z)
        self._window.clear()
        self._window.extend(self._suspects)
        self._suspects.clear()
        return True

    @property
    def last_z(self) -> float:
        """z-score of the last observation given to :meth:`detect_task_boundary`."""
        return self._last_z

    @property
    def boundaries_detected(self) -> int:
        return self._boundaries

    # ------------------------------------------------------------------ task memory
    def start_new_task(self, params: dict[str, Any]) -> bool:
        """Remember the task just finished and start estimating a fresh Fisher.

        Pushes ``(F, θ* = params)`` into the task memory; beyond ``ewc_max_tasks``
        entries the two oldest are merged (:meth:`_Task.combine`: Fisher summed, θ* the
        Fisher-weighted mean). Then ``F`` is reset to zero (the memory holds it now), the
        detector's running statistics are cleared, and λ grows by 10 % (later tasks
        protect more accumulated knowledge), clamped to
        ``[ewc_min_lambda, ewc_max_lambda]``.

        Returns:
            True if the task was remembered; False (logged, nothing changed) when no
            gradient was folded in since the last task: an all-zero Fisher would protect
            nothing, so there is no task to remember.

        Raises:
            InvalidValue: non-finite params.
            DimensionMismatch: params do not match the registered set.
        """
        theta = self._numpy(params, "params")
        if self._fisher_updates == 0:
            logger.warning(
                "EWC++ start_new_task skipped: no update_fisher since the last task, "
                "so there is nothing to protect"
            )
            return False
        self._tasks.append(
            _Task(
                {n: f.copy() for n, f in self._fisher.items()},
                {n: t.copy() for n, t in theta.items()},
                1,
            )
        )
        if len(self._tasks) > self.config.ewc_max_tasks:
            self._tasks[:2] = [_Task.combine(self._tasks[0], self._tasks[1])]
        for f in self._fisher.values():
            f[...] = 0.0
        self._fisher_updates = 0
        self._window.clear()
        self._suspects.clear()
        self._last_z = 0.0
        self.set_lambda(self._lambda * _LAMBDA_GROWTH)
        self._version += 1
        return True

    def consolidate_all_tasks(self) -> None:
        """Merge every remembered task into one entry (same rule as the bounded memory)."""
        if len(self._tasks) < 2:
            return
        acc = self._tasks[0]
        for t in self._tasks[1:]:
            acc = _Task.combine(acc, t)
        self._tasks = [acc]
        self._version += 1

    @property
    def task_count(self) -> int:
        """Entries in the task memory (at most ``ewc_max_tasks``)."""
        return len(self._tasks)

    # ------------------------------------------------------------------------ lambda
    @property
    def lambda_(self) -> float:
        """The penalty weight λ in force (see the class docstring for how it adapts)."""
        return self._lambda

    def set_lambda(self, value: float) -> float:
        """Set λ, clamped to ``[ewc_min_lambda, ewc_max_lambda]``; returns the value set.

        Raises:
            InvalidValue: value not a finite number.
        """
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise InvalidValue(f"lambda must be a finite number, got {value!r}") from None
        if not math.isfinite(v):
            raise InvalidValue(f"lambda must be a finite number, got {value!r}")
        self._lambda = min(max(v, self.config.ewc_min_lambda), self.config.ewc_max_lambda)
        return self._lambda

    # ----------------------------------------------------------------------- penalty
    def penalty(self, params: dict[str, Any]) -> Any:
        """``λ Σ_tasks Σ_i F_i (θ_i − θ*_i)²``.

        Args:
            params: current parameters by name, all NumPy or all torch.

        Returns:
            A float for NumPy input (accumulated in float64); for torch input a scalar
            tensor on the parameters' device and dtype, differentiable with respect to
            them, to be added to the training loss. 0 when no task is remembered.
        """
        self._check(params, "params")
        kind = self._kind(params)
        if kind == "torch":
            import torch

            first = next(iter(params.values()))
            total = torch.zeros((), device=first.device, dtype=first.dtype)
            for task in self._torch_tasks(first):
                for n, f in task.fisher.items():
                    d = params[n] - task.theta[n]
                    total = total + (f * d * d).sum()
            return total * self._lambda
        theta = {n: np.asarray(params[n], dtype=np.float64) for n in self._shapes}  # type: ignore[union-attr]
        total = 0.0
        for task in self._tasks:
            for n, f in task.fisher.items():
                d = theta[n] - task.theta[n]
                total += float(np.dot(f.ravel().astype(np.float64), (d * d).ravel()))
        return self._lambda * total

    def penalty_grad(self, params: dict[str, Any]) -> dict[str, Any]:
        """``∂penalty/∂θ = 2λ Σ_tasks F (θ − θ*)`` per parameter, in the caller's type.

        NumPy in, NumPy out (the parameter's dtype); torch in, detached tensors out on the
        parameter's device and dtype.
        """
        self._check(params, "params")
        lam2 = 2.0 * self._lambda
        if self._kind(params) == "torch":
            import torch

            first = next(iter(params.values()))
            tasks = self._torch_tasks(first)
            out = {}
            with torch.no_grad():
                for n in self._shapes:  # type: ignore[union-attr]
                    p = params[n].detach()
                    g = torch.zeros_like(p)
                    for task in tasks:
                        g += task.fisher[n] * (p - task.theta[n])
                    out[n] = g * lam2
            return out
        out = {}
        for n in self._shapes:  # type: ignore[union-attr]
            p = np.asarray(params[n])
            p64 = p.astype(np.float64)
            g = np.zeros(p.shape, dtype=np.float64)
            for task in self._tasks:
                g += task.fisher[n] * (p64 - task.theta[n])
            dtype = p.dtype if np.issubdtype(p.dtype, np.floating) else np.float32
            out[n] = (lam2 * g).astype(dtype)
        return out

    def apply_constraints(self, grads: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """``grads + penalty_grad(params)``: the task-loss gradient with the EWC++ pull added.

        Use when the optimiser is fed gradients directly rather than a loss that already
        contains :meth:`penalty`. Returns new arrays/tensors (the inputs are not modified),
        the whole gradient rather than only the correction.

        Raises:
            DimensionMismatch: either dict does not match the registered set.
            InvalidValue: ``grads`` and ``params`` are of different kinds (NumPy vs torch).
        """
        self._check(grads, "grads")
        self._check(params, "params")
        if self._kind(grads) != self._kind(params):
            raise InvalidValue(
                f"grads are {self._kind(grads)} but params are "
                f"{self._kind(params)}; pass both as NumPy or both as torch"
            )
        pg = self.penalty_grad(params)
        return {n: grads[n] + pg[n] for n in self._shapes}  # type: ignore[union-attr]

    @staticmethod
    def _kind(d: dict[str, Any]) -> str:
        kinds = {"torch" if _is_torch(v) else "numpy" for v in d.values()}
        if len(kinds) != 1:
            raise InvalidValue("mix of torch tensors and NumPy arrays in one dict; use one kind")
        return kinds.pop()

    def _torch_tasks(self, like: Any) -> list[_Task]:
        """The task memory as tensors on ``like``'s device and dtype (cached)."""
        import torch

        key = (str(like.device), str(like.dtype))
        if self._torch_cache_key.get(key) != self._version:
            self._torch_cache[key] = [
                _Task(
                    {
                        n: torch.as_tensor(f, device=like.device).to(like.dtype)
                        for n, f in t.fisher.items()
                    },
                    {
                        n: torch.as_tensor(v, device=like.device).to(like.dtype)
                        for n, v in t.theta.items()
                    },
                    t.merged,
                )
                for t in self._tasks
            ]
            self._torch_cache_key[key] = self._version
        return self._torch_cache[key]

    # ------------------------------------------------------------------ persistence
    def reset(self) -> None:
        """Forget everything: names, Fisher, task memory, detector; λ back to ``ewc_lambda``."""
        self.__init__(self.config)  # type: ignore[misc]

    def stats(self) -> dict[str, Any]:
        """JSON-serialisable summary."""
        return {
            "lambda": self._lambda,
            "task_count": len(self._tasks),
            "tasks_merged": sum(t.merged for t in self._tasks),
            "fisher_updates": self._fisher_updates,
            "boundaries_detected": self._boundaries,
            "last_z": self._last_z,
            "fisher_mean": (
                float(np.mean(np.concatenate([f.ravel() for f in self._fisher.values()])))
                if self._fisher
                else 0.0
            ),
            "parameters": sum(int(np.prod(s)) for s in (self._shapes or {}).values()),
        }

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(arrays, meta)``: float32 arrays for safetensors and a JSON-serialisable dict.

        Arrays are ``fisher.<name>``, ``task<i>.fisher.<name>`` and ``task<i>.theta.<name>``.
        :meth:`load_state_dict` restores exactly equal behaviour.
        """
        arrays: dict[str, np.ndarray] = {}
        for n, f in self._fisher.items():
            arrays[f"fisher.{n}"] = f.copy()
        for i, t in enumerate(self._tasks):
            for n in t.fisher:
                arrays[f"task{i}.fisher.{n}"] = t.fisher[n].copy()
                arrays[f"task{i}.theta.{n}"] = t.theta[n].copy()
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "names": list(self._shapes) if self._shapes is not None else None,
            "shapes": [list(s) for s in self._shapes.values()] if self._shapes else None,
            "lambda": self._lambda,
            "fisher_updates": self._fisher_updates,
            "tasks_merged": [t.merged for t in self._tasks],
            "window": list(self._window),
            "suspects": list(self._suspects),
            "boundaries": self._boundaries,
            "last_z": self._last_z,
        }
        return arrays, meta

    def load_state_dict(self, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; all or nothing.

        Raises:
            StateError: wrong format, missing arrays or inconsistent shapes.
        """
        try:
            if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
                raise StateError(
                    f"not a {_FORMAT} v{_VERSION} state: format "
                    f"{meta.get('format')!r} version {meta.get('version')!r}"
                )
            names = meta["names"]
            shapes = None
            fisher: dict[str, np.ndarray] = {}
            tasks: list[_Task] = []
            if names is not None:
                shapes = {
                    str(n): tuple(int(x) for x in s)
                    for n, s in zip(names, meta["shapes"], strict=True)
                }

                def get(key: str, shape: tuple[int, ...]) -> np.ndarray:
                    if key not in arrays:
                        raise StateError(f"EWC++ state lacks array {key!r}")
                    a = np.array(_to_numpy(key, arrays[key]), dtype=np.float32, copy=True)
                    if a.shape != shape:
                        raise StateError(
                            f"EWC++ state array {key!r} has shape {a.shape}, expected {shape}"
                        )
                    return a

                fisher = {n: get(f"fisher.{n}", s) for n, s in shapes.items()}
                for i, merged in enumerate(meta["tasks_merged"]):
                    tasks.append(
                        _Task(
                            {n: get(f"task{i}.fisher.{n}", s) for n, s in shapes.items()},
                            {n: get(f"task{i}.theta.{n}", s) for n, s in shapes.items()},
                            int(merged),
                        )
                    )
            elif meta["tasks_merged"]:
                raise StateError("EWC++ state has tasks but no parameter names")
            lam = float(meta["lambda"])
            updates = int(meta["fisher_updates"])
            window = [float(x) for x in meta["window"]]
            suspects = [float(x) for x in meta["suspects"]]
            boundaries = int(meta["boundaries"])
            last_z = float(meta["last_z"])
        except (KeyError, TypeError, ValueError, InvalidValue) as e:
            raise StateError(f"corrupt EWC++ state: {type(e).__name__}: {e}") from e
        self._shapes = shapes
        self._fisher = fisher
        self._tasks = tasks
        self._fisher_updates = updates
        self._lambda = lam
        self._window = deque(window, maxlen=max(self.config.ewc_fisher_samples, _WARMUP))
        self._suspects = suspects
        self._boundaries = boundaries
        self._last_z = last_z
        self._torch_cache.clear()
        self._torch_cache_key.clear()
        self._version += 1


def _shape(x: Any) -> tuple[int, ...]:
    """Shape of an array or tensor, without copying a device tensor to the host."""
    return tuple(int(s) for s in (x.shape if _is_torch(x) else np.shape(x)))
