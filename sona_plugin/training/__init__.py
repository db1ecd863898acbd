"""Loop B: BaseLoRA training with torch + PEFT, training-set selection, promotion gate.

``objective`` (REINFORCE + KL loss), ``trainer`` (BaseLoRATrainer), ``gate``
(PromotionGate) need torch (and PEFT for the trainer); ``data`` needs only NumPy. Names
are imported lazily so that ``import sona_plugin.training.data`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "BaseLoRATrainer": "trainer",
    "TrainReport": "trainer",
    "reinforce_kl_loss": "objective",
    "response_logprobs": "objective",
    "mean_response_logprob": "objective",
    "make_batch": "objective",
    "PromotionGate": "gate",
    "GateResult": "gate",
    "ModelView": "gate",
    "ANCHOR_TEXTS": "gate",
    "select_training_set": "data",
    "assign_patterns": "data",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    mod = _NAMES.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))
