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
served version passed the same checks alone when it was published). Its norm bound
(``norm_cap``, ``||s·B·A||_F`` after every update) then becomes the norm that passed, so
that the instant loop cannot regrow it past what was measured inside the budget; each
passing check lets the bound grow by a quarter again, up to the config's (``next_cap``). The BaseLoRA gets the
budget first, the MicroLoRA what is left: an instant lesson that would push answers
off the question is given up, in proportion, rather than served. Between cycles the
MicroLoRA can still drift for up to ``background_trigger_count`` feedbacks; the check bounds it at
each cycle and every ``gate_micro_check_every`` feedbacks, not at each feedback.
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


CAP_GROWTH = 1.25
"""A passing check lets the MicroLoRA's norm bound grow by this factor (up to the config's)."""
CAP_FLOOR = 1.0 / 16.0
"""The bound never falls below this fraction of the config's: the instant loop keeps
learning a little, and the next check measures it again."""


def next_cap(cap: float | None, norm: float, scale: float, config_cap: float) -> float:
    """The MicroLoRA's norm bound ``||s·B·A||_F`` after a check: the norm that passed when
    the check scaled it back (``scale`` < 1), else ``CAP_GROWTH`` × the bound, never above
    ``config_cap`` nor below ``CAP_FLOOR`` × it.

    Why a bound and not only the scaling: the instant loop's Adam steps regrow a scaled
    MicroLoRA to its bound within a few feedbacks (about 0.05 of ``||s·B·A||`` per step
    against a bound of 0.3), so between checks it sits at its bound, and the bound is
    what its drift is. Measured: scaling alone (×½ and ×¼ at checks 10 and 40 feedbacks
    before a cycle) left the on-topic score before that cycle at 0.85 × base, unchanged.
    """
    current = config_cap if cap is None else cap
    bound = scale * norm if scale < 1.0 else current * CAP_GROWTH
    return float(min(config_cap, max(bound, CAP_FLOOR * config_cap)))
