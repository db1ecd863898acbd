"""Dreams: replay answers that the served model gives again to prompts users taught.

A dream re-asks a *training* prompt (never a held-out one: the gate must measure prompts
the trainer never saw) that lies nearest a strong ReasoningBank pattern, samples a new
answer from the served model, and predicts that answer's reward from the feedback on
record: the similarity-weighted mean reward of the ``k`` stored answers most similar to
it (cosine of all-MiniLM-L6-v2 answer embeddings, softmax weights at temperature
``tau``), among answers to prompts similar to the dream's. The reward therefore depends on
the dreamed answer: one that resembles liked answers is rehearsed as liked, one that
resembles disliked answers as disliked. A dream is kept when its score
``w_n·novelty + w_c·coherence + w_u·|predicted reward|`` passes ``phi_threshold``
(novelty: 1 − cosine to the prompt's answer on record; coherence: exp of the mean
token log-prob under the base model; the confidence of the predicted reward).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..store.base import FeedbackRecord

MAX_DREAMS = 64


def predicted_rewards(
    answer_emb: np.ndarray,
    prompt_emb: np.ndarray,
    known: Sequence[FeedbackRecord],
    known_answer_emb: np.ndarray,
    k: int = 8,
    tau: float = 0.1,
    same_topic: float = 0.5,
) -> np.ndarray:
    """Per dream, the softmax(cos/tau)-weighted mean reward of its ``k`` most similar
    known answers among those to prompts with cosine ≥ ``same_topic`` (all known answers
    when none is that close)."""
    P = np.stack([np.asarray(r.embedding, np.float32) for r in known])
    P /= np.maximum(np.linalg.norm(P, axis=1, keepdims=True), 1e-12)
    R = np.array([r.reward for r in known], np.float64)
    out = np.zeros(len(answer_emb))
    for i, (a, p) in enumerate(zip(answer_emb, prompt_emb)):
        p = p / max(float(np.linalg.norm(p)), 1e-12)
        near = np.flatnonzero(P @ p >= same_topic)
        if near.size == 0:
            near = np.arange(len(known))
        sims = known_answer_emb[near] @ a
        top = near[np.argsort(-sims)[:k]]
        w = np.exp((known_answer_emb[top] @ a - 1.0) / tau)
        out[i] = float(np.dot(w, R[top]) / w.sum())
    return out


def dream(learner: Any, n: int, max_new_tokens: int = 40) -> dict:
    """Generate up to ``n`` dreams; keep those whose score passes ``phi_threshold``."""
    import torch

    from ..training.objective import response_logprobs

    host = learner.host
    cfg = host.engine.config
    bank = host.engine.reasoning_bank
    strong = sorted(bank.strong_patterns(), key=lambda p: -p.avg_quality)
    training = [r for r in learner.training_records() if r.response_ids and r.prompt_ids]
    liked = [r for r in training if r.reward > 0]
    if not strong or not liked:
        return {
            "dreams_generated": 0,
            "dreams_kept": 0,
            "skipped": "no strong pattern or no liked feedback on training prompts yet",
        }
    E = np.stack([r.embedding for r in liked]).astype(np.float32)
    En = E / (np.linalg.norm(E, axis=1, keepdims=True) + 1e-12)
    chosen, used = [], set()
    for j in range(n):
        p = strong[j % len(strong)]
        c = p.centroid / (np.linalg.norm(p.centroid) + 1e-12)
        for i in np.argsort(-(En @ c)):
            if int(i) not in used:
                used.add(int(i))
                chosen.append(liked[int(i)])
                break
        if len(used) == len(liked):
            break
    try:
        answers = host.sample_answers([r.prompt_ids for r in chosen], max_new_tokens)
    except NotImplementedError as e:
        return {"dreams_generated": 0, "dreams_kept": 0, "skipped": str(e)}
    pairs = [(r, a) for r, a in zip(chosen, answers) if a]
    if not pairs:
        return {"dreams_generated": 0, "dreams_kept": 0, "skipped": "empty answers"}
    cands = [
        FeedbackRecord(
            response_id=f"dream-{uuid.uuid4().hex}",
            prompt=r.prompt,
            prompt_ids=list(r.prompt_ids),
            response_ids=list(a),
            response_text=host.tokenizer.decode(a, skip_special_tokens=True),
            reward=0.0,
            embedding=r.embedding,
            task="dream",
        )
        for r, a in pairs
    ]
    trainer = learner.ensure_trainer()
    with trainer.peft_model.disable_adapter(), torch.no_grad():
        lps = response_logprobs(trainer.peft_model, cands)
    known = training[-512:]
    emb = host.embed(
        [c.response_text for c in cands]
        + [r.response_text for r, _ in pairs]
        + [r.response_text for r in known]
    )
    m = len(cands)
    dream_emb, orig_emb, known_emb = emb[:m], emb[m : 2 * m], emb[2 * m :]
    novelty = 1.0 - np.sum(dream_emb * orig_emb, axis=1)
    reward = predicted_rewards(dream_emb, np.stack([c.embedding for c in cands]), known, known_emb)
    kept, scores = [], []
    for i, c in enumerate(cands):
        coherence = float(torch.exp(lps[i].mean())) if lps[i].numel() else 0.0
        score = (
            cfg.dream_novelty_weight * float(novelty[i])
            + cfg.dream_coherence_weight * coherence
            + cfg.dream_utility_weight * abs(float(reward[i]))
        )
        scores.append(score)
        if score >= cfg.phi_threshold:
            c.reward = float(np.clip(reward[i], -1.0, 1.0))
            kept.append(c)
    learner.dreams = (learner.dreams + kept)[-MAX_DREAMS:]
    return {
        "dreams_generated": m,
        "dreams_kept": len(kept),
        "mean_score": float(np.mean(scores)),
        "mean_predicted_reward": float(np.mean(reward)),
        "replay_dreams": len(learner.dreams),
    }
