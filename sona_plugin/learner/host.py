"""What loop B needs from a host model (a transformers pipeline, a vLLM engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Host(Protocol):
    """The serving side that a :class:`~sona_plugin.learner.Learner` trains for.

    Attributes:
        engine: the host's SonaEngine (its ``config`` and ``reasoning_bank``).
        store: the durable feedback store.
        registry: the AdapterRegistry the learner publishes into.
        tokenizer: the served model's tokenizer.
        state_dir: where the learner keeps its state between versions.
        model_source: path of the served base model (the trainer loads a private copy).
        lora_targets: module names the BaseLoRA trains, or None for the trainer's default.
    """

    engine: Any
    store: Any
    registry: Any
    tokenizer: Any
    state_dir: Path
    model_source: Path | None
    lora_targets: list[str] | None

    @property
    def adapter_version(self) -> int | None:
        """The BaseLoRA version served now (None: the base model)."""

    def serve_version(self, version: int, micro_decay: float = 1.0) -> None:
        """Serve published ``version`` from the next request on, then make the registry's
        CURRENT name it (the learner publishes with ``make_current=False``: CURRENT only
        ever names a version an engine served). Raises ``SwapRefused`` (nothing changed)
        when the engine does not serve its weights. ``micro_decay`` < 1 shrinks the
        MicroLoRA (a new version has absorbed the instant lesson)."""

    def shrink_micro(self, factor: float) -> None:
        """Scale the served MicroLoRA's delta (``s·B·A``) by ``factor`` in [0, 1] (every
        replica alike); ``engine.micro_lora`` holds the served MicroLoRA's weights."""

    def set_micro_norm_cap(self, cap: float, as_of: int = 0) -> None:
        """Bound the served MicroLoRA's ``||s·B·A||_F`` from its next update on (every
        replica alike; ``as_of``: the last record the drift check that chose it covered, so
        a replica restoring an older state leaves a newer bound in place)."""

    def sample_answers(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Answers sampled from the served model (ids, stop token included); raises
        NotImplementedError where the host cannot generate for the learner."""

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit sentence embeddings [n, d] (all-MiniLM-L6-v2 by default)."""
