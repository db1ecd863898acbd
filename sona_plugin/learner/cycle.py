"""Loop B for a host model: train the PEFT BaseLoRA on stored feedback, gate, publish, swap.

One :meth:`Learner.run` (a *cycle*), under the learner's lock (one owner of training:
cycles, deep cycles, rollbacks and boundaries never overlap):

1. **new feedback** = store records after the last one used (``last_id``, saved: a
   restart with no new feedback trains nothing). Each goes to the held-out or the
   training side with its prompt group (:class:`~.heldout.PromptSplit`).
2. **shift detection**: every new reward goes through a two-sided CUSUM on the liked-rate
   (:class:`~.shift.ShiftDetector`), and, once a version serves, a test of whether liked
   answers still lean toward what it learned (``log π_served − log π_base``,
   :class:`~.shift.LeaningShiftDetector`); at an alarm of either a new EWC++ task starts
   from the **served** weights (their Fisher, their θ*), and the boundary is reported in
   stats. A *rise* of the liked-rate is not a boundary by itself: learning raises the
   liked-rate (measured: 32 % → 90 % over 200 feedbacks with best of 8), and the leaning
   test on the same cycle is confounded by it (at record 134 of the 1,000-event run, a
   rise learning explained met a leaning z of 2.26). It is reported as
   ``liked_rate_rises`` (with that cycle's leaning z); a new taste that raises the
   liked-rate is the leaning test's own alarm to find.
3. the new training-side records go into the ReasoningBank (plain mean quality per
   pattern, ``k ≈ √(n/2)`` clusters per cycle); the training set is those records plus
   replay of older training-side records (and kept dreams), drawn balanced across
   patterns (``select_training_set``). A cycle reads only the records it uses: the new
   ones, the newest held-out ones, and the training side up to ``REPLAY_POOL_MAX`` (a
   uniform draw past that), so its cost does not grow with weeks of stored feedback.
4. the trainer (a private copy of the base model with a PEFT LoRA, continuing from the
   served version) takes REINFORCE + KL-to-base + EWC++ steps.
5. the gate (``PromotionGate``) compares the candidate with the served adapter on
   held-out feedback (reward-centred) and with the *base model* on anchor NLL and
   on-topic answers (a fixed drift budget). Refused, the candidate is *projected back*
   toward the served weights (½, ¼ of its step); still refused, the ¼ step is shrunk
   toward the base model (every ``ΔW = B·A`` times ¾, or, when the KL budget refused it,
   times the factor fitted to the KL it measured: ``shrink_to_budget``). That point is the
   trade: it gives up a share of everything served, older tastes included, to make room
   for a step of the newer one inside the budget; the EWC++ penalty has already weighed
   what the older one is worth. The steps may score up to ``gate_heldout_margin_se``
   paired standard errors below the served version on held-out feedback; a shrunk point
   may not score below it at all (it retreats from what serves). The first passing point
   is published; if none passes, the trainer returns to the served weights.
6. the MicroLoRA is measured on top of the weights that now serve, against the same
   drift budget, and scaled back (½, ¼, zero) until it fits (``micro_bound``): the budget
   holds for what users get, not for the BaseLoRA alone.
7. EWC++'s Fisher is folded in at the weights that now serve, never at a refused
   candidate. A published version carries the learner's whole state in its directory
   (``learner.safetensors``), and its per-answer KL to the base model (Monte Carlo on
   held-out prompts) is in its metadata; the state is also saved after every cycle.

A rollback rebuilds the trainer from the rolled-to version and restores that version's
EWC++ memory, reward baseline and dreams; records already used stay used, so the
rolled-to version keeps serving until new feedback arrives (it is pinned until then).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..training import BaseLoRATrainer

from ..errors import InvalidValue, StateError
from ..ewc import EwcPlusPlus
from ..faults import failpoint
from ..store.base import FeedbackRecord
from . import canary
from .heldout import PromptSplit
from .host import Host
from .shift import LeaningShiftDetector, ShiftDetector
from .state import STATE_FILE, load_state, remove_stale_temps, save_state

logger = logging.getLogger(__name__)

PROBE_PROMPTS = [
    "What is the capital of Italy?",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "Give me a tip for learning a new language.",
    "What does a CPU do?",
    "How many legs does a spider have?",
    "What causes rain?",
    "How should I store fresh bread?",
    "What is a prime number?",
    "What is the job of a referee?",
    "How do I write a good email subject line?",
    "What does a thermometer measure?",
    "What is a lighthouse for?",
    "How do I fold a fitted sheet?",
    "Why do onions make us cry?",
    "What is a lagoon?",
    "How do I sharpen a pencil?",
    "Why do birds sing in the morning?",
    "What is a good houseplant for a dark room?",
    "How do I remove a coffee stain?",
    "What is a peninsula?",
    "How do frogs catch flies?",
    "Why does ice float?",
    "What is a good gift for a teacher?",
    "How do I plant a tree?",
    "What is a library card for?",
    "Why do our fingers wrinkle in water?",
    "How do I tie my shoelaces tighter?",
    "What is a bridge made of?",
    "How does a compass work?",
    "Why does the moon change shape?",
    "What is a good breakfast for kids?",
    "How do I keep milk fresh?",
    "What is a harbor?",
    "How do I clean my keyboard?",
    "Why do apples turn brown?",
    "What is a good song to sing at a party?",
    "How do I pack a suitcase?",
    "What is a swamp?",
    "How do plants drink water?",
    "Why do we get goosebumps?",
    "What is a good way to relax after work?",
    "How do I change a light bulb?",
    "What is a post office for?",
    "How do I make a paper airplane?",
    "Why do cats sleep so much?",
    "What is a good first instrument to learn?",
    "How do I keep a room cool in summer?",
]
"""The on-topic check's fixed questions; it answers the first ``gate_on_topic_probes``."""
# training-side records a cycle reads for replay and dreams: all of them up to this many,
# past it a uniform draw (a cycle's reads do not grow with the store)
REPLAY_POOL_MAX = 4096
KL_PROMPTS = 16
_SERVED = "served"
# points the gate tries: steps from the served weights, then the smallest step shrunk
# toward the base model (every ΔW times ``SHRINK``; with a KL budget, the factor that
# ``shrink_to_budget`` fits, at most ``SHRINK_TRIES`` times)
STEP_SCALES = (1.0, 0.5, 0.25)
SHRINK = 0.75
SHRINK_TRIES = 2
# KL to the base model against the shrink factor c, fitted as KL ∝ c^1.5 (measured on
# SmolLM2 in phase B of the shift run: the full candidate at 9.88 nats per answer, ¾ of
# it at 6.31; c² would predict 5.56), aimed at this share of the budget
KL_SHRINK_EXPONENT = 1.5
BUDGET_AIM = 0.9


def clusters_for(n: int, cap: int) -> int:
    """``k ≈ √(n/2)`` clusters for ``n`` prompts, at least 1, at most ``cap``."""
    return max(1, min(cap, int(round(math.sqrt(max(n, 1) / 2.0)))))


class Learner:
    """Loop B for one :class:`~.host.Host` (see the module docstring).

    Args:
        host: the serving side.
        epochs: passes over each cycle's training set.
        seed: seeds the trainer's LoRA initialisation, batch order and selection.
        measure_kl: measure each promoted version's per-answer KL to the base model.
        replay: ``"balanced"`` draws replay round-robin across ReasoningBank patterns,
            ``"uniform"`` at random (the ablation in ``benchmarks/learning.py``).
    """

    def __init__(
        self,
        host: Host,
        *,
        epochs: int = 2,
        seed: int = 0,
        measure_kl: bool = True,
        replay: str = "balanced",
    ):
        if replay not in ("balanced", "uniform"):
            raise InvalidValue(f"replay must be 'balanced' or 'uniform', got {replay!r}")
        self.host = host
        self.epochs = epochs
        self.seed = seed
        self.measure_kl = measure_kl
        self.replay = replay
        self.lock = threading.RLock()
        self.last_id = 0
        self.cycles = 0
        self.trainer: Any = None
        self.ewc = EwcPlusPlus(host.engine.config)
        self.dreams: list[FeedbackRecord] = []
        self.split = PromptSplit()
        self.detector = ShiftDetector()
        self.leaning_detector = LeaningShiftDetector()
        self.boundaries: list[dict] = []
        self._trainer_state: dict | None = None  # applied when the trainer is built
        self._base_answers: dict = {}  # the gate's cache of the base model
        self.micro_checked_id = 0  # the newest record when the MicroLoRA was last checked
        self.micro_checks = 0
        self.last_micro: dict | None = None
        self.micro_cap: float | None = None  # the MicroLoRA's norm bound (None: the config's)
        remove_stale_temps(host.state_dir)
        self._restore()

    # -- state ----------------------------------------------------------------------------
    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays: dict[str, np.ndarray] = {}
        ewc_arrays, ewc_meta = self.ewc.state_dict()
        arrays.update({f"ewc.{k}": v for k, v in ewc_arrays.items()})
        bank_arrays, bank_meta = self.host.engine.reasoning_bank.state_dict()
        arrays.update({f"bank.{k}": v for k, v in bank_arrays.items()})
        split_arrays, split_meta = self.split.state()
        arrays.update(split_arrays)
        if self.dreams:
            arrays["dreams.embedding"] = np.stack(
                [np.asarray(d.embedding, np.float32) for d in self.dreams]
            )
        meta = {
            "served_version": self.host.adapter_version,
            "last_id": self.last_id,
            "cycles": self.cycles,
            "ewc": ewc_meta,
            "bank": bank_meta,
            "split": split_meta,
            "detector": self.detector.state_dict(),
            "leaning_detector": self.leaning_detector.state_dict(),
            "boundaries": self.boundaries,
            "micro_cap": self.micro_cap,
            "micro_checked_id": self.micro_checked_id,
            "trainer": self.trainer.state_dict()
            if self.trainer is not None
            else self._trainer_state,
            "dreams": [
                {
                    "response_id": d.response_id,
                    "prompt": d.prompt,
                    "prompt_ids": list(d.prompt_ids),
                    "response_ids": list(d.response_ids),
                    "response_text": d.response_text,
                    "reward": float(d.reward),
                }
                for d in self.dreams
            ],
        }
        return arrays, meta

    def save(self, path: Path | None = None) -> None:
        """Write the whole state atomically (default ``state_dir/learner.safetensors``)."""
        arrays, meta = self._state()
        save_state(path or self.host.state_dir / STATE_FILE, arrays, meta)

    def _restore(self) -> None:
        """Stream-level state (records used, split, detector, bank) from the newest save;
        per-version state (EWC++, reward baseline, dreams) from the served version's."""
        host = self.host
        try:
            saved = load_state(host.state_dir / STATE_FILE)
        except StateError as e:
            logger.warning("%s; falling back to the served version's copy", e)
            saved = None
        served = host.adapter_version
        version_state = None
        if served is not None:
            try:
                version_state = load_state(host.registry.get(served).path / STATE_FILE)
            except StateError as e:
                logger.warning("served version %s has no usable learner state: %s", served, e)
        newest = max(
            (s for s in (saved, version_state) if s is not None),
            key=lambda s: s[1]["last_id"],
            default=None,
        )
        if newest is None:
            if served is not None:  # versions published before the learner saved its state
                self.last_id = int(host.registry.get(served).metadata.get("last_record_id", 0))
            return
        arrays, meta = newest
        self._load_stream_state(arrays, meta)
        per_version = newest
        if saved is not None and saved[1].get("served_version") != served:
            per_version = version_state  # a rollback or a crash between publish and save
        if per_version is not None:
            self._load_version_state(*per_version)
        logger.info(
            "learner restored: %d records used, %d cycles, %d boundaries",
            self.last_id,
            self.cycles,
            len(self.boundaries),
        )

    def _load_stream_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.last_id = int(meta["last_id"])
        self.cycles = int(meta["cycles"])
        self.detector = ShiftDetector.from_state(meta["detector"])
        self.leaning_detector = LeaningShiftDetector.from_state(meta.get("leaning_detector", {}))
        self.boundaries = list(meta["boundaries"])
        self.micro_cap = meta.get("micro_cap")
        self.micro_checked_id = int(meta.get("micro_checked_id", self.last_id))
        if self.micro_cap is not None:
            self.host.set_micro_norm_cap(self.micro_cap, as_of=self.micro_checked_id)
        self.split = PromptSplit.from_state(arrays, meta["split"])
        self.host.engine.reasoning_bank.load_state_dict(
            {k[5:]: v for k, v in arrays.items() if k.startswith("bank.")}, meta["bank"]
        )

    def _load_version_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        ewc = EwcPlusPlus(self.host.engine.config)
        ewc.load_state_dict(
            {k[4:]: v for k, v in arrays.items() if k.startswith("ewc.")}, meta["ewc"]
        )
        self.ewc = ewc
        self._trainer_state = meta.get("trainer")
        emb = arrays.get("dreams.embedding")
        self.dreams = [
            FeedbackRecord(embedding=emb[i], task="dream", **d)
            for i, d in enumerate(meta.get("dreams") or [])
        ]
        self.trainer = None  # rebuilt from the served version, with this EWC++

    # -- the trainer ----------------------------------------------------------------------
    def ensure_trainer(self) -> BaseLoRATrainer:
        """The trainer, built on first use from the served version's weights."""
        from ..training import BaseLoRATrainer

        if self.trainer is None:
            host = self.host
            cfg = host.engine.config
            extra = {"target_modules": host.lora_targets} if host.lora_targets else {}
            trainer = BaseLoRATrainer(
                _fresh_base(host),
                cfg,
                ewc=self.ewc,
                seed=self.seed,
                beta=cfg.base_lora_kl_beta,
                **extra,
            )
            v = host.adapter_version
            if v is not None:
                trainer.load_adapter_weights(host.registry.get(v).path)
            if self._trainer_state is not None:
                trainer.load_state_dict(self._trainer_state)
            self.trainer = trainer
        return self.trainer

    def _lora(self) -> dict:
        return {n: p.detach().clone() for n, p in self.trainer.named_lora_params().items()}

    # -- feedback sides ---------------------------------------------------------------------
    def pending(self) -> int:
        """Stored records not used by any cycle yet."""
        return self.host.store.count(since_id=self.last_id)

    def micro_check_due(self, every: int) -> bool:
        """Whether ``every`` (> 0) records came in since the MicroLoRA was last checked
        (by a cycle or by :meth:`check_micro`)."""
        return (
            every > 0
            and self.host.store.count(since_id=max(self.micro_checked_id, self.last_id)) >= every
        )

    def check_micro(self, probe: bool = True) -> dict:
        """Between cycles: the drift checks on the served version with the MicroLoRA as it
        serves now, scaling it back and lowering its norm bound when they fail
        (``micro_bound``). Returns the report: ``scale`` kept, ``delta_norm`` measured,
        ``norm_cap`` and what was ``tried`` (neither of the last two for a zero
        MicroLoRA, which is not checked)."""
        with self.lock:
            newest = self.host.store.records(since_id=max(self.micro_checked_id, self.last_id))
            if newest:
                self.micro_checked_id = max(r.id for r in newest)
                self.split.assign(newest)
            heldout = self._heldout()
            self.ensure_trainer()  # holds the served weights between cycles
            report = self._bound_micro(heldout, probe)
            self.micro_checks += 1
            return report

    def training_records(self, newest: int | None = None) -> list[FeedbackRecord]:
        """Used records on the training side (never a held-out prompt), oldest first: the
        ``newest`` of them, or all of them up to ``REPLAY_POOL_MAX``, past which that many
        are drawn uniformly (seeded by the cycle). Only the records wanted are read."""
        ids = self.split.ids(held=False, upto=self.last_id).tolist()
        if newest is not None:
            ids = ids[-newest:] if newest > 0 else []
        elif len(ids) > REPLAY_POOL_MAX:
            rng = np.random.default_rng([self.seed, self.cycles, 0x9E1])
            ids = sorted(int(i) for i in rng.choice(ids, REPLAY_POOL_MAX, replace=False))
        return self.host.store.records_with_ids(ids)

    def _heldout(self) -> list[FeedbackRecord]:
        """The newest ``gate_heldout_records`` live held-out records, oldest first (the
        gate's evidence); read newest first, past any quarantined or deleted ones."""
        want = int(self.host.engine.config.gate_heldout_records)
        ids = self.split.ids(held=True).tolist()
        out: list[FeedbackRecord] = []
        while ids and len(out) < want:
            take = want - len(out)
            batch, ids = ids[-take:], ids[:-take]
            out = self.host.store.records_with_ids(batch) + out
        return out

    # -- boundaries -------------------------------------------------------------------------
    def mark_task_boundary(self, reason: str = "marked") -> bool:
        """Start a new EWC++ task from the served weights (their Fisher and θ*)."""
        with self.lock:
            trainer = self.ensure_trainer()
            params = {n: p.detach().cpu().numpy() for n, p in trainer.named_lora_params().items()}
            if self.ewc.fisher_updates == 0:
                # no Fisher yet at these weights: estimate it on recent training answers
                trainer.update_fisher(self.training_records(newest=64))
            started = bool(self.ewc.start_new_task(params))
            self.boundaries.append(
                {
                    "record_id": self.last_id,
                    "cycle": self.cycles,
                    "reason": reason,
                    "served_version": self.host.adapter_version,
                    "ewc_task_started": started,
                    "at": time.time(),
                }
            )
            if not started:
                logger.warning(
                    "task boundary (%s) before any Fisher estimate: nothing to keep", reason
                )
            return started

    # -- rollback ---------------------------------------------------------------------------
    def on_rollback(self, version: int) -> None:
        """The host now serves ``version``: train from it, with its EWC++ memory."""
        with self.lock:
            try:
                st = load_state(self.host.registry.get(version).path / STATE_FILE)
            except StateError as e:
                logger.warning(
                    "version %s has no usable learner state (%s); keeping the current EWC++ memory",
                    version,
                    e,
                )
                st = None
            if st is not None:
                self._load_version_state(*st)
            self.trainer = None
            self.save()

    # -- replicas ---------------------------------------------------------------------------
    def follow(self, version: int) -> None:
        """Another process (the trainer replica) published ``version`` and this host now
        serves it: take the learner state saved with it whole (records used, prompt split,
        detectors, boundaries, bank, EWC++, reward baseline, dreams), so that if this
        replica becomes the trainer it continues from exactly there: records the version
        was trained on are not trained again, later ones are."""
        with self.lock:
            try:
                arrays, meta = load_state(self.host.registry.get(version).path / STATE_FILE)
            except StateError as e:
                logger.warning("followed version %s has no usable learner state: %s", version, e)
                self.trainer = None
                return
            self._load_stream_state(arrays, meta)
            self._load_version_state(arrays, meta)
            self.save()

    # -- one cycle --------------------------------------------------------------------------
    def run(
        self, epochs: int | None = None, gate: bool = True, probe: bool = True, batch_size: int = 4
    ) -> dict:
        """One cycle (see the module docstring); returns its report. A cycle that fails
        leaves its records to the next one (what it had used, counted and detected is
        undone; the trainer returns to the served weights)."""
        with self.lock:
            before = (self.last_id, self.cycles, self.detector.state_dict(), list(self.boundaries))
            leaning = self.leaning_detector.state_dict()
            try:
                return self._run(epochs, gate, probe, batch_size)
            except Exception:
                self.last_id, self.cycles, detector, self.boundaries = before
                self.detector = ShiftDetector.from_state(detector)
                self.leaning_detector = LeaningShiftDetector.from_state(leaning)
                self.trainer = None  # rebuilt from the served version
                raise

    def _run(self, epochs: int | None, gate: bool, probe: bool, batch_size: int) -> dict:
        from ..training import select_training_set

        t0 = time.perf_counter()
        host = self.host
        store = host.store
        new = store.records(since_id=self.last_id)
        report: dict[str, Any] = {
            "version": host.adapter_version,
            "published": False,
            "new_records": len(new),
        }
        if not new:
            report.update(
                skipped="no new feedback since the last cycle", seconds=time.perf_counter() - t0
            )
            return report
        sides = self.split.assign(new)
        train_new = [r for r, held in zip(new, sides) if not held]
        heldout = self._heldout()
        report.update(heldout=len(heldout), heldout_new=len(new) - len(train_new))

        z, z_now = None, None
        if host.adapter_version is not None:
            scorable = [r for r in new if r.prompt_ids and r.response_ids]
            tests = self.leaning_detector.tests
            z = self.leaning_detector.update(self._leaning(scorable), [r.reward for r in scorable])
            report["leaning_auc"] = self.leaning_detector.last_auc
            if self.leaning_detector.tests > tests:
                z_now = self.leaning_detector.last_z
                report["leaning_z"] = z_now  # every test's z, alarm or not
        alarms, rises = [], []
        for r in new:
            side = self.detector.update(r.reward)
            if side == "up":  # learning raises the liked-rate; not a boundary by itself
                rises.append({"record_id": r.id, "leaning_z": z_now})
            elif side is not None:
                alarms.append({"record_id": r.id, "direction": side})
        if rises:
            report["liked_rate_rises"] = rises
        reason = None
        if alarms:
            reason = (
                f"liked-rate shift ({alarms[0]['direction']}) "
                f"detected at record {alarms[0]['record_id']}"
            )
        if z is not None:
            alarms.append({"record_id": new[-1].id, "direction": "leaning", "z": z})
            reason = reason or (
                f"taste shift (liked answers no longer lean toward what the served "
                f"version learned, z = {z:.1f}) detected by record {new[-1].id}"
            )
        if reason is not None:
            self.mark_task_boundary(reason=reason)
            report["boundaries"] = alarms

        bank = host.engine.reasoning_bank
        if train_new:
            bank.add_trajectories(
                np.stack([r.embedding for r in train_new]),
                np.array([(r.reward + 1.0) / 2.0 for r in train_new]),
                weights=np.ones(len(train_new)),
            )
            report["patterns_extracted"] = len(
                bank.extract_patterns(
                    k=clusters_for(len(train_new), host.engine.config.pattern_clusters)
                )
            )
        replay = self.training_records() + self.dreams
        selected = select_training_set(
            train_new,
            bank=bank if self.replay == "balanced" else None,
            replay=replay,
            replay_fraction=0.25,
            seed=self.seed + self.cycles,
        )
        report["trained_on"] = len(selected)
        self.last_id = max(r.id for r in new)
        self.cycles += 1
        if not selected:
            self.save()
            report.update(
                skipped="every new record is on the held-out side", seconds=time.perf_counter() - t0
            )
            return report
        trainer = self.ensure_trainer()
        start = self._lora()
        tr = trainer.train(selected, epochs=epochs or self.epochs, batch_size=batch_size)
        failpoint("learner.trained")
        report["train"] = tr.to_dict()
        if tr.skipped:
            self.save()
            report.update(
                skipped=f"training skipped: {tr.skipped}", seconds=time.perf_counter() - t0
            )
            return report
        passed = True
        if gate:
            passed, report["gate"], report["step"] = self._gate(start, heldout, probe)
        report["fisher_mean"] = trainer.update_fisher(selected)  # at the weights kept
        if not passed:
            report["micro"] = self._bound_micro(heldout, probe)
            self.save()
            report["seconds"] = time.perf_counter() - t0
            return report
        meta = {
            "trained_on": len(selected),
            "new_records": len(new),
            "cycle": self.cycles,
            "last_record_id": self.last_id,
            "step": report.get("step"),
            "train_loss": tr.losses[-1] if tr.losses else None,
        }
        if self.measure_kl and heldout:
            meta["kl_per_answer"] = self._answer_kl(heldout)
            report["kl_per_answer"] = meta["kl_per_answer"]

        canary_ids = canary.canary_prompt_ids(host.tokenizer)
        canary_hidden = canary.last_hidden(trainer.peft_model, canary_ids)

        def write(path: Path) -> None:
            trainer.save_adapter(path)
            canary.write(path, canary_ids, canary_hidden)
            arrays, state = self._state()
            state["served_version"] = None  # filled by whoever serves it
            save_state(path / STATE_FILE, arrays, state)

        # CURRENT names it only once the engine serves it and its canary matched
        v = host.registry.publish(write, meta, make_current=False)
        t_pub = time.perf_counter()
        host.serve_version(v.version, micro_decay=0.5)
        if gate:
            report["micro"] = self._bound_micro(heldout, probe)
        self.save()
        report.update(
            version=v.version,
            published=True,
            seconds=time.perf_counter() - t0,
            publish_to_serve_s=time.perf_counter() - t_pub,
        )
        return report

    def _leaning(self, records: list[FeedbackRecord]) -> list[float]:
        """``log π_served(y|x) − log π_base(y|x)`` of each record's answer (records with
        prompt and response tokens; the trainer holds the served weights between cycles)."""
        import torch

        from ..training.objective import response_logprobs

        peft = self.ensure_trainer().peft_model
        out: list[float] = []
        with torch.no_grad():
            for s in range(0, len(records), 8):
                part = records[s : s + 8]
                served = response_logprobs(peft, part)
                with peft.disable_adapter():
                    base = response_logprobs(peft, part)
                out.extend(float(a.sum() - b.sum()) for a, b in zip(served, base))
        return out

    def _answer_kl(self, heldout: list[FeedbackRecord]) -> float:
        from ..training import ModelView
        from .drift import answer_kl

        peft = self.trainer.peft_model
        rows = [list(r.prompt_ids) for r in heldout[-KL_PROMPTS:]]
        return answer_kl(
            ModelView.adapter(peft, "default"),
            ModelView.base(peft),
            rows,
            self.host.tokenizer,
            seed=self.seed + self.cycles,
        )

    def _bound_micro(self, heldout: list, probe: bool) -> dict:
        """Scale the served MicroLoRA back inside the drift budget, measured with the
        weights that serve now (``micro_bound``); returns what was tried. A failure is
        logged and reported, never raised: the cycle's version is already served."""
        from ..training import ModelView
        from .micro_bound import MICRO_SCALES, head_width, micro_view, next_cap

        host = self.host
        micro = host.engine.micro_lora
        A, B, s = micro.A.copy(), micro.B.copy(), float(micro.scale)
        out: dict[str, Any] = {"delta_norm": micro.delta_norm(A, B), "scale": 1.0}
        self.micro_checked_id = max(self.micro_checked_id, self.last_id)
        self.last_micro = out
        if out["delta_norm"] == 0.0:
            return out
        peft = self.trainer.peft_model
        if head_width(peft) != A.shape[1]:
            out["skipped"] = f"the LM head's input is not {A.shape[1]} wide"
            return out
        gate = _gate_for(host.engine.config)
        base = ModelView.base(peft)
        tried: list[dict] = []
        try:
            scale = 0.0
            for f in MICRO_SCALES:
                g = gate.evaluate(
                    micro_view(peft, "default", (A * np.float32(f)).astype(np.float32), B, s),
                    base,
                    heldout,
                    None,
                    host.tokenizer,
                    embedder=host.embed if probe else None,
                    probe_prompts=self._probes() if probe else None,
                    reference=base,
                    reference_cache=self._base_answers,
                    drift_only=True,
                )
                tried.append({"scale": f, "reasons": g.reasons, "metrics": g.metrics})
                if g.passed:
                    scale = f
                    break
            if scale != 1.0:
                host.shrink_micro(scale)
                logger.info(
                    "MicroLoRA scaled by %s to stay inside the drift budget: %s",
                    scale,
                    "; ".join(tried[0]["reasons"]),
                )
            self.micro_cap = next_cap(
                self.micro_cap, out["delta_norm"], scale, host.engine.config.micro_lora_norm_cap
            )
            host.set_micro_norm_cap(self.micro_cap, as_of=self.micro_checked_id)
        except Exception as e:  # the version is served: report, keep the MicroLoRA
            logger.error("MicroLoRA drift check failed: %s", e)
            out.update(error=str(e), tried=tried)
            return out
        out.update(scale=scale, tried=tried, norm_cap=self.micro_cap)
        return out

    def _probes(self) -> list[str]:
        return PROBE_PROMPTS[: self.host.engine.config.gate_on_topic_probes]

    def _gate(self, start: dict, heldout: list, probe: bool) -> tuple[bool, dict, dict | None]:
        """Gate the trained candidate; refused, try it projected back inside the budget:
        ``STEP_SCALES`` of its step from the served weights, then (with a served version)
        the smallest step shrunk toward the base model, by ``SHRINK`` or, when the drift
        budget is what refused it, by the factor ``shrink_to_budget`` fits to the KL just
        measured (up to ``SHRINK_TRIES`` points). Returns (passed, gate report, the point
        that passed); the trainer then holds the weights that passed, or the served ones."""
        from ..training import ModelView

        host = self.host
        trainer = self.trainer
        peft = trainer.peft_model
        gate = _gate_for(host.engine.config)
        # a point shrunk toward the base model gives up part of what serves, so it may not
        # score below the served version at all: the margin is for steps toward the feedback
        retreat = _gate_for(host.engine.config, heldout_margin_se=0.0)
        probes = self._probes() if probe else None
        embedder = host.embed if probe else None
        served = host.adapter_version
        if served is not None:
            if _SERVED in peft.peft_config:
                peft.delete_adapter(_SERVED)
            peft.load_adapter(str(host.registry.get(served).path), adapter_name=_SERVED)
            peft.set_adapter("default")
            current = ModelView.adapter(peft, _SERVED)
        else:
            current = ModelView.base(peft)
        cand = self._lora()
        small = min(STEP_SCALES)
        tried: list[dict] = []
        g = None

        def evaluate(point: dict) -> Any:
            _set_lora(trainer, start, cand, point["step"], point.get("shrink", 1.0))
            g = (retreat if "shrink" in point else gate).evaluate(
                ModelView.adapter(peft, "default"),
                current,
                heldout,
                None,
                host.tokenizer,
                embedder=embedder,
                probe_prompts=probes,
                reference=ModelView.base(peft),
                reference_cache=self._base_answers,
            )
            tried.append(
                {
                    **point,
                    "passed": g.passed,
                    "reasons": g.reasons,
                    "failed": g.failed,
                    "metrics": g.metrics,
                }
            )
            return g

        try:
            point: dict | None = None
            for s in STEP_SCALES:
                point = {"step": s}
                g = evaluate(point)
                if g.passed:
                    break
            shrinks = 0
            while served is not None and not g.passed and shrinks < SHRINK_TRIES:
                last = tried[-1]
                over = "kl_budget" in last["failed"]
                if shrinks and not over:
                    break  # a shrunk point failed on something else: no better guess
                c = last.get("shrink", 1.0) * shrink_to_budget(
                    last["metrics"].get("kl_per_answer"),
                    gate.max_kl_per_answer if over else 0.0,
                )
                point = {"step": small, "shrink": round(c, 4)}
                g = evaluate(point)
                shrinks += 1
            if not g.passed:  # back to the served weights, where the next cycle starts
                _set_lora(trainer, start, cand, 0.0)
        finally:
            if served is not None:
                peft.delete_adapter(_SERVED)
                peft.set_adapter("default")
        out = g.to_dict()
        out["tried"] = tried
        return g.passed, out, (point if g.passed else None)


def shrink_to_budget(kl: float | None, budget: float) -> float:
    """The factor that shrinks every ``ΔW`` of a point whose KL to the base model is ``kl``
    nats per answer to ``BUDGET_AIM`` of ``budget`` (KL ∝ c^``KL_SHRINK_EXPONENT``),
    within [¼, 0.95]; ``SHRINK`` when there is no budget, no measurement, or the KL
    already fits (the point failed another check: shrink to drift less)."""
    if budget <= 0 or kl is None or not math.isfinite(kl) or kl <= budget:
        return SHRINK
    c = (BUDGET_AIM * budget / kl) ** (1.0 / KL_SHRINK_EXPONENT)
    return min(0.95, max(0.25, c))


def _gate_for(config: Any, **override: Any):
    """The promotion gate with the budget's settings from ``config`` (``override``: other
    values for some of them)."""
    from ..training import PromotionGate

    settings = {
        "max_kl_per_answer": config.gate_max_kl_per_answer,
        "on_topic_confidence": config.gate_on_topic_confidence,
        "heldout_margin_se": config.gate_heldout_margin_se,
    }
    return PromotionGate(**{**settings, **override})


def _fresh_base(host: Host):
    """A private, hook-free copy of the base model for training."""
    import torch
    from transformers import AutoModelForCausalLM

    if host.model_source is None:
        raise RuntimeError(
            "learn() needs the model's path to load a private training copy; "
            "build the host from a path (or the default model)"
        )
    return AutoModelForCausalLM.from_pretrained(
        host.model_source, dtype=torch.float32, local_files_only=True
    )


def _set_lora(
    trainer: BaseLoRATrainer, start: dict, end: dict, step: float, shrink: float = 1.0
) -> None:
    """LoRA tensors ← start + step·(end − start), then ``B ← shrink·B`` (``A`` kept), so
    every ``ΔW = B·A`` of that point shrinks by ``shrink`` toward the base model."""
    import torch

    with torch.no_grad():
        for n, p in trainer.named_lora_params().items():
            x = start[n] + step * (end[n] - start[n])
            p.copy_(x * shrink if "lora_B" in n else x)
