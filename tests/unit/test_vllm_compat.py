"""``integrations/vllm/_compat.py`` against the installed vLLM (no engine, no model): every
internal SONA relies on is found; one that is gone fails the launch naming it and the vLLM
version; the CPU defaults of ``sona serve`` and ``SonaLLM`` come from one place."""

from __future__ import annotations

import argparse
import importlib
import re

import pytest

vllm = pytest.importorskip("vllm")

from sona_plugin.integrations.vllm import _compat, cpu_defaults, plugin  # noqa: E402


def test_check_passes_on_the_installed_vllm():
    _compat.check()
    from vllm.config import VllmConfig

    _compat.check(VllmConfig(additional_config={"sona": {}}))


@pytest.mark.parametrize(
    ("module", "owner", "attr"),
    [
        ("vllm.entrypoints.serve.engine.serving", "BaseServing", "_maybe_get_adapters"),
        ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "sample_tokens"),
        ("vllm.v1.engine.llm_engine", "LLMEngine", "remove_lora"),
        ("vllm", "plugins", "load_endpoint_plugins"),
    ],
)
def test_a_missing_internal_is_named_with_the_vllm_version(monkeypatch, module, owner, attr):
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    monkeypatch.delattr(getattr(importlib.import_module(module), owner), attr)
    with pytest.raises(_compat.VllmIncompatible, match=rf"vLLM 0\.99\.0.*{re.escape(attr)}"):
        _compat.check()


def test_a_renamed_field_is_named(monkeypatch):
    from vllm.v1.worker.gpu_input_batch import CachedRequestState

    monkeypatch.delitem(CachedRequestState.__annotations__, "lora_request")
    with pytest.raises(
        _compat.VllmIncompatible, match="field lora_request of .*CachedRequestState"
    ):
        _compat.check()


def test_enabling_sona_checks_vllm_first(monkeypatch):
    from vllm.config import VllmConfig
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    monkeypatch.setattr(plugin, "_enabled", None)
    monkeypatch.delattr(GPUModelRunner, "execute_model")
    plugin._enable(VllmConfig())  # no sona entry: vLLM runs as without this package
    cfg = VllmConfig(additional_config={"sona": {}})
    with pytest.raises(_compat.VllmIncompatible, match="execute_model"):
        plugin._enable(cfg)
    assert plugin._enabled is None and cfg.parallel_config.worker_extension_cls == ""
    monkeypatch.undo()
    monkeypatch.setattr(plugin, "_enabled", None)
    plugin._enable(cfg)
    assert cfg.parallel_config.worker_extension_cls == plugin.EXTENSION


def test_a_launch_on_model_runner_v2_is_refused(monkeypatch):
    from vllm.config import VllmConfig

    cfg = VllmConfig(additional_config={"sona": {}})
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(_compat.VllmIncompatible, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        _compat.check(cfg)


def test_sona_routes_load_without_vllm_plugins_for_generate_servers_only(monkeypatch):
    import vllm.plugins

    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    monkeypatch.setattr(vllm.plugins, "load_endpoint_plugins", vllm.plugins.load_endpoint_plugins)
    plugin.register()
    monkeypatch.setattr(plugin, "_enabled", None)
    assert vllm.plugins.load_endpoint_plugins(("generate",)) == []  # launch without sona
    monkeypatch.setattr(plugin, "_enabled", {})
    [p] = vllm.plugins.load_endpoint_plugins(("generate",))
    assert p.name == "sona_feedback"
    assert vllm.plugins.load_endpoint_plugins(("embed",)) == []  # vLLM's required_tasks rule


def test_cpu_defaults_are_the_old_values_and_yield_to_the_user():
    both = {"dtype": "float32", "kv_cache_memory_bytes": 2 << 30}
    assert cpu_defaults(set(), on_gpu=False) == both
    assert cpu_defaults(set(), on_gpu=True) == {}
    # vllm.LLM keywords (SonaLLM) and command-line flags (sona serve) alike
    assert cpu_defaults({"dtype"}, on_gpu=False) == {"kv_cache_memory_bytes": 2 << 30}
    assert cpu_defaults({"--dtype=bfloat16"}, on_gpu=False) == {"kv_cache_memory_bytes": 2 << 30}
    for kv in (
        "gpu_memory_utilization",
        "kv_cache_memory_bytes",
        "--gpu-memory-utilization",
        "--kv-cache-memory-bytes",
    ):
        assert cpu_defaults({kv}, on_gpu=False) == {"dtype": "float32"}, kv


def test_sona_serve_adds_the_cpu_defaults_unless_given():
    import torch

    from sona_plugin.cli import serve_command

    args = argparse.Namespace(
        model="/m",
        host="127.0.0.1",
        port=9000,
        state_dir=None,
        store_url=None,
        registry_dir=None,
        schedule=None,
        admin_token_file=None,
        max_lora_rank=None,
        sona_config=None,
    )
    cmd = serve_command(args, [])
    if torch.cuda.is_available():
        assert "--dtype" not in cmd and "--kv-cache-memory-bytes" not in cmd
        return
    assert cmd[cmd.index("--dtype") + 1] == "float32"
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == str(2 << 30)
    cmd = serve_command(args, ["--gpu-memory-utilization", "0.5", "--dtype=bfloat16"])
    assert "--kv-cache-memory-bytes" not in cmd and "--dtype" not in cmd
    assert cmd[-3:] == ["--gpu-memory-utilization", "0.5", "--dtype=bfloat16"]
