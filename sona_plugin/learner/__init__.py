"""Loop B for a host model, host-agnostic: one cycle (select, train, gate, publish, swap),
its saved state, preference-shift detection, dreams, and what drift costs.

The integrations (transformers, vLLM) implement :class:`Host`; nothing here imports them.
"""

from .cycle import Learner
from .drift import answer_kl, efficiency, kl_floor
from .host import Host
from .shift import LeaningShiftDetector, ShiftDetector

__all__ = [
    "Host",
    "LeaningShiftDetector",
    "Learner",
    "ShiftDetector",
    "answer_kl",
    "efficiency",
    "kl_floor",
]
