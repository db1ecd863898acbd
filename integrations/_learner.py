"""Loop B for a host model: train the PEFT BaseLoRA on stored feedback, gate, publish, swap.

One cycle (``SonaPipeline.learn()``):

1. new feedback = store records since the last cycle; every fifth record (by row id) is
   held out for the promotion gate and never trained on;
2. their prompt embeddings and qualities go into the ReasoningBank (k-means++ patterns);
3. the training set is the new records plus replay of older ones (and of kept dreams),
   drawn balanced across patterns (``select_training_set``);
4. the trainer (a private copy of the base model with a PEFT LoRA, continuing from the
   served version) takes REINFORCE + KL-to-base + EWC++ steps (``BaseLoRATrainer``);
5. the gate compares the candidate with the served adapter on held-out feedback, and with
   the base model on anchor-text NLL and on-topic answers (to fixed probe questions and
   to the held-out feedback's prompts; a fixed drift budget); a
   refused candidate is retried at half and a quarter of its step from the served
   weights. One that passes is published atomically as a new immutable version and
   hot-swapped into the serving pipeline; when none passes the trainer returns to the
   served weights.

The deep cycle (``SonaPipeline.deep_cycle()``) consolidates the pattern bank and EWC++
memory and dreams: prompts of liked feedback nearest each strong pattern are answered
again by the current model; an answer is kept as replay when its dream score
``w_n·novelty + w_c·coherence + w_u·utility`` passes ``phi_threshold`` (novelty: 1 − cosine
to the liked answer on record; coherence: exp(mean token log-prob) under the base model;
utility: the similarity-weighted quality of the prompt's nearest patterns). Kept dreams
are rehearsed by the next background cycles with reward ``2·utility − 1``.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import numpy as np
import torch

from sona_plugin.ewc import EwcPlusPlus
from sona_plugin.store import FeedbackRecord

logger = logging.getLogger(__name__)

_PROBE_PROMPTS = [
    "What is the capital of Italy?", "How do I boil an egg?", "Why is the sky blue?",
    "Give me a tip for learning a new language.", "What does a CPU do?",
    "How many legs does a spider have?", "What causes rain?",
    "How should I store fresh bread?", "What is a prime number?",
    "What is the job of a referee?", "How do I write a good email subject line?",
    "What does a thermometer measure?",
]
_HELDOUT_EVERY = 5
_HELDOUT_MAX = 40
_SERVED = "served"
_MAX_DREAMS = 64
# fractions of a refused candidate's step from the served weights that the gate also tries
_STEP_SCALES = (1.0, 0.5, 0.25)


class Learner:
    """Runs background cycles for one :class:`SonaPipeline`."""

    def __init__(self, pipe: Any, *, epochs: int = 2, seed: int = 0):
        self.pipe = pipe
        self.epochs = epochs
        self.seed = seed
        self.last_id = 0
        self.cycles = 0
        self.trainer = None
        self.ewc = EwcPlusPlus(pipe.engine.config)
        self.dreams: list[FeedbackRecord] = []
        self._base_answers: dict = {}  # the gate's cache of the base model's NLL/answers

    def _make_trainer(self):
        from sona_plugin.training import BaseLoRATrainer

        base = _fresh_base(self.pipe)
        cfg = self.pipe.engine.config
        targets = getattr(self.pipe, "lora_targets", None)
        extra = {"target_modules": targets} if targets else {}
        trainer = BaseLoRATrainer(base, cfg, ewc=self.ewc, seed=self.seed, **extra,
                                  beta=cfg.base_lora_kl_beta)
        v = self.pipe.adapter_version
        if v is not None:
            trainer.load_adapter_weights(self.pipe.registry.get(v).path)
        return trainer

    def _gate(self, trainer, start: dict, heldout: list, probe: bool
              ) -> tuple[bool, dict, float | None]:
        """Gate the trained candidate; when it fails, try it at half and a quarter of its
        step from the served weights (θ_served + s·(θ_cand − θ_served), largest s that
        passes). A refused cycle would otherwise throw its whole update away, and the next
        one overshoots again from the same place. Drift is measured against the base model
        (a fixed budget, not one per version). Returns (passed, gate report, step scale);
        the trainer then holds the weights that passed, or the served ones."""
        from sona_plugin.training import ModelView, PromotionGate

        pipe = self.pipe
        peft = trainer.peft_model
        gate = PromotionGate()
        probes = _PROBE_PROMPTS if probe else None
        embedder = pipe.embed if probe else None
        served = pipe.adapter_version
        if served is not None:
            if _SERVED in peft.peft_config:
                peft.delete_adapter(_SERVED)
            peft.load_adapter(str(pipe.registry.get(served).path), adapter_name=_SERVED)
            peft.set_adapter("default")
            current = ModelView.adapter(peft, _SERVED)
        else:
            current = ModelView.base(peft)
        cand = {n: p.detach().clone() for n, p in trainer.named_lora_params().items()}
        tried = []
        try:
            for scale in _STEP_SCALES:
                _set_lora(trainer, start, cand, scale)
                g = gate.evaluate(ModelView.adapter(peft, "default"), current, heldout, None,
                                  pipe.tokenizer, embedder=embedder, probe_prompts=probes,
                                  reference=ModelView.base(peft),
                                  reference_cache=self._base_answers)
                tried.append({"scale": scale, "passed": g.passed, "reasons": g.reasons,
                              "metrics": g.metrics})
                if g.passed:
                    break
            if not g.passed:  # scale 0: back to the served weights, where the next cycle starts
                _set_lora(trainer, start, cand, 0.0)
        finally:
            if served is not None:
                peft.delete_adapter(_SERVED)
                peft.set_adapter("default")
        out = g.to_dict()
        out["tried"] = tried
        return g.passed, out, (scale if g.passed else None)

    def mark_task_boundary(self) -> None:
        if self.trainer is None:
            self.trainer = self._make_trainer()
        params = {n: p.detach().cpu().numpy() for n, p in self.trainer.named_lora_params().items()}
        if not self.ewc.start_new_task(params):
            logger.warning("task boundary marked before any Fisher estimate: nothing to keep")

    def run(self, epochs: int | None = None, gate: bool = True, probe: bool = True,
            batch_size: int = 4) -> dict:
        from sona_plugin.training import select_training_set

        t0 = time.perf_counter()
        pipe = self.pipe
        store = pipe.store
        new = store.records(since_id=self.last_id)
        report: dict[str, Any] = {"version": pipe.adapter_version, "published": False,
                                  "new_records": len(new)}
        if not new:
            report.update(skipped="no new feedback since the last cycle",
                          seconds=time.perf_counter() - t0)
            return report
        older = store.records(since_id=0, limit=None)
        heldout = [r for r in older if r.id % _HELDOUT_EVERY == 0][-_HELDOUT_MAX:]
        train_new = [r for r in new if r.id % _HELDOUT_EVERY != 0]
        replay_pool = [r for r in older if r.id <= self.last_id and r.id % _HELDOUT_EVERY != 0]
        replay_pool += self.dreams
        bank = pipe.engine.reasoning_bank
        bank.add_trajectories(np.stack([r.embedding for r in new]),
                              np.array([(r.reward + 1.0) / 2.0 for r in new]))
        report["patterns_extracted"] = len(bank.extract_patterns())
        selected = select_training_set(train_new, bank=bank, replay=replay_pool,
                                       replay_fraction=0.25, seed=self.seed + self.cycles)
        report["trained_on"] = len(selected)
        report["heldout"] = len(heldout)
        if self.trainer is None:
            self.trainer = self._make_trainer()
        trainer = self.trainer
        start = {n: p.detach().clone() for n, p in trainer.named_lora_params().items()}
        tr = trainer.train(selected, epochs=epochs or self.epochs, batch_size=batch_size)
        report["train"] = tr.to_dict()
        self.last_id = max(r.id for r in new)
        self.cycles += 1
        if tr.skipped:
            report.update(skipped=f"training skipped: {tr.skipped}",
                          seconds=time.perf_counter() - t0)
            return report
        passed = True
        if gate:
            passed, report["gate"], report["step_scale"] = self._gate(trainer, start, heldout,
                                                                      probe)
        if not passed:
            report["seconds"] = time.perf_counter() - t0
            return report
        meta = {"trained_on": len(selected), "new_records": len(new), "cycle": self.cycles,
                "last_record_id": self.last_id, "train_loss": tr.losses[-1] if tr.losses else None}
        v = pipe.registry.publish(lambda path: trainer.save_adapter(path), meta)
        t_pub = time.perf_counter()
        pipe._hot_swap(v.version)
        report.update(version=v.version, published=True, seconds=time.perf_counter() - t0,
                      publish_to_serve_s=time.perf_counter() - t_pub)
        return report


def _fresh_base(pipe: Any):
    """A private, hook-free copy of the base model for training."""
    from transformers import AutoModelForCausalLM

    src = pipe._model_source
    if src is not None:
        return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    raise RuntimeError("learn() needs the model's path to load a private training copy; "
                       "build the pipeline from a path (or the default model)")


def _set_lora(trainer, start: dict, end: dict, scale: float) -> None:
    """LoRA tensors ← start + scale·(end − start)."""
    with torch.no_grad():
        for n, p in trainer.named_lora_params().items():
            p.copy_(start[n] + scale * (end[n] - start[n]))


def dream(learner: Learner, n: int) -> dict:
    """Generate up to ``n`` dreams and keep the ones whose score passes ``phi_threshold``."""
    from sona_plugin.training.objective import response_logprobs

    pipe = learner.pipe
    cfg = pipe.engine.config
    bank = pipe.engine.reasoning_bank
    strong = sorted(bank.strong_patterns(), key=lambda p: -p.avg_quality)
    liked = [r for r in pipe.store.records() if r.reward > 0 and r.response_ids]
    if not strong or not liked:
        return {"dreams_generated": 0, "dreams_kept": 0,
                "skipped": "no strong pattern or no liked feedback yet"}
    E = np.stack([r.embedding for r in liked])
    En = E / (np.linalg.norm(E, axis=1, keepdims=True) + 1e-12)
    chosen, used = [], set()
    for k in range(n):
        p = strong[k % len(strong)]
        c = p.centroid / (np.linalg.norm(p.centroid) + 1e-12)
        for i in np.argsort(-(En @ c)):
            if int(i) not in used:
                used.add(int(i))
                chosen.append(liked[int(i)])
                break
        if len(used) == len(liked):
            break
    if learner.trainer is None:
        learner.trainer = learner._make_trainer()
    try:
        answers = pipe._dream_answers([r.prompt_ids for r in chosen], 40)
    except NotImplementedError as e:
        return {"dreams_generated": 0, "dreams_kept": 0, "skipped": str(e)}
    dreams = [(r, resp) for r, resp in zip(chosen, answers) if resp]
    if not dreams:
        return {"dreams_generated": 0, "dreams_kept": 0, "skipped": "empty answers"}
    from sona_plugin.store import FeedbackRecord

    cands = [FeedbackRecord(response_id=f"dream-{uuid.uuid4().hex}", prompt=r.prompt,
                            prompt_ids=r.prompt_ids, response_ids=resp,
                            response_text=pipe.tokenizer.decode(resp, skip_special_tokens=True),
                            reward=0.0, embedding=r.embedding, task="dream")
             for r, resp in dreams]
    peft = learner.trainer.peft_model
    with peft.disable_adapter(), torch.no_grad():
        lps = response_logprobs(peft, cands)
    texts = [c.response_text for c in cands] + [r.response_text for r, _ in dreams]
    emb = pipe.embed(texts)
    m = len(cands)
    novelty = 1.0 - np.sum(emb[:m] * emb[m:], axis=1)
    kept = []
    scores = []
    for i, c in enumerate(cands):
        coherence = float(torch.exp(lps[i].mean())) if lps[i].numel() else 0.0
        near = bank.find_patterns_with_scores(c.embedding, 3)
        w = np.array([max(s, 0.0) for _, s in near])
        utility = float(np.dot(w, [p.avg_quality for p, _ in near]) / w.sum()) if w.sum() > 0 \
            else 0.0
        score = (cfg.dream_novelty_weight * float(novelty[i]) +
                 cfg.dream_coherence_weight * coherence + cfg.dream_utility_weight * utility)
        scores.append(score)
        if score >= cfg.phi_threshold:
            c.reward = float(np.clip(2.0 * utility - 1.0, -1.0, 1.0))
            kept.append(c)
    learner.dreams = (learner.dreams + kept)[-_MAX_DREAMS:]
    return {"dreams_generated": m, "dreams_kept": len(kept),
            "mean_score": float(np.mean(scores)), "replay_dreams": len(learner.dreams)}
