"""How much of the BaseLoRA's drift buys the user's taste: the trainer's efficiency.

    python benchmarks/efficiency.py --variant NAME [--taste warm] [--rounds 4]
        [--per-round 50] [--seed 0] [--out results/efficiency.jsonl] [trainer options]

One simulated stream per run, on the real model (SmolLM2-135M-Instruct), the trainer alone
(no gate, no MicroLoRA, no pipeline): each round, ``--per-round`` stream prompts are
answered by the current adapter (sampled at temperature 1, top-p 0.95, what users get),
judged by the taste (``benchmarks/tastes.py`` or the marker rules of
``sona_plugin.demo.RULES``: +1 liked, -1 not), and the trainer takes one cycle on them
(plus 25 % uniform replay of earlier rounds, as the learner does). After every round, on
the 32 held-out prompts (never trained on), two sampled answers each:

* ``p``: the liked-rate (``p0``: the base model's, measured the same way at round 0);
* ``kl``: KL(π‖π_base) per answer (``sona_plugin.learner.drift.answer_kl``: answers sampled
  from π at temperature 1, full-vocabulary KL summed over their positions);
* ``efficiency = d(p‖p0) / kl`` (``d``: the Bernoulli KL, the least drift any policy
  needs to move the liked-rate from ``p0`` to ``p``; 1 means no drift wasted).

Variants are trainer settings (``--beta``, ``--epochs``, ``--lr``, ``--clip``, ``--rank``,
``--targets``, ``--optimizer sgd``, ``--baseline knn``: each record's advantage against the mean reward of the
10 most similar earlier prompts instead of the global running mean), one process per variant so each starts from the same base model and seed;
results append one JSON line per round to ``--out``. ``--table FILE`` prints the
comparison. Run one at a time on a small machine (one torch thread each).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tastes import rule as taste_rule  # noqa: E402  (benchmarks/ is on sys.path)

from sona_plugin.demo import HELDOUT_PROMPTS, STREAM_PROMPTS, chat  # noqa: E402
from sona_plugin.learner.drift import answer_kl, kl_floor, sample_answer_ids  # noqa: E402

MAX_NEW = 40


def prompt_rows(tok, prompts: list[str]) -> list[list[int]]:
    rows = []
    for p in prompts:
        ids = tok.apply_chat_template(chat(p), add_generation_prompt=True, tokenize=True)
        rows.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return rows


def sample(model, tok, rows: list[list[int]], seed: int) -> list[list[int]]:
    """Answers at temperature 1, top-p 0.95 (what users get), cut after EOS."""
    return sample_answer_ids(model, rows, tok, MAX_NEW, seed, top_p=0.95)


def records(tok, prompts, rows, answers, rule, start_id: int):
    from sona_plugin.models import embed
    from sona_plugin.store.base import FeedbackRecord

    emb = np.asarray(embed(prompts), np.float32)
    out = []
    for i, (p, r, a) in enumerate(zip(prompts, rows, answers)):
        text = tok.decode(a, skip_special_tokens=True)
        out.append(
            FeedbackRecord(
                response_id=f"r{start_id + i}",
                prompt=p,
                prompt_ids=r,
                response_ids=a,
                response_text=text,
                reward=1.0 if rule.check(text) else -1.0,
                embedding=emb[i],
                id=start_id + i,
            )
        )
    return out


def knn_baselines(batch: list, history: list, k: int = 10, prior: float = 5.0) -> list[float]:
    """Per-record baseline: the mean reward of the ``k`` most similar prompts among the
    other records seen so far (the record's own reward excluded), shrunk toward the mean of
    all of them with ``prior`` pseudo-records."""
    pool = history + batch
    emb = np.stack([r.embedding for r in pool])
    rewards = np.array([r.reward for r in pool])
    out = []
    for rec in batch:
        sims = emb @ rec.embedding
        others = [i for i in np.argsort(-sims) if pool[i].response_id != rec.response_id][:k]
        everyone = [i for i in range(len(pool)) if pool[i].response_id != rec.response_id]
        g = float(rewards[everyone].mean()) if everyone else 0.0
        n = len(others)
        local = float(rewards[others].mean()) if n else 0.0
        out.append((n * local + prior * g) / (n + prior))
    return out


def evaluate(peft, tok, rule, held_rows, seed: int, kl: bool) -> dict:
    from sona_plugin.training import ModelView

    rows = held_rows + held_rows  # two sampled answers per held-out prompt
    answers = sample(peft, tok, rows, seed)
    texts = [tok.decode(a, skip_special_tokens=True) for a in answers]
    out = {"p": sum(map(rule.check, texts)) / len(texts), "n": len(texts)}
    if kl:
        out["kl"] = answer_kl(
            ModelView.adapter(peft, "default"),
            ModelView.base(peft),
            held_rows,
            tok,
            max_new_tokens=MAX_NEW,
            seed=seed + 7,
        )
    return out


def run(args) -> None:
    from sona_plugin.config import SonaConfig
    from sona_plugin.models import load_default_llm
    from sona_plugin.training import BaseLoRATrainer

    torch.set_num_threads(args.threads)
    rule = taste_rule(args.taste)
    model, tok = load_default_llm()
    cfg = SonaConfig(base_lora_rank=args.rank, base_lora_lr=args.lr, seed=args.seed)
    trainer = BaseLoRATrainer(
        model,
        cfg,
        beta=args.beta,
        seed=args.seed,
        clip=args.clip,
        optimizer=args.optimizer,
        target_modules=tuple(args.targets.split(",")),
    )
    peft = trainer.peft_model
    held_rows = prompt_rows(tok, HELDOUT_PROMPTS[: args.heldout])
    stream = list(STREAM_PROMPTS)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base_args = {k: v for k, v in vars(args).items() if k not in ("out", "table")}

    def emit(row: dict) -> None:
        row = {"variant": args.variant, **base_args, **row}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    ev0 = evaluate(peft, tok, rule, held_rows, args.seed * 100, kl=False)  # B = 0: the base
    p0 = ev0["p"]
    emit({"feedback": 0, "p": p0, "p0": p0, "kl": 0.0, "efficiency": None})
    used: list = []
    fed = 0
    for rnd in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        prompts = [rng.choice(stream) for _ in range(args.per_round)]
        rows = prompt_rows(tok, prompts)
        answers = sample(peft, tok, rows, args.seed * 1000 + rnd)
        new = records(tok, prompts, rows, answers, rule, fed)
        fed += len(new)
        n_replay = min(len(used), round(len(new) / 3))
        replay = random.Random(args.seed + rnd).sample(used, n_replay) if n_replay else []
        batch = new + replay
        baselines = knn_baselines(batch, used) if args.baseline == "knn" else None
        rep = trainer.train(batch, epochs=args.epochs, batch_size=4, baselines=baselines)
        used.extend(new)
        ev = evaluate(peft, tok, rule, held_rows, args.seed * 100 + rnd, kl=True)
        emit(
            {
                "feedback": fed,
                "stream_liked": sum(r.reward > 0 for r in new) / len(new),
                "p": ev["p"],
                "p0": p0,
                "kl": ev["kl"],
                "floor": kl_floor(ev["p"], p0),
                "efficiency": kl_floor(ev["p"], p0) / ev["kl"] if ev["kl"] > 0 else None,
                "train_kl_per_token": rep.kl,
                "seconds": time.perf_counter() - t0,
            }
        )


def table(path: str) -> None:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    print("| variant | feedback | liked (held-out, sampled) | KL/answer | d(p‖p0) | efficiency |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r["feedback"] == 0:
            continue
        print(
            f"| {r['variant']} | {r['feedback']} | {r['p0']:.0%} → {r['p']:.0%} | "
            f"{r['kl']:.2f} | {r['floor']:.3f} | {r['efficiency']:.3f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="default")
    ap.add_argument("--taste", default="warm")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per-round", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--beta", type=float, default=0.05)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--clip", type=float, default=None)
    ap.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    ap.add_argument("--baseline", choices=["global", "knn"], default="global")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/efficiency.jsonl")
    ap.add_argument("--table")
    args = ap.parse_args()
    if args.table:
        table(args.table)
    else:
        run(args)


if __name__ == "__main__":
    main()
