"""SonaConfig by component: seeds' names and defaults, validation that names the field, the
nested form round-tripping through JSON, the flat names of older configs and saved states
still accepted, removed fields dropped with a warning, and options that reach the hosts."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sona_plugin import (
    BaseLoraConfig,
    ConfigError,
    EwcConfig,
    GateConfig,
    HostConfig,
    LoopsConfig,
    MicroLoraConfig,
    PatternConfig,
    RoutingConfig,
    SonaConfig,
    TrajectoryConfig,
)

_DEAD = (
    "num_heads",
    "dream_path_length",
    "dream_creative_jump_prob",
    "dream_restart_prob",
    "max_cycle_duration_s",
    "edge_update_scale",
    "consolidation_threshold",
)

# the "config" of an engine state saved before the split: flat, all 63 old fields, none at
# its default (so that a field read from the wrong place shows)
_OLD_SAVED = {
    "hidden_dim": 64,
    "embedding_dim": 32,
    "num_heads": 4,
    "num_layers": 6,
    "micro_lora_rank": 1,
    "base_lora_rank": 16,
    "lora_alpha": 2.0,
    "lora_dropout": 0.1,
    "micro_lora_lr": 0.002,
    "base_lora_lr": 0.001,
    "gate_max_kl_per_answer": 0.5,
    "base_lora_kl_beta": 0.3,
    "micro_lora_init": "zero_b",
    "micro_lora_norm_cap": 0.05,
    "micro_lora_trust_region": 0.04,
    "micro_lora_decay": 0.02,
    "micro_lora_beta2": 0.98,
    "grad_clip": 2.0,
    "baseline_momentum": 0.8,
    "logit_top_k": 32,
    "trajectory_capacity": 500,
    "max_trajectory_steps": 20,
    "keep_attention_weights": True,
    "max_pending_signals": 300,
    "quality_threshold": 0.4,
    "edge_update_scale": 0.02,
    "route_lr": 0.6,
    "route_key_norm_cap": 4.0,
    "route_temperature": 0.3,
    "ewc_lambda": 900.0,
    "ewc_min_lambda": 90.0,
    "ewc_max_lambda": 9000.0,
    "ewc_gamma": 0.9,
    "ewc_fisher_samples": 50,
    "ewc_online": False,
    "ewc_max_tasks": 5,
    "ewc_boundary_threshold": 2.5,
    "pattern_clusters": 8,
    "pattern_quality_threshold": 0.6,
    "pattern_max_iterations": 40,
    "pattern_convergence_threshold": 0.01,
    "pattern_min_cluster_size": 2,
    "pattern_merge_similarity": 0.97,
    "pattern_decay": 0.9,
    "pattern_prune_quality": 0.2,
    "pattern_prune_min_accesses": 3,
    "max_patterns": 700,
    "background_interval_ms": 60000,
    "background_trigger_count": 10,
    "consolidation_interval": 200,
    "dreams_per_cycle": 5,
    "consolidation_threshold": 0.6,
    "phi_threshold": 0.35,
    "max_cycle_duration_s": 300.0,
    "dream_path_length": 10,
    "dream_creative_jump_prob": 0.2,
    "dream_restart_prob": 0.2,
    "dream_novelty_weight": 0.2,
    "dream_coherence_weight": 0.5,
    "dream_utility_weight": 0.25,
    "enable_simd": False,
    "database_url": "sqlite:///x.db",
    "seed": 7,
}


def test_defaults_follow_the_seeds():
    c = SonaConfig()
    assert c.hidden_dim == 256 and c.embed_dim == 256
    assert c.patterns.clusters == 50 and c.trajectories.capacity == 10000
    assert (c.ewc.initial_lambda, c.ewc.min_lambda, c.ewc.max_lambda) == (1000.0, 100.0, 1e4)
    assert c.micro_lora.quality_threshold == 0.5 and c.loops.background_interval_ms == 3_600_000
    assert c.loops.dreams_per_cycle == 50 and c.micro_lora.logit_top_k == 64
    assert c.micro_lora_scale == pytest.approx(c.micro_lora.alpha / c.micro_lora.rank)
    assert (c.host.save_every, c.host.keep_versions, c.host.schedule) == (25, 20, "background")


def test_flat_names_read_and_write_the_component_field():
    c = SonaConfig(hidden_dim=64, ewc_lambda=500.0, micro_lora={"rank": 1})
    assert c.ewc_lambda == c.ewc.initial_lambda == 500.0
    assert c.micro_lora_rank == c.micro_lora.rank == 1
    assert c.pattern_clusters == c.patterns.clusters == 50
    c.background_trigger_count = 2  # a host sets it before building the coordinator
    assert c.loops.background_trigger_count == 2
    assert SonaConfig(ewc=EwcConfig(initial_lambda=500.0)).ewc == SonaConfig(ewc_lambda=500.0).ewc
    for flat, dotted in SonaConfig.flat_names().items():
        section, name = dotted.split(".")
        assert getattr(c, flat) == getattr(getattr(c, section), name)


def test_every_field_is_documented_and_every_flat_name_is_unique():
    docs = SonaConfig.help()
    assert all(len(h) > 10 for h in docs.values())
    flat = SonaConfig.flat_names()
    top = {f.name for f in dataclasses.fields(SonaConfig)}
    assert sorted(flat.values()) == sorted(k for k in docs if "." in k)  # a flat name each
    assert not set(flat) & top
    assert len(docs) == 80 and not set(_DEAD) & set(flat)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"hidden_dim": 0}, ["hidden_dim", ">= 1", "got 0"]),
        ({"hidden_dim": -1}, ["hidden_dim", "got -1"]),
        ({"micro_lora_rank": 3}, ["micro_lora.rank", "micro_lora_rank", "<= 2", "got 3"]),
        ({"micro_lora": {"rank": 0}}, ["micro_lora.rank", "micro_lora_rank", "got 0"]),
        ({"micro_lora_lr": 0.0}, ["micro_lora_lr", "> 0"]),
        ({"micro_lora_lr": float("nan")}, ["micro_lora_lr", "finite"]),
        ({"ewc": {"gamma": 1.5}}, ["ewc.gamma", "ewc_gamma", "<= 1.0"]),
        ({"loops": {"dreams_per_cycle": -1}}, ["loops.dreams_per_cycle", ">= 0"]),
        ({"logit_top_k": 0}, ["micro_lora.logit_top_k", ">= 1", "got 0"]),
        ({"hidden_dim": 2.5}, ["hidden_dim", "integer"]),
        ({"hidden_dim": True}, ["hidden_dim", "integer"]),
        ({"enable_simd": 1}, ["enable_simd", "bool"]),
        ({"database_url": 5}, ["database_url", "string"]),
        ({"micro_lora_init": "zero_c"}, ["micro_lora.init", "zero_a", "zero_c"]),
        ({"save_every": -1}, ["save_every must be an integer >= 0 (0: only on close), got -1"]),
        ({"host": {"max_recordings": 0}}, ["max_recordings must be an integer >= 1, got 0"]),
        ({"feedback_burst": 0.5}, ["feedback_burst must be a finite number >= 1, got 0.5"]),
        ({"retain_days": float("inf")}, ["retain_days must be a finite number >= 0"]),
        ({"schedule": "hourly"}, ["schedule must be one of", "'hourly'"]),
        ({"open_admin": "yes"}, ["open_admin must be true or false"]),
        ({"lora_targets": ["q_proj", "lm_head"]}, ["lora_targets", "not lm_head"]),
        ({"micro_lora": 3}, ["micro_lora must be a MicroLoraConfig or a dict"]),
    ],
)
def test_bad_field_is_named_with_its_range(kwargs, words):
    for build in (lambda: SonaConfig(**kwargs), lambda: SonaConfig.from_dict(kwargs)):
        with pytest.raises(ConfigError) as info:
            build()
        for w in words:
            assert w in str(info.value)


def test_a_component_built_alone_names_its_field():
    with pytest.raises(ConfigError, match=r"ewc\.initial_lambda \(ewc_lambda\) must be in"):
        EwcConfig(initial_lambda=50.0)
    with pytest.raises(ConfigError, match=r"patterns\.clusters \(pattern_clusters\)"):
        PatternConfig(clusters=0)
    with pytest.raises(ConfigError, match="keep_versions must be an integer >= 1, got 0"):
        HostConfig(keep_versions=0)


def test_lambda_bounds_are_consistent():
    with pytest.raises(ConfigError, match="ewc_lambda"):
        SonaConfig(ewc_lambda=50.0)
    with pytest.raises(ConfigError, match="ewc_min_lambda"):
        SonaConfig(ewc_min_lambda=10.0, ewc_max_lambda=5.0, ewc_lambda=7.0)


def test_json_round_trip_is_the_nested_form(tmp_path):
    c = SonaConfig(
        hidden_dim=576,
        micro_lora_rank=1,
        pattern_clusters=8,
        database_url="sqlite:///x",
        lora_targets=["q_proj"],
    )
    assert SonaConfig.from_json(c.to_json()) == c
    p = tmp_path / "sona.json"
    c.to_json(p)
    assert SonaConfig.from_json(p) == c
    saved = json.loads(p.read_text())
    assert saved["hidden_dim"] == 576 and saved["micro_lora"]["rank"] == 1
    assert saved["patterns"]["clusters"] == 8 and saved["host"]["lora_targets"] == ["q_proj"]
    assert "micro_lora_rank" not in saved


def _field_values(cls) -> st.SearchStrategy:
    """Any valid value of each field of a component, from its type and range metadata."""
    out = {}
    for f in dataclasses.fields(cls):
        m, typ = f.metadata, f.type
        if m.get("choices"):
            s = st.sampled_from(m["choices"])
        elif typ == "bool":
            s = st.booleans()
        elif typ == "str | None":
            s = st.none() | st.text(min_size=1, max_size=12)
        elif typ == "list[str] | None":
            s = st.none() | st.lists(st.sampled_from(["q_proj", "v_proj", "up_proj"]), min_size=1)
        elif typ.startswith("int"):
            s = st.integers(m["lo"], m["hi"] if m["hi"] is not None else m["lo"] + 10**6)
        else:
            hi = m["hi"] if m["hi"] is not None else 1e6
            s = st.floats(m["lo"], hi, exclude_min=bool(m["lo_open"]), allow_nan=False)
        out[f.name] = s
    return st.fixed_dictionaries(out)


@st.composite
def _configs(draw) -> dict:
    top = {
        "hidden_dim": draw(st.integers(1, 4096)),
        "embedding_dim": draw(st.none() | st.integers(1, 4096)),
        "enable_simd": draw(st.booleans()),
        "database_url": draw(st.none() | st.text(max_size=12)),
        "seed": draw(st.integers(0, 2**31)),
    }
    parts = {
        f.name: draw(_field_values(f.default_factory))
        for f in dataclasses.fields(SonaConfig)
        if f.default_factory is not dataclasses.MISSING
    }
    lo, mid, hi = sorted(parts["ewc"][k] for k in ("min_lambda", "initial_lambda", "max_lambda"))
    parts["ewc"].update(min_lambda=lo, initial_lambda=mid, max_lambda=hi)
    return {**top, **parts}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_configs())
def test_every_field_round_trips_nested_and_flat(nested):
    c = SonaConfig.from_dict(nested)
    assert c.to_dict() == nested
    assert SonaConfig.from_dict(c.to_dict()) == c
    assert SonaConfig.from_json(c.to_json()) == c
    flat = {k: v for k, v in nested.items() if not isinstance(v, dict)}
    for name, dotted in SonaConfig.flat_names().items():
        section, field = dotted.split(".")
        flat[name] = nested[section][field]
    assert SonaConfig.from_dict(flat) == c == SonaConfig(**flat)
    assert dataclasses.replace(c) == c


def test_a_state_saved_before_the_split_loads_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="sona_plugin.config"):
        c = SonaConfig.from_dict(_OLD_SAVED)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and all(k in warnings[0] for k in _DEAD)
    assert (c.hidden_dim, c.embedding_dim, c.enable_simd, c.database_url, c.seed) == (
        64,
        32,
        False,
        "sqlite:///x.db",
        7,
    )
    assert c.micro_lora == MicroLoraConfig(
        rank=1,
        alpha=2.0,
        lr=0.002,
        init="zero_b",
        norm_cap=0.05,
        trust_region=0.04,
        decay=0.02,
        beta2=0.98,
        grad_clip=2.0,
        baseline_momentum=0.8,
        quality_threshold=0.4,
        logit_top_k=32,
    )
    assert c.trajectories == TrajectoryConfig(
        capacity=500, max_steps=20, keep_attention_weights=True, max_pending_signals=300
    )
    assert c.ewc == EwcConfig(
        initial_lambda=900.0,
        min_lambda=90.0,
        max_lambda=9000.0,
        gamma=0.9,
        fisher_samples=50,
        online=False,
        max_tasks=5,
        boundary_threshold=2.5,
    )
    assert c.patterns == PatternConfig(
        clusters=8,
        quality_threshold=0.6,
        max_iterations=40,
        convergence_threshold=0.01,
        min_cluster_size=2,
        merge_similarity=0.97,
        decay=0.9,
        prune_quality=0.2,
        prune_min_accesses=3,
        max_patterns=700,
    )
    assert c.routing == RoutingConfig(lr=0.6, key_norm_cap=4.0, temperature=0.3)
    assert c.base_lora == BaseLoraConfig(rank=16, lr=0.001, dropout=0.1, kl_beta=0.3, num_layers=6)
    assert c.gate == GateConfig(max_kl_per_answer=0.5)
    assert c.loops == LoopsConfig(
        background_interval_ms=60000,
        background_trigger_count=10,
        consolidation_interval=200,
        dreams_per_cycle=5,
        phi_threshold=0.35,
        dream_novelty_weight=0.2,
        dream_coherence_weight=0.5,
        dream_utility_weight=0.25,
    )
    assert c.host == HostConfig()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sona_plugin.config"):
        assert SonaConfig(num_heads=8, hidden_dim=8) == SonaConfig(hidden_dim=8)
    assert len(caplog.records) == 1 and "num_heads" in caplog.records[0].getMessage()


def test_seed_spellings_are_accepted_and_unknown_keys_refused():
    c = SonaConfig.from_dict(
        {
            "hiddenDim": 128,
            "microLoraRank": 1,
            "trajectory_buffer_size": 7,
            "initial_lambda": 500.0,
            "k_clusters": 9,
            "extraction_interval": 60,
            "path_length": 15,  # a removed field's seed spelling: dropped
        }
    )
    assert (
        c.hidden_dim,
        c.micro_lora.rank,
        c.trajectories.capacity,
        c.ewc.initial_lambda,
        c.patterns.clusters,
        c.loops.background_interval_ms,
    ) == (128, 1, 7, 500.0, 9, 60_000)
    with pytest.raises(ConfigError, match="unknown config key 'hidenDim'"):
        SonaConfig.from_dict({"hidenDim": 128})
    with pytest.raises(ConfigError, match=r"unknown config key 'ewc\.lamda'"):
        SonaConfig.from_dict({"ewc": {"lamda": 1.0}})
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        SonaConfig(bogus=1)
    with pytest.raises(ConfigError, match=r"'micro_lr' given twice \(as 'micro_lora_lr'\)"):
        SonaConfig.from_dict({"micro_lora_lr": 0.01, "micro_lr": 0.02})
    with pytest.raises(ConfigError, match=r"SONA_ADMIN_TOKEN"):
        SonaConfig.from_dict({"host": {"admin_token": "secret"}})
    with pytest.raises(ConfigError, match="not valid JSON"):
        SonaConfig.from_json("{not json")


def test_keys_apply_in_order_field_by_field():
    c = SonaConfig(hidden_dim=64, micro_lora_rank=1, ewc_lambda=500.0)
    d = SonaConfig.from_dict({**c.to_dict(), "ewc_lambda": 700.0})  # the engine's overrides
    assert d.ewc.initial_lambda == 700.0 and d.micro_lora.rank == 1 and d.hidden_dim == 64
    # the hosts' LM defaults first, then the user's component: both kept
    e = SonaConfig.from_dict({"micro_lora_init": "zero_b", "micro_lora": {"rank": 1}})
    assert (e.micro_lora.init, e.micro_lora.rank) == ("zero_b", 1)
    f = SonaConfig.from_dict({"micro_lora": {"rank": 1}, "micro_lora_rank": 2})
    assert f.micro_lora.rank == 2


def test_docs_tables_are_the_config():
    from sona_plugin.config import _reference_markdown

    doc = (Path(__file__).parents[2] / "docs" / "config.md").read_text()
    begin, end = "<!-- generated: begin -->\n", "<!-- generated: end -->"
    assert doc[doc.index(begin) + len(begin) : doc.index(end)] == _reference_markdown()


def test_logit_top_k_and_host_options_reach_the_transformers_pipeline(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from _tiny import tiny_llama_and_tokenizer

    from sona_plugin import pipeline

    model, tok = tiny_llama_and_tokenizer()
    with pytest.raises(ConfigError, match="save_every must be an integer >= 0"):
        pipeline(model=model, tokenizer=tok, state_dir=tmp_path, save_every=-1)
    p = pipeline(
        model=model,
        tokenizer=tok,
        sona_config={"logit_top_k": 5, "host": {"save_every": 3, "keep_versions": 4}},
        state_dir=tmp_path,
        retain_days=7,  # a keyword wins over the config
    )
    try:
        out = p("abc", max_new_tokens=3, do_sample=False)
        r = p.response(out[0]["response_id"])
        assert r.topk_ids.shape == (len(r.response_ids), 5) and len(r.response_ids) > 0
        assert (p.save_every, p.keep_versions, p.retain_days) == (3, 4, 7.0)
        assert p.engine.config.host.state_dir == str(tmp_path)
    finally:
        p.close()
