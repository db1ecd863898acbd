"""Best-of-k serving (rerank.candidates) in SonaPipeline on the real SmolLM2-135M-Instruct:
one answer of k is served, its feedback teaches the reward model, and what the reward model
learned survives a restart and a crash between saves; a quarantined judgement leaves it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sona_plugin.rerank import answer_features

torch.set_num_threads(2)

CONFIG = {"rerank_candidates": 4, "rerank_refit_every": 6}
PROMPTS = ["Name a fruit.", "Name a color.", "Say hello.", "Name an animal.", "Name a city."]


def chat(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return tmp_path_factory.mktemp("rerank-state")


def test_best_of_k_serves_one_answer_and_learns_from_its_feedback(state):
    from sona_plugin.integrations.transformers import pipeline

    pipe = pipeline(state_dir=state, sona_config=CONFIG)
    try:
        greedy = pipe(chat("Name a fruit."), max_new_tokens=8, do_sample=False)
        assert len(greedy) == 1 and pipe.stats()["responses_held"] == 1
        rids = []
        for i in range(12):
            out = pipe(chat(PROMPTS[i % len(PROMPTS)]), max_new_tokens=8, do_sample=True)
            assert len(out) == 1  # one of the four candidates
            rids.append(out[0]["response_id"])
        assert pipe.stats()["responses_held"] == 13  # the other candidates are dropped

        r = pipe.response(rids[0])
        again = answer_features(pipe.answer_hidden(r.prompt_ids, r.response_ids))
        assert np.allclose(again, answer_features(r.hidden), atol=1e-3)  # what a restart uses

        probe = np.stack([answer_features(pipe.response(rid).hidden) for rid in rids])
        for i, rid in enumerate(rids):
            pipe.feedback(rid, liked=i % 2 == 0)
        pipe.ranker.refit()  # fits come every 6 judgements: one on all 12 to compare with
        pipe.ranker.wait()
        stats = pipe.stats()["rerank"]
        assert stats["candidates"] == 4 and stats["judgements"] == 12 and stats["fitted"]
        pipe.quarantine(rids[0], "test: a hostile judgement")  # out of the reward model too
        pipe.ranker.wait()
        assert len(pipe.ranker) == 11
        before = pipe.ranker.score(probe)
    finally:
        pipe.close()

    pipe = pipeline(state_dir=state, sona_config=CONFIG)  # a restart
    try:
        pipe.ranker.wait()
        assert len(pipe.ranker) == 11 and np.allclose(pipe.ranker.score(probe), before)
    finally:
        pipe.close()

    (state / "ranker.safetensors").unlink()  # a crash before the ranker was ever saved
    pipe = pipeline(state_dir=state, sona_config=CONFIG)
    try:
        pipe.ranker.wait()  # the judgements come back from the store, features recomputed
        assert len(pipe.ranker) == 11 and pipe.ranker.last_id == 12
        assert np.allclose(pipe.ranker.score(probe), before, atol=1e-2)
    finally:
        pipe.close()
