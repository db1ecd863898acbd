"""SonaConfig: seeds' names and defaults, validation that names the field, JSON round trip."""

from __future__ import annotations

import json

import pytest

from sona_plugin import ConfigError, SonaConfig


def test_defaults_follow_the_seeds():
    c = SonaConfig()
    assert c.hidden_dim == 256 and c.embed_dim == 256
    assert c.pattern_clusters == 50 and c.trajectory_capacity == 10000
    assert c.ewc_lambda == 1000.0 and c.ewc_min_lambda == 100.0 and c.ewc_max_lambda == 10000.0
    assert c.quality_threshold == 0.5 and c.background_interval_ms == 3_600_000
    assert c.dreams_per_cycle == 50 and c.dream_path_length == 15
    assert c.micro_lora_scale == pytest.approx(c.lora_alpha / c.micro_lora_rank)


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("hidden_dim", 0, ["hidden_dim", ">= 1", "got 0"]),
        ("hidden_dim", -1, ["hidden_dim", "got -1"]),
        ("micro_lora_rank", 3, ["micro_lora_rank", "<= 2", "got 3"]),
        ("micro_lora_rank", 0, ["micro_lora_rank", "got 0"]),
        ("micro_lora_lr", 0.0, ["micro_lora_lr", "> 0"]),
        ("micro_lora_lr", float("nan"), ["micro_lora_lr", "finite"]),
        ("ewc_gamma", 1.5, ["ewc_gamma", "<= 1.0"]),
        ("hidden_dim", 2.5, ["hidden_dim", "integer"]),
        ("hidden_dim", True, ["hidden_dim", "integer"]),
        ("enable_simd", 1, ["enable_simd", "bool"]),
        ("database_url", 5, ["database_url", "string"]),
    ],
)
def test_bad_field_is_named_with_its_range(field, value, words):
    with pytest.raises(ConfigError) as info:
        SonaConfig(**{field: value})
    for w in words:
        assert w in str(info.value)


def test_lambda_bounds_are_consistent():
    with pytest.raises(ConfigError, match="ewc_lambda"):
        SonaConfig(ewc_lambda=50.0)
    with pytest.raises(ConfigError, match="ewc_min_lambda"):
        SonaConfig(ewc_min_lambda=10.0, ewc_max_lambda=5.0, ewc_lambda=7.0)


def test_json_round_trip(tmp_path):
    c = SonaConfig(
        hidden_dim=576, micro_lora_rank=1, pattern_clusters=8, database_url="sqlite:///x"
    )
    assert SonaConfig.from_json(c.to_json()) == c
    p = tmp_path / "sona.json"
    c.to_json(p)
    assert SonaConfig.from_json(p) == c
    assert json.loads(p.read_text())["hidden_dim"] == 576


def test_seed_spellings_are_accepted_and_unknown_keys_refused():
    c = SonaConfig.from_dict(
        {
            "hiddenDim": 128,
            "microLoraRank": 1,
            "trajectory_buffer_size": 7,
            "initial_lambda": 500.0,
            "k_clusters": 9,
        }
    )
    assert (
        c.hidden_dim,
        c.micro_lora_rank,
        c.trajectory_capacity,
        c.ewc_lambda,
        c.pattern_clusters,
    ) == (128, 1, 7, 500.0, 9)
    with pytest.raises(ConfigError, match="unknown config key 'hidenDim'"):
        SonaConfig.from_dict({"hidenDim": 128})
    with pytest.raises(ConfigError, match="not valid JSON"):
        SonaConfig.from_json("{not json")


def test_every_field_is_documented():
    assert all(len(h) > 10 for h in SonaConfig.help().values())
