"""The vLLM worker side without an engine: a scripted model runner drives the wrapped
methods through slot reuse, preemption, partial prefills, n > 1 children and eviction; the
launch-config checks name the bad option. (The real-engine tests are in
tests/integration/test_vllm_*.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sona_plugin.errors import ConfigError

H, V = 8, 32


class FakeRunner:
    """Just enough of vLLM's GPUModelRunner: execute_model computes logits for the rows of
    ``input_batch.req_ids`` through ``model.compute_logits``; sample_tokens returns argmax."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        W = torch.randn(V, H, generator=g)
        self.model = SimpleNamespace(
            lm_head=SimpleNamespace(weight=W), config=SimpleNamespace(vocab_size=V)
        )
        self.model.compute_logits = lambda h: h @ W.T
        self.input_batch = SimpleNamespace(req_ids=[])
        self.requests: dict = {}
        self.hidden: dict[str, torch.Tensor] = {}
        self._logits = None
        self.sample_rows: list[bool] = []

    def get_model(self):
        return self.model

    def add(self, rid: str, prompt: list[int], lora_name: str | None = None, tenant: str = ""):
        lr = SimpleNamespace(lora_name=lora_name) if lora_name else None
        sp = SimpleNamespace(extra_args={"sona_tenant": tenant} if tenant else None)
        self.requests[rid] = SimpleNamespace(
            prompt_token_ids=prompt, lora_request=lr, sampling_params=sp
        )

    def execute_model(self, scheduler_output):
        ids = self.input_batch.req_ids
        h = torch.stack([torch.randn(H) for _ in ids])
        for rid, row in zip(ids, h):
            self.hidden[rid] = row
        self._logits = self.model.compute_logits(h)
        return None

    def sample_tokens(self, grammar_output):
        ids = list(self.input_batch.req_ids)
        toks = self._logits.argmax(-1).tolist()
        sampled = [[t] if s else [] for t, s in zip(toks, self.sample_rows or [True] * len(ids))]
        return SimpleNamespace(req_ids=ids, sampled_token_ids=sampled)


def step(runner, ids, finished=(), sample=None):
    runner.input_batch.req_ids = list(ids)
    runner.sample_rows = sample or [True] * len(ids)
    runner.execute_model(SimpleNamespace(finished_req_ids=set(finished)))
    return runner.sample_tokens(None)


@pytest.fixture()
def sona():
    from sona_plugin.integrations.vllm.worker import WorkerSona

    runner = FakeRunner()
    st = WorkerSona(
        runner,
        {"micro_lora_init": "zero_b", "micro_lora_norm_cap": 0.05, "max_trajectory_steps": 4},
        capacity=3,
    )
    runner._sona = st
    return runner, st


def test_recordings_follow_request_ids_through_slot_reuse_and_preemption(sona):
    runner, st = sona
    for rid, p in (
        ("a-11111111", [1, 2]),
        ("b-22222222", [3]),
        ("c-33333333", [4, 5, 6]),
        ("d-44444444", [7]),
    ):
        runner.add(rid, p, "sona-v000004" if rid.startswith("b") else None)
    expected: dict[str, list[int]] = {}

    def run(ids, **kw):
        out = step(runner, ids, **kw)
        for rid, toks in zip(out.req_ids, out.sampled_token_ids):
            if toks:
                expected.setdefault(rid, []).append(toks[0])

    run(["a-11111111", "b-22222222"])
    run(["a-11111111", "b-22222222"])
    # a finished: b moves into slot 0 and c reuses slot 1
    run(["b-22222222", "c-33333333"], finished={"a-11111111"})
    # b preempted (gone from the batch), d in a partial prefill that samples nothing
    run(["c-33333333", "d-44444444"], sample=[True, False])
    # b resumes in another slot, d samples now
    run(["d-44444444", "c-33333333", "b-22222222"])
    assert len(st.recordings) == 3 and st.dropped == 1  # capacity 3: finished a evicted
    for rid in ("b-22222222", "c-33333333", "d-44444444"):
        rec = st.recordings[rid]
        assert rec.tokens == expected[rid], rid
        assert len(rec.hidden) == len(rec.tokens) == len(rec.topk_ids)
    assert st.recordings["b-22222222"].version == 4
    assert st.recordings["c-33333333"].version is None
    assert st.recordings["d-44444444"].tokens == expected["d-44444444"]  # 1 token, not 2
    # the recorded hidden state of the last step is the runner's row for that request
    np.testing.assert_allclose(
        st.recordings["b-22222222"].hidden[-1], runner.hidden["b-22222222"].numpy()
    )


def test_long_answers_keep_all_token_ids_but_bounded_steps(sona):
    runner, st = sona
    runner.add("a-11111111", [1])
    for _ in range(7):
        step(runner, ["a-11111111"])
    rec = st.find("a", 0)
    assert len(rec.tokens) == 7 and len(rec.hidden) == len(rec.topk_lp) == 4
    assert st.stats()["steps_dropped"] == 3
    assert st.learn(rec, 1.0)["accepted"]


def test_find_by_client_id_and_choice_index():
    from sona_plugin.integrations.vllm.worker import WorkerSona

    runner = FakeRunner()
    st = WorkerSona(runner, {"micro_lora_init": "zero_b"}, capacity=16)
    # engine ids as vLLM's OpenAI server makes them: a completion's prompt p is submitted
    # as {id}-{p}, n > 1 children as {k}_{...}, and the engine appends 8 random characters
    ids = [
        "cmpl-x-0-abcdefgh",
        "0_chatcmpl-y-aaaaaaaa",
        "1_chatcmpl-y-bbbbbbbb",
        "0_cmpl-z-0-cccccccc",
        "1_cmpl-z-0-dddddddd",
        "0_cmpl-z-1-eeeeeeee",
        "1_cmpl-z-1-ffffffff",
        "chatcmpl-w-gggggggg",
    ]
    for i, rid in enumerate(ids):
        runner.add(rid, [i + 1])
    step(runner, ids)
    assert st.find("cmpl-x", 0).internal_id == "cmpl-x-0-abcdefgh"
    assert st.find("chatcmpl-y", 1).internal_id == "1_chatcmpl-y-bbbbbbbb"
    assert st.find("chatcmpl-y", 0).internal_id == "0_chatcmpl-y-aaaaaaaa"
    assert st.find("chatcmpl-w", 0).internal_id == "chatcmpl-w-gggggggg"
    # two prompts, n = 2: choices 0..3 are (prompt 0, k 0), (0, 1), (1, 0), (1, 1)
    assert [st.find("cmpl-z", i).internal_id for i in range(4)] == ids[3:7]
    assert st.find("chatcmpl-y", 2) is None
    assert st.find("cmpl-x", 1) is None
    assert st.find("cmpl-z", 4) is None
    assert st.find("cmpl", 0) is None
    assert st.find("chatcmpl-w", 1) is None


def test_the_recorded_top_k_is_the_configs_logit_top_k():
    from sona_plugin.integrations.vllm.worker import WorkerSona

    runner = FakeRunner()
    st = WorkerSona(runner, {"micro_lora": {"init": "zero_b", "logit_top_k": 5}}, capacity=4)
    runner.add("a-11111111", [1])
    step(runner, ["a-11111111"])
    step(runner, ["a-11111111"])
    rec = st.find("a", 0)
    assert [k.shape for k in rec.topk_ids] == [(5,), (5,)]
    # the five are the head's five most likely tokens, by log-prob
    assert np.all(np.diff(rec.topk_lp[0]) <= 0)
    wide = WorkerSona(FakeRunner(), {"logit_top_k": 1000}, capacity=4)
    assert wide.top_k == 1000  # more than the vocabulary: the whole of it is kept
    wide.runner.add("b-22222222", [1])
    step(wide.runner, ["b-22222222"])
    assert wide.find("b", 0).topk_ids[0].shape == (V,)


def test_a_like_changes_the_logits_of_later_steps(sona):
    runner, st = sona
    runner.add("a-11111111", [1])
    for _ in range(4):
        step(runner, ["a-11111111"])
    rec = st.find("a", 0)
    h = torch.stack([torch.from_numpy(x) for x in rec.hidden])
    before = runner.model.compute_logits(h).clone()
    tok = torch.tensor(rec.tokens)
    lp0 = torch.log_softmax(before, -1)[torch.arange(len(tok)), tok].sum()
    rep = st.learn(rec, 1.0)
    assert rep["accepted"] and rep["delta_norm"] > 0
    after = runner.model.compute_logits(h)
    lp1 = torch.log_softmax(after, -1)[torch.arange(len(tok)), tok].sum()
    assert float(lp1 - lp0) > 1e-3
    judged = st.find("a", 0)  # kept, ids only, so that sibling choices keep their index
    assert judged.tokens == rec.tokens and judged.hidden == []
    assert st.learn(judged, 1.0) is None  # learned once


def test_a_tenants_feedback_moves_only_its_own_microlora(sona):
    from sona_plugin.integrations.vllm.worker import adapter_name, parse_adapter_name

    runner, st = sona
    st.add_tenant("acme")
    st.add_tenant("zeta")
    runner.add("a-11111111", [1], tenant="acme")
    runner.add("z-22222222", [2], tenant="zeta")
    runner.add("d-33333333", [3])
    for _ in range(4):  # one batch, three tenants
        step(runner, ["a-11111111", "z-22222222", "d-33333333"])
    rec = st.find("a", 0, "acme")
    assert rec.tenant == "acme" and st.find("a", 0, "zeta") is None  # no cross-tenant lookup
    assert st.find("a", 0, "") is None and st.find("d", 0, "").tenant == ""
    zeta_B = st.engines["zeta"].micro_lora.B.copy()
    assert st.learn(rec, 1.0)["accepted"]
    assert st.engines["acme"].micro_lora.B.any()
    np.testing.assert_array_equal(st.engines["zeta"].micro_lora.B, zeta_B)
    assert not st.engine.micro_lora.B.any()
    # the next batch: acme's rows get acme's MicroLoRA, the others none
    W = runner.model.lm_head.weight
    step(runner, ["a-11111111", "z-22222222", "d-33333333"])
    logits = runner._logits
    for rid, moved in [("a-11111111", True), ("z-22222222", False), ("d-33333333", False)]:
        plain = runner.hidden[rid] @ W.T
        i = ["a-11111111", "z-22222222", "d-33333333"].index(rid)
        assert bool((logits[i] - plain).abs().max() > 1e-6) == moved, rid
    assert parse_adapter_name(adapter_name(7, "acme")) == ("acme", 7)
    assert parse_adapter_name(adapter_name(7)) == ("", 7) and parse_adapter_name("x") is None


def test_launch_config_errors_name_the_option():
    from sona_plugin.integrations.vllm.host import split_settings
    from sona_plugin.integrations.vllm.plugin import sona_settings

    assert sona_settings(None) is None and sona_settings({"x": 1}) is None
    assert sona_settings('{"sona": true}') == {}
    eng, opts = split_settings({"micro_lora_rank": 1, "state_dir": "/tmp/s", "schedule": "manual"})
    assert eng == {"micro_lora_rank": 1} and opts["schedule"] == "manual"
    with pytest.raises(ConfigError, match="bogus"):
        split_settings({"bogus": 1})
    with pytest.raises(ConfigError, match="micro_lora_rank"):
        split_settings({"micro_lora_rank": 7})
    with pytest.raises(ConfigError, match="schedule"):
        split_settings({"schedule": "hourly"})
    with pytest.raises(ConfigError, match="max_recordings"):
        split_settings({"max_recordings": 0})
    with pytest.raises(ConfigError, match="lm_head"):
        split_settings({"lora_targets": ["q_proj", "lm_head"]})


def test_launch_config_takes_the_nested_form():
    from sona_plugin.integrations.vllm.host import split_settings

    eng, opts = split_settings(
        {"ewc": {"initial_lambda": 500.0}, "host": {"save_every": 3}, "schedule": "manual"}
    )
    assert eng == {"ewc": {"initial_lambda": 500.0}}
    assert opts == {"save_every": 3, "schedule": "manual"}
    with pytest.raises(ConfigError, match=r"save_every must be an integer >= 0 .*got -1"):
        split_settings({"host": {"save_every": -1}})
    with pytest.raises(ConfigError, match=r"ewc\.gamma \(ewc_gamma\) must be <= 1\.0"):
        split_settings({"ewc": {"gamma": 2.0}})
    with pytest.raises(ConfigError, match=r"\$SONA_ADMIN_TOKEN"):
        split_settings({"admin_token": "secret"})
    with pytest.raises(ConfigError, match=r"\$SONA_ADMIN_TOKEN"):
        split_settings({"host": {"admin_token": "secret"}})
    with pytest.raises(ConfigError, match="host must be a JSON object"):
        split_settings({"host": 3})


def test_sona_serve_builds_the_vllm_command():
    import argparse

    from sona_plugin.cli import serve_command

    args = argparse.Namespace(
        model="/m",
        host="127.0.0.1",
        port=9000,
        state_dir="/s",
        store_url="postgresql://sona@db.internal/sona",
        registry_dir="/shared/adapters",
        schedule="manual",
        admin_token_file=None,
        max_lora_rank=None,
        sona_config='{"base_lora_rank": 16}',
    )
    cmd = serve_command(args, ["--max-model-len", "512", "--dtype", "bfloat16"])
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--max-lora-rank") + 1] == "16"
    import json

    cfg = json.loads(cmd[cmd.index("--additional-config") + 1])
    assert cfg == {
        "sona": {
            "base_lora_rank": 16,
            "state_dir": "/s",
            "store_url": "postgresql://sona@db.internal/sona",
            "registry_dir": "/shared/adapters",
            "schedule": "manual",
        }
    }
    assert cmd.count("--dtype") == 1 and cmd[-2:] == ["--dtype", "bfloat16"]
    args.store_url = "postgresql://sona:s3cret@db.internal/sona"  # visible in ps
    with pytest.raises(SystemExit, match="PGPASSWORD"):
        serve_command(args, [])
    args.store_url = None
    args.sona_config = '{"nope": 1}'
    with pytest.raises(ConfigError, match="nope"):
        serve_command(args, [])
    args.sona_config = '{"admin_token": "s3cret"}'  # would be visible in ps and the logs
    with pytest.raises(SystemExit, match="admin-token-file"):
        serve_command(args, [])


def test_a_requests_tenant_comes_from_its_header_or_a_digest_of_its_key():
    import hashlib

    from sona_plugin.integrations.vllm.server import request_tenant

    headers = {b"x-sona-tenant": b"acme", b"authorization": b"Bearer sk-123"}
    assert request_tenant(headers, "header") == "acme"
    key_tenant = request_tenant(headers, "api_key")
    assert key_tenant == "k" + hashlib.sha256(b"sk-123").hexdigest()[:16]
    assert "sk-123" not in key_tenant  # never the key itself
    assert request_tenant(headers, "off") == ""
    assert request_tenant({}, "header") == "" and request_tenant({}, "api_key") == ""
