"""Best-of-k by a reward model fitted to the feedback (``sona_plugin.rerank``), on the real
model: held-out liked-rate against feedbacks, and its efficiency per nat of drift.

    python benchmarks/rerank.py [--feedback 200] [--k 8] [--tastes warm plain]
        [--features hidden] [--pool 16] [--seed 0] [--out results/rerank.json]
    python benchmarks/rerank.py --phases warm:200 plain:200 'warm|plain':100   # a shift
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

``--phases``: one user and one ranker; the user's taste changes after each phase's
feedbacks, with no hint (``a|b`` likes what either likes). Every 50 feedbacks, every
taste's held-out rates under the one ranker: what it keeps of the old taste, what it
gains of the new one.

``--features``: what the ranker sees of an answer: ``hidden`` (the recorded final hidden
states, averaged), ``minilm`` (the all-MiniLM-L6-v2 embedding of its text) or both.

The base-model answers are cached in ``--cache`` (held-out pool and stream candidates, per
seed), so reruns with other features or phases judge the same answers.

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


def _minilm(texts: list[str]) -> np.ndarray:
    from sona_plugin.models import embed

    return embed(texts)


# An answer's features for the ranker, from its hidden-state mean and its text
# (``taste_ceiling.py`` studies the same ones).
FEATURES = {
    "hidden": lambda hidden, texts: hidden,
    "minilm": lambda hidden, texts: _minilm(texts),
    "hidden+minilm": lambda hidden, texts: np.hstack([hidden, _minilm(texts)]),
}
CHECKPOINTS = (25, 32, 50, 100, 150, 200, 300, 400)


def recorded_features(model, rows: list[list[int]], answers: list[list[int]]) -> np.ndarray:
    """What the host records while generating each answer, averaged, [n, d]."""
    return np.stack(
        [answer_features(recorded_hidden(model, r, a or [0])) for r, a in zip(rows, answers)]
    )


class Stacked(AnswerRanker):
    """A ranker fitted to the current phase whose scores add the log-odds of the rankers of
    earlier phases (frozen)."""

    def __init__(self, frozen: list[AnswerRanker], window: int):
        super().__init__(window=window)
        self.frozen = [r for r in frozen if r.fitted]

    def score(self, features):
        own = super().score(features)
        parts = [r.score(features) for r in self.frozen] + ([] if own is None else [own])
        return np.sum(parts, axis=0) if parts else None


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


def save_cache(path: Path, **arrays) -> None:
    """``np.savez`` to ``path`` by a temporary file and a rename, so a run killed while
    writing leaves the previous cache whole."""
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def stream_candidates(model, tok, args, steps: int, cache: Path | None) -> list[dict]:
    """Per stream step: its prompt, ``--k`` base-model answers, their texts and recorded
    features (four steps sampled in one batch); cached in ``cache`` so reruns (other features, phases)
    judge the same answers."""
    rng = random.Random(args.seed)
    prompts = [rng.choice(STREAM_PROMPTS) for _ in range(steps)]
    done: list[dict] = []
    if cache is not None and cache.exists():
        saved = np.load(cache)
        done = [
            {"prompt": p, "hidden": h, "texts": list(t)}
            for p, h, t in zip(saved["prompts"], saved["hidden"], saved["texts"])
        ][:steps]
    chunk = 4  # stream steps sampled in one batch
    for first in range(len(done), steps, chunk):
        part = prompts[first : min(first + chunk, steps)]
        rows = [r for r in prompt_rows(tok, part) for _ in range(args.k)]
        cands = sample(model, tok, rows, args.seed * 100_000 + first, batch_size=len(rows))
        hidden = recorded_features(model, rows, cands)
        for j, p in enumerate(part):
            got = slice(j * args.k, (j + 1) * args.k)
            texts = [tok.decode(a, skip_special_tokens=True) for a in cands[got]]
            done.append({"prompt": p, "hidden": hidden[got], "texts": texts})
        if cache is not None:
            save_cache(
                cache,
                prompts=[d["prompt"] for d in done],
                hidden=np.stack([d["hidden"] for d in done]),
                texts=np.array([d["texts"] for d in done]),
            )
    return done


def held_out_pool(model, tok, args, cache: Path | None) -> tuple[np.ndarray, list[str]]:
    """``--pool`` answers to each held-out prompt: recorded features and texts."""
    if cache is not None and cache.exists():
        saved = np.load(cache)
        return saved["hidden"], list(saved["texts"])
    held = prompt_rows(tok, HELDOUT_PROMPTS)
    rows = [r for r in held for _ in range(args.pool)]
    pool = sample(model, tok, rows, args.seed * 1000 + 1)
    hidden = recorded_features(model, rows, pool)
    texts = [tok.decode(a, skip_special_tokens=True) for a in pool]
    if cache is not None:
        save_cache(cache, hidden=hidden, texts=texts)
    return hidden, texts


def phases_of(args) -> list[tuple[str, int]]:
    """``--phases warm:200 plain:200`` as ``[("warm", 200), ("plain", 200)]``."""
    out = []
    for spec in args.phases or []:
        name, _, count = spec.partition(":")
        if not count.isdigit():
            raise SystemExit(f"--phases: {spec!r} is not taste:feedbacks")
        out.append((name, int(count)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--feedback", type=int, default=200)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--tastes", nargs="+", default=["warm", "plain"])
    ap.add_argument(
        "--phases",
        nargs="+",
        help="one ranker follows a user whose taste changes with no hint, e.g. "
        "warm:200 plain:200 'warm|plain':100; held-out rates of every --tastes",
    )
    ap.add_argument("--features", default="hidden", choices=sorted(FEATURES))
    ap.add_argument("--window", type=int, default=1000, help="the ranker's window")
    ap.add_argument(
        "--hinted",
        choices=["fresh", "stack"],
        help="--phases: at each phase (as if the shift were marked) the ranker starts afresh "
        "(fresh), or a new one is fitted to the new phase and the older ones' log-odds are "
        "added to its scores (stack)",
    )
    ap.add_argument("--pool", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="results/rerank_cache", help="sampled answers, reused")
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
    np_rng = np.random.default_rng(args.seed)
    cache = Path(args.cache) if args.cache else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    featurize = FEATURES[args.features]

    hidden, pool_texts = held_out_pool(
        model, tok, args, cache / f"pool_seed{args.seed}_n{args.pool}.npz" if cache else None
    )
    pool_feats = featurize(hidden, pool_texts)
    groups = [np.arange(i * args.pool, (i + 1) * args.pool) for i in range(len(HELDOUT_PROMPTS))]
    print(f"held-out pool: {len(pool_texts)} answers, {time.perf_counter() - t0:.0f} s", flush=True)

    phases = phases_of(args)
    sequential = bool(args.phases)
    steps = sum(n for _, n in phases) if sequential else args.feedback
    stream = stream_candidates(
        model, tok, args, steps, cache / f"stream_seed{args.seed}_k{args.k}.npz" if cache else None
    )
    print(f"stream: {len(stream)} prompts x {args.k}, {time.perf_counter() - t0:.0f} s", flush=True)
    if sequential:  # one user, one ranker; every taste measured on the held-out pool
        measured = sorted(set(args.tastes) | {n for n, _ in phases})
        judged_by = [n for n, count in phases for _ in range(count)]
        users = {"user": judged_by}
    else:  # one user per taste, each with a ranker of its own, on the same stream
        measured = list(args.tastes)
        users = {n: [n] * steps for n in args.tastes}
    tastes = {n: taste_rule(n) for n in set(measured) | {n for j in users.values() for n in j}}
    pool_liked = {n: np.array([tastes[n].check(t) for t in pool_texts]) for n in measured}
    rankers = {u: AnswerRanker(window=args.window) for u in users}
    served: dict[str, list[bool]] = {u: [] for u in users}
    first: dict[str, list[bool]] = {u: [] for u in users}  # the k = 1 answer, same prompts
    report: dict = {
        "k": args.k,
        "pool": args.pool,
        "seed": args.seed,
        "features": args.features,
        "window": args.window,
        "hinted": args.hinted,
        "phases": phases if sequential else None,
        "users": {u: {"checkpoints": []} for u in users},
    }

    def checkpoint(step: int) -> None:
        for u, ranker in rankers.items():
            ranker.wait()
            row: dict = {
                "feedback": step,
                "judged_by": users[u][step - 1] if step else users[u][0],
                "train_served_last50": float(np.mean(served[u][-50:])) if served[u] else None,
                "train_first_last50": float(np.mean(first[u][-50:])) if first[u] else None,
                "held_out": {},
                "seconds": time.perf_counter() - t0,
            }
            for n in measured if sequential else [u]:
                rates = held_out_rates(ranker, pool_feats, pool_liked[n], groups, np_rng)
                p0 = rates[1]["p"]
                row["held_out"][n] = {
                    str(k): {
                        **v,
                        "kl_bound": kl_bound(k),
                        "efficiency_lb": kl_floor(v["p"], p0) / kl_bound(k) if k > 1 else None,
                    }
                    for k, v in rates.items()
                }
            report["users"][u]["checkpoints"].append(row)
            k = str(args.k)
            cells = ", ".join(
                f"{n} {r['1']['p']:.0%} -> {r.get(k, {}).get('p', 0):.0%}"
                for n, r in row["held_out"].items()
            )
            print(
                f"{u} after {step} ({row['judged_by']}): held-out best-of-{k}: {cells}; "
                f"stream served {row['train_served_last50'] or 0:.0%} "
                f"vs first {row['train_first_last50'] or 0:.0%}",
                flush=True,
            )

    checkpoint(0)
    for step, cand in enumerate(stream, start=1):
        feats = featurize(cand["hidden"], cand["texts"])
        for u in rankers:
            rule = tastes[users[u][step - 1]]
            if args.hinted and step > 1 and users[u][step - 2] != users[u][step - 1]:
                older = rankers[u].frozen if isinstance(rankers[u], Stacked) else []
                rankers[u] = (
                    Stacked(older + [rankers[u]], args.window)
                    if args.hinted == "stack"
                    else AnswerRanker(window=args.window)
                )
            ranker = rankers[u]
            i = ranker.choose(feats)
            liked = rule.check(cand["texts"][i])
            served[u].append(liked)
            first[u].append(rule.check(cand["texts"][0]))
            ranker.add(step, feats[i], 1.0 if liked else -1.0)
        if step in CHECKPOINTS or (sequential and step % 50 == 0) or step == steps:
            checkpoint(step)
            report["seconds"] = time.perf_counter() - t0
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
