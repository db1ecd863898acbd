"""Liked-rates of the answers a saved deployment serves to the 32 held-out prompts:
sampled as users get them (temperature 1, top-p 0.95, 40 new tokens), ``--samples`` per
prompt, for each best-of-k setting asked for, with a 95 % bootstrap interval over prompts.

    python benchmarks/served_rates.py STATE_DIR|base [--rerank 1 8] [--samples 4]
        [--tastes warm plain] [--seed 0] [--out results/served_rates.json]

``STATE_DIR`` is a pipeline state directory (its served adapter version, its reward model
and feedback store); ``base`` measures the base model. The state is copied first, so the
measurement leaves it as it was. ``--rerank 1`` is the served version's own sampling;
``--rerank 8`` the best of 8 by the reward model fitted to the state's judgements.
``--on-topic`` also scores the greedy held-out answers' on-topic ratio to the base
model's (``training.gate.on_topic_score``), as served and with the MicroLoRA zeroed
(what the instant loop's drift since the last cycle costs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tastes import rule as taste_rule  # noqa: E402  (benchmarks/ is on sys.path)

from sona_plugin.demo import HELDOUT_PROMPTS, answers  # noqa: E402

MAX_NEW = 40


def bootstrap(per_prompt: np.ndarray, seed: int, draws: int = 2000) -> list[float]:
    """95 % interval of the mean over prompts, resampling prompts."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_prompt), (draws, len(per_prompt)))
    means = per_prompt[idx].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def open_copy(state: str, k: int):
    """A pipeline on a copy of ``state`` ('base': a fresh one), serving best of ``k``."""
    from sona_plugin.integrations.transformers import pipeline

    work = Path(tempfile.mkdtemp(prefix="sona-served-"))
    if state != "base":
        shutil.copytree(state, work / "state")
    return work, pipeline(state_dir=work / "state", sona_config={"rerank_candidates": k})


def on_topic(state: str, held: list[str]) -> dict:
    """Greedy held-out answers' on-topic score over the base model's: as served, and with
    the MicroLoRA zeroed."""
    from sona_plugin.training.gate import on_topic_score

    def score(pipe) -> float:
        texts = [o["text"] for o in answers(pipe, held, sample=False, max_new_tokens=MAX_NEW)]
        return on_topic_score(held, texts, pipe.embed)

    out = {}
    for name, where in [("base", "base"), ("served", state)]:
        work, pipe = open_copy(where, 1)
        out[name] = score(pipe)
        if name == "served":
            pipe.engine.micro_lora.shrink(0.0)
            out["micro_zeroed"] = score(pipe)
        pipe.close()
        shutil.rmtree(work, ignore_errors=True)
    return {n: v / out["base"] for n, v in out.items() if n != "base"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("state", help="a pipeline state directory, or 'base'")
    ap.add_argument("--rerank", nargs="*", type=int, default=[1, 8], metavar="K")
    ap.add_argument("--samples", type=int, default=4, help="sampled answers per prompt")
    ap.add_argument("--tastes", nargs="+", default=["warm", "plain"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--on-topic", action="store_true")
    ap.add_argument("--out", default="results/served_rates.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rules = {n: taste_rule(n) for n in args.tastes}
    held = list(HELDOUT_PROMPTS)
    result = {"args": vars(args), "rates": {}}
    if args.on_topic:
        result["on_topic"] = on_topic(args.state, held)
        print(f"on-topic x base: {result['on_topic']}", flush=True)
    for k in args.rerank:
        work, pipe = open_copy(args.state, k)
        if pipe.ranker is not None:
            pipe.ranker.wait()
        texts = [
            [o["text"] for o in answers(pipe, held, sample=True, max_new_tokens=MAX_NEW, seed=s)]
            for s in range(args.seed, args.seed + args.samples)
        ]
        row = {
            "version": pipe.adapter_version,
            "rerank": pipe.stats().get("rerank"),
            "answers": len(held) * args.samples,
        }
        pipe.close()
        shutil.rmtree(work, ignore_errors=True)
        for name, rule in rules.items():
            liked = np.array([[rule.check(t) for t in batch] for batch in texts], float)
            per_prompt = liked.mean(axis=0)
            row[name] = {"p": float(per_prompt.mean()), "ci95": bootstrap(per_prompt, args.seed)}
        row["samples"] = [texts[0][i] for i in range(3)]
        result["rates"][str(k)] = row
        print(
            f"{args.state} best of {k} (v{row['version']}): "
            + ", ".join(
                f"{n} {row[n]['p']:.0%} ({row[n]['ci95'][0]:.0%}-{row[n]['ci95'][1]:.0%})"
                for n in rules
            ),
            flush=True,
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
