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
        # the side of every record assigned, by id: two sorted arrays (9 bytes a record;
        # a dict took about 100), grown by doubling
        self._ids = np.zeros(0, np.int64)
        self._sides = np.zeros(0, bool)
        self.assigned = 0

    def assign(self, records: Sequence[FeedbackRecord]) -> list[bool]:
        """The side of each record (True: held out), assigning new ones in order."""
        out = []
        for r in records:
            if r.id is not None:
                known = self.side_of(r.id)
                if known is not None:
                    out.append(known)
                    continue
            side = self._side(r)
            if r.id is not None:
                self._remember(int(r.id), side)
            out.append(side)
        return out

    def side_of(self, record_id: int) -> bool | None:
        """The side ``record_id`` was assigned (True: held out); None if never assigned."""
        n = self.assigned
        i = int(np.searchsorted(self._ids[:n], record_id))
        return bool(self._sides[i]) if i < n and self._ids[i] == record_id else None

    def ids(self, held: bool, upto: int | None = None) -> np.ndarray:
        """The ids assigned to one side, ascending (at most ``upto``, when given)."""
        n = self.assigned
        ids = self._ids[:n][self._sides[:n] == held]
        return ids if upto is None else ids[ids <= upto]

    def _remember(self, record_id: int, side: bool) -> None:
        n = self.assigned
        if n == self._ids.shape[0]:
            cap = max(1024, 2 * n)
            self._ids = np.resize(self._ids, cap)
            self._sides = np.resize(self._sides, cap)
        i = (
            n
            if n == 0 or record_id > self._ids[n - 1]
            else int(np.searchsorted(self._ids[:n], record_id))
        )
        if i < n:  # an id older than the newest (records arrive in id order, nearly always)
            self._ids[i + 1 : n + 1] = self._ids[i:n].copy()
            self._sides[i + 1 : n + 1] = self._sides[i:n].copy()
        self._ids[i] = record_id
        self._sides[i] = side
        self.assigned = n + 1

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
        n, m = self.groups, self.assigned
        return (
            {
                "split.reps": self._reps[:n],
                "split.held": self._held[:n].astype(np.uint8),
                "split.ids": self._ids[:m].copy(),
                "split.sides": self._sides[:m].astype(np.uint8),
            },
            {"every": self.every, "same_prompt": self.same_prompt, "max_groups": self.max_groups},
        )

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict) -> PromptSplit:
        s = cls(meta["every"], meta["same_prompt"], meta["max_groups"])
        s._reps = np.array(arrays["split.reps"], np.float32)
        s._held = np.asarray(arrays["split.held"]).astype(bool)
        s.groups = s._reps.shape[0]
        ids = np.asarray(arrays["split.ids"], np.int64)
        order = np.argsort(ids, kind="stable")  # older saves kept them in assignment order
        s._ids = ids[order]
        s._sides = np.asarray(arrays["split.sides"]).astype(bool)[order]
        s.assigned = int(ids.shape[0])
        return s
