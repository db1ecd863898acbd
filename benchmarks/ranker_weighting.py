"""Would the best-of-k reward model rank the next answers better if it weighted its
judgements toward the newest? Offline, from a deployment's saved judgements: at each
point ``p``, fit the reward model (``sona_plugin.rerank.reward_model``) on the judgements
up to ``p`` with each weighting, and score the next 50 served answers by it (ROC AUC
against their labels).

    python benchmarks/ranker_weighting.py STATE_DIR --boundary 217 --points 250 300 350

Weightings: every judgement alike (shipped); judgements before ``--boundary`` (a task
boundary the learner found) at 0.2; a half-life of 100 and of 200 judgements.
``STATE_DIR`` is a pipeline's state directory (``ranker.safetensors`` in it). A saved
ranker holds its last ``rerank_window`` judgements only.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from sklearn.metrics import roc_auc_score

from sona_plugin.rerank import reward_model

NEXT = 50


def next_auc(X, y, fit_rows, weights, test_rows) -> float:
    """AUC on ``test_rows`` of the reward model fitted on ``fit_rows`` with ``weights``."""
    model = reward_model(folds=min(5, int(y[fit_rows].sum()), int((1 - y[fit_rows]).sum())))
    with warnings.catch_warnings():  # scikit-learn 1.9 warns of its own coming change
        warnings.simplefilter("ignore", FutureWarning)
        model.fit(X[fit_rows], y[fit_rows], logisticregressioncv__sample_weight=weights[fit_rows])
    return float(roc_auc_score(y[test_rows], model.decision_function(X[test_rows])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("state_dir", type=Path)
    ap.add_argument("--boundary", type=int, required=True, help="record id of a task boundary")
    ap.add_argument("--points", type=int, nargs="+", required=True)
    args = ap.parse_args()
    saved = load_file(str(args.state_dir / "ranker.safetensors"))
    order = np.argsort(saved["ids"])
    ids, X = saved["ids"][order], saved["features"][order]
    y = saved["liked"][order].astype(int)
    print(f"{len(ids)} judgements, records {ids.min()}-{ids.max()}")
    print("| point | next 50 liked | alike | before the boundary × 0.2 | half-life 100 | 200 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for p in args.points:
        fit_rows, test_rows = ids <= p, (ids > p) & (ids <= p + NEXT)
        if len(set(y[test_rows])) < 2 or min(y[fit_rows].sum(), (1 - y[fit_rows]).sum()) < 5:
            print(f"| {p} | (one label only) | | | | |")
            continue
        weightings = (
            np.ones(len(ids)),
            np.where(ids > args.boundary, 1.0, 0.2),
            0.5 ** ((p - ids) / 100),
            0.5 ** ((p - ids) / 200),
        )
        aucs = [next_auc(X, y, fit_rows, w, test_rows) for w in weightings]
        cells = " | ".join(f"{a:.3f}" for a in aucs)
        print(f"| {p} | {y[test_rows].mean():.0%} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
