"""sona_plugin vs the Node.js package @ruvector/sona@0.1.8, side by side in one run.

    python benchmarks/kernels.py [--repeats 7] [--skip-node] [--out results/kernels.json]

The Node side is the peer harness ``shared/anchors/ruvector-sona/bench.mjs`` (installed
with npm into ``~/.cache/sona_plugin/peer`` on first use); the Python side repeats the
same operations on the same shapes and data distribution: 8 Gaussian clusters in 256-d
(means ~ N(0,1), sigma 0.5), trajectories of a query plus 3 steps (activations near the
query, a softmax of attention weights), rewards 0.8-1.0. Timings are medians over
repeats of calibrated loops, ns per operation, Python-call overhead included (inputs
are float32 NumPy arrays, what a Python caller holds; Node's are number[]).
Ratios are Node time / Python time (> 1: Python faster). Recording is timed two ways on
our side, both against the peer's one way (begin, 3 steps, end): step by step, and in one
``record_trajectory`` call with the steps as [3, 256] arrays (the peer has no batched
call). Note what each side does: our flush applies 100 REINFORCE updates with a trust
region; the peer's flush moves its output by ~1e-6 relative (its own behaviour probe).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sona_plugin import SonaConfig, SonaEngine, kernels

HERE = Path(__file__).resolve().parent
HARNESS = HERE.parent.parent / "shared" / "anchors" / "ruvector-sona" / "bench.mjs"
PEER_DIR = Path(os.environ.get("SONA_PEER_DIR", Path.home() / ".cache" / "sona_plugin" / "peer"))
D, K_TRUE, SIGMA = 256, 8, 0.5


# ----------------------------------------------------------------------------- data
def make_clusters(seed: int, d: int = D, k: int = K_TRUE):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, d)).astype(np.float32)

    def sample(c: int) -> np.ndarray:
        return (means[c] + SIGMA * rng.standard_normal(d)).astype(np.float32)

    def trajectory(c: int) -> dict:
        q = sample(c)
        steps = []
        for _ in range(3):
            act = (q + 0.1 * rng.standard_normal(d)).astype(np.float32)
            z = rng.standard_normal(d)
            attn = np.exp(z - z.max())
            steps.append(
                (act, (attn / attn.sum()).astype(np.float32), float(0.8 + 0.2 * rng.uniform()))
            )
        return {"q": q, "steps": steps, "quality": float(0.8 + 0.2 * rng.uniform())}

    return means, sample, trajectory


def record(eng: SonaEngine, t: dict) -> None:
    tid = eng.begin_trajectory(t["q"])
    for act, attn, r in t["steps"]:
        eng.add_step(tid, act, attn, r)
    eng.end_trajectory(tid, t["quality"])


def as_batch(t: dict) -> dict:
    """The same trajectory as a caller holding whole arrays has it: [T, d] steps."""
    acts, attn, rewards = zip(*t["steps"])
    return {**t, "H": np.stack(acts), "A": np.stack(attn), "R": list(rewards)}


def record_batched(eng: SonaEngine, b: dict) -> None:
    eng.record_trajectory(b["q"], b["H"], b["R"], b["quality"], b["A"])


# ----------------------------------------------------------------------------- timing
def bench_loop(fn, repeats: int, target_s: float = 0.1) -> dict:
    calls, t0 = 0, time.perf_counter()
    while calls < 20 or time.perf_counter() - t0 < 0.05:
        fn(calls)
        calls += 1
    per = (time.perf_counter() - t0) / calls
    iters = max(5, min(1_000_000, round(target_s / per)))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for i in range(iters):
            fn(i)
        samples.append((time.perf_counter_ns() - t0) / iters)
    return summarize(samples, iters_per_repeat=iters)


def summarize(samples: list[float], **extra) -> dict:
    return {
        "median_ns": statistics.median(samples),
        "min_ns": min(samples),
        "max_ns": max(samples),
        "repeats": len(samples),
        **extra,
    }


def run_python(repeats: int) -> dict:
    B: dict[str, dict] = {}
    for d in (256, 576, 4096):
        eng = SonaEngine(d)
        rng = np.random.default_rng(100 + d)
        xs = [rng.standard_normal(d).astype(np.float32) for _ in range(16)]
        fwd = eng.apply_micro_lora
        B[f"applyMicroLora_{d}d"] = bench_loop(lambda i, xs=xs, fwd=fwd: fwd(xs[i & 15]), repeats)

    _, sample, trajectory = make_clusters(42)
    pool = [trajectory(i % K_TRUE) for i in range(64)]
    batches = [as_batch(t) for t in pool]
    n = 2000
    samples: dict[str, list[float]] = {"per_step": [], "batched": []}
    for _ in range(repeats):  # the two paths alternate, so both see the same machine
        for path, fn, data in (("per_step", record, pool), ("batched", record_batched, batches)):
            eng = SonaEngine(D)
            t0 = time.perf_counter_ns()
            for i in range(n):
                fn(eng, data[i & 63])
            samples[path].append((time.perf_counter_ns() - t0) / n)
    B["record_trajectory_256d_3steps"] = summarize(samples["per_step"], trajectories_per_repeat=n)
    B["record_trajectory_batched_256d_3steps"] = summarize(
        samples["batched"], trajectories_per_repeat=n
    )

    samples = []
    for _ in range(repeats):
        eng = SonaEngine(D)
        cyc = []
        for k in range(5):
            for i in range(100):
                record(eng, pool[(i + k) & 63])
            t0 = time.perf_counter_ns()
            eng.flush()
            cyc.append(time.perf_counter_ns() - t0)
        samples.append(statistics.median(cyc))
    B["flush_after_100_trajectories"] = summarize(samples)

    traj1000 = [trajectory(i % K_TRUE) for i in range(1000)]
    last = None
    for label, cfg in (("default_config", {}), ("patternClusters_8", {"pattern_clusters": 8})):
        samples, pats = [], []
        for _ in range(repeats if label == "default_config" else 5):
            eng = SonaEngine(SonaConfig(hidden_dim=D, **cfg))
            for t in traj1000:
                record(eng, t)
            eng.flush()  # the instant queue is not part of the peer's forceLearn
            t0 = time.perf_counter_ns()
            eng.force_learn()
            samples.append(time.perf_counter_ns() - t0)
            pats.append(eng.stats()["patterns_stored"])
            last = eng if label == "default_config" else last
        B[f"forceLearn_1000traj_8clusters_{label}"] = summarize(samples, patterns_stored=pats)

    qs = [sample(i % K_TRUE) for i in range(64)]
    B["findPatterns_k5"] = bench_loop(lambda i: last.find_patterns(qs[i & 63], 5), repeats)
    B["findPatterns_k5"]["patterns_stored"] = last.stats()["patterns_stored"]
    return B


def memory_child(n: int) -> None:
    """Print RSS growth per recorded trajectory (run in a fresh process)."""
    import resource  # noqa: F401  (Linux: /proc gives current RSS)

    def rss() -> int:
        gc.collect()
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    _, _, trajectory = make_clusters(7)
    pool = [trajectory(i % K_TRUE) for i in range(64)]
    # each trajectory holds its own arrays, as a caller's fresh inputs would
    m0 = rss()
    eng = SonaEngine(SonaConfig(hidden_dim=D, trajectory_capacity=10000))
    m1 = rss()
    for i in range(n):
        t = pool[i & 63]
        fresh = {
            "q": t["q"].copy(),
            "quality": t["quality"],
            "steps": [(a.copy(), w.copy(), r) for a, w, r in t["steps"]],
        }
        record(eng, fresh)
    m2 = rss()
    print(
        "MEM_RESULT "
        + json.dumps(
            {
                "n": n,
                "engine_create_rss_bytes": m1 - m0,
                "rss_per_traj_bytes": (m2 - m1) / n,
                "buffered": eng.stats()["trajectories_buffered"],
            }
        )
    )


def run_memory() -> dict:
    runs = []
    for _ in range(3):
        p = subprocess.run(
            [sys.executable, __file__, "--mem-child", "10000"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        line = next((x for x in p.stdout.splitlines() if x.startswith("MEM_RESULT ")), None)
        if line:
            runs.append(json.loads(line[11:]))
    per = [r["rss_per_traj_bytes"] for r in runs]
    return {
        "rss_per_trajectory_bytes": {
            "median": statistics.median(per),
            "min": min(per),
            "max": max(per),
        },
        "runs": runs,
        "payload_f32_bytes_per_trajectory": (D + 3 * 2 * D) * 4,
    }


# ----------------------------------------------------------------------------- node
def run_node(repeats: int) -> dict | None:
    node = shutil.which("node")
    if node is None or not HARNESS.exists():
        print(f"node or the harness ({HARNESS}) is missing: Node side skipped", file=sys.stderr)
        return None
    if not (PEER_DIR / "node_modules" / "@ruvector" / "sona").exists():
        PEER_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--no-save", "--prefix", str(PEER_DIR), "@ruvector/sona@0.1.8"],
            check=True,
            capture_output=True,
        )
    env = {**os.environ, "SONA_DIR": str(PEER_DIR)}
    p = subprocess.run(
        [node, "--expose-gc", str(HARNESS), "--skip-behaviour", "--repeats", str(repeats)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    if p.returncode != 0:
        print(p.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(p.stdout)


ROWS = [
    ("applyMicroLora_256d", "apply_micro_lora, 256-d"),
    ("applyMicroLora_576d", "apply_micro_lora, 576-d"),
    ("applyMicroLora_4096d", "apply_micro_lora, 4096-d"),
    ("record_trajectory_256d_3steps", "record trajectory, per step (begin+3+end)"),
    ("record_trajectory_batched_256d_3steps", "record trajectory, one record_trajectory"),
    ("flush_after_100_trajectories", "flush after 100 trajectories"),
    ("forceLearn_1000traj_8clusters_default_config", "background cycle, 1,000 traj, k=50"),
    ("forceLearn_1000traj_8clusters_patternClusters_8", "background cycle, 1,000 traj, k=8"),
    ("findPatterns_k5", "find_patterns k=5"),
]
# the peer's measurement a row is compared with, where its key differs (no batched call)
PEER_KEY = {"record_trajectory_batched_256d_3steps": "record_trajectory_256d_3steps"}


def fmt_ns(ns: float) -> str:
    if ns < 1e3:
        return f"{ns:.0f} ns"
    if ns < 1e6:
        return f"{ns / 1e3:.2f} us"
    return f"{ns / 1e6:.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--skip-node", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--mem-child", type=int)
    args = ap.parse_args()
    if args.mem_child:
        memory_child(args.mem_child)
        return
    print(f"python side: {kernels.BACKEND.describe()}", file=sys.stderr)
    py = run_python(args.repeats)
    py_mem = run_memory()
    nd = None if args.skip_node else run_node(args.repeats)
    print(f"\n{'operation':<44} {'sona_plugin':>12} {'@ruvector/sona':>15} {'ratio':>8}")
    for key, label in ROWS:
        a = py[key]["median_ns"]
        b = nd["bench"][PEER_KEY.get(key, key)]["median_ns"] if nd else None
        ratio = f"{b / a:7.1f}x" if b else "   n/a"
        print(f"{label:<44} {fmt_ns(a):>12} {fmt_ns(b) if b else 'n/a':>15} {ratio:>8}")
    a = py_mem["rss_per_trajectory_bytes"]["median"]
    b = nd["memory"]["rss_per_trajectory_bytes"]["median"] if nd else None
    ratio = f"{b / a:7.1f}x" if b else "   n/a"
    print(
        f"{'memory per trajectory (RSS)':<44} {a:>10.0f} B {(f'{b:.0f} B' if b else 'n/a'):>15} {ratio:>8}"
    )
    print(
        f"(payload: {py_mem['payload_f32_bytes_per_trajectory']} B of float32 per trajectory; "
        f"ratio = Node / Python, > 1 means sona_plugin is faster or smaller)"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps(
                {
                    "python": py,
                    "python_memory": py_mem,
                    "node": nd,
                    "backend": kernels.BACKEND.describe(),
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
