"""`sona demo` (the README's main job) end to end on the real SmolLM2-135M-Instruct, cut
short: one round of feedback with best-of-2 serving, a background cycle, the summary, the
plot and the exported PEFT adapter."""

from __future__ import annotations

import json


def test_sona_demo_with_best_of_k_writes_its_results(tmp_path, capsys):
    from safetensors.numpy import load_file

    from sona_plugin.cli import main

    out = tmp_path / "demo"
    argv = ["demo", "--rounds", "1", "--per-round", "8", "--max-new-tokens", "12"]
    assert main([*argv, "--candidates", "2", "--out", str(out)]) == 0

    printed = capsys.readouterr().out
    assert "best of 2" in printed and "liked on held-out prompts" in printed
    s = json.loads((out / "summary.json").read_text())
    assert s["feedback"] == 8 and s["candidates"] == 2
    assert [c["feedback"] for c in s["curve"]] == [0, 8]
    for c in s["curve"]:  # greedy and served-sampled rates on the 32 held-out prompts
        assert 0.0 <= c["heldout_liked"] <= 1.0 and 0.0 <= c["heldout_served"] <= 1.0
    assert (out / "learning_curve.png").stat().st_size > 0
    assert (out / "adapter" / "adapter_config.json").exists()
    # the simulated user's 8 judgements of served answers reached the reward model
    saved = load_file(str(out / "state" / "ranker.safetensors"))
    assert len(saved["liked"]) == 8 and saved["features"].shape == (8, 576)
    assert int(saved["liked"].sum()) == round(8 * s["curve"][1]["stream_liked"])
