"""SonaConfig: every option the SONA documents name, by component, with defaults, validated.

One dataclass per component (PEFT's one config per method, TRL's one config per trainer):
:class:`MicroLoraConfig` (with the instant loop's stabiliser), :class:`TrajectoryConfig`,
:class:`EwcConfig`, :class:`PatternConfig` (the ReasoningBank), :class:`RoutingConfig`,
:class:`BaseLoraConfig` (loop B's trainer), :class:`GateConfig`, :class:`LoopsConfig`
(schedule, consolidation, dreams) and :class:`HostConfig` (what a serving host does with
the engine); :class:`SonaConfig` holds one of each next to the model-wide fields.

The seeds disagree on some defaults (the Node README, the crate README and the API
reference each give their own). Where they disagree, or where ``shared/DESIGN.md``
measured that a seed default does not learn on our model, the choice and its reason are
in the field's help text and in ``docs/config.md``.

Every component field also has one flat name, unique across the config: the name it had
before the config was split (``ewc_lambda`` for ``ewc.initial_lambda``, ``micro_lora_rank``
for ``micro_lora.rank``; a loop or host field is its own flat name). Flat names are
accepted by the constructor and :meth:`SonaConfig.from_dict`, and readable and writable as
attributes (``config.ewc_lambda``), so saved states and callers of the flat config keep
working. :meth:`SonaConfig.to_dict` gives the nested form, the form a config file has; the
seeds' other spellings (``microLoraRank``, ``initial_lambda``, ``trajectory_buffer_size``,
...) are accepted by :meth:`SonaConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

logger = logging.getLogger(__name__)


def _opt(
    default: Any,
    help: str,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    choices: tuple | None = None,
    flat: str | None = None,
) -> Any:
    """A dataclass field with its documentation, allowed range and flat name in metadata."""
    return field(
        default=default,
        metadata={
            "help": help,
            "lo": lo,
            "hi": hi,
            "lo_open": lo_open,
            "choices": choices,
            "flat": flat,
        },
    )


@dataclass
class _Section:
    """A component's options; each field checked against its metadata on construction."""

    section = ""  # the SonaConfig field holding it

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check(self._label(f.name), f, getattr(self, f.name))
        self._check_together()

    def _check_together(self) -> None:
        """Checks that involve more than one field (none by default)."""

    @classmethod
    def _label(cls, name: str) -> str:
        """How messages name a field: its dotted path, and its flat name when it differs."""
        flat = _flat_name(cls, name)
        dotted = f"{cls.section}.{name}"
        return dotted if flat == name else f"{dotted} ({flat})"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """Build from a dict of this component's fields; an unknown key is an error naming it."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.section} must be a dict of its fields, got {data!r}")
        return cls(**_section_kwargs(cls, data))

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> its documentation."""
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}


@dataclass
class MicroLoraConfig(_Section):
    """The MicroLoRA on the final hidden state and the instant loop (loop A) that trains it.

    The stabiliser (``init``, ``norm_cap``, ``trust_region``, ``decay``): DESIGN.md found
    each alone fails and all four together stable over 200 feedbacks.
    """

    section = "micro_lora"

    rank: int = _opt(
        2,
        "MicroLoRA rank, 1 or 2. Crate README default 2 (Node: 1); DESIGN.md measured rank 2.",
        1,
        2,
        flat="micro_lora_rank",
    )
    alpha: float = _opt(
        1.0,
        "LoRA alpha; the MicroLoRA scale is s = alpha / rank.",
        0.0,
        None,
        lo_open=True,
        flat="lora_alpha",
    )
    lr: float = _opt(
        3e-3,
        "MicroLoRA Adam step size. Seeds say 0.001 (Node) or 0.01 "
        "(crate); DESIGN.md measured 3e-3 stable with the trust "
        "region and norm cap.",
        0.0,
        1.0,
        lo_open=True,
        flat="micro_lora_lr",
    )
    init: str = _opt(
        "zero_a",
        "Which MicroLoRA factor starts at zero: 'zero_a' (A = 0, "
        "B small random: an update only moves inputs similar to "
        "the ones that got feedback) or 'zero_b' (PEFT's "
        "convention).",
        choices=("zero_a", "zero_b"),
        flat="micro_lora_init",
    )
    norm_cap: float = _opt(
        0.3,
        "Bound on ||s*B*A||_F after every update.",
        0.0,
        None,
        lo_open=True,
        flat="micro_lora_norm_cap",
    )
    trust_region: float = _opt(
        0.05,
        "Largest mean KL (LM head) or relative output "
        "change (no head) one feedback may cause on its "
        "own steps; the step is halved until it fits.",
        0.0,
        None,
        lo_open=True,
        flat="micro_lora_trust_region",
    )
    decay: float = _opt(
        0.01,
        "Per feedback, B shrinks by this fraction and A moves "
        "this fraction back toward its initial value.",
        0.0,
        1.0,
        flat="micro_lora_decay",
    )
    beta2: float = _opt(
        0.99,
        "Adam second-moment decay of the MicroLoRA optimiser.",
        0.0,
        1.0,
        lo_open=True,
        flat="micro_lora_beta2",
    )
    grad_clip: float = _opt(
        1.0,
        "Global L2 norm clip of one instant-loop gradient.",
        0.0,
        None,
        lo_open=True,
        flat="grad_clip",
    )
    baseline_momentum: float = _opt(
        0.9, "Running reward baseline b <- m*b + (1-m)*R.", 0.0, 1.0, flat="baseline_momentum"
    )
    quality_threshold: float = _opt(
        0.5,
        "Quality counted as neutral before a running baseline "
        "exists: the first feedback's advantage is quality - "
        "this. Node README: 0.5.",
        0.0,
        1.0,
        flat="quality_threshold",
    )
    logit_top_k: int = _opt(
        64,
        "Top-k of the softmax kept per generated token to approximate "
        "p_t in the REINFORCE gradient W^T(e_y - p_t); both hosts record this many "
        "(at most the vocabulary).",
        1,
        None,
        flat="logit_top_k",
    )


@dataclass
class TrajectoryConfig(_Section):
    """The trajectory buffer and the open (begun, not ended) trajectories."""

    section = "trajectories"

    capacity: int = _opt(
        10000,
        "Bound of the trajectory buffer; when full, new "
        "trajectories are dropped and counted. Seeds: 10000.",
        1,
        None,
        flat="trajectory_capacity",
    )
    max_steps: int = _opt(
        50,
        "Steps kept per trajectory; later steps are counted and dropped. Crate README: 50.",
        1,
        None,
        flat="max_trajectory_steps",
    )
    keep_attention_weights: bool = _opt(
        False,
        "Keep each step's attention weights (checked "
        "either way). No learning rule reads them and "
        "they are half a step's bytes, so by default "
        "they are dropped.",
        flat="keep_attention_weights",
    )
    max_pending_signals: int = _opt(
        1000,
        "Bound of open (begun, not ended) trajectories; the "
        "oldest is evicted beyond it. API reference: 1000.",
        1,
        None,
        flat="max_pending_signals",
    )


@dataclass
class EwcConfig(_Section):
    """EWC++: the online Fisher, the adaptive penalty weight and the task memory."""

    section = "ewc"

    initial_lambda: float = _opt(
        1000.0,
        "Initial EWC++ penalty weight. Node README and API reference: "
        "1000 (crate README's 0.4 is on another scale).",
        0.0,
        None,
        flat="ewc_lambda",
    )
    min_lambda: float = _opt(
        100.0, "Lower bound of the adaptive lambda.", 0.0, None, flat="ewc_min_lambda"
    )
    max_lambda: float = _opt(
        10000.0, "Upper bound of the adaptive lambda.", 0.0, None, flat="ewc_max_lambda"
    )
    gamma: float = _opt(
        0.95,
        "Online Fisher decay: F <- gamma*F + (1-gamma)*g^2. Crate README: 0.95.",
        0.0,
        1.0,
        flat="ewc_gamma",
    )
    fisher_samples: int = _opt(
        100,
        "Gradient samples used to estimate the Fisher per cycle.",
        1,
        None,
        flat="ewc_fisher_samples",
    )
    online: bool = _opt(
        True, "Online (EWC++) Fisher rather than one estimate per task.", flat="ewc_online"
    )
    max_tasks: int = _opt(
        10,
        "Tasks kept in the multi-task memory (oldest merged away).",
        1,
        None,
        flat="ewc_max_tasks",
    )
    boundary_threshold: float = _opt(
        2.0,
        "z-score of the gradient statistics above which a task boundary is declared.",
        0.0,
        None,
        lo_open=True,
        flat="ewc_boundary_threshold",
    )

    def _check_together(self) -> None:
        if self.min_lambda > self.max_lambda:
            raise ConfigError(
                f"{self._label('min_lambda')} must be <= ewc.max_lambda, got "
                f"{self.min_lambda} > {self.max_lambda}"
            )
        if not self.min_lambda <= self.initial_lambda <= self.max_lambda:
            raise ConfigError(
                f"{self._label('initial_lambda')} must be in [ewc.min_lambda, ewc.max_lambda]"
                f" = [{self.min_lambda}, {self.max_lambda}], got {self.initial_lambda}"
            )


@dataclass
class PatternConfig(_Section):
    """The ReasoningBank: k-means++ pattern extraction, merging, decay and pruning."""

    section = "patterns"

    clusters: int = _opt(
        50,
        "k of k-means++ pattern extraction. Node README and API reference: 50 (crate README: 32).",
        1,
        None,
        flat="pattern_clusters",
    )
    quality_threshold: float = _opt(
        0.7,
        "Patterns at or above this average quality are strong: dream and replay sources.",
        0.0,
        1.0,
        flat="pattern_quality_threshold",
    )
    max_iterations: int = _opt(
        100, "k-means iteration limit.", 1, None, flat="pattern_max_iterations"
    )
    convergence_threshold: float = _opt(
        1e-3,
        "k-means stops when no centroid moves more than this (relative).",
        0.0,
        None,
        flat="pattern_convergence_threshold",
    )
    min_cluster_size: int = _opt(
        1,
        "Clusters smaller than this are not kept. API "
        "reference says 5; that silently discards learning "
        "from small batches, so we keep every cluster.",
        1,
        None,
        flat="pattern_min_cluster_size",
    )
    merge_similarity: float = _opt(
        0.98,
        "Cosine above which two patterns are merged.",
        0.0,
        1.0,
        flat="pattern_merge_similarity",
    )
    decay: float = _opt(0.95, "Weight multiplier per deep cycle.", 0.0, 1.0, flat="pattern_decay")
    prune_quality: float = _opt(
        0.1,
        "Patterns below this quality and with fewer accesses "
        "than pattern_prune_min_accesses are pruned.",
        0.0,
        1.0,
        flat="pattern_prune_quality",
    )
    prune_min_accesses: int = _opt(
        1, "See pattern_prune_quality.", 0, None, flat="pattern_prune_min_accesses"
    )
    max_patterns: int = _opt(
        10000,
        "Bound of the bank; the weakest patterns go first.",
        1,
        None,
        flat="max_patterns",
    )


@dataclass
class RoutingConfig(_Section):
    """Router mode: the route keys the instant loop learns by policy gradient."""

    section = "routing"

    lr: float = _opt(
        0.5,
        "Router mode: step size of the route keys' policy-gradient update.",
        0.0,
        None,
        lo_open=True,
        flat="route_lr",
    )
    key_norm_cap: float = _opt(
        5.0,
        "Router mode: bound on each route key's norm.",
        0.0,
        None,
        lo_open=True,
        flat="route_key_norm_cap",
    )
    temperature: float = _opt(
        0.2,
        "Router mode: softmax temperature of the route policy "
        "over unit-norm embeddings (0.2: 95 % best-route picks "
        "after 600 rounds in examples/router.py; 1.0: 75 %).",
        0.0,
        None,
        lo_open=True,
        flat="route_temperature",
    )


@dataclass
class BaseLoraConfig(_Section):
    """The BaseLoRA and the background trainer (loop B) that trains it."""

    section = "base_lora"

    rank: int = _opt(
        8,
        "BaseLoRA rank, 4-16 recommended. Node README default 8; DESIGN.md measured rank 8.",
        1,
        256,
        flat="base_lora_rank",
    )
    lr: float = _opt(
        5e-4,
        "BaseLoRA learning rate (AdamW). Seeds say 1e-4; DESIGN.md "
        "measured that 1e-4 barely moves the model and 5e-4 works.",
        0.0,
        1.0,
        lo_open=True,
        flat="base_lora_lr",
    )
    dropout: float = _opt(
        0.0,
        "Dropout on the BaseLoRA input during background training.",
        0.0,
        1.0,
        flat="lora_dropout",
    )
    kl_beta: float = _opt(
        0.2,
        "Weight of the KL(pi || pi_base) term of the BaseLoRA "
        "objective. Measured on SmolLM2 (docs/benchmarks.md): "
        "at 0.05 and 0.1 every candidate drifted off the "
        "question and the gate refused it; 0.2 passed and "
        "learned (digits 22 % -> 53 % after 200 feedbacks).",
        0.0,
        None,
        flat="base_lora_kl_beta",
    )
    num_layers: int = _opt(
        12,
        "Layers of the BaseLoRA container (API reference example).",
        1,
        None,
        flat="num_layers",
    )


@dataclass
class GateConfig(_Section):
    """The promotion gate a trained BaseLoRA version must pass before it is served."""

    section = "gate"

    max_kl_per_answer: float = _opt(
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
        flat="gate_max_kl_per_answer",
    )
    on_topic_confidence: float = _opt(
        0.95,
        "The on-topic check (answers at least 0.9 x the base "
        "model's prompt-answer similarity) passes only when "
        "the one-sided lower confidence bound of the ratio "
        "over its ~72 prompts is at least 0.9, so that the "
        "floor holds on prompts it did not see (0.5: the "
        "measured ratio alone; a version that measured 0.90 "
        "there scored 0.89 on 32 other prompts).",
        0.0,
        0.999,
        flat="gate_on_topic_confidence",
    )
    on_topic_probes: int = _opt(
        48,
        "How many of the learner's fixed probe questions the "
        "on-topic check answers besides the newest 24 held-out "
        "prompts. With 12, the bound (about 0.05 below the "
        "ratio) held a taste shift at the edge for 200 "
        "feedbacks with no version; with 48 (about 0.035) two "
        "versions passed, and answers stayed >= 0.93 x base.",
        0,
        48,
        flat="gate_on_topic_probes",
    )
    heldout_records: int = _opt(
        40,
        "The held-out feedback check scores the newest this "
        "many held-out records (feedback on prompts never "
        "trained on). benchmarks/gate_noise.py: on 40, a "
        "published step's score gain was 1.5-1.9 paired "
        "standard errors.",
        4,
        None,
        flat="gate_heldout_records",
    )
    heldout_margin_se: float = _opt(
        1.0,
        "The held-out feedback check refuses a candidate "
        "whose score falls below the served version's by "
        "more than this many paired standard errors (0: by "
        "any amount; 1.645: only a drop significant at "
        "one-sided 5 %). At 1 (the default) the reverse-order "
        "long run published 7 versions instead of 4 after its "
        "shift, with the same served liked-rates and less KL "
        "per answer (docs/benchmarks.md). Points shrunk toward "
        "the base model get no margin.",
        0.0,
        None,
        flat="gate_heldout_margin_se",
    )
    micro_check_every: int = _opt(
        10,
        "Between background cycles, the drift checks run on "
        "the served version with the MicroLoRA every this "
        "many feedbacks, and scale the MicroLoRA back when "
        "they fail (0: only at cycles). With best of 8 on "
        "'warm' the MicroLoRA took the served answers from "
        "0.93 to 0.85 x the base model's on-topic score over "
        "the 50 feedbacks between two cycles.",
        0,
        None,
        flat="gate_micro_check_every",
    )


@dataclass
class LoopsConfig(_Section):
    """When the background (B) and deep (C) loops run, and the deep loop's dreams."""

    section = "loops"

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
    phi_threshold: float = _opt(
        0.3,
        "Dream-score threshold (the seeds' Phi has no tractable "
        "meaning for an adapter; the dream score replaces it).",
        0.0,
        1.0,
    )
    dream_novelty_weight: float = _opt(0.3, "Weight of novelty in the dream score.", 0.0, 1.0)
    dream_coherence_weight: float = _opt(0.4, "Weight of coherence in the dream score.", 0.0, 1.0)
    dream_utility_weight: float = _opt(
        0.3, "Weight of predicted utility in the dream score.", 0.0, 1.0
    )


@dataclass
class RerankConfig(_Section):
    """Best-of-k serving (``sona_plugin.rerank``): the host samples ``candidates`` answers
    per prompt and serves the one a reward model fitted to the feedback scores best. Its
    KL to the sampling model is at most ``log k - (k-1)/k`` nats per answer; the price is
    ``k`` sampled answers per prompt. The transformers pipeline serves it; on vLLM a value
    above 1 is refused."""

    section = "rerank"

    candidates: int = _opt(
        1,
        "Answers sampled per prompt, the best served (1: off; only sampled generation "
        "is reranked, greedy calls are served as they are). benchmarks/rerank.py "
        "measured the held-out gain for 2-16.",
        1,
        64,
        flat="rerank_candidates",
    )
    window: int = _opt(
        1000,
        "The reward model fits the latest this-many judgements (a shifted taste "
        "displaces the old one within it).",
        10,
        None,
        flat="rerank_window",
    )
    refit_every: int = _opt(
        5,
        "Refit the reward model after this many new judgements (each fit is a "
        "cross-validated logistic regression, on the feedback call).",
        1,
        None,
        flat="rerank_refit_every",
    )


_SCHEDULES = ("background", "manual")
_TENANT_SOURCES = ("off", "header", "api_key")
_ADMIN_TOKEN_REFUSED = (
    "admin_token: give the admin token in $SONA_ADMIN_TOKEN or a file "
    "named by 'admin_token_file', not in the launch config (vLLM logs the "
    "config and the command line is visible to every user)"
)


@dataclass
class HostConfig(_Section):
    """What a serving host (vLLM or the transformers pipeline) does around the engine:
    where state lives, when it learns and saves, what it keeps, who may administer it.

    The engine never reads these; its flat names are the launch-config keys
    (``--additional-config '{"sona": {"save_every": 10}}'``).
    """

    section = "host"

    state_dir: str | None = _opt(
        None,
        "where the feedback store, adapter versions and engine state live "
        "(default $SONA_HOME/state)",
    )
    store_url: str | None = _opt(
        None,
        "feedback store: a SQLite path or sqlite:/// URL, or postgresql://... "
        "(pip install 'sona_plugin[postgres]'); default state_dir/sona.db",
    )
    registry_dir: str | None = _opt(
        None,
        "where adapter versions are published and read; replicas that share a "
        "postgresql:// store share this directory too (one trainer publishes, every "
        "replica follows); default state_dir/adapters",
    )
    schedule: str = _opt(
        "background",
        "'background' (loop B/C in a thread on the config's schedule, default) or "
        "'manual' (only POST /sona/learn or learn())",
        choices=_SCHEDULES,
    )
    save_every: int = _opt(
        25,
        "save the MicroLoRA every this many feedbacks (default 25): a "
        "crash loses at most that many instant updates",
        0,
    )
    save_interval_s: float = _opt(
        60.0,
        "also save the MicroLoRA this many seconds after an unsaved feedback "
        "(default 60; 0 = only every save_every feedbacks)",
        0,
    )
    max_recordings: int = _opt(
        1000,
        "requests a worker keeps recordings of, for feedback (default 1000; "
        "about 150 kB each at 50 steps of a 576-d model); older ones are evicted",
        1,
    )
    lora_targets: list[str] | None = _opt(
        None,
        "modules the BaseLoRA trains (default q_proj, k_proj, v_proj, o_proj; "
        "never lm_head: vLLM 0.32 leaks an lm_head LoRA into other requests)",
    )
    admin_token_file: str | None = _opt(
        None,
        "file holding the bearer token the admin routes require (default: "
        "$SONA_ADMIN_TOKEN; never the token itself in the config: vLLM logs it)",
    )
    open_admin: bool = _opt(
        False,
        "true: admin routes answer without a token even when the server listens "
        "beyond loopback (default false: then they answer 403)",
    )
    feedback_rate: float = _opt(
        10.0,
        "feedback requests a second per client (API key when vLLM checks keys, "
        "else address), token bucket; 0 = no limit (default 10)",
        0,
    )
    feedback_burst: float = _opt(
        50.0, "feedback requests a client may send at once (default 50)", 1
    )
    tenants: str = _opt(
        "off",
        "who a request and its feedback belong to, each tenant with its own MicroLoRA, "
        "feedback store and adapter versions (vLLM server): 'off' (one tenant, default), "
        "'header' (the X-Sona-Tenant header) or 'api_key' (the request's bearer key)",
        choices=_TENANT_SOURCES,
    )
    max_tenants: int = _opt(
        16,
        "the most tenants a server holds; a request naming one more is refused with 403 "
        "(default 16)",
        1,
    )
    keep_versions: int = _opt(
        20,
        "adapter versions kept on disk; older ones are pruned after each cycle, "
        "never the served one (default 20)",
        1,
    )
    retain_days: float = _opt(
        90.0,
        "feedback records older than this are deleted after each cycle; 0 = keep "
        "forever (default 90)",
        0,
    )

    def __post_init__(self) -> None:
        # the launch-config messages of the vLLM host, kept word for word
        for name in ("state_dir", "store_url", "registry_dir", "admin_token_file"):
            v = getattr(self, name)
            if isinstance(v, os.PathLike):
                v = os.fspath(v)
                setattr(self, name, v)
            if v is not None and not isinstance(v, str):
                raise ConfigError(f"{name} must be a path, got {v!r}")
        if self.schedule not in _SCHEDULES:
            raise ConfigError(f"schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        if self.tenants not in _TENANT_SOURCES:
            raise ConfigError(f"tenants must be one of {_TENANT_SOURCES}, got {self.tenants!r}")
        every = self.save_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ConfigError(
                f"save_every must be an integer >= 0 (0: only on close), got {every!r}"
            )
        for name in ("max_recordings", "keep_versions", "max_tenants"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("feedback_rate", "feedback_burst", "retain_days", "save_interval_s"):
            v, lo = getattr(self, name), HostConfig._lo(name)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not v >= lo
                or v == math.inf
            ):
                raise ConfigError(f"{name} must be a finite number >= {lo:g}, got {v!r}")
        if not isinstance(self.open_admin, bool):
            raise ConfigError(f"open_admin must be true or false, got {self.open_admin!r}")
        targets = self.lora_targets
        if targets is not None and (
            not isinstance(targets, list)
            or not targets
            or not all(isinstance(t, str) for t in targets)
            or "lm_head" in targets
            or "embed_tokens" in targets
        ):
            raise ConfigError(
                "lora_targets must be a non-empty list of attention/MLP module names "
                f"(not lm_head or embed_tokens), got {targets!r}"
            )

    @staticmethod
    def _lo(name: str) -> float:
        return float(HostConfig.__dataclass_fields__[name].metadata["lo"])


@dataclass
class SonaConfig:
    """Configuration of a :class:`~sona_plugin.engine.SonaEngine`, its loops and its host.

    Build it from keywords, each a model-wide field, a component (a component config or a
    dict of its fields) or a component field's flat name; keywords apply in order, a later
    one overriding an earlier one field by field::

        SonaConfig(hidden_dim=576, ewc=EwcConfig(initial_lambda=500.0))
        SonaConfig(hidden_dim=576, ewc={"initial_lambda": 500.0})
        SonaConfig(hidden_dim=576, ewc_lambda=500.0)  # the flat name: the same config

    Read a component field as ``config.ewc.initial_lambda`` or by its flat name,
    ``config.ewc_lambda``. The seven fields no rule ever read (``num_heads``,
    ``dream_path_length``, ``dream_creative_jump_prob``, ``dream_restart_prob``,
    ``max_cycle_duration_s``, ``edge_update_scale``, ``consolidation_threshold``) are gone:
    given, they are dropped with one warning, so older saved states still load.

    Raises:
        ConfigError: a field out of its range or of the wrong type (the message names it,
            the allowed range and the value seen), or a key that was never a field.
    """

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
    micro_lora: MicroLoraConfig = field(
        default_factory=MicroLoraConfig, metadata={"help": MicroLoraConfig.__doc__}
    )
    trajectories: TrajectoryConfig = field(
        default_factory=TrajectoryConfig, metadata={"help": TrajectoryConfig.__doc__}
    )
    ewc: EwcConfig = field(default_factory=EwcConfig, metadata={"help": EwcConfig.__doc__})
    patterns: PatternConfig = field(
        default_factory=PatternConfig, metadata={"help": PatternConfig.__doc__}
    )
    routing: RoutingConfig = field(
        default_factory=RoutingConfig, metadata={"help": RoutingConfig.__doc__}
    )
    base_lora: BaseLoraConfig = field(
        default_factory=BaseLoraConfig, metadata={"help": BaseLoraConfig.__doc__}
    )
    gate: GateConfig = field(default_factory=GateConfig, metadata={"help": GateConfig.__doc__})
    loops: LoopsConfig = field(default_factory=LoopsConfig, metadata={"help": LoopsConfig.__doc__})
    rerank: RerankConfig = field(
        default_factory=RerankConfig, metadata={"help": RerankConfig.__doc__}
    )
    host: HostConfig = field(default_factory=HostConfig, metadata={"help": HostConfig.__doc__})

    def __init__(self, **options: Any) -> None:
        top = {f.name: f.default for f in _TOP_FIELDS}
        parts: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        dead = []
        for key, value in options.items():
            if key in top:
                top[key] = value
            elif key in _SECTIONS:
                cls = _SECTIONS[key]
                if isinstance(value, cls):
                    parts[key].update(value.to_dict())
                elif isinstance(value, dict):
                    parts[key].update(_section_kwargs(cls, value))
                else:
                    raise ConfigError(
                        f"{key} must be a {cls.__name__} or a dict of its fields, got {value!r}"
                    )
            elif key in _FLAT:
                section, name = _FLAT[key]
                parts[section][name] = value
            elif key in _DEAD:
                dead.append(key)
            else:
                _refuse(key)
        _warn_dropped(dead)
        for name, value in top.items():
            setattr(self, name, value)
        for name, cls in _SECTIONS.items():
            setattr(self, name, cls(**parts[name]))
        for f in _TOP_FIELDS:
            _check(f.name, f, getattr(self, f.name))

    @property
    def embed_dim(self) -> int:
        """The query-embedding width in force (``embedding_dim`` or ``hidden_dim``)."""
        return self.embedding_dim if self.embedding_dim is not None else self.hidden_dim

    @property
    def micro_lora_scale(self) -> float:
        """s = alpha / rank."""
        return self.micro_lora.alpha / self.micro_lora.rank

    def to_dict(self) -> dict[str, Any]:
        """The nested form: the model-wide fields, then one dict per component."""
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SonaConfig:
        """Build from the nested form, flat names, the seeds' spellings, or a mix.

        Keys apply in order, a later one overriding an earlier one field by field, so
        ``{**config.to_dict(), **overrides}`` is ``config`` with the overrides. Two flat
        spellings of one field (``micro_lr`` and ``micro_lora_lr``) are an error; a field
        that was removed is dropped with one warning; any other unknown key is an error.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a dict, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        dead = []
        for key, value in data.items():
            name = _ALIASES.get(key) or _ALIASES.get(_snake(key)) or _snake(key)
            if name in _DEAD:
                dead.append(key)
                continue
            if name in kwargs:
                raise ConfigError(f"config key {key!r} given twice (as {name!r})")
            if key == "extraction_interval":  # the seeds' seconds
                value = int(value * 1000)
            if name not in _TOP_NAMES and name not in _SECTIONS and name not in _FLAT:
                _refuse(key)
            kwargs[name] = value  # keyword order is the order they apply in
        _warn_dropped(dead)
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
        """Every field's dotted path (``ewc.initial_lambda``) -> its documentation."""
        out = {f.name: f.metadata["help"] for f in _TOP_FIELDS}
        for section, scls in _SECTIONS.items():
            out.update({f"{section}.{k}": h for k, h in scls.help().items()})
        return out

    @classmethod
    def flat_names(cls) -> dict[str, str]:
        """Every component field's flat name -> its dotted path."""
        return {flat: f"{section}.{name}" for flat, (section, name) in _FLAT.items()}


_TOP_FIELDS = [
    f for f in dataclasses.fields(SonaConfig) if f.default_factory is dataclasses.MISSING
]
_TOP_NAMES = {f.name for f in _TOP_FIELDS}
_SECTIONS: dict[str, type[_Section]] = {
    f.name: f.default_factory
    for f in dataclasses.fields(SonaConfig)
    if f.default_factory is not dataclasses.MISSING
}


def _flat_name(cls: type[_Section], name: str) -> str:
    return cls.__dataclass_fields__[name].metadata["flat"] or name


_FLAT: dict[str, tuple[str, str]] = {
    _flat_name(scls, f.name): (section, f.name)
    for section, scls in _SECTIONS.items()
    for f in dataclasses.fields(scls)
}


def _flat_property(flat: str, section: str, name: str) -> property:
    def get(self: SonaConfig) -> Any:
        return getattr(getattr(self, section), name)

    def set_(self: SonaConfig, value: Any) -> None:
        setattr(getattr(self, section), name, value)

    doc = f"``{section}.{name}`` by its flat name. " + _SECTIONS[section].help()[name]
    return property(get, set_, doc=doc)


for _flat, (_section, _name) in _FLAT.items():
    setattr(SonaConfig, _flat, _flat_property(_flat, _section, _name))
del _flat, _section, _name

# fields removed because no rule ever read them (each checked with grep): a saved state
# or config file that still has them loads, with one warning
_DEAD = frozenset(
    {
        "num_heads",
        "dream_path_length",
        "dream_creative_jump_prob",
        "dream_restart_prob",
        "max_cycle_duration_s",
        "edge_update_scale",
        "consolidation_threshold",
    }
)

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


def known_fields(saved: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A saved configuration (the nested form of :meth:`SonaConfig.to_dict`) split into the
    fields this version knows and the dotted names of the others, which a newer version
    wrote: loading a state after a downgrade keeps the fields it can and names the rest."""
    known: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in saved.items():
        if key in _SECTIONS and isinstance(value, dict):
            names = _SECTIONS[key].__dataclass_fields__
            known[key] = {k: v for k, v in value.items() if _snake(k) in names}
            unknown += [f"{key}.{k}" for k in value if _snake(k) not in names]
        elif key in _TOP_NAMES or key in _SECTIONS or key in _DEAD:
            known[key] = value
        else:
            unknown.append(key)
    return known, unknown


def _refuse(key: str) -> None:
    if key == "admin_token" or key.endswith(".admin_token"):
        raise ConfigError(_ADMIN_TOKEN_REFUSED)
    raise ConfigError(f"unknown config key {key!r}")


def _warn_dropped(keys: list[str]) -> None:
    if keys:
        logger.warning(
            "ignoring config keys %s: fields removed because nothing read them", sorted(keys)
        )


def _section_kwargs(cls: type[_Section], data: dict[str, Any]) -> dict[str, Any]:
    """A component's keyword arguments from a dict of its field names (or camelCase)."""
    names = cls.__dataclass_fields__
    out = {}
    for key, value in data.items():
        name = _snake(key)
        if name not in names:
            _refuse(f"{cls.section}.{key}")
        out[name] = value
    return out


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def _check(name: str, f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
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


def _reference_markdown() -> str:
    """The field tables of ``docs/config.md``, one per component, from the dataclasses."""

    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    def rng(meta: Any) -> str:
        if meta.get("choices"):
            return ", ".join(f"`{c}`" for c in meta["choices"])
        lo, hi = meta.get("lo"), meta.get("hi")
        if lo is None and hi is None:
            return ""
        left = "(" if meta.get("lo_open") else "["
        return f"{left}{lo}, {hi}]" if hi is not None else f"{left}{lo}, inf)"

    def table(fields: list[dataclasses.Field], cls: type[_Section] | None) -> list[str]:
        head = "| field | type | default | allowed | why |"
        if cls is not None:
            head = "| field | flat name | type | default | allowed | why |"
        lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
        for f in fields:
            flat = [f"`{_flat_name(cls, f.name)}`"] if cls is not None else []
            row = [f"`{f.name}`", *flat, f"`{cell(f.type)}`", f"`{f.default!r}`"]
            row += [rng(f.metadata), cell(f.metadata["help"])]
            lines.append("| " + " | ".join(row) + " |")
        return lines

    counts = {name: len(dataclasses.fields(cls)) for name, cls in _SECTIONS.items()}
    total = len(_TOP_FIELDS) + sum(counts.values())
    out = [
        f"{total} fields: {len(_TOP_FIELDS)} model-wide and "
        + ", ".join(f"{n} `{name}`" for name, n in counts.items())
        + ".",
        "",
        f"### Model-wide ({len(_TOP_FIELDS)} fields)",
        "",
        *table(_TOP_FIELDS, None),
    ]
    for name, cls in _SECTIONS.items():
        doc = " ".join((cls.__doc__ or "").split("\n\n")[0].split())
        n = f"{counts[name]} field" + ("s" if counts[name] > 1 else "")
        out += ["", f"### `{name}`: {cls.__name__} ({n})", "", doc, ""]
        out += table(list(dataclasses.fields(cls)), cls)
    return "\n".join(out) + "\n"
