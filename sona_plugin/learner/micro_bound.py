"""The drift budget holds for what users get: the served BaseLoRA *and* the MicroLoRA.

The gate measures a BaseLoRA candidate alone, but every request is answered by the served
version with the instant loop's MicroLoRA on top (``h + s·B·A·h`` before the LM head).
Between cycles the MicroLoRA moves with every feedback, bounded only per update (its trust
region) and in norm (``norm_cap``). Measured on SmolLM2 with best of 8 on the `warm`
taste (docs/benchmarks.md): after 200 feedbacks the served answers were 0.85 × the base
model's on-topic score, 0.94 × with the MicroLoRA zeroed; nothing bounded that drift.

The rule, after every cycle that trained (published or refused): the gate's drift checks
(anchor NLL, on-topic answers, and the KL budget when one is set) run on the served
weights with the MicroLoRA as it serves now, against the base model. If they fail, the
MicroLoRA's delta is scaled by ½, then ¼; if that still fails, it is reset to zero (the
served version passed the same checks alone when it was published). The BaseLoRA gets the
budget first, the MicroLoRA what is left: an instant lesson that would push answers
off the question is given up, in proportion, rather than served. Between cycles the
MicroLoRA can still drift for up to ``background_trigger_count`` feedbacks; the check bounds it at
each cycle, not at each feedback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..training import ModelView

MICRO_SCALES = (1.0, 0.5, 0.25)
"""Scales of the MicroLoRA's delta tried in turn; none passing resets it to zero."""


def micro_view(
    peft_model: Any, adapter: str, A: np.ndarray, B: np.ndarray, scale: float
) -> ModelView:
    """A :class:`~sona_plugin.training.ModelView` of ``peft_model`` with ``adapter``
    active and the MicroLoRA ``h + scale·B·A·h`` applied to the LM head's input, as the
    hosts' hooks apply it."""
    from ..kernels import apply_micro_lora_torch
    from ..training import ModelView

    head = peft_model.get_output_embeddings()

    def hook(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (apply_micro_lora_torch(args[0], A, B, scale), *args[1:])

    @contextmanager
    def ctx() -> Iterator[None]:
        prev = peft_model.active_adapter
        peft_model.set_adapter(adapter)
        handle = head.register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()
            peft_model.set_adapter(prev)

    return ModelView(peft_model, ctx)


def head_width(peft_model: Any) -> int | None:
    """The LM head's input width (None when the model has no linear output head)."""
    head = peft_model.get_output_embeddings()
    return getattr(head, "in_features", None)
