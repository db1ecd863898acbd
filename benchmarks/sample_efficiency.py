"""How few feedbacks it takes: held-out liked-rates after 32 and after 50 feedbacks.

    python benchmarks/sample_efficiency.py [--taste warm] [--seeds 0 1 2]
        [--checkpoints 32 50] [--modes instant loopb] [--out results/sample_efficiency.json]

The transformers pipeline on SmolLM2-135M-Instruct, the README's defaults. Per seed, a
shuffled stream of prompts is answered by sampling (temperature 1, top-p 0.95) and every
answer is judged by the taste (``benchmarks/tastes.py`` or ``sona_plugin.demo.RULES``) and
fed back. Two modes, same streams:

* ``instant``: the instant loop alone (the MicroLoRA updated on every feedback);
* ``loopb``: the same, plus a background cycle (train, gate, publish, hot-swap) at every
  checkpoint.

At every checkpoint, on the 32 held-out prompts (never fed back): the liked-rate of greedy
answers and of two sampled answers per prompt. The base model is measured once (seed 0's
sampling). Reported per seed and pooled over seeds with a 95 % Wilson interval on the
pooled answers (answers to one prompt are not independent, so the interval is a little
narrow).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from tastes import rule as taste_rule  # noqa: E402  (benchmarks/ is on sys.path)

from sona_plugin.demo import HELDOUT_PROMPTS, STREAM_PROMPTS, answers  # noqa: E402

MAX_NEW = 40


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion ``k/n``."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


HELD = list(HELDOUT_PROMPTS)


def measure(pipe, rule, seed: int) -> dict:
    greedy = [o["text"] for o in answers(pipe, HELD, sample=False, max_new_tokens=MAX_NEW)]
    sampled = [
        o["text"]
        for o in answers(pipe, HELD + HELD, sample=True, max_new_tokens=MAX_NEW, seed=seed)
    ]
    return {
        "greedy": [sum(map(rule.check, greedy)), len(greedy)],
        "sampled": [sum(map(rule.check, sampled)), len(sampled)],
    }


def run(rule, seed: int, mode: str, checkpoints: list[int]) -> list[dict]:
    from sona_plugin.integrations.transformers import pipeline

    state = Path(tempfile.mkdtemp(prefix="sona-sample-eff-"))
    pipe = pipeline(state_dir=state, sona_config={"seed": seed})
    pipe.learner.seed = seed
    stream = STREAM_PROMPTS[:]
    random.Random(seed).shuffle(stream)
    rows, fed = [], 0
    try:
        for cp in checkpoints:
            prompts = [stream[i % len(stream)] for i in range(fed, cp)]
            for o in answers(
                pipe, prompts, sample=True, max_new_tokens=MAX_NEW, seed=seed * 997 + cp
            ):
                pipe.feedback(o["response_id"], liked=rule.check(o["text"]))
            fed = cp
            rep = pipe.learn(epochs=2) if mode == "loopb" else {}
            row = {
                "mode": mode,
                "seed": seed,
                "feedback": cp,
                "published": rep.get("published"),
                "step": rep.get("step"),
                "gate_reasons": (rep.get("gate") or {}).get("reasons"),
                **measure(pipe, rule, 10_000 + seed * 100 + cp),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        pipe.close()
        shutil.rmtree(state, ignore_errors=True)
    return rows


def summary(rows: list[dict], base: dict) -> list[str]:
    out = [
        "| mode | feedback | held-out sampled: pooled (95 % CI) | per seed | held-out greedy: pooled (95 % CI) |",
        "| --- | --- | --- | --- | --- |",
    ]

    def cell(k: int, n: int) -> str:
        lo, hi = wilson(k, n)
        return f"{k / n:.0%} ({lo:.0%}-{hi:.0%})"

    out.append(f"| base | 0 | {cell(*base['sampled'])} | | {cell(*base['greedy'])} |")
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for cp in dict.fromkeys(r["feedback"] for r in rows):
            sel = [r for r in rows if r["mode"] == mode and r["feedback"] == cp]
            if not sel:
                continue
            ks = sum(r["sampled"][0] for r in sel), sum(r["sampled"][1] for r in sel)
            kg = sum(r["greedy"][0] for r in sel), sum(r["greedy"][1] for r in sel)
            per = ", ".join(f"{r['sampled'][0] / r['sampled'][1]:.0%}" for r in sel)
            out.append(f"| {mode} | {cp} | {cell(*ks)} | {per} | {cell(*kg)} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--taste", default="warm")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--checkpoints", nargs="+", type=int, default=[32, 50])
    ap.add_argument(
        "--modes", nargs="+", choices=["instant", "loopb"], default=["instant", "loopb"]
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--heldout", type=int, default=len(HELDOUT_PROMPTS), help="(for a smoke run)")
    ap.add_argument("--out", default="results/sample_efficiency.json")
    ap.add_argument("--table", help="print the table of a saved run")
    args = ap.parse_args()
    if args.table:
        saved = json.loads(Path(args.table).read_text())
        print("\n".join(summary(saved["rows"], saved["base"])))
        return
    torch.set_num_threads(args.threads)
    HELD[:] = HELDOUT_PROMPTS[: args.heldout]
    rule = taste_rule(args.taste)
    from sona_plugin.integrations.transformers import pipeline

    t0 = time.time()
    state = Path(tempfile.mkdtemp(prefix="sona-sample-eff-base-"))
    pipe = pipeline(state_dir=state)
    base = measure(pipe, rule, 10_000)
    pipe.close()
    shutil.rmtree(state, ignore_errors=True)
    print("base", json.dumps(base), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for seed in args.seeds:
        for mode in args.modes:
            rows += run(rule, seed, mode, sorted(args.checkpoints))
            out.write_text(json.dumps({"args": vars(args), "base": base, "rows": rows}, indent=1))
    print(f"\n{time.time() - t0:.0f} s")
    print("\n".join(summary(rows, base)))


if __name__ == "__main__":
    main()
