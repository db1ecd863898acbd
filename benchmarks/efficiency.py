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
``--targets``, ``--optimizer sgd``), one process per variant so each starts from the same
base model and seed, and three other ways to use the same feedback:

* ``--baseline knn``: each record's advantage against the mean reward of the 10 most
  similar earlier prompts instead of the global running mean;
* ``--baseline liked-only``: advantage 1 on liked answers, 0 on the rest (supervised
  fine-tuning on the liked answers, no push away from disliked ones);
* ``--reward-model K``: a logistic reward model on the base model's hidden states, fitted
  to every judgement so far, scores K fresh answers per new prompt; each prompt's answers
  are compared with each other (the group's mean predicted reward is the baseline);
* ``--best-of K``: the feedback trains only that reward model; per new prompt the best of
  K fresh answers by its score is a record with advantage 1 (best-of-K distillation);
* ``--tilt C,...``: no LoRA at all. A logistic regression of liked on the mean output
  embedding of the answer's tokens gives ``w``; the policy is the token-level exponential
  tilt ``π_base(v|ctx)·exp(E_v·b)`` with ``b = c·w / std_v(E_v·w)``, a bias on the final
  hidden state (``c``: the spread of the logit change over the vocabulary, in nats). The
  stream's answers come from the base model.

Results append one JSON line per round to ``--out``; ``--table FILE`` prints the
comparison. Run one at a time on a small machine (one torch thread each).
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


def sample(model, tok, rows: list[list[int]], seed: int, batch_size: int = 16) -> list[list[int]]:
    """Answers at temperature 1, top-p 0.95 (what users get), cut after EOS."""
    return sample_answer_ids(model, rows, tok, MAX_NEW, seed, batch_size, top_p=0.95)


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


def answer_features(peft, rows: list[list[int]], answers: list[list[int]], chunk: int = 8):
    """Per answer, the base model's last hidden state averaged over the answer's tokens
    (the adapter off, so features do not move as the policy learns): [n, d] float64."""
    from types import SimpleNamespace

    from sona_plugin.training.objective import make_batch

    out = []
    with torch.no_grad(), peft.disable_adapter():
        for s in range(0, len(rows), chunk):
            part = [
                SimpleNamespace(prompt_ids=r, response_ids=a or [0], response_id=str(i))
                for i, (r, a) in enumerate(zip(rows[s : s + chunk], answers[s : s + chunk]))
            ]
            b = make_batch(part, None, 0)
            h = peft(
                input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True
            ).hidden_states[-1][:, 1:]
            m = b.target_mask.unsqueeze(-1).to(h.dtype)  # position j+1 is an answer token
            out.append(((h * m).sum(1) / m.sum(1)).double())
    return torch.cat(out).numpy()


class RewardModel:
    """P(liked | answer): logistic regression on :func:`answer_features` of every judged
    answer so far, standardised, its L2 strength chosen by 5-fold cross-validation."""

    def __init__(self) -> None:
        self.X: list[np.ndarray] = []
        self.y: list[int] = []
        self.model = None

    def add(self, feats: np.ndarray, liked: list[bool]) -> None:
        self.X.extend(feats)
        self.y.extend(int(x) for x in liked)
        from sklearn.linear_model import LogisticRegressionCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if len(set(self.y)) < 2 or min(np.bincount(self.y)) < 5:
            self.model = None
            return
        self.model = make_pipeline(
            StandardScaler(),
            LogisticRegressionCV(Cs=np.logspace(-4, 1, 11), cv=5, scoring="neg_log_loss"),
        ).fit(np.stack(self.X), np.array(self.y))

    def predict(self, feats: np.ndarray) -> np.ndarray:
        if self.model is None:
            return np.full(len(feats), np.mean(self.y) if self.y else 0.5)
        return self.model.predict_proba(feats)[:, 1]


def auc(scores, labels) -> float | None:
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


def evaluate(peft, tok, rule, held_rows, seed: int, kl: bool, rm=None) -> dict:
    from sona_plugin.training import ModelView

    rows = held_rows + held_rows  # two sampled answers per held-out prompt
    answers = sample(peft, tok, rows, seed)
    texts = [tok.decode(a, skip_special_tokens=True) for a in answers]
    liked = [rule.check(t) for t in texts]
    out = {"p": sum(liked) / len(texts), "n": len(texts)}
    if rm is not None and rm.model is not None:  # the reward model on unseen answers
        out["rm_auc"] = auc(rm.predict(answer_features(peft, rows, answers)), liked)
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


def emitter(args):
    """``emit(row)``: one JSON line of ``row`` (after the run's arguments and variant) to
    ``--out`` and to stdout."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base_args = {k: v for k, v in vars(args).items() if k not in ("out", "table")}

    def emit(row: dict) -> None:
        row = {"variant": args.variant, **base_args, **row}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    return emit


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
    emit = emitter(args)
    ev0 = evaluate(peft, tok, rule, held_rows, args.seed * 100, kl=False)  # B = 0: the base
    p0 = ev0["p"]
    emit({"feedback": 0, "p": p0, "p0": p0, "kl": 0.0, "efficiency": None})
    used: list = []
    fed = 0
    rm = RewardModel() if args.reward_model or args.best_of else None
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
        baselines = None
        if args.best_of:
            batch, baselines = best_of_batch(args, rm, peft, tok, new, rnd)
        elif rm is not None:
            batch, baselines = rm_batch(args, rm, peft, tok, new, replay, used, rnd, fed)
        elif args.baseline == "knn":
            baselines = knn_baselines(batch, used)
        elif args.baseline == "liked-only":  # advantage 1 on liked answers, 0 on the rest
            baselines = [0.0 if r.reward > 0 else r.reward for r in batch]
        rep = trainer.train(batch, epochs=args.epochs, batch_size=4, baselines=baselines)
        used.extend(new)
        ev = evaluate(peft, tok, rule, held_rows, args.seed * 100 + rnd, kl=True, rm=rm)
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
                "rm_auc": ev.get("rm_auc"),
                "trained_records": len(batch),
                "seconds": time.perf_counter() - t0,
            }
        )


def best_of_batch(args, rm, peft, tok, new, rnd: int):
    """``--best-of K``: the feedback trains only the reward model; the adapter is trained
    toward the best-of-K policy (BOND, Sessa et al. 2024): per new prompt, K fresh answers
    from the current adapter, the one the reward model scores highest is a record with
    advantage 1 (supervised steps toward it, with the KL term)."""
    from dataclasses import replace

    rows = [r.prompt_ids for r in new]
    rm.add(answer_features(peft, rows, [r.response_ids for r in new]), [r.reward > 0 for r in new])
    k = args.best_of
    fresh_rows = [row for row in rows for _ in range(k)]
    fresh = sample(peft, tok, fresh_rows, args.seed * 1000 + rnd + 500)
    score = rm.predict(answer_features(peft, fresh_rows, fresh))
    picks = []
    for i, rec in enumerate(new):
        j = i * k + int(np.argmax(score[i * k : (i + 1) * k]))
        if fresh[j]:
            a = fresh[j]
            text = tok.decode(a, skip_special_tokens=True)
            picks.append(replace(rec, response_ids=a, response_text=text, reward=1.0))
    return picks, [0.0] * len(picks)


def rm_batch(args, rm, peft, tok, new, replay, used, rnd: int, fed: int):
    """The round's records plus ``--reward-model`` fresh answers per new prompt, sampled
    from the current adapter and scored by the reward model (reward ``2·P(liked) − 1``).
    Each prompt's answers form a group whose baseline is the group's mean predicted
    reward, so an advantage compares answers to the same prompt (GRPO's group baseline,
    with the reward model standing in for the judge of the unjudged answers); replayed
    records keep the running mean of all rewards as their baseline."""
    from dataclasses import replace

    rows = [r.prompt_ids for r in new]
    rm.add(answer_features(peft, rows, [r.response_ids for r in new]), [r.reward > 0 for r in new])
    k = args.reward_model
    fresh_rows = [row for row in rows for _ in range(k)]
    fresh = sample(peft, tok, fresh_rows, args.seed * 1000 + rnd + 500)
    pred = 2 * rm.predict(answer_features(peft, fresh_rows, fresh)) - 1
    own = 2 * rm.predict(answer_features(peft, rows, [r.response_ids for r in new])) - 1
    extra, baselines, extra_baselines = [], [], []
    for i, rec in enumerate(new):
        group = [own[i], *pred[i * k : (i + 1) * k]]
        b = float(np.mean(group))
        baselines.append(b)
        for j in range(k):
            a = fresh[i * k + j]
            if not a:
                continue
            extra.append(
                replace(
                    rec,
                    response_id=f"{rec.response_id}.s{j}",
                    response_ids=a,
                    response_text=tok.decode(a, skip_special_tokens=True),
                    reward=float(pred[i * k + j]),
                )
            )
            extra_baselines.append(b)
    g = float(np.mean([r.reward for r in used])) if used else 0.0
    batch = new + extra + replay
    return batch, baselines + extra_baselines + [g] * len(replay)


def hidden_bias(model, bias: torch.Tensor):
    """A ``ModelView`` of ``model`` with ``bias`` added to its final normed hidden state:
    every next-token logit ``v`` moves by ``E_v · bias`` (tied output embeddings)."""
    from contextlib import contextmanager

    from sona_plugin.training.gate import ModelView

    @contextmanager
    def ctx():
        h = model.model.norm.register_forward_hook(lambda m, i, o: o + bias)
        try:
            yield
        finally:
            h.remove()

    return ModelView(model, ctx)


def run_tilt(args) -> None:
    """``--tilt C,...``: no LoRA. Each round the stream's answers (sampled from the base
    model) are judged; a logistic regression of liked on the mean output embedding of the
    answer's tokens gives ``w`` (a reward linear in the answer's tokens,
    ``r̂(y) ∝ Σ_t E_{y_t}·w``); the policy is the token-level exponential tilt
    ``π_base(v|ctx)·exp(E_v·b)``, ``b = c·w / std_v(E_v·w)`` (``c``: the spread of the
    logit change in nats), applied as a bias on the final hidden state."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from sona_plugin.models import load_default_llm
    from sona_plugin.training.gate import ModelView

    torch.set_num_threads(args.threads)
    rule = taste_rule(args.taste)
    model, tok = load_default_llm()
    E = model.get_output_embeddings().weight.detach().double()
    held_rows = prompt_rows(tok, HELDOUT_PROMPTS[: args.heldout])
    stream = list(STREAM_PROMPTS)
    rng = random.Random(args.seed)
    emit = emitter(args)
    p0 = evaluate(model, tok, rule, held_rows, args.seed * 100, kl=False)["p"]
    X, y = [], []
    for rnd in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        prompts = [rng.choice(stream) for _ in range(args.per_round)]
        answers = sample(model, tok, prompt_rows(tok, prompts), args.seed * 1000 + rnd)
        for a in answers:
            X.append(E[a].mean(0).numpy() if a else np.zeros(E.shape[1]))
            y.append(rule.check(tok.decode(a, skip_special_tokens=True)))
        fit = make_pipeline(
            StandardScaler(),
            LogisticRegressionCV(Cs=np.logspace(-4, 1, 11), cv=5, scoring="neg_log_loss"),
        ).fit(np.stack(X), np.array(y))
        w = torch.tensor(fit[-1].coef_[0] / fit[0].scale_)
        for c in [float(x) for x in args.tilt.split(",")]:
            bias = (c * w / (E @ w).std()).float()
            view = hidden_bias(model, bias)
            with view.use() as m:
                ev = evaluate(m, tok, rule, held_rows, args.seed * 100 + rnd, kl=False)
            kl = answer_kl(
                view, ModelView(model), held_rows, tok, MAX_NEW, args.seed * 100 + rnd + 7
            )
            emit(
                {
                    "variant": f"{args.variant}-c{c:g}",
                    "feedback": len(y),
                    "p": ev["p"],
                    "p0": p0,
                    "kl": kl,
                    "floor": kl_floor(ev["p"], p0),
                    "efficiency": kl_floor(ev["p"], p0) / kl if kl > 0 else None,
                    "seconds": time.perf_counter() - t0,
                }
            )


def table(path: str) -> None:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    first: dict = {}
    for i, r in enumerate(rows):
        first.setdefault(r["variant"], i)
    rows.sort(key=lambda r: (first[r["variant"]], r.get("seed", 0), r["feedback"]))
    print(
        "| variant | seed | feedback | liked (held-out, sampled) | KL/answer | d(p‖p0) | efficiency |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r["feedback"] == 0:
            continue
        print(
            f"| {r['variant']} | {r.get('seed', 0)} | {r['feedback']} | {r['p0']:.0%} → {r['p']:.0%} | "
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
    ap.add_argument("--baseline", choices=["global", "knn", "liked-only"], default="global")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument(
        "--reward-model",
        type=int,
        default=0,
        metavar="K",
        help="K fresh answers per new prompt, scored by a reward model fitted to the feedback",
    )
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument(
        "--best-of",
        type=int,
        default=0,
        metavar="K",
        help="train toward the best of K fresh answers per prompt by a fitted reward model",
    )
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--tilt", help="comma-separated logit spreads c: the token-tilt variant")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/efficiency.jsonl")
    ap.add_argument("--table")
    args = ap.parse_args()
    if args.table:
        table(args.table)
    elif args.tilt:
        run_tilt(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
