"""What a version's drift from the base model costs, and what it buys.

For a binary taste with base liked-rate ``p0``, no policy reaches liked-rate ``p`` with
less than ``d(p‖p0) = p·ln(p/p0) + (1−p)·ln((1−p)/(1−p0))`` nats of ``KL(π‖π_base)`` per
answer: the KL-regularised optimum ``π_base·exp(r/β)`` attains it, and the data-processing
inequality (the liked/disliked outcome is a function of the answer) bounds every policy
from below. :func:`answer_kl` measures a version's KL per answer by Monte Carlo over
answers it samples itself; ``efficiency = d(p‖p0) / KL`` says how much of the drift
bought the user's taste (1: none wasted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


def kl_floor(p: float, p0: float) -> float:
    """``d(p‖p0)``, the Bernoulli KL in nats (``0·ln 0 = 0``); ∞ when ``p0`` is 0 or 1
    and ``p`` differs."""

    def term(a: float, b: float) -> float:
        if a == 0.0:
            return 0.0
        return math.inf if b == 0.0 else a * math.log(a / b)

    return term(p, p0) + term(1.0 - p, 1.0 - p0)


def efficiency(p: float, p0: float, kl: float) -> float | None:
    """``d(p‖p0) / kl``, or None when ``kl`` is not positive."""
    return kl_floor(p, p0) / kl if kl > 0 else None


@dataclass
class _Answer:
    prompt_ids: list[int]
    response_ids: list[int]
    response_id: str


def sample_answer_ids(
    model: Any,
    rows: Sequence[Sequence[int]],
    tokenizer: Any,
    max_new_tokens: int = 32,
    seed: int = 0,
    batch_size: int = 16,
    top_p: float = 1.0,
) -> list[list[int]]:
    """Answers sampled at temperature 1, by default without truncation (the model's own
    distribution; ``top_p`` < 1 samples what users of a nucleus sampler get), cut after the
    end-of-sequence token (kept)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    dev = next(model.parameters()).device
    out: list[list[int]] = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for s in range(0, len(rows), batch_size):
            part = rows[s : s + batch_size]
            L = max(len(r) for r in part)
            ids = torch.full((len(part), L), int(pad), dtype=torch.long)
            mask = torch.zeros((len(part), L), dtype=torch.long)
            for i, r in enumerate(part):
                ids[i, L - len(r) :] = torch.tensor(list(r), dtype=torch.long)
                mask[i, L - len(r) :] = 1
            gen = model.generate(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=1.0,
                top_p=top_p,
                top_k=0,
                pad_token_id=int(pad),
            )
            for row in gen[:, L:].tolist():
                if eos is not None and eos in row:
                    row = row[: row.index(eos) + 1]
                out.append(row)
    return out


def answer_kl(
    policy: Any,
    base: Any,
    rows: Sequence[Sequence[int]],
    tokenizer: Any,
    max_new_tokens: int = 32,
    seed: int = 0,
    chunk: int = 4,
) -> float:
    """``KL(π‖π_base)`` per answer: answers ``y ~ π`` to the prompt ``rows``, and per
    answer ``Σ_t KL(π(·|x, y_<t) ‖ π_base(·|x, y_<t))`` (the full-vocabulary KL at every
    position of the sampled answer: the same expectation as ``Σ_t log π(y_t)/π_base(y_t)``
    with far less variance, and never negative), averaged over answers.

    Args:
        policy, base: modules or ``ModelView`` s of the gate (``.use()`` contexts).
    """
    from ..training.gate import _view
    from ..training.objective import _response_logits, make_batch

    pol, ref = _view(policy), _view(base)
    with pol.use() as m:
        answers = sample_answer_ids(m, rows, tokenizer, max_new_tokens, seed)
    seqs = [_Answer(list(p), a, f"kl{i}") for i, (p, a) in enumerate(zip(rows, answers)) if a]
    if not seqs:
        return 0.0
    total = 0.0
    for s in range(0, len(seqs), chunk):
        part = seqs[s : s + chunk]
        with torch.no_grad():
            with pol.use() as m:
                batch = make_batch(part, next(m.parameters()).device, 0)
                lp = _response_logits(m, batch).log_softmax(-1)
            with ref.use() as m:
                lq = _response_logits(m, batch).log_softmax(-1)
            total += float((lp.exp() * (lp - lq)).sum())
    return total / len(seqs)
