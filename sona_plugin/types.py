"""The records SONA learns from: trajectories, learning signals and learned patterns."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InvalidValue


def check_unit(name: str, value: float, lo: float = 0.0, hi: float = 1.0) -> float:
    """Return ``value`` as a float if finite and within [lo, hi], else raise InvalidValue."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidValue(f"{name} must be a number in [{lo}, {hi}], got {value!r}") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise InvalidValue(f"{name} must be a finite number in [{lo}, {hi}], got {value!r}")
    return v


class PatternType(str, enum.Enum):
    """Kind of a learned pattern (the seeds' classification)."""

    GENERAL = "General"
    REASONING = "Reasoning"
    FACTUAL = "Factual"
    CREATIVE = "Creative"
    CODE_GEN = "CodeGen"
    CONVERSATIONAL = "Conversational"


@dataclass(slots=True)
class TrajectoryStep:
    """One step of a trajectory.

    LLM style: ``activations`` is the final hidden state h_t, ``action`` the chosen token,
    ``topk_ids``/``topk_logprobs`` the head's top-k at that step. Router style:
    ``activations`` is the query embedding, ``action`` the chosen route (node id),
    ``reward`` the route's score.
    """

    activations: np.ndarray
    attention_weights: np.ndarray
    reward: float
    action: int | None = None
    latency_us: int = 0
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    timestamp: float = field(default_factory=time.time)


@dataclass(slots=True)
class Trajectory:
    """A query's path through the model (or router), and the quality it earned."""

    id: int
    query_embedding: np.ndarray
    steps: list[TrajectoryStep] = field(default_factory=list)
    final_quality: float | None = None
    latency_us: int = 0
    route: str | None = None
    context_ids: list[str] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    steps_dropped: int = 0

    @property
    def ended(self) -> bool:
        return self.final_quality is not None


@dataclass
class LearningSignal:
    """What one piece of feedback teaches.

    ``quality`` in [0, 1] is the reward; the instant loop turns it into an advantage
    ``quality - baseline``. ``trajectory_id`` names the trajectory it judges (None: the
    most recently ended one). ``gradient`` is an explicit upstream gradient on the
    adapted output at ``query_embedding`` (``with_gradient``).
    """

    quality: float
    query_embedding: np.ndarray | None = None
    gradient: np.ndarray | None = None
    trajectory_id: int | None = None
    latency_ms: float = 0.0
    timestamp: float = field(default_factory=time.time)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.quality = check_unit("quality", self.quality)
        if not math.isfinite(float(self.latency_ms)) or self.latency_ms < 0:
            raise InvalidValue(f"latency_ms must be a finite number >= 0, got {self.latency_ms!r}")

    @classmethod
    def from_feedback(
        cls,
        liked: bool,
        latency_ms: float = 0.0,
        quality: float | None = None,
        trajectory_id: int | None = None,
    ) -> LearningSignal:
        """A user's thumbs up/down; ``quality`` defaults to 1.0 if liked else 0.0."""
        if quality is None:
            quality = 1.0 if liked else 0.0
        return cls(
            quality=quality,
            latency_ms=latency_ms,
            trajectory_id=trajectory_id,
            metadata={"liked": bool(liked)},
        )

    @classmethod
    def positive(
        cls, latency_ms: float = 0.0, quality: float = 0.95, trajectory_id: int | None = None
    ) -> LearningSignal:
        return cls.from_feedback(True, latency_ms, quality, trajectory_id)

    @classmethod
    def negative(
        cls, latency_ms: float = 0.0, quality: float = 0.2, trajectory_id: int | None = None
    ) -> LearningSignal:
        return cls.from_feedback(False, latency_ms, quality, trajectory_id)

    @classmethod
    def from_trajectory(cls, trajectory: Trajectory) -> LearningSignal:
        """The signal an ended trajectory carries: its final quality."""
        if trajectory.final_quality is None:
            raise InvalidValue(f"trajectory {trajectory.id} has not ended; it has no quality yet")
        return cls(
            quality=trajectory.final_quality,
            query_embedding=trajectory.query_embedding,
            trajectory_id=trajectory.id,
            latency_ms=trajectory.latency_us / 1000.0,
        )

    @classmethod
    def with_gradient(cls, embedding: Any, gradient: Any, quality: float) -> LearningSignal:
        """A signal with an explicit gradient d(objective)/d(output) at ``embedding``."""
        e = np.ascontiguousarray(embedding, dtype=np.float32)
        g = np.ascontiguousarray(gradient, dtype=np.float32)
        if e.ndim != 1 or e.shape != g.shape:
            raise InvalidValue(
                f"embedding and gradient must be 1-D of equal length, got shapes "
                f"{e.shape} and {g.shape}"
            )
        for name, v in (("embedding", e), ("gradient", g)):
            if not np.isfinite(v).all():
                raise InvalidValue(
                    f"{name} contains a non-finite value at index {int(np.argmin(np.isfinite(v)))}"
                )
        return cls(quality=quality, query_embedding=e, gradient=g)


@dataclass
class LearnedPattern:
    """A cluster of similar trajectories: what the ReasoningBank remembers."""

    id: int
    centroid: np.ndarray
    cluster_size: int
    total_weight: float
    avg_quality: float
    created_at: float = field(default_factory=time.time)
    last_accessed: float = field(default_factory=time.time)
    access_count: int = 0
    pattern_type: PatternType = PatternType.GENERAL
    quality_sq_sum: float = 0.0
    route_stats: dict[str, list[float]] = field(default_factory=dict)

    @property
    def quality_std(self) -> float:
        """Standard deviation of the member qualities (weighted)."""
        if self.total_weight <= 0:
            return 0.0
        var = self.quality_sq_sum / self.total_weight - self.avg_quality**2
        return math.sqrt(max(var, 0.0))

    def merge(self, other: LearnedPattern) -> LearnedPattern:
        """A new pattern: weight-averaged centroid and quality, summed sizes and counts."""
        w1, w2 = self.total_weight, other.total_weight
        tot = w1 + w2
        a = w1 / tot if tot > 0 else 0.5
        routes = {k: list(v) for k, v in self.route_stats.items()}
        for k, (n, mean) in other.route_stats.items():
            n0, m0 = routes.get(k, [0.0, 0.0])
            routes[k] = [n0 + n, (n0 * m0 + n * mean) / (n0 + n) if n0 + n else 0.0]
        return LearnedPattern(
            id=min(self.id, other.id),
            centroid=(a * self.centroid + (1 - a) * other.centroid).astype(np.float32),
            cluster_size=self.cluster_size + other.cluster_size,
            total_weight=tot,
            avg_quality=a * self.avg_quality + (1 - a) * other.avg_quality,
            created_at=min(self.created_at, other.created_at),
            last_accessed=max(self.last_accessed, other.last_accessed),
            access_count=self.access_count + other.access_count,
            pattern_type=self.pattern_type,
            quality_sq_sum=self.quality_sq_sum + other.quality_sq_sum,
            route_stats=routes,
        )

    def decay(self, factor: float) -> None:
        """Scale the pattern's weight by ``factor`` in [0, 1] (its evidence ages)."""
        factor = check_unit("factor", factor)
        self.total_weight *= factor
        self.quality_sq_sum *= factor

    def should_prune(self, min_quality: float, min_accesses: int) -> bool:
        """Low quality and rarely used, or with no weight left."""
        return self.total_weight <= 1e-6 or (
            self.avg_quality < min_quality and self.access_count < min_accesses
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view (centroid as a list)."""
        return {
            "id": self.id,
            "centroid": self.centroid.tolist(),
            "cluster_size": self.cluster_size,
            "total_weight": self.total_weight,
            "avg_quality": self.avg_quality,
            "quality_std": self.quality_std,
            "created_at": self.created_at,
            "last_accessed": self.last_accessed,
            "access_count": self.access_count,
            "pattern_type": self.pattern_type.value,
            "route_stats": self.route_stats,
        }
