"""Loop C, the deep loop: consolidation of memory.

A cycle merges near-duplicate patterns, decays every pattern's weight, prunes the weak
and unused, and folds the EWC++ task memories into one (``consolidate_all_tasks``) when
the bank's strong patterns say the current behaviour is worth keeping. Dreams (replay
data answered by the current model from strong patterns' prompts, kept when their score
passes ``phi_threshold``) need a model; an integration supplies them through
``dream_fn`` and they are rehearsed by its trainer. The seeds' Phi (IIT) has no
tractable meaning for an adapter: the dream score is our gate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..config import SonaConfig
from ..ewc import EwcPlusPlus
from ..reasoning_bank import ReasoningBank


@dataclass
class DeepResult:
    """What one deep cycle did."""

    patterns_merged: int = 0
    patterns_pruned: int = 0
    patterns_total: int = 0
    tasks_consolidated: bool = False
    dreams_generated: int = 0
    dreams_kept: int = 0
    skipped: list[str] = field(default_factory=list)
    elapsed_ms: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class DeepLoop:
    def __init__(
        self,
        config: SonaConfig,
        bank: ReasoningBank,
        ewc: EwcPlusPlus,
        dream_fn: Callable[[ReasoningBank, int], tuple[int, int]] | None = None,
    ):
        self.config, self.bank, self.ewc, self.dream_fn = config, bank, ewc, dream_fn
        self.cycles = 0

    def run_cycle(self) -> DeepResult:
        t0 = time.perf_counter()
        res = DeepResult()
        res.patterns_merged = self.bank.merge_similar()
        self.bank.decay()
        res.patterns_pruned = self.bank.prune()
        res.patterns_total = self.bank.pattern_count
        strong = self.bank.strong_patterns()
        if self.ewc.task_count > 1 and strong:
            self.ewc.consolidate_all_tasks()
            res.tasks_consolidated = True
        elif self.ewc.task_count <= 1:
            res.skipped.append("EWC++ consolidation: fewer than two remembered tasks")
        else:
            res.skipped.append("EWC++ consolidation: no strong patterns")
        if self.dream_fn is not None and self.config.dreams_per_cycle > 0:
            res.dreams_generated, res.dreams_kept = self.dream_fn(
                self.bank, self.config.dreams_per_cycle
            )
        else:
            res.skipped.append("dreams: no model attached")
        self.cycles += 1
        res.elapsed_ms = (time.perf_counter() - t0) * 1e3
        return res
