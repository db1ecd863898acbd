"""SonaEngine: the public facade, with the seeds' API in Python names."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.numpy import load_file, save_file
from threadpoolctl import threadpool_limits

from . import kernels
from .base_lora import BaseLoRA
from .config import SonaConfig, known_fields
from .errors import InvalidValue, StateError, UnknownTrajectory
from .ewc import EwcPlusPlus
from .faults import failpoint
from .loops.background import BackgroundLoop, BackgroundResult
from .loops.coordinator import LoopCoordinator
from .loops.deep import DeepLoop, DeepResult
from .loops.instant import InstantLoop, InstantReport
from .micro_lora import MicroLoRA
from .reasoning_bank import ReasoningBank
from .trajectory import TrajectoryBuffer, TrajectoryBuilder, as_vector, make_step, make_steps
from .types import LearnedPattern, LearningSignal, Trajectory, TrajectoryStep, check_unit

if TYPE_CHECKING:
    import torch
    from numpy.typing import ArrayLike

logger = logging.getLogger(__name__)

_F32 = np.dtype(np.float32)
_FORMAT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_saves(path: Path) -> None:
    """Temp dirs of saves that crashed (``.NAME.tmp-*``); never ``.NAME.old``, which may be
    the only complete copy."""
    for p in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _dotted(config: dict[str, Any]) -> dict[str, Any]:
    """A nested config dict as ``{"section.field": value}`` (model-wide fields undotted)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


class SonaEngine:
    """Self-optimising adapter engine: record trajectories, learn from feedback, adapt.

    Router style: ``start_trajectory`` / ``record_step(id, node_id, score, latency_us)`` /
    ``end_trajectory``. LLM style: ``begin_trajectory`` / ``add_step(id, activations,
    attention_weights, reward)`` / ``end_trajectory``, or a :class:`TrajectoryBuilder`.
    ``end_trajectory(id, quality)`` is a feedback: the instant loop learns from it at once
    (or, if a cycle holds the learning lock, as soon as ``flush``/``tick`` run) and the
    trajectory is buffered for the background loop. ``learn_from_feedback`` applies a
    further feedback (a user's rating) to an ended trajectory.
    """

    def __init__(self, config: SonaConfig | dict | int | None = None, **overrides: Any):
        if isinstance(config, int) and not isinstance(config, bool):
            config = SonaConfig(hidden_dim=config, **overrides)
        elif isinstance(config, dict):
            config = SonaConfig.from_dict({**config, **overrides})
        elif config is None:
            config = SonaConfig(**overrides)
        elif overrides:
            config = SonaConfig.from_dict({**config.to_dict(), **overrides})
        self.config = c = config
        if not c.enable_simd and kernels.BACKEND.name == "native":
            kernels.set_simd_level("scalar")  # process-wide: the kernels are shared
        self._micro = MicroLoRA(
            c.hidden_dim,
            c.micro_lora_rank,
            c.lora_alpha,
            lr=c.micro_lora_lr,
            beta2=c.micro_lora_beta2,
            norm_cap=c.micro_lora_norm_cap,
            trust_region=c.micro_lora_trust_region,
            decay=c.micro_lora_decay,
            grad_clip=c.grad_clip,
            seed=c.seed,
            init=c.micro_lora_init,
        )
        self._base = BaseLoRA(c.hidden_dim, c.base_lora_rank, c.num_layers, seed=c.seed)
        self._bank = ReasoningBank(c)
        self._ewc = EwcPlusPlus(c)
        self._buffer = TrajectoryBuffer(c.trajectory_capacity)
        self._instant = InstantLoop(c, self._micro)
        self._background = BackgroundLoop(c, self._bank, self._base, self._micro, self._ewc)
        self._deep = DeepLoop(c, self._bank, self._ewc)
        self._coordinator = LoopCoordinator(
            pending=lambda: len(self._buffer),
            run_background=self._background_cycle,
            run_deep=self._deep_cycle,
            trigger_count=c.background_trigger_count,
            interval_s=c.background_interval_ms / 1000.0,
            deep_every=c.consolidation_interval,
        )
        self._open: OrderedDict[int, TrajectoryBuilder] = OrderedDict()
        # recently ended trajectories, for feedback by id; and those whose instant update
        # waits because a cycle held the learning lock when they ended
        self._recent: OrderedDict[int, Trajectory] = OrderedDict()
        self._pending: OrderedDict[int, Trajectory] = OrderedDict()
        self._last_ended: Trajectory | None = None
        self._next_id = 1
        self._enabled = True
        self._lock = threading.RLock()  # bookkeeping: open/recent/pending maps, counters
        self._learn_lock = threading.Lock()  # held by every update of learned state
        self._counters = {
            "trajectories_started": 0,
            "trajectories_ended": 0,
            "open_evicted": 0,
            "instant_dropped": 0,
            "feedback": 0,
            "background_cycles": 0,
            "deep_cycles": 0,
        }

    # -- adapters -----------------------------------------------------------------------
    def apply_micro_lora(self, x: ArrayLike | torch.Tensor) -> np.ndarray | torch.Tensor:
        """``x + s B A x`` (input plus the MicroLoRA's delta); NumPy or torch, same type out."""
        if type(x) is np.ndarray and x.dtype is _F32 and self._enabled:
            m = self._micro
            return kernels.micro_lora_forward(x, m._A, m._B, m.scale)
        return self._apply(x, micro=True, base=False)

    def apply_base_lora(
        self, x: ArrayLike | torch.Tensor, layer_idx: int | None = None
    ) -> np.ndarray | torch.Tensor:
        """Input plus the BaseLoRA delta of ``layer_idx`` (default: the output layer).

        The seeds' argument order ``apply_base_lora(layer_idx, x)`` is accepted too.
        """
        if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
            x, layer_idx = layer_idx, x
        layer = self._base.num_layers - 1 if layer_idx is None else layer_idx
        self._base._check_layer(layer)
        return self._apply(x, micro=False, base=True, layer=layer)

    def apply_lora(self, x: ArrayLike | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Input plus both deltas: ``x + D_micro(x) + D_base(x)`` (base output layer)."""
        return self._apply(x, micro=True, base=True)

    def _apply(
        self, x: ArrayLike | torch.Tensor, *, micro: bool, base: bool, layer: int | None = None
    ):
        torch_in = hasattr(x, "detach")
        if torch_in:
            xt = x
            xn = x.detach().cpu().numpy()
        else:
            xn = np.asarray(x) if not isinstance(x, np.ndarray) else x
        dtype = xn.dtype if np.issubdtype(xn.dtype, np.floating) else np.dtype(np.float32)
        if xn.ndim == 1:
            as_vector("x", xn, self.config.hidden_dim)
        elif xn.ndim == 2:
            for i in range(xn.shape[0]):
                as_vector(f"x[{i}]", xn[i], self.config.hidden_dim)
        else:
            as_vector("x", xn, self.config.hidden_dim)  # raises: wrong rank
        h = np.ascontiguousarray(xn, np.float32)
        if not self._enabled:
            y = h.copy()
        else:
            y = h
            if micro:
                y = self._micro.forward(h)
            if base:
                layer = self._base.num_layers - 1 if layer is None else layer
                d = self._base.forward_layer(layer, h) - h
                y = (y if micro else h) + d
        y = y.astype(dtype, copy=False)
        if torch_in:
            import torch

            return torch.from_numpy(np.ascontiguousarray(y)).to(device=xt.device, dtype=xt.dtype)
        return y

    # -- trajectories (LLM style) -------------------------------------------------------
    def begin_trajectory(self, query_embedding: ArrayLike | torch.Tensor) -> int:
        """Start recording (LLM style); returns the trajectory id."""
        return self._begin(query_embedding)

    def start_trajectory(self, query_embedding: ArrayLike | torch.Tensor) -> int:
        """Start recording (router style); returns the trajectory id."""
        return self._begin(query_embedding)

    def _begin(self, query_embedding: ArrayLike | torch.Tensor) -> int:
        c = self.config
        # checked and copied once, before the lock: a refused query consumes no id
        b = TrajectoryBuilder(0, query_embedding, c.hidden_dim, c.embed_dim, c.max_trajectory_steps)
        with self._lock:
            tid = b.trajectory.id = self._next_id
            self._next_id += 1
            self._open[tid] = b
            self._counters["trajectories_started"] += 1
            if len(self._open) > self.config.max_pending_signals:
                self._open.popitem(last=False)
                self._counters["open_evicted"] += 1
        return tid

    def trajectory_builder(self, query_embedding: ArrayLike | torch.Tensor) -> TrajectoryBuilder:
        """A builder object; hand it back with :meth:`submit_trajectory`."""
        tid = self.begin_trajectory(query_embedding)
        return self._open[tid]

    def _builder(self, tid: int) -> TrajectoryBuilder:
        b = self._open.get(tid)
        if b is None:
            state = (
                "has already ended"
                if (
                    tid in self._recent
                    or (isinstance(tid, (int, np.integer)) and 0 < tid < self._next_id)
                )
                else "was never started"
            )
            raise UnknownTrajectory(f"trajectory id {tid!r} {state}")
        return b

    def add_step(
        self,
        trajectory_id: int,
        activations: ArrayLike | torch.Tensor,
        attention_weights: ArrayLike | torch.Tensor = (),
        reward: float = 0.0,
        **extra: Any,
    ) -> None:
        """Record one step: ``activations`` (hidden_dim), attention weights, reward in [-1, 1]."""
        b = self._open.get(trajectory_id)
        if b is None:
            b = self._builder(trajectory_id)  # raises, naming why
        c = self.config
        b.append(
            make_step(
                activations,
                attention_weights,
                reward,
                c.hidden_dim,
                keep_attention=c.keep_attention_weights,
                **extra,
            )
        )

    add_trajectory_step = add_step

    def record_step(
        self, trajectory_id: int, node_id: int, score: float, latency_us: int = 0
    ) -> None:
        """Router style: the query went to route ``node_id`` with ``score`` in [-1, 1]."""
        b = self._builder(trajectory_id)
        q = b.trajectory.query_embedding
        if q.shape[0] != self.config.hidden_dim:
            raise InvalidValue(
                f"router steps adapt the query embedding, which is "
                f"{q.shape[0]}-d; hidden_dim is {self.config.hidden_dim}: set "
                f"hidden_dim = embedding_dim for router mode"
            )
        b.append(make_step(q, (), score, None, action=node_id, latency_us=latency_us))

    def end_trajectory(self, trajectory_id: int | TrajectoryBuilder, quality: float) -> int:
        """End a trajectory with its quality in [0, 1]: a feedback, learned from at once.

        The instant update runs in the calling thread unless a background or deep cycle
        holds the learning lock; then it waits in a queue (``flush``/``tick`` apply it)
        and the call returns without blocking. Returns the trajectory id.
        """
        if isinstance(trajectory_id, TrajectoryBuilder):
            trajectory_id = trajectory_id.id
        q = check_unit("quality", quality)
        with self._lock:
            b = self._open.get(trajectory_id)
            if b is None:
                b = self._builder(trajectory_id)  # raises, naming why
            t = b._end(q)
            del self._open[trajectory_id]
            learn = self._ended(t)
        if learn and self._learn_lock.acquire(blocking=False):
            try:
                self._apply_pending()
            finally:
                self._learn_lock.release()
        return t.id

    def record_trajectory(
        self,
        query_embedding: ArrayLike | torch.Tensor,
        activations: ArrayLike | torch.Tensor,
        rewards: ArrayLike,
        quality: float,
        attention_weights: ArrayLike | torch.Tensor | None = None,
        *,
        actions: ArrayLike | None = None,
        route: str | None = None,
        context_ids: Iterable[str] = (),
        latency_us: int = 0,
    ) -> int:
        """Record a whole trajectory in one call: ``begin_trajectory``, one ``add_step`` per
        row and ``end_trajectory``, with the same checks, state and learning, at less cost.

        Args:
            query_embedding: the query (embedding_dim).
            activations: ``[T, hidden_dim]``, one row per step (or a sequence of T vectors).
            rewards: T step rewards in [-1, 1].
            quality: the trajectory's quality in [0, 1]: a feedback, learned from at once
                as by :meth:`end_trajectory`.
            attention_weights: None, or T vectors (a ``[T, k]`` array or a sequence).
            actions: None, or T non-negative integers (each step's token or route).
            route: the trajectory's route label (``TrajectoryBuilder.set_route``).
            context_ids: context ids (``TrajectoryBuilder.add_context``).
            latency_us: the trajectory's latency (the per-step path measures it from
                ``begin_trajectory`` to ``end_trajectory``).

        Returns:
            The trajectory id.

        Raises:
            DimensionMismatch, InvalidValue: as the per-step calls would, for the first bad
                input in their order (query, then each step, then quality); a step's
                message is add_step's with `` (step i)`` appended. Every input is checked
                before anything is recorded: a refused trajectory leaves no trace (the
                per-step path keeps the steps added before a refused one) and uses no id.
        """
        c = self.config
        qe = as_vector("query_embedding", query_embedding, c.embed_dim, copy=True)
        steps, dropped = make_steps(
            activations,
            rewards,
            c.hidden_dim,
            attention_weights=attention_weights,
            actions=actions,
            keep_attention=c.keep_attention_weights,
            max_steps=c.max_trajectory_steps,
        )
        q = check_unit("quality", quality)
        if latency_us < 0:
            raise InvalidValue(f"latency_us must be >= 0, got {latency_us!r}")
        t = Trajectory(
            0,
            qe,
            steps,
            q,
            int(latency_us),
            None if route is None else str(route),
            [str(x) for x in context_ids],
            steps_dropped=dropped,
        )
        with self._lock:
            t.id = self._next_id
            self._next_id += 1
            self._counters["trajectories_started"] += 1
            learn = self._ended(t)
        if learn and self._learn_lock.acquire(blocking=False):
            try:
                self._apply_pending()
            finally:
                self._learn_lock.release()
        return t.id

    def _ended(self, t: Trajectory) -> bool:
        """Bookkeeping of a trajectory that has just ended (``self._lock`` held): buffered,
        held for feedback and queued for its instant update. False when disabled."""
        self._counters["trajectories_ended"] += 1
        self._last_ended = t
        if not self._enabled:
            return False
        self._buffer.record(t)
        limit = self.config.max_pending_signals
        self._recent[t.id] = t
        if len(self._recent) > limit:
            self._recent.popitem(last=False)
        self._pending[t.id] = t
        if len(self._pending) > limit:
            self._pending.popitem(last=False)
            self._counters["instant_dropped"] += 1
        return True

    def submit_trajectory(self, builder: TrajectoryBuilder, quality: float) -> int:
        return self.end_trajectory(builder.id, quality)

    def _apply_pending(self) -> list[InstantReport]:
        """Instant updates for queued trajectories, oldest first (learning lock held)."""
        reports = []
        while True:
            with self._lock:
                if not self._pending:
                    return reports
                _, t = self._pending.popitem(last=False)
            rep = self._instant.learn(t, t.final_quality)
            if rep is not None:
                reports.append(rep)

    # -- learning -----------------------------------------------------------------------
    def learn_from_feedback(self, signal: LearningSignal) -> InstantReport | None:
        """Apply one feedback now (waits for a running cycle to finish).

        With ``signal.gradient`` the update uses that gradient at ``signal.query_embedding``;
        otherwise it judges ``signal.trajectory_id`` (default: the most recently ended
        trajectory) with ``signal.quality``; an instant update still queued for that
        trajectory is superseded.
        """
        if not isinstance(signal, LearningSignal):
            raise InvalidValue(
                f"learn_from_feedback takes a LearningSignal, got {type(signal).__name__}"
            )
        if not self._enabled:
            return None
        if signal.gradient is not None:
            e = as_vector("query_embedding", signal.query_embedding, self.config.hidden_dim)
            g = as_vector("gradient", signal.gradient, self.config.hidden_dim)
        with self._learn_lock:
            if signal.gradient is not None:
                rep = self._instant.learn_gradient(e, g, signal.quality)
            else:
                with self._lock:
                    t = self._feedback_target(signal.trajectory_id)
                    self._pending.pop(t.id, None)
                rep = self._instant.learn(t, signal.quality)
            with self._lock:
                self._counters["feedback"] += 1
            return rep

    def _feedback_target(self, tid: int | None) -> Trajectory:
        if tid is None:
            if self._last_ended is None:
                raise UnknownTrajectory("no trajectory has ended yet: nothing to apply feedback to")
            return self._last_ended
        t = self._recent.get(tid)
        if t is None:
            for t2 in self._buffer.peek():
                if t2.id == tid:
                    return t2
            state = (
                "is still open (end it first)"
                if tid in self._open
                else "is unknown or no longer held for feedback"
            )
            raise UnknownTrajectory(f"trajectory id {tid!r} {state}")
        return t

    def learn_trajectory(self, trajectory: Trajectory, quality: float) -> InstantReport | None:
        """Instant update from a trajectory recorded by a host integration (not buffered).

        The integration keeps its own durable record (the feedback store); the engine only
        learns from it. ``quality`` in [0, 1].
        """
        q = check_unit("quality", quality)
        if not self._enabled:
            return None
        with self._learn_lock:
            rep = self._instant.learn(trajectory, q)
            with self._lock:
                self._counters["feedback"] += 1
            return rep

    def run_instant_cycle(self) -> list[InstantReport]:
        """Apply every queued instant update now, oldest first."""
        if not self._enabled:
            return []
        with self._learn_lock:
            return self._apply_pending()

    def flush(self) -> list[InstantReport]:
        """Seeds' name for :meth:`run_instant_cycle`."""
        return self.run_instant_cycle()

    def _background_cycle(self) -> BackgroundResult:
        # one BLAS thread: the cycle's matrices are small, and on a busy machine a second
        # BLAS thread made a 1,000-trajectory cycle 5x slower (measured: 15 ms -> 80 ms)
        with self._learn_lock, threadpool_limits(1, user_api="blas"):
            if self._enabled:
                self._apply_pending()
            res = self._background.run_cycle(self._buffer.drain())
            with self._lock:
                self._counters["background_cycles"] += 1
            return res

    def _deep_cycle(self) -> DeepResult:
        with self._learn_lock:
            res = self._deep.run_cycle()
            with self._lock:
                self._counters["deep_cycles"] += 1
            return res

    def run_background_cycle(self) -> BackgroundResult:
        """Run a background cycle now over whatever is buffered (no minimum)."""
        return self._coordinator.force_background()

    def run_deep_cycle(self) -> DeepResult:
        return self._deep_cycle()

    def force_learn(self) -> str:
        """Background cycle now; returns its status line (the seeds' ``forceLearn``)."""
        return self.run_background_cycle().status

    def tick(self) -> str | None:
        """Run what is due (instant queue, then background/deep on schedule)."""
        if not self._enabled:
            return None
        if self._pending and not self._coordinator.running:
            self.run_instant_cycle()
        return self._coordinator.tick()

    def start_background(self, poll_s: float = 1.0) -> None:
        """Run the coordinator in its own thread; ``tick`` then never runs a cycle itself."""
        self._coordinator.poll_s = poll_s
        self._coordinator.start()

    def stop_background(self) -> None:
        self._coordinator.stop()

    @property
    def coordinator(self) -> LoopCoordinator:
        return self._coordinator

    # -- routing ------------------------------------------------------------------------
    def route_probabilities(self, query_embedding: ArrayLike | torch.Tensor) -> dict[int, float]:
        """The router policy ``softmax(K apply_lora(q) / tau)`` over the routes seen so far."""
        q = as_vector("query_embedding", query_embedding, self.config.hidden_dim)
        keys = self._instant.routes
        if not keys.ids:
            return {}
        p = keys.probs(self.apply_lora(q)[None, :])[0].astype(np.float64)
        p /= p.sum()
        return {r: float(p[i]) for i, r in enumerate(keys.ids)}

    def add_route(self, node_id: int) -> None:
        """Make a route known to the policy before it has any feedback."""
        self._instant.routes.ensure(int(node_id))

    # -- patterns -----------------------------------------------------------------------
    def find_patterns(
        self, query_embedding: ArrayLike | torch.Tensor, k: int = 5
    ) -> list[LearnedPattern]:
        """The k learned patterns most similar (cosine) to the query."""
        return self._bank.find_patterns(query_embedding, k)

    query_patterns = find_patterns

    def set_output_head(self, W: ArrayLike | torch.Tensor) -> None:
        """Give the instant loop the LM head ``W`` [vocab, hidden_dim] (LLM objective)."""
        self._instant.set_output_head(W)

    # -- misc ---------------------------------------------------------------------------
    def set_enabled(self, enabled: bool) -> None:
        self._enabled = bool(enabled)

    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def micro_lora(self) -> MicroLoRA:
        return self._micro

    @property
    def base_lora(self) -> BaseLoRA:
        return self._base

    @property
    def reasoning_bank(self) -> ReasoningBank:
        return self._bank

    @property
    def ewc(self) -> EwcPlusPlus:
        return self._ewc

    def stats(self) -> dict[str, Any]:
        """Engine statistics (JSON-serialisable), with the seeds' key names."""
        c = self._counters
        return {
            "trajectories_recorded": self._buffer.recorded_count,
            "trajectories_buffered": len(self._buffer),
            "trajectories_dropped": self._buffer.dropped_count,
            "trajectories_started": c["trajectories_started"],
            "trajectories_ended": c["trajectories_ended"],
            "trajectories_open": len(self._open),
            "open_evicted": c["open_evicted"],
            "instant_pending": len(self._pending),
            "instant_dropped": c["instant_dropped"],
            "feedback_applied": c["feedback"],
            "micro_updates": self._instant.updates,
            "micro_updates_rejected": self._instant.rejected,
            "micro_delta_norm": self._micro.delta_norm(),
            "reward_baseline": self._instant.baseline,
            "patterns_stored": self._bank.pattern_count,
            "background_cycles": c["background_cycles"],
            "deep_cycles": c["deep_cycles"],
            "ewc_tasks": self._ewc.task_count,
            "ewc_lambda": float(self._ewc.lambda_),
            "routes": len(self._instant.routes.ids),
            "enabled": self._enabled,
            "backend": kernels.BACKEND.name,
            "simd": kernels.BACKEND.simd,
        }

    def get_stats(self) -> str:
        return json.dumps(self.stats())

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write all learned and pending state to directory ``path`` (safetensors + JSON).

        Atomic: written to a temporary sibling, fsynced, then renamed into place.
        """
        path = Path(path)
        with self._learn_lock, self._lock:
            arrays, meta = self._state()
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_saves(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            save_file(arrays, str(tmp / "state.safetensors"))
            (tmp / "state.json").write_text(json.dumps(meta, sort_keys=True, indent=1))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                if old.exists():
                    shutil.rmtree(old)
                path.rename(old)
                failpoint("engine.save.swapped")
            tmp.rename(path)
            _fsync_dir(path.parent)
            if old is not None:
                shutil.rmtree(old)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, config: SonaConfig | None = None) -> SonaEngine:
        """Restore an engine saved with :meth:`save` (no pickle anywhere).

        Args:
            path: the directory :meth:`save` wrote. When a crash came between moving the
                previous copy aside and renaming the new one in, the previous copy
                (``.NAME.old``) is loaded.
            config: the configuration to run with (a launch config); fields that differ
                from the saved configuration are logged and this one wins. None: the
                saved configuration.
        """
        path = Path(path)
        old = path.with_name(f".{path.name}.old")
        if not (path / "state.json").exists() and (old / "state.json").exists():
            logger.warning("%s is missing; loading the previous complete copy %s", path, old)
            path = old
        try:
            meta = json.loads((path / "state.json").read_text())
            arrays = load_file(str(path / "state.safetensors"))
        except (OSError, ValueError) as e:
            raise StateError(f"cannot load SONA state from {path}: {e}") from e
        if meta.get("format_version") != _FORMAT_VERSION:
            raise StateError(
                f"state format {meta.get('format_version')!r} is not {_FORMAT_VERSION}"
            )
        fields, unknown = known_fields(meta["config"])
        if unknown:
            logger.warning(
                "%s was saved with config fields this version does not know (by a newer "
                "sona_plugin?); they are ignored: %s",
                path,
                ", ".join(unknown),
            )
        saved = SonaConfig.from_dict(fields)
        if config is not None:
            now = _dotted(config.to_dict())
            changed = {k: (v, now.get(k)) for k, v in _dotted(saved.to_dict()).items()}
            changed = {k: ab for k, ab in changed.items() if ab[0] != ab[1]}
            if changed:
                logger.warning(
                    "the launch config differs from the one saved in %s; the launch "
                    "config wins: %s",
                    path,
                    ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()),
                )
        eng = cls(config if config is not None else saved)
        eng._restore(arrays, meta)
        return eng

    def _state(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {"format_version": _FORMAT_VERSION, "config": self.config.to_dict()}
        for name, obj in (
            ("micro", self._micro),
            ("base", self._base),
            ("ewc", self._ewc),
            ("bank", self._bank),
            ("instant", self._instant),
        ):
            a, m = obj.state_dict()
            arrays.update({f"{name}.{k}": np.ascontiguousarray(v) for k, v in a.items()})
            meta[name] = m
        a, m = _pack_trajectories("buffer", self._buffer.peek())
        arrays.update(a)
        meta["buffer"] = {
            **m,
            "recorded": self._buffer.recorded_count,
            "dropped": self._buffer.dropped_count,
        }
        a, m = _pack_trajectories("recent", list(self._recent.values()))
        arrays.update(a)
        meta["recent"] = {**m, "pending": list(self._pending)}
        a, m = _pack_trajectories("open", [b.trajectory for b in self._open.values()])
        arrays.update(a)
        meta["open"] = m
        meta["engine"] = {
            "next_id": self._next_id,
            "enabled": self._enabled,
            "counters": dict(self._counters),
            "last_ended": self._last_ended.id if self._last_ended else None,
            "background_cycles": self._background.cycles,
            "deep_cycles": self._deep.cycles,
        }
        return arrays, meta

    def _restore(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        for name, obj in (
            ("micro", self._micro),
            ("base", self._base),
            ("ewc", self._ewc),
            ("bank", self._bank),
            ("instant", self._instant),
        ):
            pre = f"{name}."
            obj.load_state_dict(
                {k[len(pre) :]: v for k, v in arrays.items() if k.startswith(pre)}, meta[name]
            )
        buffered = _unpack_trajectories("buffer", arrays, meta["buffer"])
        self._buffer.restore(buffered, meta["buffer"]["recorded"], meta["buffer"]["dropped"])
        by_id = {t.id: t for t in buffered}
        recent = [
            by_id.get(t.id, t) for t in _unpack_trajectories("recent", arrays, meta["recent"])
        ]
        self._recent = OrderedDict((t.id, t) for t in recent)
        self._pending = OrderedDict((i, self._recent[i]) for i in meta["recent"]["pending"])
        for t in _unpack_trajectories("open", arrays, meta["open"]):
            b = TrajectoryBuilder(
                t.id, t.query_embedding, None, None, self.config.max_trajectory_steps
            )
            b.trajectory = t
            self._open[t.id] = b
        e = meta["engine"]
        self._next_id = int(e["next_id"])
        self._enabled = bool(e["enabled"])
        self._counters = {k: int(v) for k, v in e["counters"].items()}
        last = e["last_ended"]
        self._last_ended = None
        if last is not None:
            self._last_ended = self._recent.get(last) or by_id.get(last)
        self._background.cycles = int(e["background_cycles"])
        self._deep.cycles = int(e["deep_cycles"])


_STEP_FIELDS = ("reward", "action", "latency_us", "timestamp")


def _pack_trajectories(prefix: str, ts: list[Trajectory]) -> tuple[dict[str, np.ndarray], dict]:
    """Trajectories as a few flat arrays plus JSON (safetensors holds no objects)."""
    steps = [s for t in ts for s in t.steps]
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"trajectories": [], "steps": []}
    if not ts:
        return arrays, meta
    arrays[f"{prefix}.query"] = _ragged([t.query_embedding for t in ts])
    arrays[f"{prefix}.query_len"] = np.array([t.query_embedding.shape[0] for t in ts], np.int64)
    if steps:
        arrays[f"{prefix}.act"] = _ragged([s.activations for s in steps])
        arrays[f"{prefix}.act_len"] = np.array([s.activations.shape[0] for s in steps], np.int64)
        arrays[f"{prefix}.attn"] = _ragged([s.attention_weights for s in steps])
        arrays[f"{prefix}.attn_len"] = np.array(
            [s.attention_weights.shape[0] for s in steps], np.int64
        )
        for i, s in enumerate(steps):
            if s.topk_ids is not None:
                arrays[f"{prefix}.topk_ids.{i}"] = np.asarray(s.topk_ids, np.int64)
                arrays[f"{prefix}.topk_logprobs.{i}"] = np.asarray(s.topk_logprobs, np.float32)
    for t in ts:
        meta["trajectories"].append(
            {
                "id": t.id,
                "n_steps": len(t.steps),
                "final_quality": t.final_quality,
                "latency_us": t.latency_us,
                "route": t.route,
                "context_ids": t.context_ids,
                "created_at": t.created_at,
                "steps_dropped": t.steps_dropped,
            }
        )
    meta["steps"] = [[getattr(s, f) for f in _STEP_FIELDS] for s in steps]
    return arrays, meta


def _ragged(vs: list[np.ndarray]) -> np.ndarray:
    return (
        np.concatenate([np.asarray(v, np.float32).ravel() for v in vs])
        if vs
        else np.zeros(0, np.float32)
    )


def _unpack_trajectories(
    prefix: str, arrays: dict[str, np.ndarray], meta: dict
) -> list[Trajectory]:
    tmeta = meta["trajectories"]
    if not tmeta:
        return []
    q = np.split(arrays[f"{prefix}.query"], np.cumsum(arrays[f"{prefix}.query_len"])[:-1])
    steps: list[TrajectoryStep] = []
    if meta["steps"]:
        acts = np.split(arrays[f"{prefix}.act"], np.cumsum(arrays[f"{prefix}.act_len"])[:-1])
        attn = np.split(arrays[f"{prefix}.attn"], np.cumsum(arrays[f"{prefix}.attn_len"])[:-1])
        for i, (row, a, w) in enumerate(zip(meta["steps"], acts, attn)):
            f = dict(zip(_STEP_FIELDS, row))
            steps.append(
                TrajectoryStep(
                    a.copy(),
                    w.copy(),
                    f["reward"],
                    f["action"],
                    f["latency_us"],
                    arrays.get(f"{prefix}.topk_ids.{i}"),
                    arrays.get(f"{prefix}.topk_logprobs.{i}"),
                    f["timestamp"],
                )
            )
    out, k = [], 0
    for m, qe in zip(tmeta, q):
        n = m["n_steps"]
        out.append(
            Trajectory(
                id=m["id"],
                query_embedding=qe.copy(),
                steps=steps[k : k + n],
                final_quality=m["final_quality"],
                latency_us=m["latency_us"],
                route=m["route"],
                context_ids=list(m["context_ids"]),
                created_at=m["created_at"],
                steps_dropped=m["steps_dropped"],
            )
        )
        k += n
    return out
