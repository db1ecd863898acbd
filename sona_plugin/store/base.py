"""The trajectory store: durable (prompt, response, reward, embedding) feedback records."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class FeedbackRecord:
    """One piece of feedback on one generated response.

    ``prompt`` is the text the model was conditioned on (chat template applied) and
    ``prompt_ids``/``response_ids`` its exact tokens, so a trainer can score the response
    without re-tokenising. ``reward`` is in [-1, 1]; ``embedding`` is the prompt's
    sentence embedding (float32). ``adapter_version`` is the BaseLoRA version that
    answered (None: the base model). ``quarantined_at`` (unix time, None: live) and
    ``quarantine_reason`` are set by ``TrajectoryStore.quarantine``: such a record is kept
    but never trained on again.
    """

    response_id: str
    prompt: str
    prompt_ids: list[int]
    response_ids: list[int]
    response_text: str
    reward: float
    embedding: np.ndarray
    adapter_version: int | None = None
    created_at: float = field(default_factory=time.time)
    task: str | None = None
    id: int | None = None
    quarantined_at: float | None = None
    quarantine_reason: str | None = None


@runtime_checkable
class TrajectoryStore(Protocol):
    """Where feedback lives. ``add`` returns only once the record is durable."""

    def add(self, record: FeedbackRecord) -> int:
        """Store a record; raises InvalidValue if its response_id is already stored."""

    def get(self, response_id: str) -> FeedbackRecord | None: ...

    def has(self, response_id: str) -> bool: ...

    def records(self, since_id: int = 0, limit: int | None = None) -> list[FeedbackRecord]:
        """Live (not quarantined) records with row id > since_id, oldest first."""

    def records_with_ids(self, ids: Sequence[int]) -> list[FeedbackRecord]:
        """The live records among row ids ``ids``, oldest first (unknown, deleted and
        quarantined ids are left out): what a learner reads when it knows which records it
        wants, so that a cycle's reads do not grow with the store."""

    def count(self, since_id: int = 0) -> int:
        """How many live records have a row id above ``since_id``; cheap enough to poll."""

    def quarantine(self, response_id: str, reason: str = "") -> FeedbackRecord:
        """Keep the record but never train on it again; UnknownRecord if none."""

    def delete(self, response_id: str) -> None:
        """Remove the record for good; UnknownRecord if none."""

    def list_records(
        self, since_id: int = 0, limit: int = 100, include_quarantined: bool = True
    ) -> list[dict]:
        """An admin page of records as dicts, texts cut short, no embeddings or token ids."""

    def prune(self, older_than: float) -> int:
        """Delete records created before ``older_than`` (unix s) in short batches; how many."""

    def close(self) -> None: ...
