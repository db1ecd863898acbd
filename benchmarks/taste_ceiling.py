"""How much taste can n feedbacks buy per nat of drift? The efficiency of a learned tilt.

    python benchmarks/taste_ceiling.py [--answers 300] [--tastes warm plain]
        [--fit 50 100 200] [--splits 20] [--seed 0] [--out results/taste_ceiling.json]

For small steps every policy's efficiency ``d(p‖p0)/KL`` is about the squared correlation,
under the base model's answers, between the user's reward and the policy's log-ratio
``log π/π_base``: a learner can only be as efficient as its update direction is aligned
with the taste. The best direction that ``n`` judgements can give is a reward model fitted
to them; this benchmark measures what following one would buy.

It samples ``--answers`` base-model answers to stream prompts (temperature 1, top-p 0.95),
judges each with every taste, and takes each answer's features (the base model's last
hidden state averaged over the answer: ``efficiency.answer_features``). Per split, the
stream's prompts are halved at random: a reward model (L2 logistic regression,
cross-validated strength: ``efficiency.RewardModel``) is fitted to ``n`` judged answers of
the first half, and on the answers of the other half (prompts it never saw) the
sequence-level tilt ``π ∝ π_base·exp(s·r̂)`` is evaluated by importance weights on the
base answers: its liked-rate ``p(s)`` and its KL to the base ``KL(s)`` (exact for the
reweighted sample), with ``s`` set so that ``KL(s)`` is 0.2, 0.5 and 1 nat per answer.
Reported: the reward model's AUC on the unseen prompts, the gain ``p − p0`` and the
efficiency at each KL, means over ``--splits`` splits.

The same reward models also pick the best of ``k`` base answers to each unseen prompt
(best-of-k, for the prompts with at least ``k`` answers, over random subsets): a policy
that can be run, whose KL to the base is at most ``log k − (k−1)/k`` nats per answer
(Beirami et al. 2024), so its efficiency is at least ``d(p‖p0)`` over that bound.

``--shift``: the same answers also test a reward model of the old taste as a detector of
an unhinted shift: fitted to 50 judgements of taste A (its reference: its 5-fold
out-of-fold AUC), batches of 50 unseen answers judged by A (false alarms) or by B (a
shift) are scored, and an alarm is the z-test of ``sona_plugin.learner.shift`` at 2.576.

This is the efficiency of the *policy* the feedback supports (reachable by best-of-n
against the reward model, or by distilling that into a BaseLoRA), not of a trained
adapter; ``benchmarks/efficiency.py`` measures trained ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from efficiency import RewardModel, answer_features, prompt_rows, sample  # noqa: E402
from rerank import FEATURES, save_cache  # noqa: E402
from tastes import rule as taste_rule  # noqa: E402

from sona_plugin.demo import STREAM_PROMPTS  # noqa: E402
from sona_plugin.learner.drift import kl_floor  # noqa: E402
from sona_plugin.learner.shift import auc  # noqa: E402

KL_TARGETS = (0.2, 0.5, 1.0)


BEST_OF = (2, 4)


def best_of(
    r: np.ndarray, liked: np.ndarray, groups: list[np.ndarray], k: int, rng
) -> tuple[float, float] | None:
    """``(p0, p)``: the liked-rate of one random answer and of the best-scored of ``k``
    random answers, over the groups (one per prompt) with at least ``k`` answers."""
    base, best = [], []
    for g in groups:
        if len(g) < k:
            continue
        for _ in range(8):
            pick = rng.choice(g, k, replace=False)
            base.append(liked[pick[0]])
            best.append(liked[pick[np.argmax(r[pick])]])
    return (float(np.mean(base)), float(np.mean(best))) if base else None


def tilt_at(r: np.ndarray, liked: np.ndarray, kl_target: float) -> tuple[float, float]:
    """``(p, KL)`` of the sample reweighted by ``exp(s·r)``, ``s`` found by bisection so
    that its KL to the uniform weights is ``kl_target``."""
    n = len(r)
    lo, hi = 0.0, 100.0
    for _ in range(80):
        s = (lo + hi) / 2
        w = np.exp(s * (r - r.max()))
        w /= w.sum()
        kl = float(np.sum(w * np.log(np.maximum(w * n, 1e-300))))
        lo, hi = (s, hi) if kl < kl_target else (lo, s)
    return float(np.dot(w, liked)), kl


def alarm(score: np.ndarray, liked: np.ndarray, a_ref: float, v_ref: float) -> bool:
    """The leaning detector's test: is this batch's AUC below the reference's, z > 2.576?"""
    from sona_plugin.learner.shift import auc_variance

    n1, n0 = int(liked.sum()), int((~liked).sum())
    if min(n1, n0) < 5:
        return False
    a = auc(score, liked)
    return (a_ref - a) / math.sqrt(v_ref + auc_variance(a, n1, n0)) > 2.576


def shift_study(feats, labels: dict, prompts: list[str], seed: int, fits: int = 20) -> dict:
    """Per ordered pair of tastes A → B: the share of batches of 50 that raise an alarm
    when judged by A (false alarms) and when judged by B (the shift found in one batch,
    and in the first or the second of two)."""
    from sklearn.model_selection import cross_val_predict

    from sona_plugin.learner.shift import auc_variance

    rng = np.random.default_rng(seed)
    unique = sorted(set(prompts))
    out = {}
    for a_name, b_name in [(a, b) for a in labels for b in labels if a != b]:
        A, B = labels[a_name], labels[b_name]
        counts = {"false_alarm": 0, "found_first": 0, "found_by_second": 0, "batches": 0}
        for _ in range(fits):
            side = dict(zip(unique, rng.permutation(len(unique)) % 2))
            fit = rng.permutation([i for i, p in enumerate(prompts) if side[p] == 0])[:50]
            pool = np.array([i for i, p in enumerate(prompts) if side[p] == 1])
            rm = RewardModel()
            rm.add(feats[fit], list(A[fit]))
            if rm.model is None:
                continue
            oof = cross_val_predict(rm.model, feats[fit], A[fit], cv=5, method="predict_proba")
            a_ref = auc(oof[:, 1], A[fit])
            v_ref = auc_variance(a_ref, int(A[fit].sum()), int((~A[fit]).sum()))
            score = rm.predict(feats[pool])

            for _ in range(50):
                b1 = rng.choice(len(pool), 50, replace=False)
                b2 = rng.choice(len(pool), 50, replace=False)
                counts["batches"] += 1
                counts["false_alarm"] += alarm(score[b1], A[pool][b1], a_ref, v_ref)
                first = alarm(score[b1], B[pool][b1], a_ref, v_ref)
                counts["found_first"] += first
                counts["found_by_second"] += first or alarm(score[b2], B[pool][b2], a_ref, v_ref)
        n = max(counts.pop("batches"), 1)
        out[f"{a_name}->{b_name}"] = {k: v / n for k, v in counts.items()}
        print(
            f"shift {a_name} -> {b_name}: "
            + ", ".join(f"{k} {v / n:.1%}" for k, v in counts.items())
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--answers", type=int, default=300)
    ap.add_argument("--tastes", nargs="+", default=["warm", "plain"])
    ap.add_argument("--fit", nargs="*", type=int, default=[50, 100, 200])
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shift", action="store_true", help="also the shift-detector study")
    ap.add_argument(
        "--features",
        nargs="+",
        default=["hidden"],
        choices=sorted(FEATURES),
        help="the reward model's features, each studied in turn",
    )
    ap.add_argument("--cache", help="an .npz of the sampled answers and their hidden features")
    ap.add_argument("--out", default="results/taste_ceiling.json")
    args = ap.parse_args()

    from sona_plugin.config import SonaConfig
    from sona_plugin.models import load_default_llm
    from sona_plugin.training import BaseLoRATrainer

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.cache and Path(args.cache).exists():
        saved = np.load(args.cache)
        prompts, texts, hidden = list(saved["prompts"]), list(saved["texts"]), saved["hidden"]
    else:
        model, tok = load_default_llm()
        peft = BaseLoRATrainer(model, SonaConfig(seed=args.seed)).peft_model  # B = 0: the base
        rng = random.Random(args.seed)
        prompts = [rng.choice(STREAM_PROMPTS) for _ in range(args.answers)]
        rows = prompt_rows(tok, prompts)
        answers = sample(peft, tok, rows, args.seed * 1000 + 17)
        texts = [tok.decode(a, skip_special_tokens=True) for a in answers]
        hidden = answer_features(peft, rows, answers)
        if args.cache:
            save_cache(Path(args.cache), prompts=prompts, texts=texts, hidden=hidden)
    for kind in args.features:
        feats = FEATURES[kind](hidden, texts)
        report = study(args, prompts, texts, feats)
        report["features"] = kind
        report["seconds"] = time.perf_counter() - t0
        out = Path(args.out if len(args.features) == 1 else f"{args.out[:-5]}_{kind}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))


def study(args, prompts: list[str], texts: list[str], feats: np.ndarray) -> dict:
    unique = sorted(set(prompts))
    split_rng = np.random.default_rng(args.seed)
    report: dict = {"answers": len(prompts), "prompts": len(unique), "tastes": {}}
    for name in args.tastes:
        liked = np.array([taste_rule(name).check(t) for t in texts])
        per_fit = {}
        for n in args.fit:
            rows_out = {"auc": [], **{f"gain@{k}": [] for k in KL_TARGETS}}
            rows_out.update({f"efficiency@{k}": [] for k in KL_TARGETS})
            rows_out.update({f"best_of_{k}_gain": [] for k in BEST_OF})
            rows_out.update({f"best_of_{k}_efficiency": [] for k in BEST_OF})
            for _ in range(args.splits):
                side = dict(zip(unique, split_rng.permutation(len(unique)) % 2))
                fit = [i for i, p in enumerate(prompts) if side[p] == 0]
                pool = np.array([i for i, p in enumerate(prompts) if side[p] == 1])
                fit = split_rng.permutation(fit)[:n]
                if len(fit) < n or min(liked[fit].sum(), (~liked[fit]).sum()) < 5:
                    continue
                rm = RewardModel()
                rm.add(feats[fit], list(liked[fit]))
                r = rm.model.decision_function(feats[pool])
                y = liked[pool]
                pool_prompts = np.array([prompts[i] for i in pool])
                p0 = float(y.mean())
                rows_out["auc"].append(auc(r, y))
                for k in KL_TARGETS:
                    p, kl = tilt_at(r, y, k)
                    rows_out[f"gain@{k}"].append(p - p0)
                    rows_out[f"efficiency@{k}"].append(kl_floor(p, p0) / kl)
                groups = [
                    np.flatnonzero(pool_prompts == q) for q in sorted(set(pool_prompts.tolist()))
                ]
                for k in BEST_OF:
                    got = best_of(r, y, groups, k, split_rng)
                    if got is not None:
                        b0, b = got
                        rows_out[f"best_of_{k}_gain"].append(b - b0)
                        bound = math.log(k) - (k - 1) / k
                        rows_out[f"best_of_{k}_efficiency"].append(kl_floor(b, b0) / bound)
            per_fit[n] = {k: float(np.mean(v)) for k, v in rows_out.items() if v}
            per_fit[n]["splits"] = len(rows_out["auc"])
            cells = " ".join(
                f"KL {k}: {per_fit[n][f'gain@{k}']:+.0%} eff {per_fit[n][f'efficiency@{k}']:.3f}"
                for k in KL_TARGETS
            )
            cells += " " + " ".join(
                f"best-of-{k}: {per_fit[n][f'best_of_{k}_gain']:+.0%} "
                f"eff ≥ {per_fit[n][f'best_of_{k}_efficiency']:.3f}"
                for k in BEST_OF
                if f"best_of_{k}_gain" in per_fit[n]
            )
            print(f"{name} n={n} auc {per_fit[n]['auc']:.3f} {cells}", flush=True)
        report["tastes"][name] = {"base_liked": float(liked.mean()), "fit": per_fit}
    if args.shift:
        labels = {n: np.array([taste_rule(n).check(t) for t in texts]) for n in args.tastes}
        report["shift"] = shift_study(feats, labels, prompts, args.seed)
    return report


if __name__ == "__main__":
    main()
