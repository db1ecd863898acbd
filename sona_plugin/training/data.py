"""Training-set selection for the background loop: new feedback plus balanced replay.

Replay keeps earlier lessons alive while the BaseLoRA learns from new feedback
(experience replay; with EWC++ it is the second guard against forgetting). Drawing
replay uniformly would over-represent whatever users asked most often, so replay records
are assigned to their nearest ReasoningBank pattern (cosine of the prompt embedding to
the pattern centroid) and drawn round-robin across patterns: every pattern contributes
before any contributes twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import DimensionMismatch, InvalidValue
from ..store.base import FeedbackRecord


def _centroids(bank: Any) -> np.ndarray | None:
    """Unit-norm pattern centroids [k, d] of ``bank`` (None: no bank or no patterns).

    Reads the patterns directly rather than through ``find_patterns``, which would count
    a training-set selection as an access of every pattern.
    """
    if bank is None:
        return None
    pats = bank.patterns
    if not pats:
        return None
    C = np.stack([np.asarray(p.centroid, dtype=np.float32) for p in pats])
    return C / np.maximum(np.linalg.norm(C, axis=1, keepdims=True), 1e-12)


def assign_patterns(records: Sequence[FeedbackRecord], bank: Any) -> np.ndarray:
    """Index (into ``bank.patterns``) of each record's nearest pattern by cosine.

    Records without an embedding (None or empty) get -1, as do all records when the
    bank has no patterns.

    Raises:
        DimensionMismatch: an embedding whose width differs from the centroids'.
    """
    C = _centroids(bank)
    out = np.full(len(records), -1, dtype=np.int64)
    if C is None:
        return out
    for i, r in enumerate(records):
        e = None if r.embedding is None else np.asarray(r.embedding, dtype=np.float32).ravel()
        if e is None or e.size == 0:
            continue
        if e.shape[0] != C.shape[1]:
            raise DimensionMismatch(
                f"record {r.response_id!r} has a {e.shape[0]}-d embedding, "
                f"the bank's patterns are {C.shape[1]}-d",
                C.shape[1],
                e.shape[0],
            )
        if not np.isfinite(e).all():
            raise InvalidValue(f"record {r.response_id!r} has a non-finite embedding")
        out[i] = int(np.argmax(C @ e))
    return out


def _balanced_sample(groups: np.ndarray, n: int, rng: np.random.Generator) -> list[int]:
    """``n`` indices drawn round-robin across the groups (shuffled within each group).

    The order in which groups take turns is itself shuffled, so no group is favoured
    when ``n`` is not a multiple of the number of groups.
    """
    labels = np.unique(groups)
    pools = []
    for g in rng.permutation(labels):
        idx = np.flatnonzero(groups == g)
        pools.append(list(rng.permutation(idx)))
    out: list[int] = []
    depth = 0
    while len(out) < n:
        took = False
        for pool in pools:
            if depth < len(pool):
                out.append(int(pool[depth]))
                took = True
                if len(out) == n:
                    break
        if not took:
            break
        depth += 1
    return out


def _sample(
    records: Sequence[FeedbackRecord], n: int, bank: Any, rng: np.random.Generator
) -> list[int]:
    if n >= len(records):
        return list(range(len(records)))
    groups = assign_patterns(records, bank)
    if (groups < 0).all():
        return sorted(int(i) for i in rng.choice(len(records), size=n, replace=False))
    return sorted(_balanced_sample(groups, n, rng))


def select_training_set(
    records: Sequence[FeedbackRecord],
    bank: Any = None,
    max_records: int | None = None,
    replay: Sequence[FeedbackRecord] | None = None,
    replay_fraction: float = 0.25,
    seed: int = 0,
) -> list[FeedbackRecord]:
    """New feedback plus replay drawn balanced across ReasoningBank patterns.

    Args:
        records: the new records (since the last cycle). All are kept, unless there
            are more than ``max_records``: then ``max_records`` of them are drawn, balanced
            across patterns like the replay (uniformly when there is no bank).
        bank: a ReasoningBank; its patterns' centroids define the groups.
        max_records: cap on the new records kept (None: no cap).
        replay: older records to replay from; any with the response_id of a new record
            is ignored.
        replay_fraction: the share of the returned set that is replay, in [0, 1):
            ``n_replay = round(f / (1 − f) · n_new)``, capped by the replay available
            (0.25 → one replay record for every three new ones).
        seed: the draw is a deterministic function of the inputs and the seed.

    Returns:
        The selected new records (in their original order) followed by the replay
        records. Empty when ``records`` is empty: replay accompanies new feedback, it
        does not replace it.

    Raises:
        InvalidValue: ``replay_fraction`` outside [0, 1) or ``max_records`` < 1.
        DimensionMismatch: an embedding of the wrong width for the bank.
    """
    if not (isinstance(replay_fraction, (int, float)) and 0.0 <= replay_fraction < 1.0):
        raise InvalidValue(f"replay_fraction must be in [0, 1), got {replay_fraction!r}")
    if max_records is not None and (
        isinstance(max_records, bool)
        or not isinstance(max_records, (int, np.integer))
        or max_records < 1
    ):
        raise InvalidValue(f"max_records must be an integer >= 1 or None, got {max_records!r}")
    records = list(records)
    if not records:
        return []
    rng = np.random.default_rng([int(seed), 0x5EED])
    new = records
    if max_records is not None and len(records) > max_records:
        new = [records[i] for i in _sample(records, int(max_records), bank, rng)]
    if not replay or replay_fraction == 0.0:
        return list(new)
    seen = {r.response_id for r in new} | {r.response_id for r in records}
    pool = [r for r in replay if r.response_id not in seen]
    n_replay = min(len(pool), int(round(replay_fraction / (1.0 - replay_fraction) * len(new))))
    if n_replay == 0:
        return list(new)
    picked = _sample(pool, n_replay, bank, rng)
    return list(new) + [pool[i] for i in picked]


__all__ = ["assign_patterns", "select_training_set"]
