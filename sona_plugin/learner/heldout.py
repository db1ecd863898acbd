"""Which feedback the promotion gate holds out: whole prompts, never single records.

A record goes to the held-out side or the training side with its *prompt*: a prompt
whose embedding has cosine ≥ ``same_prompt`` with an earlier prompt group's first prompt
joins that group (near-duplicates, rephrasings); a new group is held out when
``crc32(prompt text) % every == 0`` (about one prompt in ``every``, the same on every
replica and after every restart). So once the prompt stream repeats, a held-out prompt
is still never trained on, and the gate measures the model on prompts it was not taught.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from ..store.base import FeedbackRecord


class PromptSplit:
    """Assigns records to the held-out or the training side by prompt group.

    Args:
        every: about one prompt group in ``every`` is held out.
        same_prompt: cosine at or above which two prompts are one group.
        max_groups: group representatives kept; past that, new prompts are split by
            their text's hash alone (their near-duplicates may land on either side).
    """

    def __init__(self, every: int = 5, same_prompt: float = 0.9, max_groups: int = 20_000):
        self.every = int(every)
        self.same_prompt = float(same_prompt)
        self.max_groups = int(max_groups)
        self._reps = np.zeros((0, 0), np.float32)  # unit prompt embeddings, one per group
        self._held = np.zeros(0, bool)  # the group's side
        self.groups = 0
        self.sides: dict[int, bool] = {}  # record id -> held out

    def assign(self, records: Sequence[FeedbackRecord]) -> list[bool]:
        """The side of each record (True: held out), assigning new ones in order."""
        out = []
        for r in records:
            if r.id is not None and r.id in self.sides:
                out.append(self.sides[r.id])
                continue
            side = self._side(r)
            if r.id is not None:
                self.sides[r.id] = side
            out.append(side)
        return out

    def _side(self, r: FeedbackRecord) -> bool:
        e = np.asarray(r.embedding, np.float32).ravel()
        norm = float(np.linalg.norm(e))
        n = self.groups
        if norm > 0 and n and self._reps.shape[1] == e.shape[0]:
            sims = self._reps[:n] @ (e / norm)
            j = int(np.argmax(sims))
            if sims[j] >= self.same_prompt:
                return bool(self._held[j])
        held = zlib.crc32(r.prompt.encode("utf-8", "replace")) % self.every == 0
        if norm > 0 and n < self.max_groups and (n == 0 or self._reps.shape[1] == e.shape[0]):
            if n == self._reps.shape[0]:  # grow by doubling
                cap = max(64, 2 * n)
                reps = np.zeros((cap, e.shape[0]), np.float32)
                if n:
                    reps[:n] = self._reps[:n]
                held_ = np.zeros(cap, bool)
                held_[:n] = self._held[:n]
                self._reps, self._held = reps, held_
            self._reps[n] = e / norm
            self._held[n] = held
            self.groups = n + 1
        return held

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        ids = np.fromiter(self.sides.keys(), np.int64, len(self.sides))
        sides = np.fromiter(self.sides.values(), bool, len(self.sides))
        n = self.groups
        return (
            {
                "split.reps": self._reps[:n],
                "split.held": self._held[:n].astype(np.uint8),
                "split.ids": ids,
                "split.sides": sides.astype(np.uint8),
            },
            {"every": self.every, "same_prompt": self.same_prompt, "max_groups": self.max_groups},
        )

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict) -> PromptSplit:
        s = cls(meta["every"], meta["same_prompt"], meta["max_groups"])
        s._reps = np.array(arrays["split.reps"], np.float32)
        s._held = np.asarray(arrays["split.held"]).astype(bool)
        s.groups = s._reps.shape[0]
        s.sides = {int(i): bool(v) for i, v in zip(arrays["split.ids"], arrays["split.sides"])}
        return s
