"""SonaConfig: every option the SONA documents name, with their defaults, validated.

The seeds disagree on some defaults (the Node README, the crate README and the API
reference each give their own). Where they disagree, or where ``shared/DESIGN.md``
measured that a seed default does not learn on our model, the choice and its reason are
in the field's help text and in ``docs/config.md``. A config file holds the same keys as
the constructor; the seeds' other spellings (``microLoraRank``, ``initial_lambda``,
``trajectory_buffer_size``, ...) are accepted by :meth:`SonaConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

_INF = math.inf


def _opt(
    default: Any,
    help: str,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    choices: tuple | None = None,
) -> Any:
    """A dataclass field with its documentation and allowed range in metadata."""
    return field(
        default=default,
        metadata={"help": help, "lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices},
    )


@dataclass
class SonaConfig:
    """Configuration of a :class:`~sona_plugin.engine.SonaEngine` and its loops."""

    # -- dimensions
    hidden_dim: int = _opt(
        256,
        "Width of the vectors the MicroLoRA adapts (the host model's "
        "final hidden size). Seeds: 256.",
        1,
        None,
    )
    embedding_dim: int | None = _opt(
        None,
        "Width of query embeddings used for patterns and "
        "routing; None means hidden_dim (Node README).",
        1,
        None,
    )
    num_heads: int = _opt(8, "Attention heads of the host model (API reference).", 1, None)
    num_layers: int = _opt(12, "Layers of the BaseLoRA container (API reference example).", 1, None)
    # -- LoRA
    micro_lora_rank: int = _opt(
        2,
        "MicroLoRA rank, 1 or 2. Crate README default 2 (Node: 1); DESIGN.md measured rank 2.",
        1,
        2,
    )
    base_lora_rank: int = _opt(
        8,
        "BaseLoRA rank, 4-16 recommended. Node README default 8; DESIGN.md measured rank 8.",
        1,
        256,
    )
    lora_alpha: float = _opt(
        1.0, "LoRA alpha; the MicroLoRA scale is s = alpha / rank.", 0.0, None, lo_open=True
    )
    lora_dropout: float = _opt(
        0.0, "Dropout on the BaseLoRA input during background training.", 0.0, 1.0
    )
    micro_lora_lr: float = _opt(
        3e-3,
        "MicroLoRA Adam step size. Seeds say 0.001 (Node) or 0.01 "
        "(crate); DESIGN.md measured 3e-3 stable with the trust "
        "region and norm cap.",
        0.0,
        1.0,
        lo_open=True,
    )
    base_lora_lr: float = _opt(
        5e-4,
        "BaseLoRA learning rate (AdamW). Seeds say 1e-4; DESIGN.md "
        "measured that 1e-4 barely moves the model and 5e-4 works.",
        0.0,
        1.0,
        lo_open=True,
    )
    gate_max_kl_per_answer: float = _opt(
        0.0,
        "Drift budget in nats of KL(pi || pi_base) per "
        "sampled answer on held-out prompts that a "
        "promoted version may spend (0: no KL check; "
        "the anchor-NLL and on-topic checks hold "
        "anyway). benchmarks/long_horizon.py measured "
        "0.28, 1.5, 2.9 nats after 50, 100, 150 "
        "feedbacks with no KL check, while both other "
        "checks passed.",
        0.0,
        None,
    )
    base_lora_kl_beta: float = _opt(
        0.2,
        "Weight of the KL(pi || pi_base) term of the BaseLoRA "
        "objective. Measured on SmolLM2 (docs/benchmarks.md): "
        "at 0.05 and 0.1 every candidate drifted off the "
        "question and the gate refused it; 0.2 passed and "
        "learned (digits 22 % -> 53 % after 200 feedbacks).",
        0.0,
        None,
    )
    # -- instant loop stabiliser (DESIGN.md: each alone fails; together stable over 200 feedbacks)
    micro_lora_init: str = _opt(
        "zero_a",
        "Which MicroLoRA factor starts at zero: 'zero_a' (A = 0, "
        "B small random: an update only moves inputs similar to "
        "the ones that got feedback) or 'zero_b' (PEFT's "
        "convention).",
        choices=("zero_a", "zero_b"),
    )
    micro_lora_norm_cap: float = _opt(
        0.3, "Bound on ||s*B*A||_F after every update.", 0.0, None, lo_open=True
    )
    micro_lora_trust_region: float = _opt(
        0.05,
        "Largest mean KL (LM head) or relative output "
        "change (no head) one feedback may cause on its "
        "own steps; the step is halved until it fits.",
        0.0,
        None,
        lo_open=True,
    )
    micro_lora_decay: float = _opt(
        0.01,
        "Per feedback, B shrinks by this fraction and A moves "
        "this fraction back toward its initial value.",
        0.0,
        1.0,
    )
    micro_lora_beta2: float = _opt(
        0.99, "Adam second-moment decay of the MicroLoRA optimiser.", 0.0, 1.0, lo_open=True
    )
    grad_clip: float = _opt(
        1.0, "Global L2 norm clip of one instant-loop gradient.", 0.0, None, lo_open=True
    )
    baseline_momentum: float = _opt(0.9, "Running reward baseline b <- m*b + (1-m)*R.", 0.0, 1.0)
    logit_top_k: int = _opt(
        64,
        "Top-k of the softmax kept per generated token to approximate "
        "p_t in the REINFORCE gradient W^T(e_y - p_t).",
        1,
        None,
    )
    # -- trajectories
    trajectory_capacity: int = _opt(
        10000,
        "Bound of the trajectory buffer; when full, new "
        "trajectories are dropped and counted. Seeds: 10000.",
        1,
        None,
    )
    max_trajectory_steps: int = _opt(
        50,
        "Steps kept per trajectory; later steps are counted and dropped. Crate README: 50.",
        1,
        None,
    )
    keep_attention_weights: bool = _opt(
        False,
        "Keep each step's attention weights (checked "
        "either way). No learning rule reads them and "
        "they are half a step's bytes, so by default "
        "they are dropped.",
    )
    max_pending_signals: int = _opt(
        1000,
        "Bound of open (begun, not ended) trajectories; the "
        "oldest is evicted beyond it. API reference: 1000.",
        1,
        None,
    )
    quality_threshold: float = _opt(
        0.5,
        "Quality counted as neutral before a running baseline "
        "exists: the first feedback's advantage is quality - "
        "this. Node README: 0.5.",
        0.0,
        1.0,
    )
    edge_update_scale: float = _opt(
        0.01,
        "Router mode: rate of the per-route quality moving average. API reference: 0.01.",
        0.0,
        1.0,
        lo_open=True,
    )
    route_lr: float = _opt(
        0.5,
        "Router mode: step size of the route keys' policy-gradient update.",
        0.0,
        None,
        lo_open=True,
    )
    route_key_norm_cap: float = _opt(
        5.0, "Router mode: bound on each route key's norm.", 0.0, None, lo_open=True
    )
    route_temperature: float = _opt(
        0.2,
        "Router mode: softmax temperature of the route policy "
        "over unit-norm embeddings (0.2: 95 % best-route picks "
        "after 600 rounds in examples/router.py; 1.0: 75 %).",
        0.0,
        None,
        lo_open=True,
    )
    # -- EWC++
    ewc_lambda: float = _opt(
        1000.0,
        "Initial EWC++ penalty weight. Node README and API reference: "
        "1000 (crate README's 0.4 is on another scale).",
        0.0,
        None,
    )
    ewc_min_lambda: float = _opt(100.0, "Lower bound of the adaptive lambda.", 0.0, None)
    ewc_max_lambda: float = _opt(10000.0, "Upper bound of the adaptive lambda.", 0.0, None)
    ewc_gamma: float = _opt(
        0.95, "Online Fisher decay: F <- gamma*F + (1-gamma)*g^2. Crate README: 0.95.", 0.0, 1.0
    )
    ewc_fisher_samples: int = _opt(
        100, "Gradient samples used to estimate the Fisher per cycle.", 1, None
    )
    ewc_online: bool = _opt(True, "Online (EWC++) Fisher rather than one estimate per task.")
    ewc_max_tasks: int = _opt(
        10, "Tasks kept in the multi-task memory (oldest merged away).", 1, None
    )
    ewc_boundary_threshold: float = _opt(
        2.0,
        "z-score of the gradient statistics above which a task boundary is declared.",
        0.0,
        None,
        lo_open=True,
    )
    # -- ReasoningBank
    pattern_clusters: int = _opt(
        50,
        "k of k-means++ pattern extraction. Node README and API reference: 50 (crate README: 32).",
        1,
        None,
    )
    pattern_quality_threshold: float = _opt(
        0.7,
        "Patterns at or above this average quality are strong: dream and replay sources.",
        0.0,
        1.0,
    )
    pattern_max_iterations: int = _opt(100, "k-means iteration limit.", 1, None)
    pattern_convergence_threshold: float = _opt(
        1e-3, "k-means stops when no centroid moves more than this (relative).", 0.0, None
    )
    pattern_min_cluster_size: int = _opt(
        1,
        "Clusters smaller than this are not kept. API "
        "reference says 5; that silently discards learning "
        "from small batches, so we keep every cluster.",
        1,
        None,
    )
    pattern_merge_similarity: float = _opt(
        0.98, "Cosine above which two patterns are merged.", 0.0, 1.0
    )
    pattern_decay: float = _opt(0.95, "Weight multiplier per deep cycle.", 0.0, 1.0)
    pattern_prune_quality: float = _opt(
        0.1,
        "Patterns below this quality and with fewer accesses "
        "than pattern_prune_min_accesses are pruned.",
        0.0,
        1.0,
    )
    pattern_prune_min_accesses: int = _opt(1, "See pattern_prune_quality.", 0, None)
    max_patterns: int = _opt(10000, "Bound of the bank; the weakest patterns go first.", 1, None)
    # -- loops and schedule
    background_interval_ms: int = _opt(
        3_600_000,
        "Background cycle at most this often when trajectories are pending. Node README: 1 h.",
        0,
        None,
    )
    background_trigger_count: int = _opt(
        100,
        "Background cycle as soon as this many trajectories "
        "are pending (the seeds' min_trajectories, used as a "
        "trigger, never as a minimum).",
        1,
        None,
    )
    consolidation_interval: int = _opt(
        1000, "Deep cycle after this many trajectories. Crate README: 1000.", 1, None
    )
    dreams_per_cycle: int = _opt(50, "Dreams generated per deep cycle. API reference: 50.", 0, None)
    consolidation_threshold: float = _opt(
        0.7, "Pattern quality at which EWC++ consolidates a task. API reference: 0.7.", 0.0, 1.0
    )
    phi_threshold: float = _opt(
        0.3,
        "Dream-score threshold (the seeds' Phi has no tractable "
        "meaning for an adapter; the dream score replaces it).",
        0.0,
        1.0,
    )
    max_cycle_duration_s: float = _opt(
        600.0, "Time budget of one deep cycle.", 0.0, None, lo_open=True
    )
    dream_path_length: int = _opt(15, "Dream random-walk length. API reference: 15.", 1, None)
    dream_creative_jump_prob: float = _opt(0.3, "Dream creative jump probability.", 0.0, 1.0)
    dream_restart_prob: float = _opt(0.1, "Dream random-walk restart probability.", 0.0, 1.0)
    dream_novelty_weight: float = _opt(0.3, "Weight of novelty in the dream score.", 0.0, 1.0)
    dream_coherence_weight: float = _opt(0.4, "Weight of coherence in the dream score.", 0.0, 1.0)
    dream_utility_weight: float = _opt(
        0.3, "Weight of predicted utility in the dream score.", 0.0, 1.0
    )
    # -- misc
    enable_simd: bool = _opt(
        True,
        "Use the SIMD paths of the native kernels; False pins them "
        "to their scalar path (process-wide).",
    )
    database_url: str | None = _opt(
        None,
        "Trajectory store URL (sqlite:///path or "
        "postgresql://...); None means the embedded default.",
    )
    seed: int = _opt(0, "Seed of the MicroLoRA initialisation and k-means++.", 0, None)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check(f, getattr(self, f.name))
        if self.ewc_min_lambda > self.ewc_max_lambda:
            raise ConfigError(
                f"ewc_min_lambda must be <= ewc_max_lambda, got "
                f"{self.ewc_min_lambda} > {self.ewc_max_lambda}"
            )
        if not self.ewc_min_lambda <= self.ewc_lambda <= self.ewc_max_lambda:
            raise ConfigError(
                f"ewc_lambda must be in [ewc_min_lambda, ewc_max_lambda] = "
                f"[{self.ewc_min_lambda}, {self.ewc_max_lambda}], got {self.ewc_lambda}"
            )

    @property
    def embed_dim(self) -> int:
        """The query-embedding width in force (``embedding_dim`` or ``hidden_dim``)."""
        return self.embedding_dim if self.embedding_dim is not None else self.hidden_dim

    @property
    def micro_lora_scale(self) -> float:
        """s = alpha / rank."""
        return self.lora_alpha / self.micro_lora_rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SonaConfig:
        """Build from a dict of constructor keys or the seeds' spellings; unknown keys are errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            name = _ALIASES.get(key) or _ALIASES.get(_snake(key)) or _snake(key)
            if name not in names:
                raise ConfigError(f"unknown config key {key!r}")
            if name in kwargs:
                raise ConfigError(f"config key {key!r} given twice (as {name!r})")
            if name == "background_interval_ms" and key in ("extraction_interval",):
                value = int(value * 1000)
            kwargs[name] = value
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> SonaConfig:
        """Build from a JSON string or the path of a JSON file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            try:
                text = Path(text_or_path).read_text()
            except OSError as e:
                raise ConfigError(f"cannot read config file {text_or_path!s}: {e}") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from e
        return cls.from_dict(data)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> its documentation."""
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}


_ALIASES = {
    "trajectory_buffer_size": "trajectory_capacity",
    "micro_lr": "micro_lora_lr",
    "base_lr": "base_lora_lr",
    "initial_lambda": "ewc_lambda",
    "min_lambda": "ewc_min_lambda",
    "max_lambda": "ewc_max_lambda",
    "fisher_ema_decay": "ewc_gamma",
    "max_tasks": "ewc_max_tasks",
    "boundary_threshold": "ewc_boundary_threshold",
    "k_clusters": "pattern_clusters",
    "max_iterations": "pattern_max_iterations",
    "convergence_threshold": "pattern_convergence_threshold",
    "min_cluster_size": "pattern_min_cluster_size",
    "min_trajectories": "background_trigger_count",
    "extraction_interval": "background_interval_ms",
    "path_length": "dream_path_length",
    "creative_jump_prob": "dream_creative_jump_prob",
    "restart_prob": "dream_restart_prob",
    "novelty_weight": "dream_novelty_weight",
    "coherence_weight": "dream_coherence_weight",
    "utility_weight": "dream_utility_weight",
}


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def _check(f: dataclasses.Field, value: Any) -> None:
    name, meta = f.name, f.metadata
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    optional = "None" in typ
    if value is None:
        if optional:
            return
        raise ConfigError(f"{name} must not be None")
    base = typ.replace("| None", "").strip()
    if base == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be a bool, got {value!r}")
        return
    if base == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{name} must be one of {list(meta['choices'])}, got {value!r}")
        return
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                raise ConfigError(f"{name} must be an integer, got float {value!r}")
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    elif base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be finite, got {value!r}")
    lo, hi, lo_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open")
    if lo is not None and (value <= lo if lo_open else value < lo):
        rng = f"({lo}, {hi if hi is not None else 'inf'}" + (")" if hi is None else "]")
        if not lo_open:
            rng = "[" + rng[1:]
        op = ">" if lo_open else ">="
        raise ConfigError(f"{name} must be {op} {lo} (allowed range {rng}), got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(
            f"{name} must be <= {hi} (allowed range "
            f"{'(' if lo_open else '['}{lo}, {hi}]), got {value!r}"
        )
