"""Loop B's learner (sona_plugin.learner) on a tiny random Llama with a real SQLite store and
adapter registry: shift detection, the prompt-level held-out split, the drift floor, dream
rewards, and the saved state (a restart trains nothing twice, a rollback trains from the
rolled-to version)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import CharTokenizer

from sona_plugin.adapters import AdapterRegistry
from sona_plugin.config import SonaConfig
from sona_plugin.engine import SonaEngine
from sona_plugin.learner import (
    LeaningShiftDetector,
    Learner,
    ShiftDetector,
    efficiency,
    kl_floor,
)
from sona_plugin.learner.dreams import predicted_rewards
from sona_plugin.learner.heldout import PromptSplit
from sona_plugin.learner.shift import auc
from sona_plugin.store import open_store
from sona_plugin.store.base import FeedbackRecord

torch.set_num_threads(1)
V, E = 96, 8


def bernoulli(rng, p, n):
    return np.where(rng.random(n) < p, 1.0, -1.0)


# ----------------------------------------------------------------------- shift detection
def test_shift_detector_false_alarm_rate_and_delay():
    rng = np.random.default_rng(0)
    for p in (0.1, 0.4, 0.9):  # stationary: the stated 0.05-0.85 per 1,000
        det = ShiftDetector()
        alarms = sum(det.update(r) is not None for r in bernoulli(rng, p, 20_000))
        assert alarms <= 30, (p, alarms)
    delays = {(0.7, 0.2): [], (0.84, 0.56): [], (0.3, 0.75): []}
    for _trial in range(40):
        for a, b in delays:
            side = "down" if b < a else "up"
            det = ShiftDetector()
            for r in bernoulli(rng, a, 300):
                det.update(r)
            got = [i for i, r in enumerate(bernoulli(rng, b, 200)) if det.update(r) == side]
            delays[a, b].append(got[0] if got else 999)
    assert np.median(delays[0.7, 0.2]) <= 30 and np.percentile(delays[0.7, 0.2], 90) <= 60
    # a drop of 28 points, the long run's warm -> plain: the reference does not follow it
    assert np.median(delays[0.84, 0.56]) <= 45 and np.mean(np.less(delays[0.84, 0.56], 100)) >= 0.85
    assert np.median(delays[0.3, 0.75]) <= 40, delays


def test_shift_detector_learning_raises_no_drop_alarm_and_round_trips():
    rng = np.random.default_rng(1)
    downs = ups = 0
    for _ in range(30):  # 0.3 -> 0.9 over 200 feedbacks: a deployment learning
        det = ShiftDetector()
        p = np.r_[np.linspace(0.3, 0.9, 200), np.full(100, 0.9)]
        sides = [det.update(r) for r in np.where(rng.random(300) < p, 1.0, -1.0)]
        downs += sides.count("down")
        ups += sides.count("up")
    # the rise is "up" alarms (the learner explains them by the leaning test), not drops
    assert downs <= 3 and ups >= 30, (downs, ups)
    det = ShiftDetector()
    stream = bernoulli(rng, 0.5, 100)
    for r in stream[:60]:
        det.update(r)
    back = ShiftDetector.from_state(det.state_dict())
    assert [det.update(r) for r in stream[60:]] == [back.update(r) for r in stream[60:]]
    assert det.state_dict() == back.state_dict()
    # an older release's saved settings do not come back with its state
    old = {**det.state_dict(), "delta": 0.25, "warmup": 20, "horizon": 25.0}
    assert ShiftDetector.from_state(old).delta == ShiftDetector().delta


def test_auc_counts_ties_as_half():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 5, 60).astype(float)
    liked = rng.random(60) < 0.4
    pos, neg = scores[liked], scores[~liked]
    brute = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert auc(scores, liked) == pytest.approx(brute)


def test_leaning_detector_false_alarm_rate_and_power():
    """Liked answers lean toward the served version (AUC ≈ 0.64); after the shift they lean
    away (AUC ≈ 0.31, as measured on SmolLM2 for warm → plain), the liked-rate unchanged: what the liked-rate CUSUM cannot see."""
    rng = np.random.default_rng(0)

    def batch(shift: float, n: int = 50):
        liked = rng.random(n) < 0.4
        return rng.standard_normal(n) + np.where(liked, shift, 0.0), np.where(liked, 1.0, -1.0)

    false_alarms = tests = found = 0
    for _ in range(400):
        det = LeaningShiftDetector()
        for _b in range(5):
            false_alarms += det.update(*batch(0.5)) is not None
        tests += det.tests
        found += any(det.update(*batch(-0.7)) is not None for _b in range(2))
    assert false_alarms / tests <= 0.015, (false_alarms, tests)  # stated 0.5 %
    assert found / 400 >= 0.8, found
    back = LeaningShiftDetector.from_state(det.state_dict())
    assert back.state_dict() == det.state_dict()
    lean, rewards = batch(0.5)
    assert back.update(lean, rewards) == det.update(lean, rewards)
    assert det.update([0.1, 0.2], [1.0, 1.0]) is None  # too few of each side: no test


# -------------------------------------------------------------------------- held-out split
def record(
    i: int, prompt: str, emb: np.ndarray, reward: float = 1.0, response: list[int] | None = None
) -> FeedbackRecord:
    return FeedbackRecord(
        response_id=f"r{i}",
        prompt=prompt,
        prompt_ids=[5, 6, 7],
        response_ids=response or [9, 10],
        response_text="",
        reward=reward,
        embedding=np.asarray(emb, np.float32),
        id=i,
    )


def test_prompt_split_keeps_near_duplicates_together_and_is_stable():
    rng = np.random.default_rng(2)
    base = rng.standard_normal((300, 64)).astype(np.float32)  # distinct prompts
    recs = [record(i + 1, f"prompt {i}", base[i]) for i in range(300)]
    split = PromptSplit()
    sides = split.assign(recs)
    assert 0.1 < np.mean(sides) < 0.3  # about one prompt in five
    # the same prompts again, rephrased (cosine > 0.9), under new text: same side
    again = [
        record(1000 + i, f"rephrased {i}", base[i] + 0.05 * rng.standard_normal(64))
        for i in range(300)
    ]
    assert split.assign(again) == sides
    # state round trip, and a fresh split built from the same stream agrees
    back = PromptSplit.from_state(*split.state())
    assert back.assign(recs + again) == sides + sides
    assert PromptSplit().assign(recs) == sides
    # the record index: every id's side, each side's ids ascending, an id never seen None
    assert [split.side_of(r.id) for r in recs + again] == sides + sides
    assert split.side_of(999) is None
    held = split.ids(held=True)
    assert held.tolist() == sorted(r.id for r, h in zip(recs + again, sides + sides) if h)
    assert split.ids(held=False, upto=300).tolist() == [r.id for r, h in zip(recs, sides) if not h]
    assert _same_split(back, split)


def test_prompt_split_takes_an_older_record_late_and_keeps_ids_sorted():
    rng = np.random.default_rng(3)
    recs = [record(i, f"prompt {i}", rng.standard_normal(64)) for i in (5, 9, 2, 7, 1)]
    split = PromptSplit(every=2)
    sides = split.assign(recs)
    assert split.assigned == 5 and [split.side_of(r.id) for r in recs] == sides
    both = np.concatenate([split.ids(held=True), split.ids(held=False)])
    assert sorted(both.tolist()) == [1, 2, 5, 7, 9]
    assert split.ids(held=True).tolist() == sorted(r.id for r, h in zip(recs, sides) if h)
    back = PromptSplit.from_state(*split.state())
    assert _same_split(back, split) and back.assign(recs) == sides


def _same_split(a: PromptSplit, b: PromptSplit) -> bool:
    return all(np.array_equal(a.ids(held=h), b.ids(held=h)) for h in (True, False))


# --------------------------------------------------------------------------- drift floor
def test_kl_floor_and_efficiency():
    assert kl_floor(0.80, 0.41) == pytest.approx(0.32, abs=0.005)  # the figure
    assert kl_floor(0.41, 0.41) == 0.0
    assert kl_floor(1.0, 0.5) == pytest.approx(np.log(2))
    assert efficiency(0.8, 0.41, 0.64) == pytest.approx(0.5, abs=0.01)
    assert efficiency(0.8, 0.41, 0.0) is None


def test_dream_reward_depends_on_the_dreamed_answer():
    prompt = np.array([1, 0, 0, 0], np.float32)
    liked_a, disliked_a = np.array([0, 1, 0, 0], np.float32), np.array([0, 0, 1, 0], np.float32)
    known = [record(1, "p", prompt, 1.0), record(2, "p", prompt, -1.0)]
    known_emb = np.stack([liked_a, disliked_a])
    dreams = np.stack([liked_a, disliked_a, (liked_a + disliked_a) / np.sqrt(2)])
    r = predicted_rewards(dreams, np.stack([prompt] * 3), known, known_emb)
    assert r[0] > 0.9 and r[1] < -0.9 and abs(r[2]) < 1e-6


# ------------------------------------------------------------ the learner on a tiny model
class TinyHost:
    """A Host from real parts: a tiny Llama checkpoint on disk, SQLite, an AdapterRegistry."""

    def __init__(self, root: Path, model_dir: Path, **config):
        self.state_dir = root
        self.model_source = model_dir
        self.lora_targets = None
        self.tokenizer = CharTokenizer()
        self.engine = SonaEngine(
            SonaConfig(hidden_dim=32, embedding_dim=E, base_lora_rank=4, **config)
        )
        self.store = open_store(root / "sona.db")
        self.registry = AdapterRegistry(root / "adapters")
        cur = self.registry.current()
        self.served = cur.version if cur else None
        self.swaps: list[tuple[int, float]] = []

    @property
    def adapter_version(self):
        return self.served

    def serve_version(self, version: int, micro_decay: float = 1.0) -> None:
        self.served = version
        self.registry.set_current(version)  # the host's job, once it serves the version
        self.swaps.append((version, micro_decay))

    def shrink_micro(self, factor: float) -> None:
        self.engine.micro_lora.shrink(factor)

    def set_micro_norm_cap(self, cap: float, as_of: int = 0) -> None:
        self.engine.micro_lora.norm_cap = cap

    def sample_answers(self, prompt_ids, max_new_tokens):
        raise NotImplementedError("no generation in this test host")

    def embed(self, texts):
        return np.ones((len(texts), E), np.float32) / np.sqrt(E)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
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
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def feed(host: TinyHost, start: int, n: int, rng) -> None:
    for i in range(start, start + n):
        liked = i % 2 == 0
        host.store.add(
            FeedbackRecord(
                response_id=f"resp{i}",
                prompt=f"question number {i}",
                prompt_ids=rng.integers(10, V, 6).tolist(),
                response_ids=[7 if liked else 9] * 3,
                response_text="",
                reward=1.0 if liked else -1.0,
                embedding=rng.standard_normal(E).astype(np.float32),
            )
        )


def add_judged(host: TinyHost, rng, n: int, liked: list[bool], liked_token: int) -> int:
    """Store one judged answer per flag: ``liked_token`` three times when liked, the other
    of 7/9 when not; records are numbered from ``n``. Returns the next number."""
    for like in liked:
        token = liked_token if like else 16 - liked_token  # 7 <-> 9
        host.store.add(
            FeedbackRecord(
                response_id=f"s{n}",
                prompt=f"q{n}",
                prompt_ids=rng.integers(10, V, 6).tolist(),
                response_ids=[token] * 3,
                response_text="",
                reward=1.0 if like else -1.0,
                embedding=rng.standard_normal(E).astype(np.float32),
            )
        )
        n += 1
    return n


def test_restart_trains_nothing_twice_and_restores_the_whole_state(tmp_path, tiny_model_dir):
    rng = np.random.default_rng(3)
    host = TinyHost(tmp_path, tiny_model_dir)
    learner = Learner(host, epochs=1)
    feed(host, 0, 40, rng)
    rep = learner.run(gate=False)
    assert rep["published"] and rep["version"] == 1, rep
    assert host.swaps == [(1, 0.5)]  # a new version lets the MicroLoRA fade
    assert 0 < rep["heldout_new"] < 40 and rep["trained_on"] >= 40 - rep["heldout_new"]
    assert rep["kl_per_answer"] >= 0.0
    assert learner.ewc.fisher_updates == 1
    saved = learner._state()

    host2 = TinyHost(tmp_path, tiny_model_dir)  # a restart: everything from disk
    again = Learner(host2, epochs=1)
    assert host2.served == 1 and host2.swaps == []
    assert again.last_id == learner.last_id == 40 and again.pending() == 0
    assert again.cycles == 1 and _same_split(again.split, learner.split)
    assert host2.engine.reasoning_bank.pattern_count == host.engine.reasoning_bank.pattern_count
    a_arrays, a_meta = again._state()
    for k, v in saved[0].items():
        np.testing.assert_array_equal(a_arrays[k], v, err_msg=k)
    assert a_meta["detector"] == saved[1]["detector"]
    assert a_meta["trainer"]["reward_mean"] == saved[1]["trainer"]["reward_mean"]
    assert again.run(gate=False)["skipped"] == "no new feedback since the last cycle"
    # the next cycle continues from the served weights and the saved baseline
    feed(host2, 40, 10, rng)
    rep2 = again.run(gate=False)
    assert rep2["new_records"] == 10 and rep2["version"] == 2
    assert rep2["train"]["baseline"] != 0.0


def test_rollback_trains_from_the_rolled_to_version(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    rng = np.random.default_rng(4)
    host = TinyHost(tmp_path, tiny_model_dir)
    learner = Learner(host, epochs=1)
    feed(host, 0, 30, rng)
    assert learner.run(gate=False)["version"] == 1
    feed(host, 30, 30, rng)
    assert learner.run(gate=False)["version"] == 2
    host.registry.set_current(1)
    host.serve_version(1)
    learner.on_rollback(1)
    trainer = learner.ensure_trainer()
    v1 = load_file(str(host.registry.get(1).path / "adapter_model.safetensors"))
    from peft import get_peft_model_state_dict

    got = get_peft_model_state_dict(trainer.peft_model)
    assert set(got) == set(v1)
    assert all(torch.equal(got[k], t) for k, t in v1.items())
    assert learner.run(gate=False)["skipped"]  # pinned: no new feedback
    feed(host, 60, 10, rng)
    rep = learner.run(gate=False)
    assert rep["version"] == 3
    assert host.registry.get(3).parent == 1  # derived from the version rolled back to


def test_a_cycle_reads_the_records_it_uses_not_the_whole_store(
    tmp_path, tiny_model_dir, monkeypatch
):
    from sona_plugin.learner import cycle

    rng = np.random.default_rng(11)
    host = TinyHost(tmp_path, tiny_model_dir)
    learner = Learner(host, epochs=1)
    feed(host, 0, 600, rng)  # a long deployment's feedback, already trained on
    used = host.store.records()
    learner.split.assign(used)
    learner.last_id = used[-1].id
    held = [r.id for r in used if learner.split.side_of(r.id)]
    window = host.engine.config.gate_heldout_records
    assert [r.id for r in learner._heldout()] == held[-window:]
    host.store.quarantine(f"resp{held[-1] - 1}")  # the newest held-out one leaves the window
    assert [r.id for r in learner._heldout()] == held[-window - 1 : -1]
    train_side = [r.id for r in used if not learner.split.side_of(r.id)]
    monkeypatch.setattr(cycle, "REPLAY_POOL_MAX", 10_000)
    assert [r.id for r in learner.training_records()] == train_side  # all, below the cap
    monkeypatch.setattr(cycle, "REPLAY_POOL_MAX", 64)
    pool = learner.training_records()
    assert len(pool) == 64 and not any(learner.split.side_of(r.id) for r in pool)
    assert pool[0].id < used[300].id < pool[-1].id  # drawn over the whole history
    assert [r.id for r in learner.training_records(newest=3)] == train_side[-3:]

    read: list[int] = []
    for name in ("records", "records_with_ids"):
        real = getattr(host.store, name)
        monkeypatch.setattr(
            host.store,
            name,
            lambda *a, _real=real, **k: read.append(len(out := _real(*a, **k))) or out,
        )
    feed(host, 600, 20, rng)
    rep = learner.run(gate=False)
    assert rep["published"] and rep["new_records"] == 20, rep
    # 20 new, 40 held out, 64 replay candidates: not the 620 stored, twice
    assert sum(read) <= 20 + window + 64, read
    assert rep["trained_on"] > 20 - rep["heldout_new"]  # replay came along


def test_unhinted_shift_starts_a_new_ewc_task_from_the_served_weights(tmp_path, tiny_model_dir):
    rng = np.random.default_rng(5)
    host = TinyHost(tmp_path, tiny_model_dir)
    learner = Learner(host, epochs=1)
    n = 0
    for _ in range(2):  # taste A: 80 % liked
        for _i in range(40):
            liked = rng.random() < 0.8
            host.store.add(
                FeedbackRecord(
                    response_id=f"a{n}",
                    prompt=f"q{n}",
                    prompt_ids=rng.integers(10, V, 6).tolist(),
                    response_ids=[7] * 3,
                    response_text="",
                    reward=1.0 if liked else -1.0,
                    embedding=rng.standard_normal(E).astype(np.float32),
                )
            )
            n += 1
        assert "boundaries" not in learner.run(gate=False)
    served = {k: v.detach().clone() for k, v in learner.trainer.named_lora_params().items()}
    for i in range(60):  # taste B: the same answers now mostly disliked
        liked = rng.random() < 0.15
        host.store.add(
            FeedbackRecord(
                response_id=f"b{i}",
                prompt=f"q{n + i}",
                prompt_ids=rng.integers(10, V, 6).tolist(),
                response_ids=[7] * 3,
                response_text="",
                reward=1.0 if liked else -1.0,
                embedding=rng.standard_normal(E).astype(np.float32),
            )
        )
    rep = learner.run(gate=False)
    assert rep["boundaries"] and rep["boundaries"][0]["direction"] == "down", rep
    assert learner.ewc.task_count == 1 and learner.boundaries[-1]["ewc_task_started"]
    arrays, _ = learner.ewc.state_dict()
    for k, v in served.items():  # θ* is what served when the shift was seen
        np.testing.assert_array_equal(arrays[f"task0.theta.{k}"], v.numpy())
    assert rep["train"]["penalty"] >= 0.0


def test_a_shift_at_the_same_liked_rate_is_found_by_what_the_model_learned(
    tmp_path, tiny_model_dir
):
    """Taste A likes answer 7 7 7 and dislikes 9 9 9; taste B the reverse, at the same
    50 % liked-rate: the liked-rate CUSUM stays silent, the leaning test sees it."""
    rng = np.random.default_rng(8)
    host = TinyHost(tmp_path, tiny_model_dir)
    learner = Learner(host, epochs=1)
    n = 0

    def round_of(liked_token: int) -> dict:
        nonlocal n
        n = add_judged(host, rng, n, [i % 2 == 0 for i in range(40)], liked_token)
        return learner.run(gate=False)

    assert "boundaries" not in round_of(7)  # v1: the base served these answers
    rep = round_of(7)
    assert "boundaries" not in rep and rep["leaning_auc"] > 0.9, rep
    rep = round_of(9)
    assert rep["leaning_auc"] < 0.1 and rep["leaning_z"] > 2.576, rep
    assert [b["direction"] for b in rep["boundaries"]] == ["leaning"], rep
    assert learner.ewc.task_count == 1 and "taste shift" in learner.boundaries[-1]["reason"]
    assert learner.detector.alarms == 0  # the liked-rate never moved


def test_a_replica_follows_the_trainers_version_and_continues_from_its_state(
    tmp_path, tiny_model_dir
):
    rng = np.random.default_rng(9)
    trainer_host = TinyHost(tmp_path / "a", tiny_model_dir)
    replica = TinyHost(tmp_path / "b", tiny_model_dir)
    replica.store = trainer_host.store  # one store (PostgreSQL in a deployment)
    replica.registry = AdapterRegistry(tmp_path / "a" / "adapters")  # one registry directory
    trainer, follower = Learner(trainer_host, epochs=1), Learner(replica, epochs=1)
    feed(trainer_host, 0, 40, rng)
    assert trainer.run(gate=False)["version"] == 1
    replica.serve_version(1)
    follower.follow(1)
    assert follower.last_id == trainer.last_id == 40 and follower.pending() == 0
    assert _same_split(follower.split, trainer.split) and follower.cycles == trainer.cycles
    theirs, mine = trainer._state()[0], follower._state()[0]
    for k, v in theirs.items():
        np.testing.assert_array_equal(mine[k], v, err_msg=k)
    assert follower.run(gate=False)["skipped"] == "no new feedback since the last cycle"
    feed(trainer_host, 40, 10, rng)  # the trainer went away; this replica takes over
    rep = follower.run(gate=False)
    assert rep["new_records"] == 10 and rep["version"] == 2
    assert replica.registry.get(2).parent == 1


def test_a_failed_cycle_leaves_its_records_to_the_next(tmp_path, tiny_model_dir):
    rng = np.random.default_rng(6)
    host = TinyHost(tmp_path, tiny_model_dir)
    learner = Learner(host, epochs=1)
    feed(host, 0, 20, rng)
    trainer = learner.ensure_trainer()

    def broken(*a, **k):
        raise RuntimeError("out of memory")

    trainer.train = broken
    with pytest.raises(RuntimeError, match="out of memory"):
        learner.run(gate=False)
    assert learner.last_id == 0 and learner.pending() == 20 and learner.cycles == 0
    assert learner.detector.seen == 0 and learner.trainer is None
    rep = learner.run(gate=False)  # a fresh trainer, the same records
    assert rep["new_records"] == 20 and rep["published"]


def test_the_micro_lora_is_scaled_back_inside_the_drift_budget(tmp_path, tiny_model_dir):
    rng = np.random.default_rng(7)
    host = TinyHost(tmp_path, tiny_model_dir, micro_lora_norm_cap=100.0)
    learner = Learner(host, epochs=1)
    micro = host.engine.micro_lora
    A = rng.standard_normal((micro.rank, 32)).astype(np.float32)
    micro.set_params(A * 1e-3, micro.B)  # a small instant lesson: served as it is
    feed(host, 0, 30, rng)
    rep = learner.run()
    small = rep["micro"]
    assert small["scale"] == 1.0 and len(small["tried"]) == 1, small
    assert small["tried"][0]["metrics"]["anchor_nll_ratio"] < 1.05
    np.testing.assert_array_equal(micro.A, A * 1e-3)

    micro.set_params(A * 30, micro.B)  # one that wrecks the served logits
    before = micro.delta_norm()
    feed(host, 30, 30, rng)
    rep = learner.run()
    big = rep["micro"]
    assert big["scale"] < 1.0, big
    assert big["tried"][0]["metrics"]["anchor_nll_ratio"] > 1.05
    assert "anchor-text NLL rose" in big["tried"][0]["reasons"][0]
    assert micro.delta_norm() == pytest.approx(before * big["scale"], rel=1e-5)
    if big["scale"] > 0:  # the scale kept is the first that passed
        assert not big["tried"][-1]["reasons"]
    # the instant loop may not regrow it past the norm that passed
    assert micro.norm_cap == big["norm_cap"] == pytest.approx(max(micro.delta_norm(), 100 / 16))
    assert small["norm_cap"] == 100.0  # a passing check leaves the config's bound


def test_between_cycles_the_micro_lora_is_checked_every_n_feedbacks(tmp_path, tiny_model_dir):
    rng = np.random.default_rng(8)
    host = TinyHost(tmp_path, tiny_model_dir, micro_lora_norm_cap=100.0)
    learner = Learner(host, epochs=1)
    feed(host, 0, 30, rng)
    learner.run(gate=False)  # v1 serves; the cycle's records count as checked
    assert not learner.micro_check_due(10)
    micro = host.engine.micro_lora
    micro.set_params(rng.standard_normal((micro.rank, 32)).astype(np.float32) * 30, micro.B)
    feed(host, 30, 9, rng)
    assert not learner.micro_check_due(10)
    feed(host, 39, 1, rng)
    assert learner.micro_check_due(10) and not learner.micro_check_due(0)
    before = micro.delta_norm()
    rep = learner.check_micro()
    assert rep["scale"] < 1.0 and "anchor-text NLL rose" in rep["tried"][0]["reasons"][0]
    assert micro.delta_norm() == pytest.approx(before * rep["scale"], rel=1e-5)
    assert learner.micro_checks == 1 and not learner.micro_check_due(10)
    assert learner.pending() == 10  # a check trains nothing and uses no record
    cap = micro.norm_cap
    assert cap < 100.0 and cap == rep["norm_cap"]
    learner.save()
    host2 = TinyHost(tmp_path, tiny_model_dir, micro_lora_norm_cap=100.0)  # a restart
    restored = Learner(host2, epochs=1)
    assert host2.engine.micro_lora.norm_cap == cap
    assert not restored.micro_check_due(10)  # the records checked stay checked
    feed(host2, 40, 10, rng)
    assert restored.micro_check_due(10)


def test_a_rise_that_learning_explains_is_no_boundary_a_reversed_taste_is(tmp_path, tiny_model_dir):
    """The liked-rate rises with the taste unchanged (liked answers lean as before): the
    CUSUM's "up" alarm is reported as a rise, no EWC++ task starts. A rise where the other
    answers are now liked is a boundary."""
    rng = np.random.default_rng(10)
    host = TinyHost(tmp_path, tiny_model_dir)
    learner = Learner(host, epochs=1)
    n = 0

    def round_of(liked_token: int, count: int, every: int) -> dict:
        nonlocal n
        # every `every`-th answer disliked (every other one, from the first, for 2)
        liked = [i % 2 == 0 if every == 2 else i % every != 0 for i in range(count)]
        n = add_judged(host, rng, n, liked, liked_token)
        return learner.run(gate=False)

    for _ in range(3):  # 50 % liked; v1..v3 learn that 7 7 7 is liked
        assert "boundaries" not in round_of(7, 40, 2)
    rep = round_of(7, 60, 8)  # 7 of 8 liked: the rise learning would bring
    assert rep["liked_rate_rises"] and rep["liked_rate_rises"][0]["leaning_z"] < 1.645, rep
    assert "boundaries" not in rep and learner.ewc.task_count == 0, rep
    assert learner.detector.alarms == 1
    rep = round_of(9, 60, 8)  # as many likes, for the answers the versions unlearned
    assert "leaning" in [b["direction"] for b in rep["boundaries"]], rep
    assert learner.ewc.task_count == 1


def test_a_candidate_over_the_kl_budget_is_shrunk_to_fit_from_its_smallest_step(
    tmp_path, tiny_model_dir, monkeypatch
):
    """Refused at every step for its KL, the ¼ step is shrunk toward the base model by the
    factor fitted to the KL it measured, then refitted once from the shrunk point's KL;
    the point that passes is what the trainer holds. A point refused for something else
    is shrunk by ¾ once, and a refusal there returns the trainer to the served weights."""
    from sona_plugin.learner import cycle
    from sona_plugin.training.gate import GateResult, PromotionGate

    rng = np.random.default_rng(11)
    host = TinyHost(tmp_path, tiny_model_dir, gate_max_kl_per_answer=3.0)
    learner = Learner(host, epochs=1)
    feed(host, 0, 30, rng)
    assert learner.run(gate=False)["version"] == 1  # a served version to shrink toward
    trainer = learner.trainer
    params = trainer.named_lora_params()
    start = {n: p.detach().clone() for n, p in params.items()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g) * 1e-2)
    cand = {n: p.detach().clone() for n, p in params.items()}

    margins = []

    def run(verdicts):
        calls = iter(verdicts)
        margins.clear()

        def evaluate(self, *a, **k):
            margins.append(self.heldout_margin_se)
            passed, failed, kl = next(calls)
            return GateResult(
                passed, {"kl_per_answer": kl}, [f"{f} failed" for f in failed], {}, failed
            )

        monkeypatch.setattr(PromotionGate, "evaluate", evaluate)
        cycle._set_lora(trainer, start, cand, 1.0)
        return learner._gate(start, [], probe=False)

    over = (False, ["kl_budget"], 6.0)
    passed, rep, point = run(
        [over, over, (False, ["kl_budget"], 4.0), (False, ["kl_budget"], 3.4), (True, [], 2.9)]
    )
    c1 = (0.9 * 3.0 / 4.0) ** (1 / 1.5)  # fitted to the ¼ step's KL
    c2 = c1 * (0.9 * 3.0 / 3.4) ** (1 / 1.5)  # refitted to the shrunk point's KL
    assert passed and point == {"step": 0.25, "shrink": round(c2, 4)}
    assert [t.get("shrink") for t in rep["tried"]] == [None, None, None, round(c1, 4), round(c2, 4)]
    # the steps get the configured held-out margin; the points shrunk toward the base
    # model (they give up part of what serves) must not score below the served version
    assert margins == [host.engine.config.gate_heldout_margin_se] * 3 + [0.0, 0.0]
    assert host.engine.config.gate_heldout_margin_se == 1.0
    for n, p in params.items():
        quarter = start[n] + 0.25 * (cand[n] - start[n])
        want = quarter * round(c2, 4) if "lora_B" in n else quarter
        torch.testing.assert_close(p.detach(), want)

    off = (False, ["on_topic"], 2.0)
    passed, rep, point = run([off, off, off, off])
    assert not passed and point is None
    assert [t.get("shrink") for t in rep["tried"]] == [None, None, None, 0.75]
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), start[n])
    assert cycle.shrink_to_budget(6.0, 0.0) == 0.75  # no budget: the plain shrink
    assert cycle.shrink_to_budget(100.0, 3.0) == 0.25  # never below a quarter


def test_the_probe_questions_are_distinct_and_none_is_a_benchmark_prompt(tmp_path, tiny_model_dir):
    """Every probe the config allows exists, and none is a demo/benchmark prompt: the
    benchmarks' held-out on-topic score stays on prompts the gate never asked. The
    learner's checks ask as many as the config says."""
    import dataclasses

    from sona_plugin.config import GateConfig
    from sona_plugin.demo import HELDOUT_PROMPTS, STREAM_PROMPTS
    from sona_plugin.learner.cycle import PROBE_PROMPTS

    field = next(f for f in dataclasses.fields(GateConfig) if f.name == "on_topic_probes")
    assert field.metadata["hi"] == len(PROBE_PROMPTS) == len(set(PROBE_PROMPTS))
    seen = {p.lower() for p in STREAM_PROMPTS + HELDOUT_PROMPTS}
    assert not [p for p in PROBE_PROMPTS if p.lower() in seen]
    for n in (48, 5, 0):
        host = TinyHost(tmp_path / str(n), tiny_model_dir, gate_on_topic_probes=n)
        assert Learner(host)._probes() == PROBE_PROMPTS[:n]
    assert SonaConfig().gate_on_topic_probes == 48
