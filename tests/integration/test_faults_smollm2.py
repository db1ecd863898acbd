"""Faults on the real model: a child process serving SmolLM2 is killed (SIGKILL) at a named
point (``sona_plugin.faults``), or runs out of file space while publishing, or finds its
served adapter truncated; after each, a restarted host starts and serves, the last good
version is current, and every acknowledged feedback is in the store."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

QUESTIONS = ["Name a number.", "Name a fruit.", "Count to three.", "Name a planet."]

_CHILD = textwrap.dedent("""
    import resource, signal, sys
    from sona_plugin.integrations.transformers import pipeline

    state, action, QUESTIONS = sys.argv[1], sys.argv[2], sys.argv[3:]
    p = pipeline(state_dir=state, save_every=1 if action == "feedback_save" else 25)
    for i, q in enumerate(QUESTIONS):
        out = p([{"role": "user", "content": q}], max_new_tokens=8, do_sample=False)
        rid = out[0]["response_id"]
        p.feedback(rid, liked=i % 2 == 0)
        print("ACK", rid, flush=True)
    if action == "learn":
        p.learn(epochs=1, gate=False, probe=False)
    elif action == "learn_disk_full":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
        try:
            p.learn(epochs=1, gate=False, probe=False)
        except Exception as e:  # EFBIG, as OSError or as safetensors' own error
            print("FAILED", type(e).__name__, e, flush=True)
            sys.exit(3)
    elif action == "rollback":
        p.rollback(1)
    print("DONE", repr(p.engine.micro_lora.delta_norm()), flush=True)
""")


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Path:
    """A state dir with two published versions (v2 current) and 8 used records."""
    from sona_plugin.integrations.transformers import pipeline

    state = tmp_path_factory.mktemp("seeded")
    p = pipeline(state_dir=state)
    try:
        for k in range(2):
            for i, q in enumerate(QUESTIONS):
                out = p([{"role": "user", "content": q}], max_new_tokens=8, do_sample=False)
                p.feedback(out[0]["response_id"], liked=(i + k) % 2 == 0)
            assert p.learn(epochs=1, gate=False, probe=False)["published"]
        assert p.adapter_version == 2
        assert p.last_swap["ok"] and p.last_swap["canary_error"] < 1e-3, p.last_swap
    finally:
        p.close()
    return state


def run_child(state: Path, action: str, failpoint: str | None) -> tuple[int, list[str], str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("SONA_FAILPOINT", None)
    if failpoint:
        env["SONA_FAILPOINT"] = failpoint
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(state), action, *QUESTIONS],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    acked = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ACK ")]
    return proc.returncode, acked, proc.stdout + proc.stderr[-3000:]


def restarted(state: Path):
    from sona_plugin.integrations.transformers import pipeline

    return pipeline(state_dir=state)


def assert_serves(p, version: int | None) -> None:
    out = p([{"role": "user", "content": "Say hi."}], max_new_tokens=4, do_sample=False)
    assert p.response(out[0]["response_id"]).adapter_version == version
    assert p.registry.current_version() == version


@pytest.mark.parametrize(
    "failpoint, action, current, used",
    [
        ("feedback.stored", "feedback", 2, True),  # a record committed, no answer sent
        ("engine.save.swapped", "feedback_save", 2, True),  # engine copy moved aside
        ("learner.trained", "learn", 2, False),  # mid-cycle
        ("publish.renamed", "learn", 2, False),  # v3 complete, CURRENT not moved
        ("swap.loaded", "learn", 2, False),  # v3 served, CURRENT not moved
        ("rollback.served", "rollback", 1, True),  # v1 served and CURRENT, learner not rebuilt
    ],
)
def test_kill_9_at_each_point_loses_nothing_acknowledged(
    seeded, tmp_path, failpoint, action, current, used
):
    state = tmp_path / "state"
    shutil.copytree(seeded, state)
    rc, acked, log = run_child(state, action, failpoint)
    assert rc == -signal.SIGKILL, log
    p = restarted(state)
    try:
        for rid in acked:
            assert p.store.has(rid), (rid, log)
        assert_serves(p, current)
        assert p.learner.last_id == 8  # what the last finished cycle used, no more
        assert p.learner.pending() == p.store.count() - 8 >= len(acked)
        if not used:  # the killed cycle's records wait, and the next cycle goes on
            assert len(acked) == 4
            rep = p.learn(epochs=1, gate=False, probe=False)
            assert rep["published"] and rep["version"] > 2, rep
            assert p.learner.pending() == 0
    finally:
        p.close()


def test_disk_full_while_publishing_keeps_the_served_version(seeded, tmp_path):
    state = tmp_path / "state"
    shutil.copytree(seeded, state)
    before = sorted(x.name for x in (state / "adapters").iterdir())
    rc, acked, log = run_child(state, "learn_disk_full", None)
    assert rc == 3 and "FAILED" in log, log
    assert sorted(x.name for x in (state / "adapters").iterdir()) == before  # no tmp left
    p = restarted(state)
    try:
        assert all(p.store.has(rid) for rid in acked) and len(acked) == 4
        assert_serves(p, 2)
        assert p.learner.pending() == 4
    finally:
        p.close()


def test_truncated_served_adapter_falls_back_to_the_newest_complete_one(seeded, tmp_path):
    state = tmp_path / "state"
    shutil.copytree(seeded, state)
    f = state / "adapters" / "v000002" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    p = restarted(state)
    try:
        assert_serves(p, 1)  # and CURRENT now names it
    finally:
        p.close()


def test_a_version_whose_engine_weights_differ_is_not_served(seeded, tmp_path):
    """The swap canary: an adapter whose weights are not the ones its canary was taken
    from (what a stale or half-applied swap looks like) is refused; v2 keeps serving."""
    from safetensors.torch import load_file, save_file

    from sona_plugin.errors import SwapRefused

    state = tmp_path / "state"
    shutil.copytree(seeded, state)
    p = restarted(state)
    try:
        v2 = p.registry.get(2)

        def write(d: Path) -> None:
            for name in ("adapter_config.json", "canary.safetensors"):
                shutil.copy(v2.path / name, d)
            w = load_file(str(v2.path / "adapter_model.safetensors"))
            save_file(
                {k: t * 1.5 if "lora_B" in k else t for k, t in w.items()},
                str(d / "adapter_model.safetensors"),
            )

        bad = p.registry.publish(write, {"tampered": True}, make_current=False)
        with pytest.raises(SwapRefused, match="off by"):
            p.rollback(bad.version)
        assert not p.last_swap["ok"]
        assert_serves(p, 2)
        assert p.adapter_version == 2
    finally:
        p.close()


def test_exit_without_close_saves_what_the_micro_lora_learned(seeded, tmp_path):
    from sona_plugin.engine import SonaEngine

    state = tmp_path / "state"
    shutil.copytree(seeded, state)
    rc, acked, log = run_child(state, "feedback", None)  # 4 feedbacks, no close()
    assert rc == 0 and len(acked) == 4, log
    live = float(next(line for line in log.splitlines() if line.startswith("DONE")).split()[1])
    saved = SonaEngine.load(state / "engine").micro_lora.delta_norm()
    assert saved == pytest.approx(live, rel=1e-6), (saved, live)
