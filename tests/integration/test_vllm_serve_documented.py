"""`sona serve` started exactly as the README shows it (no options at all; only
``$SONA_HOME`` points at a fresh directory, with the converted model linked in): SONA's
routes are there, and feedback is taken on the ids of chat completions, streamed chat
completions and plain completions, with ``index`` picking a choice when ``n > 1``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from _serving import http_call, stop, wait_healthy

PORT = 8000  # the README's address: sona serve binds 127.0.0.1:8000
BASE = f"http://127.0.0.1:{PORT}"


def call(method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict]:
    return http_call(BASE, method, path, body, headers=headers)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from sona_plugin.models import default_llm_path, sona_home

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(("127.0.0.1", PORT))
        except OSError:
            pytest.fail(
                f"port {PORT} is in use: this test starts `sona serve` with no "
                f"options, which binds 127.0.0.1:{PORT}"
            )
    model = default_llm_path()  # converted once, shared with the other tests
    home = tmp_path_factory.mktemp("sona-home")
    (home / "models").symlink_to(sona_home() / "models", target_is_directory=True)
    assert model.exists()
    sona = shutil.which("sona", path=str(Path(sys.executable).parent))
    cmd = [sona, "serve"] if sona else [sys.executable, "-m", "sona_plugin.cli", "serve"]
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed in teardown
    env = {**os.environ, "SONA_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("SONA_ADMIN_TOKEN", None)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if not wait_healthy(BASE, proc):
        proc.kill()
        log.close()
        pytest.fail("sona serve did not start:\n" + (home / "server.log").read_text()[-4000:])
    model_name = call("GET", "/v1/models")[1]["data"][0]["id"]
    yield model_name, home, proc
    if proc.poll() is None:
        stop(proc, log)
    else:
        log.close()


def feedback(rid: str, reward: float, index: int | None = None) -> tuple[int, dict]:
    body = {"id": rid, "reward": reward}
    if index is not None:
        body["index"] = index
    return call("POST", "/v1/feedback", body)


def test_feedback_route_is_on_with_no_options(server):
    model, home, _ = server
    code, out = call(
        "POST",
        "/v1/chat/completions",
        {
            "model": model,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "Name a fruit."}],
        },
    )
    assert code == 200, out
    code, fb = feedback(out["id"], 1.0)
    assert code == 200, fb
    assert fb["instant"]["accepted"] and fb["stored_id"] >= 1
    code, st = call("GET", "/sona/stats")
    assert code == 200 and st["feedback_stored"] == 1, st
    assert (home / "state" / "sona.db").exists()  # the documented default state dir


def test_streamed_chat_id_takes_feedback(server):
    model, _, _ = server
    req = urllib.request.Request(
        BASE + "/v1/chat/completions",
        method="POST",
        data=json.dumps(
            {
                "model": model,
                "max_tokens": 8,
                "stream": True,
                "messages": [{"role": "user", "content": "Name a colour."}],
            }
        ).encode(),
    )
    req.add_header("Content-Type", "application/json")
    ids = set()
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: {"):
                ids.add(json.loads(line[6:])["id"])
    assert len(ids) == 1, ids
    code, fb = feedback(ids.pop(), -1.0)
    assert code == 200 and fb["instant"]["accepted"], fb


def test_completion_ids_take_feedback_by_choice_index(server):
    model, _, _ = server
    code, out = call(
        "POST", "/v1/completions", {"model": model, "prompt": "The sky is", "max_tokens": 6}
    )
    assert code == 200, out
    assert out["id"].startswith("cmpl-")
    code, fb = feedback(out["id"], 1.0)
    assert code == 200 and fb["instant"]["accepted"], fb

    # two prompts, two choices each: vLLM numbers the choices 0..3, prompt by prompt
    code, out = call(
        "POST",
        "/v1/completions",
        {
            "model": model,
            "prompt": ["A cat is", "Rain falls"],
            "n": 2,
            "max_tokens": 6,
            "temperature": 1.0,
            "seed": 3,
        },
    )
    assert code == 200, out
    assert sorted(c["index"] for c in out["choices"]) == [0, 1, 2, 3]
    for c in out["choices"]:
        code, fb = feedback(out["id"], 1.0 if c["index"] % 2 else -1.0, c["index"])
        assert code == 200, (c["index"], fb)
        assert fb["index"] == c["index"]
    assert feedback(out["id"], 1.0, 4)[0] == 404
    assert feedback(out["id"], 1.0, 2)[0] == 409  # one feedback per choice


def test_chat_with_n_choices_by_index(server):
    model, _, _ = server
    code, out = call(
        "POST",
        "/v1/chat/completions",
        {
            "model": model,
            "max_tokens": 8,
            "n": 2,
            "temperature": 1.0,
            "messages": [{"role": "user", "content": "Name a tree."}],
        },
    )
    assert code == 200, out
    for i in (1, 0):
        code, fb = feedback(out["id"], 1.0, i)
        assert code == 200 and fb["index"] == i, fb
    assert feedback(out["id"], 1.0, 2)[0] == 404


def test_every_response_names_the_adapter_version_that_answered(server):
    model, _, _ = server
    headers: dict = {}
    code, out = call(
        "POST",
        "/v1/chat/completions",
        {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi."}]},
        headers=headers,
    )
    assert code == 200 and headers.get("x-sona-adapter-version") == "0", headers  # base model
    code, fb = feedback(out["id"], 1.0)
    assert code == 200 and fb["adapter_version"] is None  # what the worker ran: no adapter
    req = urllib.request.Request(
        BASE + "/v1/chat/completions",
        method="POST",
        data=json.dumps(
            {
                "model": model,
                "max_tokens": 4,
                "stream": True,
                "messages": [{"role": "user", "content": "Hi."}],
            }
        ).encode(),
    )
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=300) as r:
        assert r.headers["x-sona-adapter-version"] == "0"
        r.read()


def test_admin_routes_answer_on_loopback_without_a_token(server):
    code, st = call("GET", "/sona/stats")
    assert code == 200 and st["admin"] == "loopback", st
    assert call("GET", "/sona/adapters")[0] == 200
    code, recs = call("GET", "/sona/feedback?limit=2")
    assert code == 200 and len(recs["records"]) == 2 and "embedding" not in recs["records"][0]


def test_feedback_past_the_clients_rate_gets_429_with_retry_after(server):
    statuses, retry = [], None
    for i in range(150):  # default: 10/s per client, bursts of 50
        headers: dict = {}
        code, err = call(
            "POST", "/v1/feedback", {"id": f"chatcmpl-nope{i}", "reward": 1.0}, headers=headers
        )
        statuses.append(code)
        if code == 429:
            retry = headers.get("retry-after")
            assert "rate limit" in err["error"]["message"], err
    assert set(statuses) == {404, 429} and statuses[0] == 404, statuses
    assert retry is not None and int(retry) >= 1


def test_sigterm_saves_what_the_micro_lora_learned(server):
    """No feedback count or timer has saved the last instant updates: the shutdown hook
    does (vLLM never calls a plugin's close())."""
    import signal
    import time

    from sona_plugin.engine import SonaEngine

    model, home, proc = server
    time.sleep(3)  # the rate limit's bucket refills
    code, out = call(
        "POST",
        "/v1/chat/completions",
        {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Name a dog."}]},
    )
    assert code == 200
    assert feedback(out["id"], 1.0)[0] == 200
    live = call("GET", "/sona/stats")[1]["micro_delta_norm"]
    assert live > 0
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    saved = SonaEngine.load(home / "state" / "engine")
    assert abs(saved.micro_lora.delta_norm() - live) <= 1e-6 * live, (saved.stats(), live)
