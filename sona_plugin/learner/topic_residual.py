"""Rewards with the part that answering off the question predicts taken out.

Measured on the 1,200-feedback run (``benchmarks/long_horizon.py``, docs/benchmarks.md):
in every phase the answers users liked were *less* on topic than those they disliked.
The mean prompt–answer cosine was 0.45 for liked against 0.63 for disliked answers in
the second taste's first 200 feedbacks (correlation with the reward −0.38; −0.24 to −0.34
in the other phases). REINFORCE on those rewards pulls answers off the question, the
gate's on-topic bound (≥ 0.9 × the base model) then refuses every step, and that taste
gained nothing in its first 200 feedbacks.

The rule, per cycle, over the records it trains on: with ``c_i`` the cosine of record
``i``'s prompt embedding and its answer's, fit the reward on it by least squares
(slope ``b = cov(r, c) / var(c)``). When ``b < 0`` (liked answers sit further off the
question), train on ``r_i − b·(c_i − c̄)``. This is REINFORCE on ``r + λ·c`` with
``λ = −b``: the Lagrangian of "maximise the liked-rate, keep answers on the question",
with the multiplier that makes the reward uncorrelated with ``c`` over these records.
The update then no longer favours an answer for being off the question, and still
favours what users liked beyond that. When ``b ≥ 0`` the rewards are kept (users who
like on-topic answers teach that already). The gate measures candidates on the users'
own rewards, never these.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from ..store.base import FeedbackRecord

MIN_RECORDS = 8
"""Fewer usable records than this: no fit, rewards kept."""


def answer_cosines(
    records: Sequence[FeedbackRecord], embed: Callable[[list[str]], np.ndarray]
) -> np.ndarray:
    """Cosine of each record's prompt embedding and its answer's; NaN where the record
    has no answer text or no prompt embedding."""
    cos = np.full(len(records), np.nan)
    keep = [
        i
        for i, r in enumerate(records)
        if r.response_text.strip()
        and r.embedding is not None
        and np.asarray(r.embedding).size > 0
        and float(np.linalg.norm(r.embedding)) > 0
    ]
    if not keep:
        return cos
    A = np.asarray(embed([records[i].response_text for i in keep]), np.float64)
    A /= np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-12)
    P = np.stack([np.asarray(records[i].embedding, np.float64) for i in keep])
    if P.shape[1] != A.shape[1]:
        return cos  # the stored embeddings come from another embedder
    P /= np.linalg.norm(P, axis=1, keepdims=True)
    cos[keep] = np.einsum("ij,ij->i", P, A)
    return cos


def residualise(
    records: Sequence[FeedbackRecord], cos: np.ndarray
) -> tuple[list[FeedbackRecord], dict]:
    """The records with rewards ``r − b·(c − c̄)`` when the least-squares slope ``b`` of
    reward on on-topic cosine is negative, else unchanged; and a report (``slope``,
    ``records`` fitted, mean cosine of ``liked`` and ``disliked`` answers, ``applied``).
    Records without a cosine (NaN) keep their reward."""
    cos = np.asarray(cos, np.float64)
    ok = np.isfinite(cos)
    r = np.array([float(x.reward) for x in records])
    report: dict = {"records": int(ok.sum()), "applied": False}
    if ok.sum() < MIN_RECORDS:
        return list(records), report
    c, rr = cos[ok], r[ok]
    report.update(
        liked_cos=float(c[rr > 0].mean()) if (rr > 0).any() else None,
        disliked_cos=float(c[rr < 0].mean()) if (rr < 0).any() else None,
    )
    var = float(c.var())
    if var <= 1e-12:
        return list(records), report
    b = float(((c - c.mean()) * (rr - rr.mean())).mean() / var)
    report["slope"] = b
    if b >= 0:
        return list(records), report
    shaped = r.copy()
    shaped[ok] = rr - b * (c - c.mean())
    report["applied"] = True
    out = [
        dataclasses.replace(x, reward=float(s)) if k else x for x, s, k in zip(records, shaped, ok)
    ]
    return out, report


__all__ = ["MIN_RECORDS", "answer_cosines", "residualise"]
