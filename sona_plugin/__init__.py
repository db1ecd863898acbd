"""sona_plugin: continual learning from user feedback for running LLM deployments.

The core (this package) has no dependency on vLLM or transformers; the integrations
live in ``sona_plugin.integrations``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base_lora import BaseLoRA
from .config import (
    BaseLoraConfig,
    EwcConfig,
    GateConfig,
    HostConfig,
    LoopsConfig,
    MicroLoraConfig,
    PatternConfig,
    RerankConfig,
    RoutingConfig,
    SonaConfig,
    TrajectoryConfig,
)
from .engine import SonaEngine
from .errors import (
    ConfigError,
    DimensionMismatch,
    DuplicateFeedback,
    InvalidValue,
    SonaError,
    StateError,
    UnknownTrajectory,
)
from .ewc import EwcPlusPlus
from .micro_lora import MicroLoRA
from .reasoning_bank import ReasoningBank
from .rerank import AnswerRanker
from .trajectory import TrajectoryBuffer, TrajectoryBuilder
from .types import LearnedPattern, LearningSignal, PatternType, Trajectory, TrajectoryStep

if TYPE_CHECKING:
    from pathlib import Path

    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .integrations.transformers import SonaPipeline

__version__ = "0.1.0"


def pipeline(
    task: str = "text-generation",
    model: str | Path | PreTrainedModel | None = None,
    tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
    sona_config: SonaConfig | dict | None = None,
    **kwargs,
) -> SonaPipeline:
    """A transformers text-generation pipeline that learns from feedback.

    See :func:`sona_plugin.integrations.transformers.pipeline` (imported on first call, so
    the core never imports transformers).
    """
    from .integrations.transformers import pipeline as _pipeline

    return _pipeline(task, model, tokenizer, sona_config, **kwargs)


__all__ = [
    "AnswerRanker",
    "BaseLoRA",
    "BaseLoraConfig",
    "ConfigError",
    "DimensionMismatch",
    "DuplicateFeedback",
    "EwcConfig",
    "EwcPlusPlus",
    "GateConfig",
    "HostConfig",
    "InvalidValue",
    "LearnedPattern",
    "LearningSignal",
    "LoopsConfig",
    "MicroLoRA",
    "MicroLoraConfig",
    "PatternConfig",
    "PatternType",
    "ReasoningBank",
    "RerankConfig",
    "RoutingConfig",
    "SonaConfig",
    "SonaEngine",
    "SonaError",
    "StateError",
    "Trajectory",
    "TrajectoryBuffer",
    "TrajectoryBuilder",
    "TrajectoryConfig",
    "TrajectoryStep",
    "UnknownTrajectory",
    "pipeline",
    "__version__",
]
