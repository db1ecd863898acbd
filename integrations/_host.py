"""What every host integration (transformers pipeline, vLLM) shares around its model.

A host has a front-end :class:`SonaEngine` (config, ReasoningBank), a durable feedback
store, an :class:`AdapterRegistry` and a tokenizer; it implements ``adapter_version``,
``_serve(version)`` (serve a published BaseLoRA version) and ``sample_answers``. This
base makes it a :class:`sona_plugin.learner.Host` and adds loop B/C on top (``learn``,
``deep_cycle``, the background thread, through the one :class:`~sona_plugin.learner.Learner`),
adapter listing and rollback, the embedder, and the feedback rules.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from sona_plugin.errors import InvalidValue, SonaError
from sona_plugin.faults import failpoint

logger = logging.getLogger(__name__)

# On an LM's final hidden state (measured on SmolLM2, docs/benchmarks.md): a zero-A
# MicroLoRA moves every position alike and collapsed the model within 50 feedbacks at
# cap 0.3; zero-B (DESIGN.md's setting) stays fluent, but at cap 0.15 200 instant-only
# feedbacks still drove the held-out liked-rate to 0 %. The instant loop's job here is
# the same-answer effect; cap 0.05 keeps it from pulling held-out answers around.
LM_DEFAULTS = {"micro_lora_init": "zero_b", "micro_lora_norm_cap": 0.05}


def load_engine(path: Path, config: Any) -> Any:
    """The engine saved at ``path`` run with the launch ``config`` (differences logged;
    the launch config wins), or a fresh engine when nothing was saved or the saved state
    does not fit that config (logged)."""
    from sona_plugin.engine import SonaEngine

    if (path / "state.json").exists() or (
        path.with_name(f".{path.name}.old") / "state.json"
    ).exists():
        try:
            return SonaEngine.load(path, config=config)
        except SonaError as e:
            logger.warning("ignoring saved engine state in %s: %s", path, e)
    return SonaEngine(config)


def _replica_log(store: Any) -> Any:
    """The instant log on ``store``'s database when replicas share it (a PostgresStore),
    else None."""
    try:
        from sona_plugin.store.replication import replica_log_for
    except ImportError as e:  # without psycopg the store cannot be a PostgresStore
        if e.name not in ("psycopg", "psycopg_pool"):
            raise
        return None
    return replica_log_for(store)


def _trainer_lease(store: Any, name: str) -> Any:
    """The trainer lease ``name`` on ``store``'s database when replicas share it (a
    PostgresStore), else None."""
    try:
        from sona_plugin.store.leader import lease_for
    except ImportError as e:  # without psycopg the store cannot be a PostgresStore
        if e.name not in ("psycopg", "psycopg_pool"):
            raise
        return None
    return lease_for(store, name)


class FeedbackResult(TypedDict):
    """What ``feedback()`` answers, from every host (and ``POST /v1/feedback``)."""

    id: str  # the response id the feedback named
    index: int  # the choice (n > 1); 0 otherwise
    stored_id: int  # the record's row in the store: durable
    reward: float  # in [-1, 1] (liked: +1, disliked: -1)
    adapter_version: int | None  # the BaseLoRA version that answered (None: the base model)
    instant: dict | None  # the MicroLoRA's instant update (None: nothing to learn from)


def parse_reward(reward: Any = None, liked: Any = None) -> float:
    """``reward`` in [-1, 1], or ``liked`` True/False (+1/-1); exactly one of them."""
    if (reward is None) == (liked is None):
        raise InvalidValue("give exactly one of reward (in [-1, 1]) or liked (True/False)")
    if liked is not None:
        if not isinstance(liked, bool):
            raise InvalidValue(f"liked must be True or False, got {liked!r}")
        return 1.0 if liked else -1.0
    if isinstance(reward, bool):
        raise InvalidValue(f"reward must be a number in [-1, 1], got {reward!r}")
    try:
        r = float(reward)
    except (TypeError, ValueError):
        raise InvalidValue(f"reward must be a number in [-1, 1], got {reward!r}") from None
    if not (math.isfinite(r) and -1.0 <= r <= 1.0):
        raise InvalidValue(f"reward must be a finite number in [-1, 1], got {reward!r}")
    return r


class Turns:
    """One training cycle at a time among the tenants of one server, granted in the order
    they asked: when every tenant has work, they train round-robin."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()

    @contextmanager
    def turn(self) -> Iterator[None]:
        me = object()
        with self._cond:
            self._queue.append(me)
            while self._queue[0] is not me:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._queue.popleft()
                self._cond.notify_all()


class LearningHost:
    """Loop B/C, adapters and the embedder for a host (see the module docstring).

    A subclass sets ``engine``, ``store``, ``state_dir``, ``registry``, ``tokenizer``,
    ``model_source`` and ``lora_targets``, implements ``adapter_version``,
    ``_serve(version)`` and ``sample_answers``, serves the registry's current version,
    and then calls :meth:`_start_learner` (the learner restores its saved state).
    """

    engine: Any
    store: Any
    state_dir: Any
    registry: Any
    tokenizer: Any
    model_source: Any = None
    lora_targets: Any = None
    learner: Any = None
    ranker: Any = None  # the best-of-k reward model (rerank.candidates > 1; sona_plugin.rerank)
    _embedder: Any = None
    _coordinator: Any = None
    _trainer_lease: Any = None  # replicas on one PostgreSQL store: only its holder trains
    _replica: Any = None  # replicas on one PostgreSQL store: one instant log (_replica.py)
    lease_name: str = "sona-trainer"  # one trainer per lease name (per tenant)
    training_turns: Any = None  # a Turns shared by one server's tenants (None: one tenant)
    save_every: int = 25
    save_interval_s: float = 60.0
    keep_versions: int = 20
    retain_days: float = 90.0
    last_swap: dict | None = None
    _unsaved_feedback: int = 0
    _save_timer: Any = None

    @property
    def _save_lock(self) -> threading.Lock:
        """This host's lock of a feedback's periodic save against a cycle's save (one per
        instance: two hosts in one process never wait on each other)."""
        return self.__dict__.setdefault("_save_lock_instance", threading.Lock())

    # -- to implement ---------------------------------------------------------------------
    @property
    def adapter_version(self) -> int | None:
        raise NotImplementedError

    def _serve(self, version: int) -> None:
        """Make published ``version`` what requests get (atomically for requests)."""
        raise NotImplementedError

    def _shrink_micro(self, factor: float) -> None:
        self.engine.micro_lora.shrink(factor)

    def sample_answers(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Sampled answers (token ids, stop token included) from the served model."""
        raise NotImplementedError

    def _has_recording(self, response_id: str, index: int) -> bool:
        """Whether this host generated the response (and can take its feedback)."""
        raise NotImplementedError

    # -- replicas (integrations/_replica.py) ------------------------------------------------
    def _micro_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the served MicroLoRA's A and B."""
        m = self.engine.micro_lora
        return m.A.copy(), m.B.copy()

    def _set_micro_arrays(self, A: np.ndarray, B: np.ndarray) -> None:
        """Serve exactly these MicroLoRA weights."""
        m = self.engine.micro_lora
        m.A[...] = A
        m.B[...] = B

    def _take_forward(self, f: Any) -> dict:
        """Take feedback another replica forwarded for a response generated here."""
        return dict(self.feedback(f.response_id, f.reward))

    def _start_replica(self) -> None:
        """On a PostgreSQL store, join the deployment's replicas: the MicroLoRA comes from
        the instant log (snapshot + tail) and follows it from then on."""
        log = _replica_log(self.store)
        if log is not None:
            from ._replica import ReplicaSync

            self._replica = ReplicaSync(self, log)
            self._replica.start()

    def _stop_replica(self) -> None:
        if self._replica is not None:
            self._replica.stop()

    def _instant(self, response_id: str, update: Any) -> Any:
        """Run the instant update ``update()``: through the instant log when replicated."""
        if self._replica is None:
            return update()
        return self._replica.instant(response_id, update)

    # -- the Host protocol of sona_plugin.learner ------------------------------------------
    def serve_version(self, version: int, micro_decay: float = 1.0) -> None:
        """Serve ``version``: the engine loads it and its canary is checked first
        (``SwapRefused`` otherwise, and the previous version keeps serving); only then does
        the registry's CURRENT name it. ``micro_decay`` < 1 shrinks the MicroLoRA (a newly
        trained version carries what the instant loop had learned). Restoring at start-up
        and rolling back pass 1: the MicroLoRA comes back exactly as saved."""
        from sona_plugin import metrics

        t0 = time.perf_counter()
        try:
            err = self._serve(version)
        except Exception as e:
            metrics.swap(time.perf_counter() - t0, False, version)
            self.last_swap = {"version": version, "ok": False, "error": str(e), "at": time.time()}
            logger.error("adapter version %s not served: %s", version, e)
            raise
        if self.registry.current_version() != version:
            failpoint("swap.loaded")
            self.registry.set_current(version)
            if self._replica is not None:
                self._replica.log.notify_published(version)
        dt = time.perf_counter() - t0
        metrics.swap(dt, True, version)
        self.last_swap = {
            "version": version,
            "ok": True,
            "canary_error": err,
            "seconds": dt,
            "at": time.time(),
        }
        if micro_decay != 1.0:
            self.shrink_micro(micro_decay)

    def set_micro_norm_cap(self, cap: float, as_of: int = 0) -> None:
        """Bound the served MicroLoRA's ``||s·B·A||_F`` from its next update on: on every
        replica when replicated, unless the deployment's bound is newer than ``as_of``."""
        if self._replica is not None:
            self._replica.set_norm_cap(cap, as_of)
        else:
            self._apply_norm_cap(cap)

    def _apply_norm_cap(self, cap: float) -> None:
        """Bound this host's MicroLoRA updates by ``cap``."""
        self.engine.micro_lora.norm_cap = float(cap)

    def shrink_micro(self, factor: float) -> None:
        """Scale the served MicroLoRA's delta by ``factor`` (every replica alike, in the
        instant log's order, when replicated)."""
        if self._replica is not None:
            self._replica.scale(factor)
        else:
            self._shrink_micro(factor)

    def _serve_at_start(self) -> None:
        """Serve the registry's version at start-up: CURRENT's, or the newest complete one
        when CURRENT's weights are missing (logged); a version that fails its canary is
        skipped for the next older one (the base model when none is left)."""
        from sona_plugin.errors import SwapRefused

        v = self.registry.servable()
        if v is None:
            return
        older = [x for x in reversed(self.registry.versions()) if x.version < v.version]
        for cand in [v, *older]:
            try:
                self.serve_version(cand.version)
                return
            except SwapRefused as e:
                logger.error("not serving version %s at start-up: %s", cand.version, e)
        logger.error("no adapter version passed its canary: serving the base model")

    def follow_registry(self, blocking: bool = True) -> int | None:
        """Serve the registry's CURRENT when another process moved it: replicas that share
        a store and a registry directory learn as one, the trainer publishes and every
        replica follows (checked by the version's canary, like any swap), taking the
        learner state saved with the version. Returns the version now served when it
        changed, else None. A version that fails its canary here is logged and retried at
        the next poll; this replica keeps serving what it served. With ``blocking`` False
        it returns None at once while this host's learner is busy (a cycle runs).

        The MicroLoRA's decay that goes with a new version is the trainer's to log (every
        replica applies it from the instant log); without a log it is halved here."""
        from sona_plugin.errors import SwapRefused

        current = self.registry.current_version()
        if current is None or current == self.adapter_version:
            return None
        if not self.learner.lock.acquire(blocking=blocking):
            return None
        try:
            if self.registry.current_version() != current:
                return None  # moved again meanwhile: the next poll follows
            try:
                self.serve_version(current, micro_decay=1.0 if self._replica else 0.5)
            except SwapRefused as e:
                logger.error("not following adapter version %s: %s", current, e)
                return None
            self.learner.follow(current)
        finally:
            self.learner.lock.release()
        logger.info("following adapter version %s published by the trainer", current)
        return current

    def _start_ranker(self, hidden_of: Any) -> None:
        """Best-of-k (``rerank.candidates`` > 1): its reward model, as saved, plus what the
        store took after the save (``AnswerRanker.catch_up`` with ``hidden_of``)."""
        from sona_plugin.rerank import AnswerRanker

        rc = self.engine.config.rerank
        if rc.candidates > 1:
            self.ranker = AnswerRanker(rc.window, rc.refit_every, background=True)
            self.ranker.load(self.state_dir)
            self.ranker.catch_up(self.store, hidden_of)

    def _start_learner(self) -> None:
        from sona_plugin.learner import Learner

        self.learner = Learner(self)

    def save_state(self) -> None:
        """Persist the engine (MicroLoRA, patterns, counters) and the learner next to the
        store and adapters, so ``sona export`` and a restarted host find them. Runs after
        every ``learn()`` and on ``close()``; feedback itself is durable in the store as it
        arrives."""
        self.save_engine()
        if self.learner is not None:
            with self.learner.lock:
                self.learner.save()
        info = {
            "model_source": str(self.model_source) if self.model_source else None,
            "adapter_version": self.adapter_version,
        }
        tmp = self.state_dir / "pipeline.json.tmp"
        tmp.write_text(json.dumps(info))
        tmp.replace(self.state_dir / "pipeline.json")

    def save_engine(self) -> None:
        """Save the engine (the MicroLoRA's instant lessons, patterns) atomically."""
        with self._save_lock:
            self.engine.save(self.state_dir / "engine")
            if self.ranker is not None:
                self.ranker.save(self.state_dir)

    def _saved_after_feedback(self) -> None:
        """Every ``save_every`` feedbacks, and ``save_interval_s`` after an unsaved one,
        save the engine: a crash then loses at most that many (that long) instant updates;
        SIGTERM loses none (``close()``). The feedback records are durable at once."""
        self._unsaved_feedback += 1
        if self.save_every and self._unsaved_feedback >= self.save_every:
            self._save_now()
        elif self.save_interval_s > 0 and self._save_timer is None:
            t = threading.Timer(self.save_interval_s, self._save_now)
            t.daemon = True
            self._save_timer = t
            t.start()

    def _save_now(self) -> None:
        timer, self._save_timer = self._save_timer, None
        if timer is not None:
            timer.cancel()
        if self._unsaved_feedback:
            self._unsaved_feedback = 0
            try:
                self.save_engine()
            except Exception:  # noqa: BLE001 - a timer thread: log, the next save retries
                logger.exception("saving the engine failed")

    # -- shared ---------------------------------------------------------------------------
    def embed(self, texts: list[str]) -> np.ndarray:
        if self._embedder is None:
            from sona_plugin.models import default_embedder

            self._embedder = default_embedder()
        return np.asarray(
            self._embedder.encode(list(texts), normalize_embeddings=True, show_progress_bar=False),
            np.float32,
        )

    def learn(self, **kwargs) -> dict:
        """Run loop B now: train, gate, publish, hot-swap; then retention. Returns the
        report.

        On a PostgreSQL store shared by replicas only the holder of the trainer lease
        trains: on another replica this returns ``{"skipped": "not the trainer"}`` and
        changes nothing. A call that had to take the lease gives it back when it ends,
        unless this host's background thread is running (then it keeps training)."""
        if self._trainer_lease is None:
            self._trainer_lease = _trainer_lease(self.store, self.lease_name)
        lease = self._trainer_lease
        if lease is None:
            return self._learn_now(**kwargs)
        from sona_plugin.store.leader import NOT_TRAINER

        had = lease.stats()["holder"]
        if not lease.try_acquire():
            return {"skipped": NOT_TRAINER}
        try:
            return self._learn_now(**kwargs)
        finally:
            if not had and not (self._coordinator is not None and self._coordinator.running):
                lease.release()

    def _learn_now(self, **kwargs) -> dict:
        turns = self.training_turns
        if turns is None:
            return self._learn_in_turn(**kwargs)
        with turns.turn():
            return self._learn_in_turn(**kwargs)

    def _learn_in_turn(self, **kwargs) -> dict:
        from sona_plugin import metrics

        try:
            report = self.learner.run(**kwargs)
        except Exception:
            metrics.cycle(None, failed=True)
            raise
        metrics.cycle(report)
        self.save_state()
        report["retention"] = self.prune()
        return report

    def deep_cycle(self, dreams: int | None = None) -> dict:
        """Loop C: merge/decay/prune patterns, consolidate EWC++ tasks, and dream (see
        ``sona_plugin/learner/dreams.py``); kept dreams are rehearsed by later cycles."""
        from sona_plugin.learner.dreams import dream

        learner = self.learner
        with learner.lock:
            deep = self.engine.run_deep_cycle().to_dict()
            if learner.ewc.task_count > 1:
                learner.ewc.consolidate_all_tasks()
                deep["lora_tasks_consolidated"] = True
            n = self.engine.config.dreams_per_cycle if dreams is None else dreams
            deep.update(dream(learner, min(n, 16)) if n > 0 else {"dreams_generated": 0})
        self.save_state()
        return deep

    def start_background(self, poll_s: float = 1.0) -> None:
        """Run loop B (and C) in a background thread on the config's schedule: a cycle when
        ``background_trigger_count`` new feedback records are stored, or when
        ``background_interval_ms`` has passed with any new feedback; a deep cycle every
        ``consolidation_interval`` records. Generation is never blocked by training (it
        waits only for the adapter swap itself).

        On a PostgreSQL store shared by replicas, only the holder of the trainer lease
        (``sona_plugin/store/leader.py``) runs loops B and C: another replica's coordinator
        sees nothing pending, and its forced cycle reports ``{"skipped": "not the trainer"}``;
        it takes over when the holder goes away. Every replica follows the registry
        (:meth:`follow_registry`) from its replica thread (``integrations/_replica.py``),
        woken by the trainer's ``NOTIFY`` or every 0.5 s: with the registry directory
        shared, a version the trainer publishes serves everywhere within one notification
        (or poll) plus one swap."""
        from sona_plugin.loops.coordinator import LoopCoordinator

        if self._coordinator is None:
            c = self.engine.config
            pending, run_background, run_deep = self.learner.pending, self.learn, self.deep_cycle
            every = c.gate_micro_check_every
            check_due, run_check = (lambda: self.learner.micro_check_due(every)), self._check_micro
            if self._trainer_lease is None:
                self._trainer_lease = _trainer_lease(self.store, self.lease_name)
            if self._trainer_lease is not None:
                from sona_plugin.store.leader import only_while_leading

                lease = self._trainer_lease
                # pending 0 off the lease: a follower's poll neither runs nor logs a cycle
                pending = only_while_leading(lease, pending, otherwise=0)
                run_background = only_while_leading(lease, run_background)
                run_deep = only_while_leading(lease, run_deep)
                run_check = only_while_leading(lease, run_check)
            self._coordinator = LoopCoordinator(
                pending=pending,
                run_background=run_background,
                run_deep=run_deep,
                trigger_count=c.background_trigger_count,
                interval_s=c.background_interval_ms / 1000.0,
                deep_every=c.consolidation_interval,
                poll_s=poll_s,
                check_due=check_due,
                run_check=run_check,
            )
        self._coordinator.poll_s = poll_s
        self._coordinator.start()

    def _check_micro(self) -> dict:
        """The MicroLoRA's drift check between cycles (``Learner.check_micro``), saved."""
        report = self.learner.check_micro()
        if report.get("scale", 1.0) != 1.0:
            self.save_state()
        return report

    def stop_background(self) -> None:
        """Stop the background thread and give the trainer lease up (hosts' ``close()``
        calls this; ``start_background`` takes the lease again when it is free)."""
        ended = self._coordinator.stop() if self._coordinator is not None else True
        if self._trainer_lease is not None:
            if ended:
                self._trainer_lease.close()
            else:  # a replica taking over now would train alongside the cycle still running
                logger.warning("a cycle is still running: keeping the trainer lease until it ends")

    @property
    def coordinator(self):
        return self._coordinator

    def mark_task_boundary(self) -> None:
        """Tell EWC++ that the feedback's task has changed: the served BaseLoRA and its
        Fisher are remembered, and later training is pulled back toward them. Shifts are
        also detected from the feedback stream on their own (``learner_stats()``)."""
        self.learner.mark_task_boundary()

    def learner_stats(self) -> dict:
        """Loop B's progress: records used, cycles, EWC++ tasks and detected boundaries."""
        lr = self.learner
        return {
            "records_used": lr.last_id,
            "cycles": lr.cycles,
            "pending": lr.pending(),
            "ewc": lr.ewc.stats(),
            "boundaries": list(lr.boundaries),
            "shift_detector": lr.detector.state_dict(),
            "leaning_shift_detector": lr.leaning_detector.state_dict(),
            "dreams": len(lr.dreams),
            "heldout_prompt_groups": lr.split.groups,
            "micro_checks": lr.micro_checks,
            "micro_last_check": {
                k: v for k, v in (lr.last_micro or {}).items() if k in ("scale", "delta_norm")
            },
        }

    def _with_learner(self, s: dict) -> dict:
        """Engine stats with loop B's: the EWC++ that trains the BaseLoRA is the learner's
        (the engine's own serves the engine-only router mode)."""
        from ._replica import micro_digest

        s["learner"] = self.learner_stats()
        s["micro_lora_sha256"] = micro_digest(*self._micro_arrays())
        s["ewc_tasks"] = self.learner.ewc.task_count
        s["ewc_lambda"] = float(self.learner.ewc.lambda_)
        s["task_boundaries"] = len(self.learner.boundaries)
        from sona_plugin import metrics

        s["adapter_versions"] = len(self.registry.versions())  # cached per directory
        s["last_swap"] = self.last_swap
        s["background"] = (
            self._coordinator.stats() if self._coordinator is not None else {"running": False}
        )
        if self._trainer_lease is not None:
            s["trainer_lease"] = self._trainer_lease.stats()
        if self._replica is not None:
            s["replica"] = self._replica.stats()
        if self.ranker is not None:
            s["rerank"] = {"candidates": self.engine.config.rerank.candidates}
            s["rerank"].update(self.ranker.stats())
        s["counters"] = metrics.snapshot()
        return s

    def adapters(self) -> list[dict]:
        """Published BaseLoRA versions, oldest first, with which one is served."""
        cur = self.adapter_version
        return [
            {
                "version": v.version,
                "path": str(v.path),
                "metadata": v.metadata,
                "created_at": v.created_at,
                "served": v.version == cur,
            }
            for v in self.registry.versions()
        ]

    def rollback(self, version: int) -> None:
        """Serve an earlier (or later) published version (checked by its canary; CURRENT
        follows once it serves), and the next cycle trains from that version with its
        EWC++ memory (it stays served until new feedback arrives)."""
        self.registry.get(version)  # UnknownAdapterVersion before anything changes
        with self.learner.lock:
            self.serve_version(version)
            failpoint("rollback.served")
            self.learner.on_rollback(version)

    # -- feedback records (admin) ---------------------------------------------------------
    def quarantine(self, response_id: str, reason: str = "") -> None:
        """Never train on this record again (it stays stored, and a second feedback for
        the response stays refused). Its instant update is not undone."""
        rec = self.store.quarantine(response_id, reason)
        if self.ranker is not None and rec.id is not None:
            self.ranker.forget(rec.id)

    def delete_record(self, response_id: str) -> None:
        """Delete a stored feedback record for good (its instant update is not undone)."""
        rec = self.store.get(response_id) if self.ranker is not None else None
        self.store.delete(response_id)
        if rec is not None and rec.id is not None:
            self.ranker.forget(rec.id)

    def prune(self) -> dict:
        """Retention: keep the newest ``keep_versions`` adapter versions (and the served
        one) and delete records older than ``retain_days``. Runs after every cycle."""
        out = {"versions_removed": [], "records_removed": 0}
        with self.learner.lock:
            served = self.adapter_version
            out["versions_removed"] = self.registry.prune(
                self.keep_versions, protect=[served] if served else []
            )
            if self.retain_days > 0:
                out["records_removed"] = self.store.prune(time.time() - self.retain_days * 86400)
        if out["versions_removed"] or out["records_removed"]:
            logger.info("retention: %s", out)
        return out
