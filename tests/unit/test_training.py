"""Loop B on a tiny random Llama: objective, BaseLoRATrainer, EWC++, selection, promotion gate."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _tiny import CharTokenizer

from sona_plugin.config import SonaConfig  # noqa: E402
from sona_plugin.errors import DimensionMismatch, InvalidValue, StateError  # noqa: E402
from sona_plugin.ewc import EwcPlusPlus  # noqa: E402
from sona_plugin.reasoning_bank import ReasoningBank  # noqa: E402
from sona_plugin.store.base import FeedbackRecord  # noqa: E402
from sona_plugin.training.data import assign_patterns, select_training_set  # noqa: E402
from sona_plugin.training.gate import (  # noqa: E402
    ANCHOR_TEXTS,
    ModelView,
    PromotionGate,
    on_topic_score,
    ratio_lower_bound,
)
from sona_plugin.training.objective import (  # noqa: E402
    mean_response_logprob,
    reinforce_kl_loss,
    response_logprobs,
)
from sona_plugin.training.trainer import BaseLoRATrainer  # noqa: E402

# One thread: on a shared 2-core machine, two threads on these tiny matrices spend their
# time waiting for each other (measured 80x slower under load).
torch.set_num_threads(1)
V = 96
LIKED, DISLIKED = 7, 9


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return LlamaForCausalLM(cfg).eval()


def rec(
    i: int, prompt: list[int], response: list[int], reward: float, emb: np.ndarray | None = None
) -> FeedbackRecord:
    return FeedbackRecord(
        response_id=f"r{i}",
        prompt="",
        prompt_ids=list(prompt),
        response_ids=list(response),
        response_text="",
        reward=float(reward),
        embedding=np.zeros(4, np.float32) if emb is None else emb,
    )


def prompts(n: int, seed: int, length: int = 6) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(10, V, length).tolist() for _ in range(n)]


def preference_records(n: int, seed: int, liked: int = LIKED, disliked: int = DISLIKED):
    """Per prompt: a liked answer of token ``liked`` and a disliked one of ``disliked``."""
    out = []
    for i, p in enumerate(prompts(n, seed)):
        out.append(rec(2 * i, p, [liked] * 3, 1.0))
        out.append(rec(2 * i + 1, p, [disliked] * 3, -1.0))
    return out


def config(**kw) -> SonaConfig:
    kw.setdefault("base_lora_rank", 4)
    return SonaConfig(**kw)


def lora(trainer, which: str) -> dict[str, torch.Tensor]:
    return {n: p for n, p in trainer.named_lora_params().items() if f"lora_{which}" in n}


# ----------------------------------------------------------------------------- objective
def test_first_backward_reaches_b_not_a():
    tr = BaseLoRATrainer(tiny_llama(), config())
    recs = preference_records(4, seed=1)
    loss, _ = reinforce_kl_loss(tr.model, recs, torch.tensor([1.0, -1.0] * 4), beta=0.05)
    loss.backward()
    # B = 0 at init: the gradient reaches B through A·x, while A's gradient goes through B.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora(tr, "B").values())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in lora(tr, "A").values())


def test_response_logprobs_match_unpadded_scoring():
    model = tiny_llama()
    recs = [rec(0, [11, 12, 13, 14, 15], [20, 21], 1.0), rec(1, [30, 31], [40, 41, 42, 43], 1.0)]
    with torch.no_grad():
        batched = response_logprobs(model, recs)
        for r, lp in zip(recs, batched):
            ids = torch.tensor([r.prompt_ids + r.response_ids])
            full = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            want = full[len(r.prompt_ids) - 1 :].gather(-1, ids[0, len(r.prompt_ids) :, None])[:, 0]
            assert lp.shape == (len(r.response_ids),)
            torch.testing.assert_close(lp, want, atol=1e-5, rtol=0)


def test_max_length_drops_prompt_tokens_from_the_left():
    from sona_plugin.training.objective import make_batch

    b = make_batch([rec(0, [11, 12, 13, 14, 15], [20, 21], 1.0)], max_length=4)
    assert b.input_ids.tolist() == [[14, 15, 20, 21]]
    assert b.targets[b.target_mask].tolist() == [20, 21]


def test_reference_cache_gives_the_same_training():
    runs = []
    for mb in (0.0, 256.0):
        tr = BaseLoRATrainer(tiny_llama(), config(), ref_cache_mb=mb)
        runs.append(tr.train(preference_records(6, seed=1), epochs=3, batch_size=4, lr=5e-3))
    np.testing.assert_allclose(runs[0].losses, runs[1].losses, atol=1e-5)
    assert runs[0].kl == pytest.approx(runs[1].kl, abs=1e-6)


def test_loss_is_per_token_mean_reinforce():
    model = tiny_llama()
    recs = [rec(0, [11, 12], [20], 1.0), rec(1, [30, 31], [40, 41, 42, 43, 44, 45], 1.0)]
    adv = torch.tensor([0.5, -1.0])
    with torch.no_grad():
        loss, stats = reinforce_kl_loss(model, recs, adv, beta=0.0)
        lps = response_logprobs(model, recs)
    want = -(0.5 * lps[0].mean() - 1.0 * lps[1].mean()) / 2
    assert float(loss) == pytest.approx(float(want), abs=1e-6)
    assert stats["tokens"] == 7
    with pytest.raises(InvalidValue, match="one value per record"):
        reinforce_kl_loss(model, recs, torch.ones(3), beta=0.0)


def test_clipped_surrogate_equals_reinforce_at_the_start_and_stops_moved_tokens():
    model = tiny_llama()
    recs = preference_records(3, seed=4)
    adv = torch.tensor([1.0, -1.0] * 3)
    with torch.no_grad():
        old = torch.cat(response_logprobs(model, recs))

    def grads(**kw):
        model.zero_grad(set_to_none=True)
        loss, _ = reinforce_kl_loss(model, recs, adv, beta=0.0, **kw)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    torch.testing.assert_close(grads(old_logprobs=old, clip=0.2), grads(), atol=1e-6, rtol=1e-5)
    # every token already 50 % more likely (liked) / less likely (disliked) than when
    # sampled: past the clip, nothing pulls further
    moved = old - torch.cat([torch.full((3,), s) for s in (0.4055, -0.4055) * 3])
    assert grads(old_logprobs=moved, clip=0.2).abs().max() == 0
    with pytest.raises(InvalidValue, match="old_logprobs"):
        reinforce_kl_loss(model, recs, adv, beta=0.0, clip=0.2)


def test_per_record_baselines_replace_the_running_mean():
    recs = preference_records(4, seed=5)
    runs = []
    for baselines in (None, [0.0] * len(recs), [1.0, -1.0] * 4):
        tr = BaseLoRATrainer(tiny_llama(), config(), seed=0)
        runs.append(tr.train(recs, epochs=1, batch_size=8, lr=5e-3, baselines=baselines))
    # r − b = 0 for every record: nothing to learn, the loss has no gradient
    assert runs[2].losses[0] == pytest.approx(0.0, abs=1e-7)
    assert runs[0].losses[0] != pytest.approx(runs[2].losses[0], abs=1e-4)
    with pytest.raises(InvalidValue, match="baselines"):
        BaseLoRATrainer(tiny_llama(), config()).train(recs, baselines=[0.0])


# ------------------------------------------------------------------------------ trainer
def test_training_moves_preference_on_heldout_prompts_and_kl_grows():
    tr = BaseLoRATrainer(tiny_llama(), config(), seed=0)
    train = preference_records(16, seed=1)
    held = preference_records(8, seed=2)
    _, stats0 = reinforce_kl_loss(tr.model, train[:8], torch.ones(8), beta=0.05)
    assert stats0["kl"] == 0.0  # B = 0: the adapter is the identity

    before = mean_response_logprob(tr.model, held)
    report = tr.train(train, epochs=6, batch_size=8, lr=5e-3)
    after = mean_response_logprob(tr.model, held)
    delta = after - before
    assert report.skipped is None and report.steps == 6 * 4 and len(report.losses) == 24
    assert float(delta[0::2].mean()) > 0.1, "liked (token 7) answers must become more likely"
    assert float(delta[1::2].mean()) < -0.1, "disliked (token 9) answers must become less likely"
    _, stats1 = reinforce_kl_loss(tr.model, train[:8], torch.ones(8), beta=0.05)
    assert stats1["kl"] > 1e-4 and report.kl > 0


def test_empty_and_unscorable_records_are_reported_as_skipped():
    tr = BaseLoRATrainer(tiny_llama(), config())
    before = {n: p.detach().clone() for n, p in tr.named_lora_params().items()}
    r = tr.train([])
    assert r.skipped == "no records" and r.steps == 0 and r.losses == []
    r = tr.train([rec(0, [11, 12], [], 1.0)])
    assert r.skipped is not None and "response tokens" in r.skipped and r.dropped == 1
    assert all(torch.equal(before[n], p) for n, p in tr.named_lora_params().items())
    assert json.loads(json.dumps(r.to_dict()))["skipped"] == r.skipped


def test_running_reward_mean_persists_and_round_trips():
    tr = BaseLoRATrainer(tiny_llama(), config())
    recs = [rec(i, [11, 12, 13], [LIKED], 1.0) for i in range(4)]
    # the baseline folds in this call's rewards and one neutral prior reward of 0
    assert tr.train(recs, epochs=1).baseline == pytest.approx(4 / 5)
    assert tr.reward_baseline == pytest.approx(4 / 5)
    assert tr.train(recs, epochs=1).baseline == pytest.approx(8 / 9)
    state = json.loads(json.dumps(tr.state_dict()))
    tr2 = BaseLoRATrainer(tiny_llama(), config())
    tr2.load_state_dict(state)
    assert tr2.reward_baseline == pytest.approx(8 / 9) and tr2.state_dict() == tr.state_dict()
    with pytest.raises(StateError):
        BaseLoRATrainer(tiny_llama(), config(base_lora_rank=2)).load_state_dict(state)


def test_adapter_round_trip_and_mismatch(tmp_path):
    tr = BaseLoRATrainer(tiny_llama(), config())
    tr.train(preference_records(4, seed=1), epochs=2, lr=5e-3)
    path = tr.save_adapter(tmp_path / "v1")
    assert (path / "adapter_model.safetensors").exists()
    tr2 = BaseLoRATrainer(tiny_llama(), config(), seed=5)
    ids = torch.tensor([[11, 12, 13, LIKED, LIKED]])
    with torch.no_grad():
        assert not torch.allclose(tr2.model(input_ids=ids).logits, tr.model(input_ids=ids).logits)
        tr2.load_adapter_weights(path)
        torch.testing.assert_close(tr2.model(input_ids=ids).logits, tr.model(input_ids=ids).logits)
    with pytest.raises(StateError, match="shape"):
        BaseLoRATrainer(tiny_llama(), config(base_lora_rank=2)).load_adapter_weights(path)
    with pytest.raises(StateError, match="does not match"):
        BaseLoRATrainer(tiny_llama(), config(), target_modules=("q_proj",)).load_adapter_weights(
            path
        )
    with pytest.raises(StateError, match="no adapter"):
        tr.load_adapter_weights(tmp_path / "missing")


def test_ewc_penalty_keeps_lora_near_task_a():
    def run(lam: float) -> float:
        cfg = config(ewc_lambda=lam, ewc_min_lambda=0.0, ewc_max_lambda=1e9)
        ewc = EwcPlusPlus(cfg)
        tr = BaseLoRATrainer(tiny_llama(), cfg, ewc=ewc, seed=0)
        assert set(ewc.names) == set(tr.named_lora_params())
        task_a = preference_records(8, seed=1)
        tr.train(task_a, epochs=4, lr=5e-3)  # task A: 7 liked
        tr.update_fisher(task_a)
        theta_a = {n: p.detach().clone() for n, p in tr.named_lora_params().items()}
        assert ewc.start_new_task({n: p.numpy() for n, p in theta_a.items()})
        ewc.set_lambda(lam)
        report = tr.train(
            preference_records(8, seed=3, liked=DISLIKED, disliked=LIKED), epochs=4, lr=5e-3
        )  # task B: the opposite preference
        assert (report.penalty > 0) == (lam > 0)
        return (
            sum(
                float((p.detach() - theta_a[n]).pow(2).sum())
                for n, p in tr.named_lora_params().items()
            )
            ** 0.5
        )

    # the default λ (1000) is not inert: with the per-token Fisher the penalty is in KL
    # units (update_fisher's mean); the squared batch-loss gradients used before
    # needed λ = 1e7 to hold anything
    free, held = run(0.0), run(SonaConfig().ewc_lambda)
    assert held < 0.8 * free, (held, free)


def test_fisher_is_folded_in_only_when_asked():
    cfg = config()
    ewc = EwcPlusPlus(cfg)
    tr = BaseLoRATrainer(tiny_llama(), cfg, ewc=ewc)
    report = tr.train(preference_records(4, seed=1), epochs=1)
    assert ewc.fisher_updates == 0 and ewc.task_count == 0  # a candidate is not remembered
    assert tr.update_fisher(preference_records(4, seed=1)) > 0
    assert ewc.fisher_updates == 1
    fisher = ewc.fisher
    assert any(float(f.sum()) > 0 for n, f in fisher.items() if "lora_B" in n)
    assert report.first_epoch_loss is not None


def test_invalid_arguments():
    tr = BaseLoRATrainer(tiny_llama(), config())
    recs = preference_records(2, seed=1)
    for kw in ({"epochs": 0}, {"batch_size": 0}, {"lr": -1.0}):
        with pytest.raises(InvalidValue):
            tr.train(recs, **kw)
    with pytest.raises(InvalidValue, match="PEFT"):
        BaseLoRATrainer(tr.model, config())
    for kw, field in (({"clip": 1.5}, "clip"), ({"optimizer": "lion"}, "optimizer")):
        with pytest.raises(InvalidValue, match=field):
            BaseLoRATrainer(tiny_llama(), config(), **kw)


def test_sgd_moves_the_preference_too():
    tr = BaseLoRATrainer(tiny_llama(), config(), optimizer="sgd")
    held = preference_records(8, seed=2)
    before = mean_response_logprob(tr.model, held)
    tr.train(preference_records(16, seed=1), epochs=6, batch_size=8, lr=0.5)
    delta = mean_response_logprob(tr.model, held) - before
    assert float(delta[0::2].mean()) > float(delta[1::2].mean()) + 0.05


# -------------------------------------------------------------------------- selection
def _bank_and_pool(d: int = 8):
    rng = np.random.default_rng(0)
    dirs = np.eye(d, dtype=np.float32)[:3] * 5.0
    bank = ReasoningBank(SonaConfig(embedding_dim=d, pattern_clusters=3))
    for k in range(3):
        for _ in range(10):
            bank.add_trajectory(dirs[k] + 0.1 * rng.standard_normal(d).astype(np.float32), 0.8)
    bank.extract_patterns()
    assert bank.pattern_count == 3

    def emb(k):
        return dirs[k] + 0.1 * rng.standard_normal(d).astype(np.float32)

    sizes = (30, 6, 3)  # replay pool dominated by cluster 0
    replay, truth = [], {}
    for k, n in enumerate(sizes):
        for _ in range(n):
            r = rec(1000 + len(replay), [11, 12], [LIKED], 1.0, emb(k))
            truth[r.response_id] = k
            replay.append(r)
    new = [rec(i, [11, 12], [LIKED], 1.0, emb(i % 3)) for i in range(18)]
    return bank, replay, new, truth


def test_replay_is_balanced_across_patterns():
    bank, replay, new, truth = _bank_and_pool()
    out = select_training_set(new, bank=bank, replay=replay, replay_fraction=0.25, seed=0)
    assert out[:18] == new
    picked = out[18:]
    assert len(picked) == 6  # 0.25 of the set: 6 replay for 18 new
    counts = np.bincount([truth[r.response_id] for r in picked], minlength=3)
    assert counts.tolist() == [2, 2, 2]
    again = select_training_set(new, bank=bank, replay=replay, replay_fraction=0.25, seed=0)
    assert [r.response_id for r in again] == [r.response_id for r in out]
    # the nearest-pattern assignment recovers the planted clusters
    groups = assign_patterns(replay, bank)
    for k in range(3):
        members = {int(g) for g, r in zip(groups, replay) if truth[r.response_id] == k}
        assert len(members) == 1


def test_selection_caps_new_records_and_handles_edge_cases():
    bank, replay, new, truth = _bank_and_pool()
    capped = select_training_set(new, bank=bank, max_records=6, seed=1)
    assert len(capped) == 6
    assert np.bincount([int(r.response_id[1:]) % 3 for r in capped], minlength=3).tolist() == [
        2,
        2,
        2,
    ]
    assert select_training_set([], bank=bank, replay=replay) == []
    assert select_training_set(new, replay=replay, replay_fraction=0.0) == new
    no_bank = select_training_set(new, replay=replay, replay_fraction=0.5, seed=0)
    assert len(no_bank) == 18 + 18
    assert select_training_set(new, replay=new, replay_fraction=0.5) == new  # nothing to replay
    with pytest.raises(InvalidValue):
        select_training_set(new, replay_fraction=1.0)
    wrong = [rec(0, [11], [LIKED], 1.0, np.ones(5, np.float32))]
    with pytest.raises(DimensionMismatch):
        select_training_set(wrong + new, bank=bank, max_records=3)


# ------------------------------------------------------------------------------- gate
@pytest.fixture(scope="module")
def fluent_tiny():
    """The tiny Llama fitted to a few anchor texts, so that it has an NLL to lose."""
    model = tiny_llama()
    tok = CharTokenizer()
    ids = torch.tensor([tok(t[:80])["input_ids"] for t in ANCHOR_TEXTS[:4]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


def test_gate_rejects_broken_adapter_and_accepts_identical_one(fluent_tiny):
    import copy

    tr = BaseLoRATrainer(copy.deepcopy(fluent_tiny), config())
    tok = CharTokenizer()
    anchors = [t[:80] for t in ANCHOR_TEXTS[:4]]
    held = preference_records(4, seed=2)
    gate = PromotionGate()
    same = gate.evaluate(tr.model, ModelView.base(tr.model), held, anchors, tok)
    assert same.passed and same.reasons == []
    assert same.metrics["anchor_nll_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert same.metrics["anchor_nll_current"] < 3.0  # well below uniform, ln 96 = 4.56

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora(tr, "B").values():
            p.copy_(torch.randn(p.shape, generator=g) * 3.0)
    bad = gate.evaluate(tr.model, ModelView.base(tr.model), [], anchors, tok)
    assert not bad.passed
    assert any("anchor-text NLL" in r for r in bad.reasons)
    assert bad.metrics["anchor_nll_candidate"] > 1.05 * bad.metrics["anchor_nll_current"]
    assert bad.metrics["heldout_records"] == 0  # no held-out feedback: check 1 not run
    # the adapter is active again after the gate used the model with it switched off
    assert gate.evaluate(tr.model, tr.model, held, anchors, tok).passed
    with torch.no_grad():
        ids = torch.tensor([tok(anchors[0])["input_ids"]])
        assert not torch.allclose(tr.model(input_ids=ids).logits, fluent_tiny(input_ids=ids).logits)


def bag_of_chars(texts):
    out = np.zeros((len(texts), 128))
    for i, t in enumerate(texts):
        for c in t.lower():
            out[i, ord(c) % 128] += 1
    return out


def test_on_topic_score():
    assert on_topic_score(["abc", "xyz"], ["cab", "xyz"], bag_of_chars) == pytest.approx(1.0)
    assert on_topic_score(["abc"], [""], bag_of_chars) == 0.0
    assert on_topic_score(["abc"], ["xyz"], bag_of_chars) == 0.0


def test_gate_on_topic_check_rejects_drift(fluent_tiny):
    import copy

    tr = BaseLoRATrainer(copy.deepcopy(fluent_tiny), config())
    tok = CharTokenizer()
    probes = [t[:30] for t in ANCHOR_TEXTS[:4]]
    gate = PromotionGate(tolerance_nll=1e6, max_new_tokens=16)  # isolate check 3
    same = gate.evaluate(
        tr.model,
        ModelView.base(tr.model),
        [],
        None,
        tok,
        embedder=bag_of_chars,
        probe_prompts=probes,
    )
    assert same.passed and same.metrics["on_topic_ratio"] == pytest.approx(1.0)
    assert same.samples["candidate"] == same.samples["current"]
    assert len(same.samples["candidate"]) == 4

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora(tr, "B").values():
            p.copy_(torch.randn(p.shape, generator=g) * 3.0)
    drift = gate.evaluate(
        tr.model,
        ModelView.base(tr.model),
        [],
        None,
        tok,
        embedder=bag_of_chars,
        probe_prompts=probes,
    )
    assert drift.metrics["on_topic_candidate"] < 0.9 * drift.metrics["on_topic_current"]
    assert not drift.passed and any("off the question" in r for r in drift.reasons)
    assert same.metrics["on_topic_ratio_lower"] == pytest.approx(1.0)  # nothing changed

    # the floor is checked with a margin for the prompts sampled: a bar at the measured
    # ratio itself passes on the ratio alone and fails on its lower confidence bound
    ratio, low = drift.metrics["on_topic_ratio"], drift.metrics["on_topic_ratio_lower"]
    assert low < ratio
    at_ratio = dict(tolerance_nll=1e6, max_new_tokens=16, min_on_topic_ratio=ratio - 1e-9)
    args = (tr.model, ModelView.base(tr.model), [], None, tok)
    kw = dict(embedder=bag_of_chars, probe_prompts=probes)
    assert PromotionGate(on_topic_confidence=0.5, **at_ratio).evaluate(*args, **kw).passed
    bounded = PromotionGate(**at_ratio).evaluate(*args, **kw)
    assert not bounded.passed and bounded.failed == ["on_topic"]
    assert "lower 0.95 bound" in bounded.reasons[0]
    with pytest.raises(InvalidValue, match="on_topic_confidence"):
        PromotionGate(on_topic_confidence=1.0)

    # a drifted model serving now does not lower the bar: against the base model as a
    # fixed reference the same drift fails, although it equals the current model's
    assert gate.evaluate(
        tr.model, tr.model, [], None, tok, embedder=bag_of_chars, probe_prompts=probes
    ).passed
    cache: dict = {}
    for _ in range(2):  # the second call answers from the cache
        fixed = gate.evaluate(
            tr.model,
            tr.model,
            [],
            None,
            tok,
            embedder=bag_of_chars,
            probe_prompts=probes,
            reference=ModelView.base(tr.model),
            reference_cache=cache,
        )
        assert not fixed.passed and any("reference" in r for r in fixed.reasons)
        assert fixed.metrics["on_topic_reference"] == pytest.approx(
            same.metrics["on_topic_current"]
        )
        assert fixed.samples["reference"] == same.samples["current"]
    assert len(cache) == 1 + len(probes)  # anchor NLL + one answer per probe


def test_ratio_lower_bound_covers_the_true_ratio_at_its_confidence():
    """Drawn 36 prompts at a time from a population whose on-topic ratio is exactly
    0.9, the 95 % lower bound lies above 0.9 in about 5 % of the draws; the measured
    ratio alone does so in about half of them."""
    rng = np.random.default_rng(0)
    den = rng.uniform(0.2, 0.8, 20_000)
    changed = rng.random(den.size) < 0.5
    num = np.where(changed, den + rng.normal(0, 0.15, den.size), den)
    num *= 0.9 * den.mean() / num.mean()  # the population's ratio: 0.9
    above_bound = above_ratio = 0
    draws = 2_000
    for _ in range(draws):
        i = rng.integers(0, den.size, 36)
        above_bound += ratio_lower_bound(num[i], den[i], 0.95) > 0.9
        above_ratio += num[i].mean() / den[i].mean() > 0.9
    assert 0.03 < above_bound / draws < 0.08
    assert 0.4 < above_ratio / draws < 0.6
    assert ratio_lower_bound([0.5, 0.4], [0.5, 0.4], 0.95) == pytest.approx(1.0)
    assert ratio_lower_bound([0.3, 0.5], [0.5, 0.5], 0.5) == pytest.approx(0.8)
    assert ratio_lower_bound([0.3], [0.5], 0.95) == pytest.approx(0.6)  # one prompt: no sd


def test_gate_on_topic_check_answers_heldout_prompts(fluent_tiny):
    import copy

    tr = BaseLoRATrainer(copy.deepcopy(fluent_tiny), config())
    tok = CharTokenizer()
    held = preference_records(3, seed=2)
    for r in held:
        r.embedding = bag_of_chars([tok.decode(r.prompt_ids)])[0].astype(np.float32)
    gate = PromotionGate(tolerance_nll=1e6, tolerance_heldout=1e6, max_new_tokens=8)
    res = gate.evaluate(
        tr.model,
        ModelView.base(tr.model),
        held,
        None,
        tok,
        embedder=bag_of_chars,
        probe_prompts=["abc"],
    )
    assert res.metrics["on_topic_prompts"] == 1 + len(held)
    assert len(res.samples["candidate"]) == 1 + len(held)
    assert (
        PromotionGate(on_topic_records=0, tolerance_nll=1e6, tolerance_heldout=1e6)
        .evaluate(
            tr.model,
            ModelView.base(tr.model),
            held,
            None,
            tok,
            embedder=bag_of_chars,
            probe_prompts=["abc"],
        )
        .metrics["on_topic_prompts"]
        == 1
    )
    with pytest.raises(InvalidValue, match="on_topic_records"):
        PromotionGate(on_topic_records=-1)


def test_gate_heldout_check_rejects_reversed_preference():
    tr = BaseLoRATrainer(tiny_llama(), config())
    tr.train(preference_records(8, seed=1, liked=DISLIKED, disliked=LIKED), epochs=4, lr=5e-3)
    held = preference_records(4, seed=2)
    res = PromotionGate(tolerance_nll=10.0).evaluate(
        tr.model, ModelView.base(tr.model), held, None, CharTokenizer()
    )
    assert not res.passed and any("held-out" in r for r in res.reasons)
    assert res.metrics["heldout_candidate"] < res.metrics["heldout_current"]
    assert json.loads(json.dumps(res.to_dict()))["passed"] is False
    # the paired standard error of that difference is reported (a noise scale for it)
    assert res.metrics["heldout_diff_se"] > 0 and "standard error" in res.reasons[0]


def test_gate_heldout_margin_is_counted_in_paired_standard_errors():
    tr = BaseLoRATrainer(tiny_llama(), config())
    tr.train(preference_records(8, seed=1, liked=DISLIKED, disliked=LIKED), epochs=4, lr=5e-3)
    held = preference_records(4, seed=2)

    def failed(margin):
        res = PromotionGate(tolerance_nll=10.0, heldout_margin_se=margin).evaluate(
            tr.model, ModelView.base(tr.model), held, None, CharTokenizer()
        )
        m = res.metrics
        return res.failed, (m["heldout_current"] - m["heldout_candidate"]) / m["heldout_diff_se"]

    got, drop_in_se = failed(0.0)
    assert "heldout_score" in got and drop_in_se > 0
    assert "heldout_score" in failed(drop_in_se - 0.05)[0]
    assert "heldout_score" not in failed(drop_in_se + 0.05)[0]
    with pytest.raises(InvalidValue, match="heldout_margin_se"):
        PromotionGate(heldout_margin_se=-1.0)


def test_paired_se_is_the_standard_error_of_the_per_record_difference():
    from sona_plugin.training.gate import paired_se

    recs = [SimpleNamespace(reward=r) for r in (1.0, -1.0, 1.0, -1.0)]
    a, b = torch.tensor([-1.0, -2.0, -1.5, -2.5]), torch.tensor([-1.2, -1.8, -1.5, -2.0])
    d = np.array([1.0, -1.0, 1.0, -1.0]) * (a - b).numpy()  # rewards are centred already
    assert paired_se(a, b, recs) == pytest.approx(d.std(ddof=1) / 2.0)
    assert paired_se(a, a, recs) == 0.0 and paired_se(a[:1], b[:1], recs[:1]) == 0.0


class _LoweredTokens(torch.nn.Module):
    """``model`` with the logits of ``tokens`` lowered by ``by``."""

    def __init__(self, model, tokens, by):
        super().__init__()
        self.model, self.tokens, self.by = model, list(tokens), by

    def forward(self, **kw):
        logits = self.model(**kw).logits.clone()
        logits[..., self.tokens] -= self.by
        return SimpleNamespace(logits=logits)


def test_gate_refuses_a_candidate_that_lowers_every_heldout_answer():
    """Most held-out feedback is negative (1 like in 4): uncentred, ``mean r·logπ`` rose
    when every answer became less likely. Centred, and with the liked answers' log-prob
    checked, that candidate is refused; one that separates liked from disliked passes."""
    model = tiny_llama()
    held = []
    for i, p in enumerate(prompts(8, seed=5)):
        held.append(
            rec(
                i,
                p,
                [LIKED] * 3 if i % 4 == 0 else [DISLIKED + i % 3] * 3,
                1.0 if i % 4 == 0 else -1.0,
            )
        )
    # a candidate under which every held-out answer is less likely: the answers' tokens
    # get a lower logit (the rest of the vocabulary gains)
    cand = _LoweredTokens(model, sorted({t for x in held for t in x.response_ids}), 1.0)
    with torch.no_grad():
        before = mean_response_logprob(model, held)
        after = mean_response_logprob(cand, held)
    assert bool((after < before).all())  # every held-out answer fell
    r = torch.tensor([x.reward for x in held])
    assert float((r * after).mean()) > float((r * before).mean())  # the old score rose
    gate = PromotionGate(tolerance_nll=1e6)
    res = gate.evaluate(cand, model, held, None, CharTokenizer())
    assert not res.passed, res.metrics
    assert any("liked answers became less likely" in x for x in res.reasons)

    good = BaseLoRATrainer(tiny_llama(), config())
    good.train(preference_records(8, seed=1), epochs=4, lr=5e-3)
    ok = gate.evaluate(good.model, ModelView.base(good.model), held, None, CharTokenizer())
    assert ok.passed, ok.reasons
    assert ok.metrics["heldout_candidate"] > ok.metrics["heldout_current"]


def test_inverted_feedback_flood_cannot_get_a_candidate_served():
    """500 feedbacks with inverted rewards (a hostile client on training prompts) train a
    candidate; the gate, scoring it on held-out prompts with the users' real feedback,
    refuses it."""
    tr = BaseLoRATrainer(tiny_llama(), config())
    flood = preference_records(250, seed=11, liked=DISLIKED, disliked=LIKED)
    assert len(flood) == 500
    tr.train(flood, epochs=1, batch_size=25, lr=5e-3)
    held = preference_records(6, seed=12)
    gate = PromotionGate(tolerance_nll=1e6)
    assert gate.heldout_margin_se == 1.0  # the default: a drop within 1 SE would pass
    res = gate.evaluate(tr.model, ModelView.base(tr.model), held, None, CharTokenizer())
    assert not res.passed and "heldout_score" in res.failed, res.reasons
    m = res.metrics
    assert (m["heldout_current"] - m["heldout_candidate"]) / m["heldout_diff_se"] > 1.0


def test_gate_kl_budget_refuses_a_candidate_that_spends_too_much_drift():
    tr = BaseLoRATrainer(tiny_llama(), config())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora(tr, "B").values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    held = preference_records(4, seed=2)
    base = ModelView.base(tr.model)
    loose = PromotionGate(
        tolerance_nll=1e6,
        tolerance_heldout=1e6,
        tolerance_liked=1e6,
        max_kl_per_answer=1e6,
        max_new_tokens=8,
    )
    res = loose.evaluate(tr.model, base, held, None, CharTokenizer())
    kl = res.metrics["kl_per_answer"]
    assert kl > 0 and res.passed
    tight = PromotionGate(
        tolerance_nll=1e6,
        tolerance_heldout=1e6,
        tolerance_liked=1e6,
        max_kl_per_answer=kl / 10,
        max_new_tokens=8,
    )
    res = tight.evaluate(tr.model, base, held, None, CharTokenizer())
    assert not res.passed and any("drift budget" in r for r in res.reasons)
    same = tight.evaluate(base, base, held, None, CharTokenizer())  # the base spends nothing
    assert same.metrics["kl_per_answer"] == pytest.approx(0.0, abs=1e-6) and same.passed
    assert (
        "kl_per_answer"
        not in PromotionGate().evaluate(tr.model, base, held, None, CharTokenizer()).metrics
    )  # off by default
