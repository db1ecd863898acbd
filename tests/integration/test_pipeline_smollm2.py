"""SonaPipeline on the real SmolLM2-135M-Instruct: feedback moves the model, versions load in
PEFT, hot-swaps lose nothing, and acknowledged work survives kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from sona_plugin import InvalidValue, UnknownTrajectory

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from sona_plugin.integrations.transformers import pipeline

    p = pipeline(state_dir=tmp_path_factory.mktemp("state"))
    yield p
    p.close()


def chat(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def response_logprob(pipe, rid_or_resp) -> float:
    r = pipe.response(rid_or_resp) if isinstance(rid_or_resp, str) else rid_or_resp
    ids = torch.tensor([r.prompt_ids + r.response_ids])
    with torch.no_grad():
        logits = pipe.model(ids).logits[0]
    lp = torch.log_softmax(logits[len(r.prompt_ids) - 1 : -1], -1)
    return float(lp[torch.arange(len(r.response_ids)), torch.tensor(r.response_ids)].sum())


def generate_one(pipe, q: str, **kw) -> str:
    out = pipe(chat(q), max_new_tokens=kw.pop("max_new_tokens", 16), do_sample=False, **kw)
    return out[0]["response_id"]


def test_every_sequence_gets_a_response_id(pipe):
    out = pipe(
        [chat("Name a fruit."), chat("Name a color.")],
        max_new_tokens=8,
        do_sample=True,
        num_return_sequences=2,
        batch_size=2,
    )
    ids = [seq["response_id"] for row in out for seq in row]
    assert len(ids) == 4 and len(set(ids)) == 4
    for row in out:
        for seq in row:
            r = pipe.response(seq["response_id"])
            assert seq["generated_text"][-1]["content"].strip() == r.response_text.strip()
            assert r.hidden.shape == (len(r.response_ids), 576)


def test_one_like_raises_and_one_dislike_lowers_the_responses_log_prob(pipe):
    liked = generate_one(pipe, "What is the capital of France?")
    disliked = generate_one(pipe, "Name a big animal.")
    r_liked, r_disliked = pipe.response(liked), pipe.response(disliked)
    before_l, before_d = response_logprob(pipe, r_liked), response_logprob(pipe, r_disliked)
    pipe.feedback(liked, liked=True)
    after_l = response_logprob(pipe, r_liked)
    pipe.feedback(disliked, -1.0)
    after_d = response_logprob(pipe, r_disliked)
    assert after_l > before_l + 0.05, (before_l, after_l)
    assert after_d < before_d - 0.05, (before_d, after_d)


def test_bad_feedback_is_refused_and_nothing_is_stored(pipe):
    rid = generate_one(pipe, "Say hello.", max_new_tokens=4)
    n = pipe.store.count()
    for bad in (float("nan"), 1.5, -2.0, "x"):
        with pytest.raises(InvalidValue, match="reward"):
            pipe.feedback(rid, bad)
    with pytest.raises(UnknownTrajectory, match="unknown response_id"):
        pipe.feedback("no-such-id", 1.0)
    assert pipe.store.count() == n
    pipe.feedback(rid, 0.5)
    with pytest.raises(InvalidValue, match="already given"):  # one feedback per response
        pipe.feedback(rid, 0.5)
    assert pipe.store.count() == n + 1


def test_export_reproduces_the_adapted_logits_in_peft(pipe, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sona_plugin.models import default_llm_path

    assert pipe.engine.micro_lora.delta_norm() > 0  # earlier feedback moved it
    path = pipe.export_peft(tmp_path / "export")
    ids = torch.tensor([pipe.tokenizer("The weather today is sunny and")["input_ids"]])
    with torch.no_grad():
        want = pipe.model(ids).logits
        base = AutoModelForCausalLM.from_pretrained(default_llm_path(), dtype=torch.float32)
        got = PeftModel.from_pretrained(base, str(path)).eval()(ids).logits
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())
    assert (path / "adapter_model.safetensors").stat().st_size < 10 * 2**20


def test_learn_publishes_a_version_peft_loads_with_the_same_logits(pipe):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sona_plugin.models import default_llm_path

    for q in (
        "Name a number.",
        "What is 2 plus 2?",
        "Name a fruit.",
        "How many legs has a cat?",
        "Name a planet.",
        "Count to three.",
    ):
        rid = generate_one(pipe, q, max_new_tokens=12)
        text = pipe.response(rid).response_text
        pipe.feedback(rid, liked=any(c.isdigit() for c in text))
    rep = pipe.learn(epochs=1, probe=False)
    assert rep["published"], rep
    v = rep["version"]
    assert pipe.adapter_version == v and pipe.adapters()[-1]["served"]
    ids = torch.tensor([pipe.tokenizer("Tell me about the moon.")["input_ids"]])
    pipe.engine.set_enabled(False)  # compare the BaseLoRA alone
    try:
        with torch.no_grad():
            want = pipe.model(ids).logits
    finally:
        pipe.engine.set_enabled(True)
    base = AutoModelForCausalLM.from_pretrained(default_llm_path(), dtype=torch.float32)
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, str(pipe.registry.get(v).path)).eval()(ids).logits
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())
    # every later response says which version answered it
    assert pipe.response(generate_one(pipe, "Hi.", max_new_tokens=2)).adapter_version == v


_PUBLISH_AND_HANG = """
import shutil, sys, time
from pathlib import Path
from sona_plugin.adapters import AdapterRegistry

def write(d):
    src = Path(sys.argv[2])
    shutil.copy(src / "adapter_config.json", d)
    with open(d / "adapter_model.safetensors", "wb") as f:   # half a SmolLM2 adapter
        data = (src / "adapter_model.safetensors").read_bytes()
        f.write(data[: len(data) // 2])
        f.flush()
    print("PAUSED", flush=True)
    time.sleep(120)

AdapterRegistry(sys.argv[1]).publish(write, {"from": "killed process"})
"""


def test_kill_9_mid_publish_leaves_the_served_smollm2_version_loadable(pipe):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sona_plugin.adapters import AdapterRegistry
    from sona_plugin.models import default_llm_path

    if pipe.registry.current() is None:  # when this test runs on its own
        for q in ("Name a number.", "Name a fruit.", "Name a planet.", "Count to three."):
            pipe.feedback(generate_one(pipe, q, max_new_tokens=8), liked="1" in q or "N" in q)
        assert pipe.learn(epochs=1, gate=False)["published"]
    served = pipe.registry.current()
    ids = torch.tensor([pipe.tokenizer("Tell me about the moon.")["input_ids"]])

    def peft_logits(path):
        base = AutoModelForCausalLM.from_pretrained(default_llm_path(), dtype=torch.float32)
        with torch.no_grad():
            return PeftModel.from_pretrained(base, str(path)).eval()(ids).logits

    want = peft_logits(served.path)
    root = pipe.registry.root
    proc = subprocess.Popen(
        [sys.executable, "-c", _PUBLISH_AND_HANG, str(root), str(served.path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "PAUSED"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(list(root.glob(".tmp-*"))) == 1  # the half-written publish is there
    reopened = AdapterRegistry(root)  # and a reopen clears it away
    assert list(root.glob(".tmp-*")) == []
    assert reopened.current() == served
    assert [v.version for v in reopened.versions()] == [v.version for v in pipe.registry.versions()]
    torch.testing.assert_close(peft_logits(reopened.current().path), want, rtol=0, atol=0)


def test_hot_swap_while_another_thread_generates_loses_nothing(pipe):
    import shutil

    from safetensors.torch import load_file, save_file

    served = pipe.adapters()[-1]
    assert served["served"], "needs a published version (previous test)"

    def write_variant(path: Path) -> None:  # a second version: the served one, B scaled
        src = Path(served["path"])
        shutil.copy(src / "adapter_config.json", path / "adapter_config.json")
        t = load_file(str(src / "adapter_model.safetensors"))
        save_file(
            {k: (v * 1.5 if "lora_B" in k else v) for k, v in t.items()},
            str(path / "adapter_model.safetensors"),
        )

    pipe.registry.publish(write_variant, {"variant": "B x 1.5"}, make_current=False)
    versions = [a["version"] for a in pipe.adapters()]
    assert len(versions) >= 2
    results, errors = [], []

    def worker():
        try:
            for i in range(6):
                out = pipe(chat(f"Say the number {i}."), max_new_tokens=6, do_sample=False)
                results.append(out[0]["response_id"])
        except Exception as e:  # noqa: BLE001 - the test reports any failure
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    seen = set()
    while t.is_alive():
        for v in versions + [versions[-1]]:
            pipe.rollback(v)
            seen.add(v)
        time.sleep(0.05)
    t.join()
    assert not errors, errors
    assert len(results) == 6 and all(pipe.response(r).response_ids for r in results)
    assert {pipe.response(r).adapter_version for r in results} <= set(versions)
    assert len(seen) >= 2


def test_deep_cycle_dreams_replay_from_strong_patterns(pipe):
    rep = pipe.deep_cycle(dreams=4)
    assert rep["dreams_generated"] >= 1, rep
    assert 0 <= rep["dreams_kept"] <= rep["dreams_generated"]
    for d in pipe.learner.dreams:
        assert d.task == "dream" and d.response_ids and -1 <= d.reward <= 1


def test_background_thread_publishes_on_its_schedule(pipe):
    before = len(pipe.adapters())
    cfg = pipe.engine.config
    cfg.background_trigger_count = 2  # the coordinator reads it when built
    pipe.start_background(poll_s=0.2)
    try:
        for q in ("Name a number.", "Count to two."):
            rid = generate_one(pipe, q, max_new_tokens=8)
            pipe.feedback(rid, liked=any(c.isdigit() for c in pipe.response(rid).response_text))
        deadline = time.time() + 300
        while time.time() < deadline and pipe.coordinator.last_result is None:
            time.sleep(0.5)
        assert pipe.coordinator.last_error is None, pipe.coordinator.last_error
        res = pipe.coordinator.last_result
        assert res is not None and res["new_records"] >= 2
        assert len(pipe.adapters()) == before + int(bool(res["published"]))
    finally:
        pipe.stop_background()


CHILD = textwrap.dedent("""
    import os, sys, torch
    torch.set_num_threads(1)
    from sona_plugin.integrations.transformers import pipeline
    pipe = pipeline(state_dir=sys.argv[1], save_every=2)
    for i in range(50):
        out = pipe([{"role": "user", "content": f"Say {i}."}], max_new_tokens=3, do_sample=False)
        pipe.feedback(out[0]["response_id"], 1.0 if i % 2 else -1.0)
        print("ACK", out[0]["response_id"], flush=True)
""")


def test_feedback_acknowledged_before_kill_9_is_in_the_store(tmp_path):
    """kill -9 loses no acknowledged feedback record, and the instant lessons saved every
    ``save_every`` feedbacks (2 here) come back with the engine."""
    from sona_plugin.engine import SonaEngine
    from sona_plugin.store import open_store

    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    acked = []
    deadline = time.time() + 240
    while len(acked) < 3 and time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("ACK "):
            acked.append(line.split()[1])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(acked) == 3
    store = open_store(Path(state) / "sona.db")
    try:
        assert all(store.has(a) for a in acked)
    finally:
        store.close()
    saved = SonaEngine.load(Path(state) / "engine")  # saved after the second feedback
    assert saved.micro_lora.delta_norm() > 0


def test_refused_candidate_is_projected_back_inside_the_budget_then_dropped(pipe, monkeypatch):
    """The learner's projection: a candidate the gate refuses at its full step is served at
    the largest of ½, ¼ of its step that passes, then at ¼ of its step with every ΔW times
    ¾ toward the base model; one refused everywhere leaves the trainer on the served
    weights."""
    from sona_plugin.learner import cycle
    from sona_plugin.training.gate import GateResult, PromotionGate

    assert pipe.adapter_version is not None, "needs a served version (earlier tests)"
    learner = pipe.learner
    trainer = learner.ensure_trainer()
    params = trainer.named_lora_params()
    start = {n: p.detach().clone() for n, p in params.items()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    cand = {n: p.detach().clone() for n, p in params.items()}

    def run(verdicts):
        calls = iter(verdicts)
        monkeypatch.setattr(
            PromotionGate, "evaluate", lambda self, *a, **k: GateResult(next(calls), {}, [])
        )
        cycle._set_lora(trainer, start, cand, 1.0)  # the trainer's candidate
        return learner._gate(start, [], probe=False)

    passed, rep, point = run([False, True])
    assert passed and point == {"step": 0.5}
    assert [t.get("step") for t in rep["tried"]] == [1.0, 0.5]
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), start[n] + 0.5 * (cand[n] - start[n]))
    passed, rep, point = run([False, False, False, True])
    assert passed and point == {"step": 0.25, "shrink": 0.75}
    for n, p in params.items():
        quarter = start[n] + 0.25 * (cand[n] - start[n])
        torch.testing.assert_close(p.detach(), quarter * (0.75 if "lora_B" in n else 1.0))
    passed, rep, point = run([False, False, False, False])
    assert not passed and point is None and len(rep["tried"]) == 4
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), start[n])


def test_restart_resumes_exactly_where_it_was(tmp_path):
    """After a restart: the MicroLoRA is bit-identical, the served version and the learner's
    state (records used, EWC++ memory, reward baseline) come back, nothing is retrained,
    and the next cycle continues from the saved state."""
    import numpy as np

    from sona_plugin.integrations.transformers import pipeline

    first = pipeline(state_dir=tmp_path)
    for q in (
        "Name a number.",
        "What is 2 plus 2?",
        "Name a fruit.",
        "Count to three.",
        "Name a planet.",
        "How many legs has a cat?",
    ):
        rid = generate_one(first, q, max_new_tokens=10)
        first.feedback(rid, liked=any(c.isdigit() for c in first.response(rid).response_text))
    rep = first.learn(epochs=1, gate=False, probe=False)
    assert rep["published"], rep
    for q in ("Name a colour.", "Name a tree.", "Name a river."):
        first.feedback(generate_one(first, q, max_new_tokens=6), liked=True)
    micro = first.engine.micro_lora
    A, B = micro.A.copy(), micro.B.copy()
    assert np.abs(B).sum() > 0
    used, baseline = first.learner.last_id, first.learner.trainer.reward_baseline
    ewc_arrays, _ = first.learner.ewc.state_dict()
    first.close()

    again = pipeline(state_dir=tmp_path)
    try:
        m = again.engine.micro_lora
        assert np.array_equal(m.A, A) and np.array_equal(m.B, B)  # not halved by the swap
        assert again.adapter_version == rep["version"]
        assert again.learner.last_id == used and again.learner.pending() == 3
        arrays, _ = again.learner.ewc.state_dict()
        assert arrays.keys() == ewc_arrays.keys()
        assert all(np.array_equal(arrays[k], v) for k, v in ewc_arrays.items())
        rep2 = again.learn(epochs=1, gate=False, probe=False)
        assert rep2["new_records"] == 3 and rep2["published"], rep2  # nothing retrained
        assert (
            rep2["train"]["baseline"] != 0.0 and again.learner.trainer.reward_baseline != baseline
        )  # the saved baseline, moved on by the new rewards
        assert again.registry.get(rep2["version"]).parent == rep["version"]
        assert (
            again.learn(epochs=1, gate=False)["skipped"] == "no new feedback since the last cycle"
        )
    finally:
        again.close()
