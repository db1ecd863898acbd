"""Best-of-k by a reward model fitted to the feedback (``sona_plugin.rerank``), on the real
model: held-out liked-rate against feedbacks, and its efficiency per nat of drift.

    python benchmarks/rerank.py [--feedback 200] [--k 8] [--tastes warm plain]
        [--pool 16] [--seed 0] [--out results/rerank.json]
    python benchmarks/rerank.py --cost [--k 8]    # sampling k answers against one

A simulated user judges, with each taste, the answer served to ``--feedback`` stream
prompts; the answer served is the best of ``--k`` base-model answers (temperature 1,
top-p 0.95, 40 new tokens) by that taste's :class:`~sona_plugin.rerank.AnswerRanker`,
which takes every judgement as it comes (the features are the final hidden states that
the host records while generating, averaged: ``rerank.answer_features``). The candidates
are base-model samples either way, so they are sampled once per stream step and shared by
the tastes; each taste's ranker picks its own.

Held out: ``--pool`` answers to each of the 32 held-out prompts, sampled once. At each
checkpoint the ranker serves best-of-k for k = 1, 2, 4, 8, 16 on random subsets of the
pool (20 per prompt), so p0 (k = 1) and every p come from the same answers. Reported per
checkpoint: the held-out liked-rate per k, its 95 % interval over prompts (bootstrap), the
KL bound ``log k − (k−1)/k`` and the efficiency ``d(p‖p0)`` over that bound (a lower
bound on the true efficiency); and the liked-rate of the answers served on the training
stream's last 50 feedbacks (the trained-on prompts), beside the held-out one.

Nothing trains the weights here: the instant loop and the BaseLoRA are off, so the
candidates stay base-model samples and anchor NLL and on-topic are the base model's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")
warnings.filterwarnings("ignore", category=UserWarning, module="sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from efficiency import prompt_rows, sample  # noqa: E402
from tastes import rule as taste_rule  # noqa: E402

from sona_plugin.demo import HELDOUT_PROMPTS, STREAM_PROMPTS  # noqa: E402
from sona_plugin.learner.drift import kl_floor  # noqa: E402
from sona_plugin.rerank import AnswerRanker, answer_features, kl_bound, recorded_hidden  # noqa: E402

EVAL_K = (1, 2, 4, 8, 16)
CHECKPOINTS = (25, 50, 100, 150, 200, 300, 400)


def recorded_features(model, rows: list[list[int]], answers: list[list[int]]) -> np.ndarray:
    """What the host records while generating each answer, averaged, [n, d]."""
    return np.stack(
        [answer_features(recorded_hidden(model, r, a or [0])) for r, a in zip(rows, answers)]
    )


def held_out_rates(ranker, feats, liked, groups, rng) -> dict:
    """Per k: liked-rate of the ranker's best of k random pool answers, per prompt mean."""
    s = ranker.score(feats)
    out = {}
    for k in [k for k in EVAL_K if k <= len(groups[0])]:
        per_prompt = []
        for g in groups:
            picks = [rng.choice(g, k, replace=False) for _ in range(20)]
            chosen = [p[0] if s is None else p[np.argmax(s[p])] for p in picks]
            per_prompt.append(float(np.mean(liked[chosen])))
        per_prompt = np.asarray(per_prompt)
        boots = [
            per_prompt[rng.integers(0, len(per_prompt), len(per_prompt))].mean()
            for _ in range(1000)
        ]
        out[k] = {
            "p": float(per_prompt.mean()),
            "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
        }
    return out


def sampling_cost(model, tok, k: int, seed: int, prompts: int = 8) -> None:
    """Seconds to sample k answers to one prompt (one batch) against one answer, for
    ``prompts`` stream prompts, alternating, after a warm-up; prints the ratio."""
    rows = prompt_rows(tok, STREAM_PROMPTS[:prompts])
    sample(model, tok, rows[:1] * k, seed)  # warm-up
    one = many = 0.0
    for i, r in enumerate(rows):
        t = time.perf_counter()
        sample(model, tok, [r], seed + i)
        one += time.perf_counter() - t
        t = time.perf_counter()
        sample(model, tok, [r] * k, seed + i)
        many += time.perf_counter() - t
    print(
        f"one answer {one / prompts:.2f} s, {k} answers {many / prompts:.2f} s: {many / one:.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--feedback", type=int, default=200)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--tastes", nargs="+", default=["warm", "plain"])
    ap.add_argument("--pool", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/rerank.json")
    ap.add_argument(
        "--cost",
        action="store_true",
        help="only the cost: seconds to sample k answers to a prompt against one, side by side",
    )
    args = ap.parse_args()

    from sona_plugin.models import load_default_llm

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_default_llm()
    if args.cost:
        sampling_cost(model, tok, args.k, args.seed)
        return
    rng = random.Random(args.seed)
    np_rng = np.random.default_rng(args.seed)

    held = prompt_rows(tok, HELDOUT_PROMPTS)
    pool_rows = [r for r in held for _ in range(args.pool)]
    pool = sample(model, tok, pool_rows, args.seed * 1000 + 1)
    pool_feats = recorded_features(model, pool_rows, pool)
    pool_texts = [tok.decode(a, skip_special_tokens=True) for a in pool]
    groups = [np.arange(i * args.pool, (i + 1) * args.pool) for i in range(len(held))]
    print(f"held-out pool: {len(pool)} answers, {time.perf_counter() - t0:.0f} s", flush=True)

    tastes = {n: taste_rule(n) for n in args.tastes}
    pool_liked = {n: np.array([r.check(t) for t in pool_texts]) for n, r in tastes.items()}
    rankers = {n: AnswerRanker() for n in tastes}
    served: dict[str, list[bool]] = {n: [] for n in tastes}
    first: dict[str, list[bool]] = {n: [] for n in tastes}  # the k = 1 answer, same prompts
    report: dict = {"k": args.k, "pool": args.pool, "seed": args.seed, "tastes": {}}
    for n in tastes:
        report["tastes"][n] = {"checkpoints": []}

    def checkpoint(step: int) -> None:
        for n in tastes:
            rates = held_out_rates(rankers[n], pool_feats, pool_liked[n], groups, np_rng)
            p0 = rates[1]["p"]
            row = {
                "feedback": step,
                "held_out": {
                    str(k): {
                        **v,
                        "kl_bound": kl_bound(k),
                        "efficiency_lb": (kl_floor(v["p"], p0) / kl_bound(k) if k > 1 else None),
                    }
                    for k, v in rates.items()
                },
                "train_served_last50": float(np.mean(served[n][-50:])) if served[n] else None,
                "train_first_last50": float(np.mean(first[n][-50:])) if first[n] else None,
                "seconds": time.perf_counter() - t0,
            }
            report["tastes"][n]["checkpoints"].append(row)
            k = str(args.k)
            print(
                f"{n} after {step}: held-out p0 {p0:.0%} best-of-{k} "
                f"{row['held_out'].get(k, {}).get('p', 0):.0%}; "
                f"stream served {row['train_served_last50'] or 0:.0%} "
                f"vs first {row['train_first_last50'] or 0:.0%}",
                flush=True,
            )

    checkpoint(0)
    for step in range(1, args.feedback + 1):
        p = rng.choice(STREAM_PROMPTS)
        rows = prompt_rows(tok, [p]) * args.k
        cands = sample(model, tok, rows, args.seed * 100_000 + step)
        feats = recorded_features(model, rows, cands)
        texts = [tok.decode(a, skip_special_tokens=True) for a in cands]
        for n, rule in tastes.items():
            i = rankers[n].choose(feats)
            liked = rule.check(texts[i])
            served[n].append(liked)
            first[n].append(rule.check(texts[0]))
            rankers[n].add(step, feats[i], 1.0 if liked else -1.0)
        if step in CHECKPOINTS:
            checkpoint(step)
            report["seconds"] = time.perf_counter() - t0
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1))
    report["seconds"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
