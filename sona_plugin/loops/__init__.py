"""The three learning loops and their coordinator."""

from .background import BackgroundLoop, BackgroundResult
from .coordinator import LoopCoordinator
from .deep import DeepLoop, DeepResult
from .instant import InstantLoop, InstantReport

__all__ = [
    "BackgroundLoop",
    "BackgroundResult",
    "DeepLoop",
    "DeepResult",
    "InstantLoop",
    "InstantReport",
    "LoopCoordinator",
]
