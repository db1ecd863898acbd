"""One simulated deployment that runs long: tastes that shift without a hint, a restart, a
rollback; what the served model does at every checkpoint.

    python benchmarks/long_horizon.py [--phases 400 400 400] [--tastes warm plain]
        [--per-round 50] [--restart-at 600] [--rollback-at 1000] [--seed 0]
        [--rerank K] [--sona-config JSON] [--out results/long_horizon.json]
        [--plot docs/long_horizon.png] [--state-dir DIR [--resume]]

Phases: taste A alone, then taste B alone (no ``mark_task_boundary``: the learner must
notice the shift itself), then A and B both liked (an answer is liked when either taste
likes it). Tastes are ``benchmarks/tastes.py`` (whole-answer properties judged by VADER and
textstat) or the marker rules of ``sona_plugin.demo.RULES``. Feedback arrives in rounds of
``--per-round`` sampled answers to a shuffled prompt stream; after each round a background
cycle runs (``learn()``: train, gate, publish, hot-swap). The process is restarted (the
pipeline closed and rebuilt from its state directory) at ``--restart-at`` feedbacks and the
previous version is rolled back to at ``--rollback-at``.

At every round, on the 32 held-out prompts (never fed back) and on 32 stream prompts
that were trained on: each taste's liked-rate for greedy answers and for sampled answers
(temperature 1, top-p 0.95, what users get); the on-topic ratio (prompt-answer cosine of
all-MiniLM-L6-v2, greedy held-out answers, against the base model's; also measured just
before each cycle, where the MicroLoRA has drifted longest: its checks between cycles,
every ``gate_micro_check_every`` feedbacks, are run by hand here and skipped right before
a cycle); the anchor-text NLL
against the base model's; the served version's per-answer KL to the base model (the
learner's Monte Carlo estimate at publish) and the efficiency ``d(p‖p0) / KL`` for the
phase's taste (``p``: sampled held-out liked-rate, ``p0``: the base model's); versions
published, gate refusals and their reasons, detected boundaries. ``--seed`` varies the
prompt stream, the sampling and the trainer (LoRA initialisation, batch order).

``--rerank K`` serves best-of-K sampled answers (``rerank_candidates``) on top of the
trained versions: the stream's feedback is on the served (reranked) answers, and the
sampled liked-rates above are those of served best-of-K answers; greedy answers are not
reranked.

A run longer than one sitting: ``--state-dir DIR`` keeps the deployment (store, versions,
learner state) in ``DIR``, and ``--resume`` continues the run saved in ``--out`` from its
last checkpoint with that deployment, as a process restart would (the run's own settings
come from ``--out``). Feedback a killed run stored after its last checkpoint stays in the
store, is trained on by the next cycle, and is counted in the ``resume`` event.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tastes import rule as taste_rule  # noqa: E402  (benchmarks/ is on sys.path)

from sona_plugin.demo import HELDOUT_PROMPTS, STREAM_PROMPTS, Rule, answers  # noqa: E402
from sona_plugin.learner import kl_floor  # noqa: E402
from sona_plugin.training.gate import ANCHOR_TEXTS, anchor_nll, on_topic_score  # noqa: E402

MAX_NEW = 40
EVAL_PROMPTS = 32
# what a resumed run takes from the run it continues
RUN_SETTINGS = (
    "phases",
    "tastes",
    "per_round",
    "restart_at",
    "rollback_at",
    "seed",
    "eval_prompts",
    "rerank",
    "sona_config",
)


def gate_point(tried: dict) -> dict:
    """One point the gate tried, for a row: its step, verdict and reasons, its KL, and its
    held-out scores (candidate, served, paired standard error) instead of all metrics."""
    m = tried.get("metrics") or {}
    return {
        **{x: v for x, v in tried.items() if x != "metrics"},
        "kl": m.get("kl_per_answer"),
        "heldout": [m.get(x) for x in ("heldout_candidate", "heldout_current", "heldout_diff_se")],
    }


def new_pipe(state_dir: Path, seed: int, rerank: int = 1, extra: dict | None = None):
    from sona_plugin.integrations.transformers import pipeline

    config = {**(extra or {}), "seed": seed, "rerank_candidates": rerank}
    pipe = pipeline(state_dir=state_dir, sona_config=config)
    pipe.learner.seed = seed  # the trainer's LoRA initialisation and batch order
    return pipe


def trained_prompts(pipe, stream: list[str], n: int) -> list[str]:
    """Stream prompts on the learner's training side: a new prompt group is held out when
    ``crc32(stored prompt) % 5 == 0`` (``sona_plugin.learner.heldout``; the stored prompt
    is the chat-templated text as the pipeline decodes it)."""
    from sona_plugin.demo import chat

    tok = pipe.tokenizer
    out = []
    for p in stream:
        ids = tok.apply_chat_template(chat(p), add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        if zlib.crc32(tok.decode(ids).encode("utf-8", "replace")) % 5:
            out.append(p)
        if len(out) == n:
            break
    return out


def served_kl(pipe) -> float | None:
    """The served version's per-answer KL to the base model (measured by the learner when
    it was published), None for the base model."""
    v = pipe.adapter_version
    return None if v is None else pipe.registry.get(v).metadata.get("kl_per_answer")


def drift_now(pipe, held: list[str], base: dict) -> dict:
    """On-topic and anchor-NLL ratios to the base model of what serves now (greedy answers
    to the held-out prompts, the MicroLoRA included): measured before each cycle, where
    the instant loop's drift since the last one is largest."""
    greedy = [o["text"] for o in answers(pipe, held, sample=False, max_new_tokens=MAX_NEW)]
    return {
        "on_topic_ratio": on_topic_score(held, greedy, pipe.embed) / base["on_topic"],
        "anchor_nll_ratio": anchor_nll(pipe.model, ANCHOR_TEXTS, pipe.tokenizer)
        / base["anchor_nll"],
    }


def evaluate(
    pipe, rules: dict[str, Rule], held: list[str], trained: list[str], seed: int, base: dict | None
) -> dict:
    greedy = [o["text"] for o in answers(pipe, held, sample=False, max_new_tokens=MAX_NEW)]
    sampled = [
        o["text"] for o in answers(pipe, held, sample=True, max_new_tokens=MAX_NEW, seed=seed)
    ]
    train_s = [
        o["text"]
        for o in answers(pipe, trained, sample=True, max_new_tokens=MAX_NEW, seed=seed + 1)
    ]
    out = {
        "on_topic": on_topic_score(held, greedy, pipe.embed),
        "anchor_nll": anchor_nll(pipe.model, ANCHOR_TEXTS, pipe.tokenizer),
    }
    for name, rule in rules.items():
        out[name] = {
            "heldout_greedy": sum(map(rule.check, greedy)) / len(greedy),
            "heldout_sampled": sum(map(rule.check, sampled)) / len(sampled),
            "trained_sampled": sum(map(rule.check, train_s)) / len(train_s),
        }
    if base is not None:
        out["on_topic_ratio"] = out["on_topic"] / base["on_topic"]
        out["anchor_nll_ratio"] = out["anchor_nll"] / base["anchor_nll"]
    out["samples"] = {"greedy": greedy[:4], "sampled": sampled[:4]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--phases",
        nargs=3,
        type=int,
        default=[400, 400, 400],
        help="feedbacks in phase A, phase B, phase A+B",
    )
    ap.add_argument("--tastes", nargs=2, default=["warm", "plain"])
    ap.add_argument("--per-round", type=int, default=50)
    ap.add_argument("--restart-at", type=int, default=600)
    ap.add_argument("--rollback-at", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--eval-prompts",
        type=int,
        default=EVAL_PROMPTS,
        help="held-out and trained-on prompts answered at every checkpoint",
    )
    ap.add_argument(
        "--rerank",
        type=int,
        default=1,
        metavar="K",
        help="serve the best of K sampled answers by the reward model (rerank_candidates)",
    )
    ap.add_argument(
        "--sona-config",
        type=json.loads,
        default={},
        metavar="JSON",
        help="more SonaConfig fields, e.g. '{\"gate_max_kl_per_answer\": 3}'",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/long_horizon.json")
    ap.add_argument(
        "--plot",
        default=None,
        help="where the plot goes (a run's default: docs/long_horizon.png; --resume: "
        "the resumed run's; --table plots only when this is given)",
    )
    ap.add_argument(
        "--state-dir",
        help="keep the deployment here (default: a temporary directory, removed at the end)",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue the run saved in --out with the deployment in --state-dir",
    )
    ap.add_argument(
        "--table",
        metavar="JSON",
        help="print a saved run as a Markdown table (and plot it with --plot), then exit",
    )
    args = ap.parse_args()
    if args.table:
        result = json.loads(Path(args.table).read_text())
        names = result["args"]["tastes"]
        print(table(result, names))
        if args.plot:
            plot(result, dict.fromkeys(names), Path(args.plot))
        return
    result = None
    if args.resume:
        if not args.state_dir:
            ap.error("--resume needs --state-dir (where the run keeps its deployment)")
        result = json.loads(Path(args.out).read_text())
        for key in RUN_SETTINGS:
            setattr(args, key, result["args"][key])
        if args.plot is None:  # the run's own plot, not the docs' default
            args.plot = result["args"].get("plot")
    if args.plot is None:
        args.plot = "docs/long_horizon.png"
    torch.set_num_threads(args.threads)
    a, b = taste_rule(args.tastes[0]), taste_rule(args.tastes[1])
    rules = {a.name: a, b.name: b}
    phases = [
        ("A", a, args.phases[0]),
        ("B", b, args.phases[1]),
        ("A+B", taste_rule(f"{a.name}|{b.name}"), args.phases[2]),
    ]
    stream = STREAM_PROMPTS[:]
    random.Random(args.seed).shuffle(stream)
    held = HELDOUT_PROMPTS[: args.eval_prompts]
    if args.state_dir:
        state = Path(args.state_dir)
        state.mkdir(parents=True, exist_ok=True)
    else:
        state = Path(tempfile.mkdtemp(prefix="sona-long-"))
    pipe = new_pipe(state, args.seed, args.rerank, args.sona_config)
    trained = trained_prompts(pipe, stream, args.eval_prompts)
    if result is None:
        t0 = time.time()
        base = evaluate(pipe, rules, held, trained, args.seed, None)
        rows = [{"feedback": 0, "phase": "base", **base}]
        print(f"base: {json.dumps({k: v for k, v in base.items() if k != 'samples'})}", flush=True)
        result = {"args": vars(args), "base": base, "rows": rows, "events": []}
    else:  # a restart from the last checkpoint
        base, rows = result["base"], result["rows"]
        t0 = time.time() - rows[-1].get("seconds", 0.0)
        result["events"].append(
            {
                "feedback": rows[-1]["feedback"],
                "event": "resume",
                "records_used": pipe.learner.last_id,
                "stored": pipe.store.count(),
                "pending": pipe.learner.pending(),
            }
        )
        print(f"        resume: {result['events'][-1]}", flush=True)
    p0 = {n: base[n]["heldout_sampled"] for n in rules}
    p0["A+B"] = None
    n, k = rows[-1]["feedback"], len(rows) - 1
    end = 0
    for phase, rule, count in phases:
        end += count
        while n < end:
            prompts = [stream[(n + i) % len(stream)] for i in range(args.per_round)]
            outs = answers(
                pipe, prompts, sample=True, max_new_tokens=MAX_NEW, seed=args.seed * 100_003 + k
            )
            liked = 0
            checks = []
            every = pipe.engine.config.gate_micro_check_every
            for i, o in enumerate(outs):
                like = rule.check(o["text"])
                liked += like
                pipe.feedback(o["response_id"], liked=like)
                # what the background thread does between cycles (this run's cycles are
                # called by hand); none right before the cycle, so that the on-topic
                # measured before it is the MicroLoRA's longest drift
                if i < len(outs) - 1 and pipe.learner.micro_check_due(every):
                    c = pipe.learner.check_micro()
                    checks.append([c.get("scale"), c.get("delta_norm"), c.get("norm_cap")])
            n += len(outs)
            k += 1
            before = drift_now(pipe, held, base)
            rep = pipe.learn(epochs=2)
            micro = rep.get("micro") or {}
            gate = rep.get("gate") or {}
            kl = served_kl(pipe)
            ev = evaluate(pipe, rules, held, trained, args.seed + k, base)
            target = rule.name if rule.name in rules else None
            p = ev[target]["heldout_sampled"] if target else None
            row = {
                "feedback": n,
                "phase": phase,
                "stream_liked": liked / len(outs),
                "published": bool(rep.get("published")),
                "version": pipe.adapter_version,
                "step": rep.get("step"),
                "kl_per_answer": kl,
                "efficiency": (
                    kl_floor(p, p0[target]) / kl if target and kl and p > p0[target] else None
                ),
                "gate_reasons": gate.get("reasons"),
                "gate_on_topic": [
                    (gate.get("metrics") or {}).get(x)
                    for x in ("on_topic_ratio", "on_topic_ratio_lower")
                ],
                "gate_tried": [gate_point(t) for t in gate.get("tried", [])],
                "boundaries": rep.get("boundaries"),
                "liked_rate_rises": rep.get("liked_rate_rises"),
                "leaning": [rep.get("leaning_auc"), rep.get("leaning_z")],
                "before_cycle": before,
                "micro_scale": micro.get("scale"),
                "micro_norm": [micro.get("delta_norm"), micro.get("norm_cap")],
                "micro_checks": checks,
                "micro_reasons": (micro.get("tried") or [{}])[0].get("reasons"),
                "train_kl": (rep.get("train") or {}).get("kl"),
                "rerank": (pipe.stats().get("rerank") or {}),
                "seconds": time.time() - t0,
                **ev,
            }
            rows.append(row)
            print(
                f"[{n:>5} {phase:>3}] stream {row['stream_liked']:.0%} | "
                + " | ".join(
                    f"{t}: held {ev[t]['heldout_greedy']:.0%}/{ev[t]['heldout_sampled']:.0%}"
                    f" trained {ev[t]['trained_sampled']:.0%}"
                    for t in rules
                )
                + f" | on-topic x{before['on_topic_ratio']:.2f} -> x{ev['on_topic_ratio']:.2f}"
                f" NLL x{ev['anchor_nll_ratio']:.3f} | MicroLoRA x{row['micro_scale']}"
                f" (checks {[c[0] for c in checks]})"
                f" | v{row['version']} {'published' if row['published'] else 'refused'}"
                f" KL {kl} eff {row['efficiency']} | boundaries {row['boundaries']}"
                f" | {row['seconds']:.0f} s",
                flush=True,
            )
            if not row["published"]:
                print(f"        gate: {row['gate_reasons']}", flush=True)
            if args.restart_at and n == args.restart_at:
                used = pipe.learner.last_id
                pipe.close()
                pipe = new_pipe(state, args.seed, args.rerank, args.sona_config)
                result["events"].append(
                    {
                        "feedback": n,
                        "event": "restart",
                        "records_used_before": used,
                        "records_used_after": pipe.learner.last_id,
                        "pending_after": pipe.learner.pending(),
                    }
                )
                print(f"        restart: {result['events'][-1]}", flush=True)
            if args.rollback_at and n == args.rollback_at:
                versions = [v["version"] for v in pipe.adapters()]
                if len(versions) >= 2 and pipe.adapter_version is not None:
                    to = max(v for v in versions if v < pipe.adapter_version)
                    pipe.rollback(to)
                    result["events"].append({"feedback": n, "event": "rollback", "to": to})
                    print(f"        rollback to v{to}", flush=True)
            result["learner"] = pipe.learner_stats()
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    pipe.close()
    if not args.state_dir:
        shutil.rmtree(state, ignore_errors=True)
    if args.plot:
        plot(result, rules, Path(args.plot))


def table(result: dict, names: list[str]) -> str:
    """One Markdown row per checkpoint: liked-rates (held-out greedy / held-out sampled /
    trained-on sampled) per taste, drift, KL, efficiency, what the cycle did."""
    k = result["args"].get("rerank", 1)
    sampled = "sampled" if k == 1 else f"sampled best of {k}"
    head = (
        "| feedback | phase | "
        + " | ".join(f"{n}: held-out greedy / {sampled} / trained" for n in names)
        + " | on-topic × base (before → after the cycle) | anchor NLL × base | KL/answer"
        " | efficiency | cycle |"
    )
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in result["rows"]:
        rates = " | ".join(
            f"{r[n]['heldout_greedy']:.0%} / {r[n]['heldout_sampled']:.0%} / "
            f"{r[n]['trained_sampled']:.0%}"
            for n in names
        )
        if r["phase"] == "base":
            cycle = "base model"
        elif r.get("published"):
            cycle = f"v{r['version']} published at {r.get('step')}"
        else:
            cycle = f"refused ({'; '.join(r.get('gate_reasons') or [])[:120]})"
        if r.get("boundaries"):
            cycle += f"; shift detected ({r['boundaries'][0]['direction']})"
        if r.get("liked_rate_rises"):
            cycle += "; liked-rate rise, explained by learning"
        if r.get("micro_scale") is not None and r["micro_scale"] != 1.0:
            cycle += f"; MicroLoRA × {r['micro_scale']}"
        shrunk = [c[0] if isinstance(c, list) else c for c in r.get("micro_checks") or []]
        shrunk = [x for x in shrunk if x != 1.0]
        if shrunk:
            cycle += f"; checks between cycles scaled it {shrunk}"
        on_topic = f"{r.get('on_topic_ratio', 1.0):.2f}"
        if r.get("before_cycle"):
            on_topic = f"{r['before_cycle']['on_topic_ratio']:.2f} → {on_topic}"
        kl, eff = r.get("kl_per_answer"), r.get("efficiency")
        lines.append(
            f"| {r['feedback']} | {r['phase']} | {rates} | "
            f"{on_topic} | {r.get('anchor_nll_ratio', 1.0):.3f} | "
            f"{'' if kl is None else f'{kl:.2f}'} | {'' if eff is None else f'{eff:.2f}'} | "
            f"{cycle} |"
        )
    for e in result.get("events", []):
        lines.append(f"\n{e['event']} after {e['feedback']} feedbacks: {e}")
    return "\n".join(lines)


def plot(result: dict, rules: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    k = result["args"].get("rerank", 1)
    served = "sampled" if k == 1 else f"sampled, best of {k}"
    x = [r["feedback"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for name in rules:
        ax1.plot(
            x,
            [r[name]["heldout_sampled"] for r in rows],
            "-o",
            ms=3,
            label=f"{name}: held-out, {served}",
        )
        ax1.plot(
            x, [r[name]["heldout_greedy"] for r in rows], "--", label=f"{name}: held-out, greedy"
        )
        ax1.plot(
            x,
            [r[name]["trained_sampled"] for r in rows],
            ":",
            label=f"{name}: trained prompts, {served}",
        )
    ax1.set_ylabel("liked-rate")
    ax1.legend(fontsize=7, ncol=2)
    ax2.plot(x, [r.get("on_topic_ratio", 1.0) for r in rows], "-o", ms=3, label="on-topic / base")
    if any(r.get("before_cycle") for r in rows):
        ax2.plot(
            x,
            [(r.get("before_cycle") or {}).get("on_topic_ratio", 1.0) for r in rows],
            "x",
            ms=5,
            label="on-topic / base, before the cycle",
        )
    ax2.plot(
        x, [r.get("anchor_nll_ratio", 1.0) for r in rows], "-s", ms=3, label="anchor NLL / base"
    )
    ax2.plot(
        x, [r.get("kl_per_answer") or 0.0 for r in rows], "-^", ms=3, label="KL per answer (nats)"
    )
    ax2.axhline(0.9, color="grey", lw=0.5)
    ax2.axhline(1.05, color="grey", lw=0.5)
    for r in rows:
        if r.get("boundaries"):
            ax1.axvline(r["feedback"], color="red", lw=0.8, alpha=0.6)
    for e in result["events"]:
        for ax in (ax1, ax2):
            ax.axvline(e["feedback"], color="black", lw=0.8, ls="--")
    ax2.set_xlabel("feedback events")
    ax2.legend(fontsize=7)
    fig.suptitle(
        "long-horizon deployment: phases A, B, A+B; restart and rollback dashed; "
        "detected shifts red",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
