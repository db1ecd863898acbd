"""What every host integration (transformers pipeline, vLLM) shares around its model.

A host has a front-end :class:`SonaEngine` (config, ReasoningBank), a durable feedback
store, an :class:`AdapterRegistry` and a tokenizer; it implements ``adapter_version``,
``_hot_swap(version)`` (serve a published BaseLoRA version) and ``_dream_answers``.
This base adds loop B/C on top (``learn``, ``deep_cycle``, the background thread),
adapter listing and rollback, the embedder, and the feedback rules.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from sona_plugin.errors import InvalidValue

# On an LM's final hidden state (measured on SmolLM2, docs/benchmarks.md): a zero-A
# MicroLoRA moves every position alike and collapsed the model within 50 feedbacks at
# cap 0.3; zero-B (DESIGN.md's setting) stays fluent, but at cap 0.15 200 instant-only
# feedbacks still drove the held-out liked-rate to 0 %. The instant loop's job here is
# the same-answer effect; cap 0.05 keeps it from pulling held-out answers around.
LM_DEFAULTS = {"micro_lora_init": "zero_b", "micro_lora_norm_cap": 0.05}


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


class LearningHost:
    """Loop B/C, adapters and the embedder for a host (see the module docstring)."""

    engine: Any
    store: Any
    state_dir: Any
    registry: Any
    tokenizer: Any
    _model_source: Any
    _embedder: Any = None
    _learner: Any = None
    _coordinator: Any = None
    _learned_count: int = 0

    # -- to implement ---------------------------------------------------------------------
    @property
    def adapter_version(self) -> int | None:
        raise NotImplementedError

    def _hot_swap(self, version: int) -> None:
        raise NotImplementedError

    def _dream_answers(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Sampled answers (token ids, stop token included) from the served model."""
        raise NotImplementedError

    def save_state(self) -> None:
        """Persist the engine (MicroLoRA, patterns, counters) next to the store and adapters,
        so ``sona export`` and a restarted host find it. Runs after every ``learn()`` and on
        ``close()``; feedback itself is durable in the store as it arrives."""
        self.engine.save(self.state_dir / "engine")
        info = {"model_source": str(self._model_source) if self._model_source else None,
                "adapter_version": self.adapter_version}
        tmp = self.state_dir / "pipeline.json.tmp"
        tmp.write_text(json.dumps(info))
        tmp.replace(self.state_dir / "pipeline.json")

    # -- shared ---------------------------------------------------------------------------
    def embed(self, texts: list[str]) -> np.ndarray:
        if self._embedder is None:
            from sona_plugin.models import default_embedder

            self._embedder = default_embedder()
        return np.asarray(self._embedder.encode(list(texts), normalize_embeddings=True,
                                                show_progress_bar=False), np.float32)

    def _the_learner(self):
        from ._learner import Learner

        if self._learner is None:
            self._learner = Learner(self)
        return self._learner

    def learn(self, **kwargs) -> dict:
        """Run loop B now: train, gate, publish, hot-swap. Returns the report."""
        n = self.store.count()
        report = self._the_learner().run(**kwargs)
        self._learned_count = n
        self.save_state()
        return report

    def deep_cycle(self, dreams: int | None = None) -> dict:
        """Loop C: merge/decay/prune patterns, consolidate EWC++ tasks, and dream (see
        ``integrations/_learner.py``); kept dreams are rehearsed by later ``learn()``s."""
        from ._learner import dream

        learner = self._the_learner()
        deep = self.engine.run_deep_cycle().to_dict()
        ewc = learner.ewc
        if ewc.task_count > 1:
            ewc.consolidate_all_tasks()
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
        waits only for the adapter swap itself)."""
        from sona_plugin.loops.coordinator import LoopCoordinator

        if self._coordinator is None:
            c = self.engine.config
            self._coordinator = LoopCoordinator(
                pending=lambda: self.store.count() - self._learned_count,
                run_background=self.learn, run_deep=self.deep_cycle,
                trigger_count=c.background_trigger_count,
                interval_s=c.background_interval_ms / 1000.0,
                deep_every=c.consolidation_interval, poll_s=poll_s)
        self._coordinator.poll_s = poll_s
        self._coordinator.start()

    def stop_background(self) -> None:
        if self._coordinator is not None:
            self._coordinator.stop()

    @property
    def coordinator(self):
        return self._coordinator

    def mark_task_boundary(self) -> None:
        """Tell EWC++ that the feedback's task has changed: the current BaseLoRA and its
        Fisher are remembered, and later training is pulled back toward them (boundaries
        are also detected from the training statistics on their own)."""
        self._the_learner().mark_task_boundary()

    def adapters(self) -> list[dict]:
        """Published BaseLoRA versions, oldest first, with which one is served."""
        cur = self.adapter_version
        return [{"version": v.version, "path": str(v.path), "metadata": v.metadata,
                 "created_at": v.created_at, "served": v.version == cur}
                for v in self.registry.versions()]

    def rollback(self, version: int) -> None:
        """Serve an earlier (or later) published version; the registry's CURRENT follows."""
        self.registry.get(version)  # UnknownVersion before anything changes
        self.registry.set_current(version)
        self._hot_swap(version)
