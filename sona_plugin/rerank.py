"""Best-of-k by a reward model fitted to the feedback: a served learner whose drift from
the model that samples is bounded by construction.

For every prompt the host samples ``k`` answers, scores each with a logistic reward model
of ``P(liked | answer)`` fitted to every judged answer so far, and returns the best one.
The features of an answer are the final hidden states the host recorded while generating
it (the input of ``lm_head`` at each step, before the MicroLoRA), averaged over its steps;
the model is L2-regularised logistic regression on standardised features, its strength
chosen by 5-fold cross-validation on the log-loss (scikit-learn's
``LogisticRegressionCV``), i.e. a real maximum of the penalised likelihood of the judged
answers, refitted every ``refit_every`` judgements on the last ``window``.

Why (``docs/benchmarks.md``, "What the feedback could buy"): for small steps a learner's
efficiency ``d(p‖p0)/KL`` is about ``Corr(log π/π_base, r)²``, and the gradient-trained
adapters reach correlations that give 0.00–0.05, while a reward model fitted to the same
50–200 judgements ranks unseen prompts' answers with AUC 0.69–0.83. Best-of-k follows the
reward model exactly, and whatever it learns, its KL to the sampling policy is at most
``log k − (k − 1)/k`` nats per answer (Beirami et al. 2024, "Theoretical guarantees on the
best-of-n alignment policy"): 0.31 for k = 2, 0.64 for 4, 1.2 for 8. The weights never
move, so anchor perplexity and staying on the question are the sampling model's. The price
is compute: ``k`` sampled answers per prompt.

Until both labels have ``min_per_label`` judgements the first candidate is served (an
ordinary sample).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidValue

logger = logging.getLogger(__name__)

_FILE = "ranker.safetensors"


def kl_bound(k: int) -> float:
    """Upper bound on KL(best-of-k ‖ sampler) in nats per answer: ``log k − (k−1)/k``."""
    return math.log(k) - (k - 1) / k


def answer_features(hidden: np.ndarray) -> np.ndarray:
    """An answer's features: its recorded final hidden states ``[T, d]`` averaged over
    the steps, as float32 ``[d]``."""
    if hidden.ndim != 2 or hidden.shape[0] == 0:
        raise InvalidValue(f"answer hidden states must be [T > 0, d], got shape {hidden.shape}")
    return hidden.mean(axis=0, dtype=np.float64).astype(np.float32)


def recorded_hidden(model: Any, prompt_ids: list[int], response_ids: list[int]) -> np.ndarray:
    """The final hidden states a host records while ``model`` generates ``response_ids``
    after ``prompt_ids`` (one per step: the prompt's last position, then every answer token
    but the last), by one forward pass: float32 ``[T, d]``. A restart recomputes the
    features of judgements stored after the ranker's last save with it."""
    import torch

    P, T = len(prompt_ids), len(response_ids)
    ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=model.device)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return out.hidden_states[-1][0, P - 1 : P + T - 1].detach().to(torch.float32).cpu().numpy()


def reward_model(folds: int) -> Any:
    """The reward model's estimator, unfitted: L2-regularised logistic regression on
    standardised features, its strength chosen by ``folds``-fold cross-validation on the
    log-loss."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(),
        LogisticRegressionCV(Cs=np.logspace(-4, 1, 11), cv=folds, scoring="neg_log_loss"),
    )


class AnswerRanker:
    """The reward model of best-of-k serving: judged answers in, scores out.

    Thread-safe: ``add`` may run on a feedback thread while ``choose`` runs on a request.

    Args:
        window: fit to at most this many of the latest judgements (a taste that shifts
            displaces the old one within a window).
        refit_every: refit after this many new judgements.
        min_per_label: judgements of each label needed before the first fit.
        background: fit on a thread of its own (one at a time; judgements that arrive
            meanwhile are in the next fit), so that ``add`` returns at once; a fit takes
            seconds (2.7 s for 200 judgements of width 576 on this repository's 2-core
            machine). False: ``add`` fits before it returns (benchmarks, tests).
    """

    def __init__(
        self,
        window: int = 1000,
        refit_every: int = 5,
        min_per_label: int = 5,
        background: bool = False,
    ):
        self.window = window
        self.refit_every = refit_every
        self.min_per_label = min_per_label
        self.background = background
        self._thread: threading.Thread | None = None
        self._pending = False
        self._ids: list[int] = []
        self._X: list[np.ndarray] = []
        self._y: list[int] = []
        self._model = None
        self._since_fit = 0
        self._lock = threading.Lock()
        self.fits = 0

    def __len__(self) -> int:
        return len(self._y)

    @property
    def last_id(self) -> int:
        """The store row id of the latest judgement taken (0: none)."""
        return max(self._ids, default=0)

    @property
    def fitted(self) -> bool:
        return self._model is not None

    def add(self, record_id: int, features: np.ndarray, reward: float) -> None:
        """Take one judgement: ``reward`` > 0 is liked, < 0 disliked, 0 carries no label."""
        if reward == 0:
            return
        with self._lock:
            if self._X and features.shape != self._X[0].shape:
                raise InvalidValue(
                    f"answer features must have shape {self._X[0].shape}, got {features.shape}"
                )
            self._ids.append(int(record_id))
            self._X.append(np.asarray(features, np.float32))
            self._y.append(int(reward > 0))
            del self._ids[: -self.window], self._X[: -self.window], self._y[: -self.window]
            self._since_fit += 1
            due = self._since_fit >= self.refit_every or (self._model is None and self._ready())
        if due:
            self.refit()

    def refit(self) -> None:
        """Fit to every judgement held now: at once, or (``background``) on the fitting
        thread, after the fit it is running."""
        if not self.background:
            self.fit()
            return
        with self._lock:
            if self._thread is not None:
                self._pending = True  # the running fit's thread fits again after it
                return
            self._thread = threading.Thread(target=self._fit_loop, name="sona-ranker", daemon=True)
            self._thread.start()

    def _fit_loop(self) -> None:
        while True:
            try:
                self.fit()
            except Exception:  # noqa: BLE001 - a thread of its own: log; the next fit retries
                logger.exception("fitting the best-of-k reward model failed")
            with self._lock:
                if not self._pending:
                    self._thread = None
                    return
                self._pending = False

    def wait(self) -> None:
        """Return once no background fit is running or pending."""
        while (t := self._thread) is not None:
            t.join()

    def forget(self, record_id: int) -> bool:
        """Drop a judgement (a quarantined or deleted record); refits. True if it was held."""
        with self._lock:
            if record_id not in self._ids:
                return False
            i = self._ids.index(record_id)
            del self._ids[i], self._X[i], self._y[i]
        self.refit()
        return True

    def _ready(self) -> bool:
        y = np.asarray(self._y)
        return len(y) > 0 and min(int(y.sum()), int((1 - y).sum())) >= self.min_per_label

    def fit(self) -> None:
        """Refit to the judgements held (no model while a label has too few)."""
        with self._lock:
            self._since_fit = 0
            if not self._ready():
                self._model = None
                return
            X, y = np.stack(self._X), np.asarray(self._y)
        model = reward_model(folds=min(5, int(y.sum()), int((1 - y).sum())))
        with warnings.catch_warnings():  # scikit-learn 1.9 warns of its own coming change
            warnings.simplefilter("ignore", FutureWarning)
            model.fit(X, y)
        with self._lock:
            self._model = model
            self.fits += 1

    def score(self, features: np.ndarray) -> np.ndarray | None:
        """Log-odds of liked for each row of ``features`` ``[k, d]``; None before a fit."""
        model = self._model
        return None if model is None else model.decision_function(features)

    def choose(self, features: list[np.ndarray | None]) -> int:
        """The index of the candidate to serve: the best-scored, or 0 before a fit or when
        a candidate has no features (nothing recorded)."""
        if any(f is None for f in features):
            return 0
        s = self.score(np.stack(features))
        return 0 if s is None else int(np.argmax(s))

    def catch_up(self, store: Any, hidden_of: Callable[[list[int], list[int]], np.ndarray]) -> int:
        """Make the judgements held agree with ``store`` after a restart: drop those whose
        record is no longer live (quarantined or deleted after the last save), and take
        the live ones stored after :attr:`last_id` (a crash between saves, or a first start
        with best-of-k on), the latest ``window`` of them, their features from
        ``hidden_of(prompt_ids, response_ids)`` (:func:`recorded_hidden` on a model); then
        fit on all. Returns how many were taken."""
        last = self.last_id
        live = store.records(since_id=min(self._ids, default=1) - 1)
        ids = {r.id for r in live}
        with self._lock:
            keep = [i for i, rid in enumerate(self._ids) if rid in ids]
            dropped = len(self._ids) - len(keep)
            self._ids = [self._ids[i] for i in keep]
            self._X = [self._X[i] for i in keep]
            self._y = [self._y[i] for i in keep]
        recs = [r for r in live if r.id > last and r.prompt_ids and r.response_ids]
        recs = recs[-self.window :]
        for r in recs:
            self.add(r.id, answer_features(hidden_of(r.prompt_ids, r.response_ids)), r.reward)
        if recs or dropped:
            self.refit()  # on all of them, not only up to the last due fit
            logger.info(
                "best-of-k reward model: took %d stored judgements, dropped %d no longer live",
                len(recs),
                dropped,
            )
        return len(recs)

    def stats(self) -> dict:
        y = np.asarray(self._y)
        return {
            "judgements": len(y),
            "liked_share": float(y.mean()) if len(y) else None,
            "fitted": self.fitted,
            "fits": self.fits,
        }

    def save(self, directory: Path) -> None:
        """Write the judgements held to ``directory/ranker.safetensors`` atomically."""
        from safetensors.numpy import save_file

        with self._lock:
            d = self._X[0].shape[0] if self._X else 0
            tensors = {
                "ids": np.asarray(self._ids, np.int64),
                "features": np.stack(self._X) if self._X else np.zeros((0, d), np.float32),
                "liked": np.asarray(self._y, np.int8),
            }
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{_FILE}.tmp"
        save_file(tensors, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, directory / _FILE)

    def load(self, directory: Path) -> bool:
        """Take the judgements saved in ``directory`` (none there: False) and refit."""
        from safetensors.numpy import load_file

        path = directory / _FILE
        if not path.exists():
            return False
        t = load_file(str(path))
        with self._lock:
            self._ids = [int(i) for i in t["ids"]]
            self._X = list(t["features"])
            self._y = [int(v) for v in t["liked"]]
        self.refit()
        return True
