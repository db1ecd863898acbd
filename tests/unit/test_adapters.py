"""AdapterRegistry with real PEFT LoRA adapters on a tiny random Llama: what CURRENT names
loads and computes what was saved, rollback works, kill -9 mid-publish never leaves
CURRENT pointing at a broken version, and published versions are never touched again."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import peft  # noqa: E402
import pytest
import torch  # noqa: E402
import transformers  # noqa: E402

from sona_plugin import adapters as adapters_mod
from sona_plugin.adapters import (
    CURRENT_FILE,
    HIGH_WATER_FILE,
    VERSION_FILE,
    AdapterRegistry,
    AdapterVersion,
)
from sona_plugin.errors import InvalidValue, StateError, UnknownAdapterVersion

REPO = Path(__file__).resolve().parents[2]

# A publish that stops in the middle and waits to be killed.
#   mid-write:    the writer has written adapter_config.json only
#   after-rename: the complete version is renamed into place; CURRENT is about to be
#                 replaced (the pause is injected at the os.replace of CURRENT)
_CRASH_SRC = """
import os, shutil, sys, time
from pathlib import Path
from sona_plugin.adapters import AdapterRegistry

root, mode, source = sys.argv[1], sys.argv[2], Path(sys.argv[3])
reg = AdapterRegistry(root)

def pause(msg):
    print(msg, flush=True)
    time.sleep(120)

def write(d):
    shutil.copy(source / "adapter_config.json", d)
    if mode == "mid-write":
        with open(d / "adapter_model.safetensors", "wb") as f:
            f.write((source / "adapter_model.safetensors").read_bytes()[:100])
        pause("PAUSED")
    else:
        shutil.copy(source / "adapter_model.safetensors", d)

real_replace = os.replace
def replace(src, dst, *a, **k):
    if mode == "after-rename" and Path(dst).name == "CURRENT":
        pause("PAUSED")
    return real_replace(src, dst, *a, **k)
os.replace = replace

reg.publish(write, {"from": "crashing process"})
print("DONE", flush=True)
"""


@pytest.fixture(scope="module")
def tiny():
    """The tiny base model's weights and a probe batch, built once."""
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    base_sd = {k: v.clone() for k, v in transformers.LlamaForCausalLM(cfg).state_dict().items()}
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    return cfg, base_sd, ids


def fresh_base(tiny):
    cfg, base_sd, _ = tiny
    m = transformers.LlamaForCausalLM(cfg)
    m.load_state_dict(base_sd)
    return m.eval()


def make_adapter(tiny, seed: int):
    """A LoRA model whose adapter actually changes the output (B is not left at zero)."""
    pm = peft.get_peft_model(
        fresh_base(tiny), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return pm.eval()


@torch.no_grad()
def logits(model, tiny):
    return model(tiny[2]).logits


def load_logits(tiny, path: Path):
    return logits(peft.PeftModel.from_pretrained(fresh_base(tiny), str(path)).eval(), tiny)


def publish_model(reg: AdapterRegistry, pm, **metadata) -> AdapterVersion:
    return reg.publish(lambda d: pm.save_pretrained(d), metadata)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def adapters(tiny):
    """Two adapters and the logits each gives, plus the base model's."""
    a1, a2 = make_adapter(tiny, 11), make_adapter(tiny, 22)
    out = {
        "m1": a1,
        "m2": a2,
        "l1": logits(a1, tiny),
        "l2": logits(a2, tiny),
        "base": logits(fresh_base(tiny), tiny),
    }
    assert not torch.allclose(out["l1"], out["l2"], atol=1e-3)
    assert not torch.allclose(out["l1"], out["base"], atol=1e-3)
    return out


def test_empty_registry(tmp_path):
    reg = AdapterRegistry(tmp_path / "adapters")
    assert reg.versions() == [] and reg.current() is None and reg.latest() is None
    assert not (tmp_path / "adapters" / CURRENT_FILE).exists()
    with pytest.raises(InvalidValue, match=r"available: \[\]"):
        reg.set_current(1)


def test_publish_load_and_roll_back(tmp_path, tiny, adapters):
    reg = AdapterRegistry(tmp_path)
    v1 = publish_model(reg, adapters["m1"], step=100, loss=0.5)
    v2 = publish_model(reg, adapters["m2"], step=200)
    assert (v1.version, v2.version) == (1, 2)
    assert v1.path == tmp_path / "v000001" and v2.name == "v000002"
    assert (v1.parent, v2.parent) == (None, 1)
    assert (tmp_path / CURRENT_FILE).read_text() == "v000002\n"

    reopened = AdapterRegistry(tmp_path)
    assert [v.version for v in reopened.versions()] == [1, 2]
    assert reopened.get(1) == v1  # metadata, created_at, parent all round-trip
    assert reopened.latest() == v2
    cur = reopened.current()
    assert cur == v2
    torch.testing.assert_close(load_logits(tiny, cur.path), adapters["l2"], rtol=0, atol=1e-6)

    assert reopened.set_current(1) == v1
    cur = AdapterRegistry(tmp_path).current()
    assert cur.version == 1
    torch.testing.assert_close(load_logits(tiny, cur.path), adapters["l1"], rtol=0, atol=1e-6)
    with pytest.raises(InvalidValue, match=r"adapter version 7 not found.*available: \[1, 2\]"):
        reopened.set_current(7)
    assert reopened.current().version == 1
    reopened.set_current(2)
    assert reopened.current() == v2


def test_published_versions_are_never_touched(tmp_path, adapters):
    reg = AdapterRegistry(tmp_path)
    v1 = publish_model(reg, adapters["m1"])
    before = tree_digest(v1.path)
    st = v1.path.stat()
    publish_model(reg, adapters["m2"])
    reg.set_current(1)
    publish_model(reg, adapters["m1"])
    AdapterRegistry(tmp_path)
    assert tree_digest(v1.path) == before
    assert v1.path.stat().st_ino == st.st_ino
    assert [v.version for v in reg.versions()] == [1, 2, 3]
    assert reg.current().parent == 1  # v3 was published while v1 served


def _crash_publish(root: Path, mode: str, source: Path) -> None:
    """Run a publish in a subprocess and SIGKILL it while it is paused at ``mode``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASH_SRC, str(root), mode, str(source)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "PAUSED", line
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_kill_9_while_writing_leaves_previous_version_current(tmp_path, tiny, adapters):
    root, source = tmp_path / "reg", tmp_path / "source"
    adapters["m2"].save_pretrained(source)
    reg = AdapterRegistry(root)
    v1 = publish_model(reg, adapters["m1"])
    before = tree_digest(v1.path)

    _crash_publish(root, "mid-write", source)
    stale = list(root.glob(".tmp-*"))
    assert len(stale) == 1 and (stale[0] / "adapter_config.json").exists()
    # A reader that has not reopened sees only v1, served and loadable.
    assert [v.version for v in reg.versions()] == [1]
    assert reg.current() == v1
    torch.testing.assert_close(
        load_logits(tiny, reg.current().path), adapters["l1"], rtol=0, atol=1e-6
    )

    reg = AdapterRegistry(root)  # opening removes the crashed publish's temp dir
    assert list(root.glob(".tmp-*")) == []
    v2 = publish_model(reg, adapters["m2"])
    assert v2.version == 2 and reg.current() == v2
    torch.testing.assert_close(load_logits(tiny, v2.path), adapters["l2"], rtol=0, atol=1e-6)
    assert tree_digest(v1.path) == before


def test_kill_9_after_rename_before_current_leaves_previous_version_current(
    tmp_path, tiny, adapters
):
    root, source = tmp_path / "reg", tmp_path / "source"
    adapters["m2"].save_pretrained(source)
    reg = AdapterRegistry(root)
    v1 = publish_model(reg, adapters["m1"])

    _crash_publish(root, "after-rename", source)
    assert (root / (CURRENT_FILE + ".tmp")).read_text() == "v000002\n"  # it got this far
    reg = AdapterRegistry(root)
    assert reg.current() == v1
    torch.testing.assert_close(
        load_logits(tiny, reg.current().path), adapters["l1"], rtol=0, atol=1e-6
    )
    # The orphaned version is complete and loadable, just not served.
    orphan = reg.latest()
    assert orphan.version == 2 and orphan.parent == 1
    assert orphan.metadata == {"from": "crashing process"}
    torch.testing.assert_close(load_logits(tiny, orphan.path), adapters["l2"], rtol=0, atol=1e-6)
    orphan_digest = tree_digest(orphan.path)

    v3 = publish_model(reg, adapters["m1"])  # a fresh number; v2 is not reused
    assert v3.version == 3 and reg.current() == v3
    assert tree_digest(orphan.path) == orphan_digest
    assert [v.version for v in reg.versions()] == [1, 2, 3]


def test_the_written_directory_is_renamed_into_place_not_copied(tmp_path, adapters):
    reg = AdapterRegistry(tmp_path)
    seen = {}

    def write(d: Path) -> None:
        adapters["m1"].save_pretrained(d)
        seen["dir"], seen["ino"] = d, d.stat().st_ino

    v = reg.publish(write, {})
    assert seen["dir"].parent == tmp_path and seen["dir"].name.startswith(".tmp-")
    assert not seen["dir"].exists() and v.path.stat().st_ino == seen["ino"]


def test_failed_writer_publishes_nothing(tmp_path, adapters):
    reg = AdapterRegistry(tmp_path)
    v1 = publish_model(reg, adapters["m1"])

    def boom(d: Path) -> None:
        (d / "adapter_config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        reg.publish(boom, {})
    with pytest.raises(InvalidValue, match="adapter_model.safetensors"):
        reg.publish(lambda d: (d / "adapter_config.json").write_text("{}"), {})
    with pytest.raises(InvalidValue, match="metadata must be JSON-serialisable"):
        reg.publish(lambda d: adapters["m2"].save_pretrained(d), {"bad": object()})
    assert reg.current() == v1 and [v.version for v in reg.versions()] == [1]
    assert list(tmp_path.glob(".tmp-*")) == []
    assert publish_model(reg, adapters["m2"]).version == 2


def test_incomplete_and_foreign_dirs_are_ignored_and_skipped(tmp_path, adapters):
    reg = AdapterRegistry(tmp_path)
    (tmp_path / "v000005").mkdir()  # no sona_version.json: not a version
    (tmp_path / "v000005" / "junk").write_text("keep me")
    (tmp_path / "notes").mkdir()
    assert reg.versions() == []
    v = publish_model(reg, adapters["m1"])
    assert v.version == 6  # never renamed over, never reused
    assert (tmp_path / "v000005" / "junk").read_text() == "keep me"
    with pytest.raises(InvalidValue, match=r"available: \[6\]"):
        reg.get(5)


def test_publish_without_serving_and_stale_tmp_cleanup(tmp_path, adapters):
    reg = AdapterRegistry(tmp_path)
    v1 = publish_model(reg, adapters["m1"])
    v2 = reg.publish(
        lambda d: adapters["m2"].save_pretrained(d), {"gate": "pending"}, make_current=False
    )
    assert reg.current() == v1 and reg.latest() == v2
    info = json.loads((v2.path / VERSION_FILE).read_text())
    assert info["version"] == 2 and info["parent"] == 1
    assert info["metadata"] == {"gate": "pending"} and info["created_at"] <= time.time()
    (tmp_path / ".tmp-crashed").mkdir()
    (tmp_path / ".tmp-crashed" / "adapter_config.json").write_text("{}")
    AdapterRegistry(tmp_path)
    assert not (tmp_path / ".tmp-crashed").exists()


WEIGHTS = "adapter_model.safetensors"


def truncate(path: Path, size: int | None = None) -> None:
    """Cut ``path`` to ``size`` bytes (default: half), as a full disk or a killed copy does."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if size is None else size])


def test_numbers_are_never_reused_after_the_newest_dir_is_deleted(tmp_path, adapters):
    reg = AdapterRegistry(tmp_path)
    for m in ("m1", "m2", "m1"):
        publish_model(reg, adapters[m])
    assert (tmp_path / HIGH_WATER_FILE).read_text() == "3\n"
    reg.set_current(1)  # so CURRENT no longer remembers 3 either
    shutil.rmtree(tmp_path / "v000003")  # retention, or an operator
    assert publish_model(reg, adapters["m2"]).version == 4
    reg.set_current(1)
    shutil.rmtree(tmp_path / "v000004")
    assert publish_model(AdapterRegistry(tmp_path), adapters["m2"]).version == 5  # reopened

    (tmp_path / HIGH_WATER_FILE).unlink()  # a registry from before HIGH_WATER: as before
    assert publish_model(reg, adapters["m1"]).version == 6
    assert (tmp_path / HIGH_WATER_FILE).read_text() == "6\n"

    (tmp_path / HIGH_WATER_FILE).write_text("v7\n")
    with pytest.raises(StateError, match=r"HIGH_WATER must hold a version number.*'v7'"):
        publish_model(reg, adapters["m1"])
    assert [v.version for v in reg.versions()] == [1, 2, 5, 6]


def test_versions_with_missing_or_truncated_weights_are_not_listed(tmp_path, adapters, caplog):
    reg = AdapterRegistry(tmp_path)
    vs = [
        reg.publish(lambda d: adapters["m1"].save_pretrained(d), {}, make_current=False)
        for _ in range(5)
    ]
    good_bytes = (vs[2].path / WEIGHTS).read_bytes()
    (vs[0].path / "adapter_config.json").unlink()
    truncate(vs[1].path / WEIGHTS, 0)
    truncate(vs[2].path / WEIGHTS)  # header intact, tensor data cut off
    truncate(vs[3].path / WEIGHTS, 50)  # header cut off
    caplog.set_level(logging.WARNING, logger="sona_plugin.adapters")

    assert [v.version for v in reg.versions()] == [5]
    assert reg.latest() == vs[4]
    assert [v.version for v in AdapterRegistry(tmp_path).versions()] == [5]
    with pytest.raises(
        UnknownAdapterVersion,
        match=r"v000002 is incomplete.*empty.*"
        r"available: \[5\]",
    ):
        reg.get(2)
    with pytest.raises(UnknownAdapterVersion, match=r"v000003 is incomplete.*unreadable"):
        reg.set_current(3)
    assert reg.current_version() is None

    reg.versions()
    warned = [r.getMessage() for r in caplog.records]
    for name, why in [
        ("v000001", "adapter_config.json is missing"),
        ("v000002", f"{WEIGHTS} is empty"),
        ("v000003", f"{WEIGHTS} is unreadable"),
        ("v000004", f"{WEIGHTS} is unreadable"),
    ]:
        ours = [m for m in warned if m.startswith(f"ignoring {tmp_path / name}:")]
        assert len(ours) == 2 and why in ours[0], (name, ours)  # once per registry object

    (vs[2].path / WEIGHTS).write_bytes(good_bytes)  # restored by an operator: listed again
    assert [v.version for v in reg.versions()] == [3, 5]
    (vs[4].path / WEIGHTS).unlink()
    assert [v.version for v in reg.versions()] == [3]


def test_publish_refuses_an_empty_or_truncated_safetensors(tmp_path, adapters):
    reg = AdapterRegistry(tmp_path)
    v1 = publish_model(reg, adapters["m1"])

    def writer(size):
        def write(d: Path) -> None:
            adapters["m2"].save_pretrained(d)
            truncate(d / WEIGHTS, size)

        return write

    with pytest.raises(InvalidValue, match=f"{WEIGHTS} is empty"):
        reg.publish(writer(0), {})
    with pytest.raises(InvalidValue, match=f"{WEIGHTS} is unreadable"):
        reg.publish(writer(None), {})
    assert reg.current() == v1 and [v.version for v in reg.versions()] == [1]
    assert list(tmp_path.glob(".tmp-*")) == []


def test_servable_falls_back_when_current_is_broken(tmp_path, adapters, caplog):
    reg = AdapterRegistry(tmp_path)
    assert reg.servable() is None
    v1 = publish_model(reg, adapters["m1"])
    v2 = publish_model(reg, adapters["m2"])
    v3 = reg.publish(lambda d: adapters["m1"].save_pretrained(d), {}, make_current=False)
    assert reg.servable() == reg.current() == v2

    caplog.set_level(logging.WARNING, logger="sona_plugin.adapters")
    shutil.rmtree(v2.path)
    assert reg.servable() == v3  # the newest complete one, here newer than CURRENT's
    assert any(
        "names v000002" in r.getMessage() and "v000003" in r.getMessage() for r in caplog.records
    )
    assert (tmp_path / CURRENT_FILE).read_text() == "v000002\n"  # the caller decides
    with pytest.raises(StateError, match="names v000002, which is missing"):
        reg.current()

    truncate(v3.path / WEIGHTS)
    assert reg.servable() == v1  # older this time
    reg.set_current(1)
    assert reg.servable() == reg.current() == v1

    truncate(v1.path / WEIGHTS, 0)
    assert reg.servable() is None


def test_prune_keeps_the_newest_current_and_protected(tmp_path, adapters):
    reg = AdapterRegistry(tmp_path)
    for i in range(6):
        publish_model(reg, adapters["m1" if i % 2 else "m2"])
    (tmp_path / "v000099").mkdir()  # not a version: never pruned, but its number is taken
    reg.set_current(2)
    digest_v5 = tree_digest(tmp_path / "v000005")

    assert reg.prune(keep=2, protect=[3]) == [1, 4]
    assert [v.version for v in reg.versions()] == [2, 3, 5, 6]
    assert not (tmp_path / "v000001").exists() and (tmp_path / "v000099").is_dir()
    assert list(tmp_path.glob(".tmp-*")) == []
    assert tree_digest(tmp_path / "v000005") == digest_v5
    assert reg.current().version == 2
    assert reg.prune(keep=2, protect=[3]) == []

    shutil.rmtree(tmp_path / "v000099")
    assert publish_model(reg, adapters["m1"]).version == 100  # one past every number taken


def test_prune_is_crash_safe_and_records_the_high_water(tmp_path, adapters, monkeypatch):
    reg = AdapterRegistry(tmp_path)
    for m in ("m1", "m2", "m1"):
        publish_model(reg, adapters[m])
    (tmp_path / HIGH_WATER_FILE).unlink()  # a registry from before HIGH_WATER
    reg.set_current(1)

    def killed(path, *a, **k):
        raise OSError("killed before the delete finished")

    with monkeypatch.context() as mp:  # the rename happened; the delete did not
        mp.setattr(adapters_mod.shutil, "rmtree", killed)
        assert reg.prune(keep=1) == [2]
    assert (tmp_path / HIGH_WATER_FILE).read_text() == "3\n"
    assert [v.version for v in reg.versions()] == [1, 3]
    assert len(list(tmp_path.glob(".tmp-*"))) == 1
    reg = AdapterRegistry(tmp_path)  # opening removes the leftover
    assert list(tmp_path.glob(".tmp-*")) == []

    shutil.rmtree(tmp_path / "v000003")
    assert publish_model(reg, adapters["m2"]).version == 4


@pytest.mark.parametrize("keep", [0, -1, 1.5, True])
def test_prune_rejects_a_bad_keep(tmp_path, adapters, keep):
    reg = AdapterRegistry(tmp_path)
    publish_model(reg, adapters["m1"])
    publish_model(reg, adapters["m2"])
    with pytest.raises(InvalidValue, match=rf"keep must be an int >= 1, got {keep!r}"):
        reg.prune(keep)
    with pytest.raises(InvalidValue, match=r"protect must hold version numbers.*'1'"):
        reg.prune(1, protect=["1"])
    assert [v.version for v in reg.versions()] == [1, 2]


def test_versions_does_not_reread_unchanged_dirs(tmp_path, adapters, monkeypatch):
    reg = AdapterRegistry(tmp_path)
    for m in ("m1", "m2", "m1"):
        publish_model(reg, adapters[m], tag=m)
    reg = AdapterRegistry(tmp_path)
    calls = {"info": 0, "header": 0}

    def counted(name, fn):
        def wrapper(path):
            calls[name] += 1
            return fn(path)

        return wrapper

    monkeypatch.setattr(adapters_mod, "_read_info", counted("info", adapters_mod._read_info))
    monkeypatch.setattr(
        adapters_mod, "_safetensors_problem", counted("header", adapters_mod._safetensors_problem)
    )
    first = reg.versions()
    assert calls == {"info": 3, "header": 3}
    for _ in range(3):
        assert reg.versions() == first and reg.latest() == first[-1]
    assert reg.get(2) == first[1] and reg.current() == first[2]
    assert calls == {"info": 3, "header": 3}

    # an operator replaces v2 by a copy of v1: new files, so they are read again
    shutil.rmtree(tmp_path / "v000002")
    shutil.copytree(tmp_path / "v000001", tmp_path / "v000002")
    info = json.loads((tmp_path / "v000002" / VERSION_FILE).read_text())
    (tmp_path / "v000002" / VERSION_FILE).write_text(
        json.dumps({**info, "version": 2, "metadata": {"restored": True}})
    )
    assert reg.get(2).metadata == {"restored": True}
    assert [v.metadata for v in reg.versions()] == [
        {"tag": "m1"},
        {"restored": True},
        {"tag": "m1"},
    ]
    assert calls == {"info": 4, "header": 4}
