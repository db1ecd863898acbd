"""The promotion gate: a candidate adapter is published only if it does not regress.

Three checks, each comparing the candidate with the model that serves now (or, for
checks 2 and 3, a fixed reference; see below):

1. **Held-out feedback**, over feedback on prompts the trainer never saw:
   the reward-centred score ``mean_i (r_i − r̄) · (1/T_i) Σ_t log π(y_{i,t})`` (higher is
   better: liked answers more likely *relative to* disliked ones) must not fall by more
   than ``tolerance_heldout`` plus ``heldout_margin_se`` paired standard errors (one by
   default), and the liked answers' mean log-prob per token must not fall by more than
   ``tolerance_liked``. Centring makes the score blind to a change
   that moves every answer alike: uncentred, with mostly negative rewards, a candidate
   that made *every* held-out answer less likely scored higher and was served. The
   second condition refuses exactly that candidate (it lowers the liked answers too).
   The metrics carry the paired standard error of the score difference over the records
   (``heldout_diff_se``): on 40 held-out records a published step's gain measured 1.5–1.9
   of it (``benchmarks/gate_noise.py``), so a drop by less than one is noise, and passes.
2. **Anchor text**: mean NLL per token of fixed neutral text (:data:`ANCHOR_TEXTS`).
   Passes if ``nll_cand ≤ nll_ref · (1 + tolerance_nll)``.
3. **On topic** (when an embedder is given): the probe prompts and the prompts of the
   held-out feedback (the last ``on_topic_records``; real traffic, never trained on) are
   answered greedily (≤ 32 new tokens); the score is the mean cosine of prompt and
   answer embeddings (a record's prompt embedding is the one stored with it). Passes if
   the one-sided ``on_topic_confidence`` lower confidence bound of the ratio
   ``on_cand / on_ref`` is at least ``min_on_topic_ratio`` (:func:`ratio_lower_bound`:
   the prompts are a sample, and the floor is meant to hold on prompts the gate did not
   see; with the plain ratio a version passed at 0.9 on the gate's 36 prompts and
   measured 0.89 on 32 others). DESIGN.md found that the strong settings drift off the
   question while the anchor NLL barely moves, so perplexity alone does not protect
   users.
4. **KL budget** (when ``max_kl_per_answer`` > 0): the candidate's ``KL(π‖π_ref)`` per
   answer sampled on the held-out prompts (``sona_plugin.learner.drift.answer_kl``) must
   not exceed it; the two checks above passed versions that spent 2.9 nats per answer.

The drift checks (2, 3) compare with a *reference*: the current model by default, or a
fixed ``reference`` model (normally the base model, with a ``reference_cache`` so that its
anchor NLL and answers are computed once). Against the current model each published
version may drift a further 5 % / 10 % and the drifts compound over versions; against the
base model the budget is fixed.

Models are passed as modules or as :class:`ModelView` — a model plus a context to enter
while it is evaluated, so that one PeftModel can serve as both candidate and current
(e.g. ``ModelView.base(peft_model)`` for the adapter switched off, or
``ModelView.adapter(peft_model, "v3")`` for a named adapter).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from ..errors import InvalidValue
from ..store.base import FeedbackRecord
from .objective import mean_response_logprob, response_logprobs

ANCHOR_TEXTS: list[str] = [
    "Water boils at one hundred degrees Celsius at sea level. At higher altitudes the air "
    "pressure is lower, so water boils at a lower temperature and food takes longer to cook.",
    "To reset your password, open the settings page, choose Security, and click the link "
    "labelled Forgot password. A message with a new link will arrive in your inbox within "
    "a few minutes.",
    "The library opens at nine in the morning and closes at six in the evening on weekdays. "
    "On Saturdays it closes at noon, and it stays closed on Sundays and public holidays.",
    '"Could you pass me the salt, please?" she asked. "Of course," he replied, sliding '
    'the small glass jar across the table. "Dinner smells wonderful tonight."',
    "Photosynthesis is the process by which green plants use sunlight, water and carbon "
    "dioxide to make sugar. Oxygen is released into the air as a by-product.",
    "Before you start the machine, make sure the lid is closed and the water tank is full. "
    "Press the power button once and wait until the green light stops blinking.",
    "The river runs through the middle of the old town. In summer, families walk along its "
    "banks in the evening, and children feed the ducks near the stone bridge.",
    "A triangle has three sides and three angles. The angles of any triangle always add up "
    "to one hundred and eighty degrees, whatever the length of its sides.",
    "Thank you for your order. Your package was shipped this morning and should arrive in "
    "three to five working days. You can track it with the number in this email.",
    '"What time does the train leave?" asked the traveller. "At a quarter past four," '
    'said the clerk, "from platform two. You have plenty of time for a coffee."',
    "The heart is a muscle that pumps blood through the body. It beats about seventy times "
    "a minute when a person is at rest, and faster during exercise.",
    "To make a simple salad, wash the lettuce, slice a tomato and a cucumber, and mix them "
    "in a bowl. Add a spoon of olive oil, a little lemon juice and a pinch of salt.",
]
"""Short neutral English paragraphs (facts, instructions, dialogue) written for this
project, scored for the anchor-text NLL of the promotion gate."""


class ModelView:
    """A model to evaluate, entered under an optional context.

    Args:
        model: the module whose forward/generate is called.
        context: a zero-argument callable returning a context manager (for example
            ``peft_model.disable_adapter``) that is active while the gate uses the model.
    """

    def __init__(self, model: Any, context: Callable[[], Any] | None = None):
        self.model = model
        self.context = context

    @contextmanager
    def use(self) -> Iterator[Any]:
        if self.context is None:
            yield self.model
        else:
            with self.context():
                yield self.model

    @classmethod
    def base(cls, peft_model: Any) -> ModelView:
        """The PeftModel with its adapters switched off (the base model)."""
        return cls(peft_model, peft_model.disable_adapter)

    @classmethod
    def adapter(cls, peft_model: Any, name: str) -> ModelView:
        """The PeftModel with adapter ``name`` active (the previous one restored after)."""

        @contextmanager
        def ctx() -> Iterator[None]:
            prev = peft_model.active_adapter
            peft_model.set_adapter(name)
            try:
                yield
            finally:
                peft_model.set_adapter(prev)

        return cls(peft_model, ctx)


def _view(m: Any) -> ModelView:
    return m if isinstance(m, ModelView) else ModelView(m)


@dataclass
class GateResult:
    """The gate's verdict.

    Attributes:
        passed: every check that ran passed.
        metrics: the numbers behind the verdict (candidate and current, or reference, per
            check).
        reasons: one line per failed check (empty when passed).
        failed: the failed checks' names, one per reason (``heldout_score``,
            ``liked_answers``, ``anchor_nll``, ``on_topic``, ``kl_budget``): metric labels.
        samples: the probe answers, ``{"candidate": [...], "current" or "reference": [...]}``.
    """

    passed: bool
    metrics: dict[str, float]
    reasons: list[str]
    samples: dict[str, list[str]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Seq:
    prompt_ids: list[int]
    response_ids: list[int]
    response_id: str


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def anchor_nll(model: Any, texts: Sequence[str], tokenizer: Any, batch_size: int = 8) -> float:
    """Mean negative log-likelihood per token of ``texts`` (every token after the first)."""
    seqs = []
    for i, t in enumerate(texts):
        ids = list(tokenizer(t)["input_ids"])
        if len(ids) >= 2:
            seqs.append(_Seq(ids[:1], ids[1:], f"anchor{i}"))
    if not seqs:
        raise InvalidValue("anchor_texts must contain at least one text of two or more tokens")
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(seqs), batch_size):
            for lp in response_logprobs(model, seqs[s : s + batch_size], _device(model)):
                total -= float(lp.sum())
                n += lp.shape[0]
    return total / n


def heldout_score(model: Any, records: Sequence[FeedbackRecord], batch_size: int = 8) -> float:
    """``mean_i (r_i − r̄) · mean_t log π(y_{i,t})`` over the records (higher is better)."""
    return heldout_scores(model, records, batch_size)[0]


def heldout_scores(
    model: Any, records: Sequence[FeedbackRecord], batch_size: int = 8
) -> tuple[float, float | None]:
    """(the reward-centred score of :func:`heldout_score`, the liked answers' mean
    log-prob per token or None when no record has a reward > 0)."""
    lp = mean_response_logprob(model, list(records), batch_size, _device(model))
    return _scores(lp, records)


def _scores(lp: torch.Tensor, records: Sequence[FeedbackRecord]) -> tuple[float, float | None]:
    r = torch.tensor([float(x.reward) for x in records], dtype=lp.dtype)
    liked = r > 0
    return (
        float(((r - r.mean()) * lp).mean()),
        float(lp[liked].mean()) if bool(liked.any()) else None,
    )


def paired_se(lp_a: torch.Tensor, lp_b: torch.Tensor, records: Sequence[FeedbackRecord]) -> float:
    """Standard error of the held-out score difference ``a − b`` over the records (the
    mean of ``(r_i − r̄)·(lp_a,i − lp_b,i)``, paired by record); 0 for fewer than 2."""
    r = torch.tensor([float(x.reward) for x in records], dtype=lp_a.dtype)
    d = (r - r.mean()) * (lp_a - lp_b)
    return float(d.std() / math.sqrt(len(d))) if len(d) > 1 else 0.0


def _chat_prompt(tokenizer: Any, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return prompt


def _prompt_rows(prompts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    return [
        list(tokenizer(_chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"])
        for p in prompts
    ]


def greedy_answers(
    model: Any, prompts: Sequence[str], tokenizer: Any, max_new_tokens: int = 32
) -> list[str]:
    """Greedy answers (chat template applied when the tokenizer has one), decoded."""
    return greedy_answers_ids(model, _prompt_rows(prompts, tokenizer), tokenizer, max_new_tokens)


def greedy_answers_ids(
    model: Any,
    rows: Sequence[Sequence[int]],
    tokenizer: Any,
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to prompts given as token ids (already templated), decoded."""
    out: list[str] = []
    for s in range(0, len(rows), batch_size):
        out += _greedy_batch(model, rows[s : s + batch_size], tokenizer, max_new_tokens)
    return out


def _greedy_batch(
    model: Any, rows: Sequence[Sequence[int]], tokenizer: Any, max_new_tokens: int
) -> list[str]:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding: every row's answer starts at column L
        ids[i, L - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, L - len(r) :] = 1
    dev = _device(model)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=int(pad),
        )
    return [tokenizer.decode(o[L:], skip_special_tokens=True).strip() for o in out]


def _embed(embedder: Any, texts: list[str]) -> np.ndarray:
    enc = getattr(embedder, "encode", None)
    E = enc(texts) if callable(enc) else embedder(texts)
    if hasattr(E, "detach"):
        E = E.detach().cpu().numpy()
    E = np.asarray(E, dtype=np.float64)
    return E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)


def on_topic_score(prompts: Sequence[str], answers: Sequence[str], embedder: Any) -> float:
    """Mean cosine between each prompt's and its answer's embedding (empty answer: 0)."""
    return float(_cosines(_embed(embedder, list(prompts)), answers, embedder).mean())


def _cosines(P: np.ndarray, answers: Sequence[str], embedder: Any) -> np.ndarray:
    """Cosine of each unit prompt embedding in ``P`` and its answer's (empty answer: 0)."""
    keep = [i for i, a in enumerate(answers) if a.strip()]
    cos = np.zeros(len(answers))
    if keep:
        A = _embed(embedder, [answers[i] for i in keep])
        cos[keep] = np.einsum("ij,ij->i", P[keep], A)
    return cos


def ratio_lower_bound(num: Sequence[float], den: Sequence[float], confidence: float) -> float:
    """One-sided lower confidence bound of ``mean(num) / mean(den)`` over paired samples.

    The ratio estimator's delta-method standard error, ``sd(num − R·den) / (√n ·
    mean(den))``, times the normal quantile of ``confidence`` (0.5 or less: the ratio
    itself). Answers identical to the reference's give the ratio 1 with no margin; the
    more answers change, and the more their scores differ, the wider the margin. NaN
    when ``mean(den)`` is not positive (no ratio to bound).
    """
    c, u = np.asarray(num, np.float64), np.asarray(den, np.float64)
    mu = float(u.mean()) if u.size else 0.0
    if mu <= 0:
        return float("nan")
    ratio = float(c.mean()) / mu
    if c.size < 2 or confidence <= 0.5:
        return ratio
    se = float(np.std(c - ratio * u, ddof=1)) / (math.sqrt(c.size) * mu)
    return ratio - NormalDist().inv_cdf(confidence) * se


def _on_topic_items(
    probes: list[str], records: Sequence[FeedbackRecord], tokenizer: Any, embedder: Any
) -> tuple[list[str], list[list[int]], np.ndarray]:
    """Keys, prompt token rows and unit prompt embeddings of the on-topic check's prompts:
    the probe questions, then the records with a prompt and a stored embedding."""
    keys = [f"probe:{p}" for p in probes]
    rows = _prompt_rows(probes, tokenizer)
    parts = [_embed(embedder, probes)] if probes else []
    recs = [
        r
        for r in records
        if len(r.prompt_ids) > 0 and r.embedding is not None and np.asarray(r.embedding).size > 0
    ]
    if recs:
        keys += [f"record:{r.response_id}" for r in recs]
        rows += [list(r.prompt_ids) for r in recs]
        E = np.stack([np.asarray(r.embedding, np.float64) for r in recs])
        parts.append(E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12))
    P = np.concatenate(parts) if parts else np.zeros((0, 0))
    return keys, rows, P


class PromotionGate:
    """Decides whether a candidate adapter may replace the one serving now.

    Args:
        tolerance_nll: relative anchor-NLL increase allowed (0.05: 5 %).
        tolerance_heldout: absolute drop of the held-out feedback score allowed.
        heldout_margin_se: further drop allowed, in paired standard errors of the score
            difference (0: none; 1: the default, a drop within the score's noise passes;
            1.645: refuse only a drop significant at one-sided 5 %).
        tolerance_liked: drop of the held-out liked answers' mean log-prob per token
            allowed (nats).
        max_kl_per_answer: check 4's budget in nats (0: check 4 off).
        kl_prompts: how many of the latest held-out prompts check 4 samples answers to.
        min_on_topic_ratio: candidate on-topic score must be at least this fraction of
            the current (or reference) model's.
        on_topic_confidence: one-sided confidence, over the sampled prompts, with which
            that fraction must be shown (:func:`ratio_lower_bound`; 0.5 or less: the
            measured ratio alone).
        on_topic_records: how many of the latest held-out records the on-topic check
            also answers (0: the probe prompts only).
        max_new_tokens: length of the greedy probe answers.
        batch_size: rows per forward pass.
    """

    def __init__(
        self,
        tolerance_nll: float = 0.05,
        tolerance_heldout: float = 0.0,
        min_on_topic_ratio: float = 0.9,
        max_new_tokens: int = 32,
        batch_size: int = 8,
        on_topic_records: int = 24,
        tolerance_liked: float = 0.05,
        max_kl_per_answer: float = 0.0,
        kl_prompts: int = 16,
        on_topic_confidence: float = 0.95,
        heldout_margin_se: float = 1.0,
    ):
        for name, v in (
            ("tolerance_nll", tolerance_nll),
            ("tolerance_heldout", tolerance_heldout),
            ("heldout_margin_se", heldout_margin_se),
            ("min_on_topic_ratio", min_on_topic_ratio),
            ("tolerance_liked", tolerance_liked),
            ("max_kl_per_answer", max_kl_per_answer),
        ):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise InvalidValue(f"{name} must be a finite number >= 0, got {v!r}")
        if not (isinstance(on_topic_confidence, (int, float)) and 0 <= on_topic_confidence < 1):
            raise InvalidValue(
                f"on_topic_confidence must be a number in [0, 1), got {on_topic_confidence!r}"
            )
        self.on_topic_confidence = float(on_topic_confidence)
        if (
            isinstance(max_new_tokens, bool)
            or not isinstance(max_new_tokens, int)
            or max_new_tokens < 1
        ):
            raise InvalidValue(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        self.tolerance_nll = float(tolerance_nll)
        self.tolerance_heldout = float(tolerance_heldout)
        self.heldout_margin_se = float(heldout_margin_se)
        self.tolerance_liked = float(tolerance_liked)
        self.max_kl_per_answer = float(max_kl_per_answer)
        self.kl_prompts = int(kl_prompts)
        self.min_on_topic_ratio = float(min_on_topic_ratio)
        if (
            isinstance(on_topic_records, bool)
            or not isinstance(on_topic_records, int)
            or on_topic_records < 0
        ):
            raise InvalidValue(
                f"on_topic_records must be an integer >= 0, got {on_topic_records!r}"
            )
        self.max_new_tokens = max_new_tokens
        self.batch_size = int(batch_size)
        self.on_topic_records = on_topic_records

    def evaluate(
        self,
        candidate: Any,
        current: Any,
        heldout: Sequence[FeedbackRecord],
        anchor_texts: Sequence[str] | None,
        tokenizer: Any,
        embedder: Any = None,
        probe_prompts: Sequence[str] | None = None,
        reference: Any = None,
        reference_cache: dict | None = None,
        drift_only: bool = False,
    ) -> GateResult:
        """Run the checks (see the module docstring) and return the verdict.

        Args:
            candidate, current: modules or :class:`ModelView` s.
            heldout: feedback records not trained on; empty skips check 1 (noted in
                ``metrics["heldout_records"] = 0``).
            anchor_texts: texts for check 2; None uses :data:`ANCHOR_TEXTS`.
            tokenizer: the host model's tokenizer.
            embedder: a SentenceTransformer (``.encode``) or a callable
                ``list[str] -> [n, d]``; enables check 3.
            probe_prompts: fixed questions for check 3 (besides the held-out prompts).
            reference: a module or :class:`ModelView` that checks 2 and 3 compare with
                instead of ``current`` (``metrics`` names it ``reference``).
            reference_cache: a dict kept by the caller across calls with the same
                ``reference``: its anchor NLL and answers are computed once. Only for a
                reference whose weights do not change.
            drift_only: skip check 1 (the held-out records still give checks 3 and 4
                their prompts): the drift budget alone.
        """
        cand, cur = _view(candidate), _view(current)
        texts = list(ANCHOR_TEXTS if anchor_texts is None else anchor_texts)
        heldout = list(heldout)
        metrics: dict[str, float] = {"heldout_records": float(len(heldout))}
        reasons: list[str] = []
        failed: list[str] = []
        samples: dict[str, list[str]] = {}

        if heldout and not drift_only:
            with cand.use() as m:
                lp_c = mean_response_logprob(m, heldout, self.batch_size, _device(m))
            with cur.use() as m:
                lp_u = mean_response_logprob(m, heldout, self.batch_size, _device(m))
            (hc, lc), (hu, lu) = _scores(lp_c, heldout), _scores(lp_u, heldout)
            se = paired_se(lp_c, lp_u, heldout)
            metrics.update(heldout_candidate=hc, heldout_current=hu, heldout_diff_se=se)
            allowed = self.tolerance_heldout + self.heldout_margin_se * se
            if hc < hu - allowed:
                failed.append("heldout_score")
                reasons.append(
                    f"held-out feedback score fell: {hc:.4f} < {hu:.4f} - {allowed:.4f} "
                    f"(paired standard error {se:.4f})"
                )
            if lc is not None and lu is not None:
                metrics.update(heldout_liked_logprob_candidate=lc, heldout_liked_logprob_current=lu)
                if lc < lu - self.tolerance_liked:
                    failed.append("liked_answers")
                    reasons.append(
                        f"held-out liked answers became less likely: {lc:.4f} < "
                        f"{lu:.4f} - {self.tolerance_liked} nats per token"
                    )

        ref = cur if reference is None else _view(reference)
        ref_name = "current" if reference is None else "reference"
        cache = reference_cache if reference is not None and reference_cache is not None else {}
        with cand.use() as m:
            nc = anchor_nll(m, texts, tokenizer, self.batch_size)
        key = ("anchor_nll", tuple(texts))
        if key not in cache:
            with ref.use() as m:
                cache[key] = anchor_nll(m, texts, tokenizer, self.batch_size)
        nu = cache[key]
        metrics.update({"anchor_nll_candidate": nc, f"anchor_nll_{ref_name}": nu})
        if nu > 0:  # ratios only where defined, so that the metrics stay valid JSON
            metrics["anchor_nll_ratio"] = nc / nu
        if nc > nu * (1.0 + self.tolerance_nll):
            failed.append("anchor_nll")
            reasons.append(
                f"anchor-text NLL rose: {nc:.4f} > {ref_name} {nu:.4f} x (1 + {self.tolerance_nll})"
            )

        if embedder is not None:
            keys, rows, P = _on_topic_items(
                list(probe_prompts or []),
                heldout[-self.on_topic_records :] if self.on_topic_records else [],
                tokenizer,
                embedder,
            )
            if keys:
                with cand.use() as m:
                    ac = greedy_answers_ids(m, rows, tokenizer, self.max_new_tokens)
                todo = [i for i, k in enumerate(keys) if ("answer", k) not in cache]
                if todo:
                    with ref.use() as m:
                        got = greedy_answers_ids(
                            m, [rows[i] for i in todo], tokenizer, self.max_new_tokens
                        )
                    for i, a in zip(todo, got):
                        cache[("answer", keys[i])] = a
                au = [cache[("answer", k)] for k in keys]
                cc, cu = _cosines(P, ac, embedder), _cosines(P, au, embedder)
                oc, ou = float(cc.mean()), float(cu.mean())
                metrics.update(
                    {
                        "on_topic_candidate": oc,
                        f"on_topic_{ref_name}": ou,
                        "on_topic_prompts": float(len(keys)),
                    }
                )
                low = ratio_lower_bound(cc, cu, self.on_topic_confidence)
                if ou > 0:
                    metrics["on_topic_ratio"] = oc / ou
                    metrics["on_topic_ratio_lower"] = low
                samples = {"candidate": ac, ref_name: au}
                if oc < self.min_on_topic_ratio * ou or (ou > 0 and low < self.min_on_topic_ratio):
                    failed.append("on_topic")
                    reasons.append(
                        f"answers drift off the question: on-topic {oc:.4f} vs {ref_name} "
                        f"{ou:.4f}, ratio {oc / ou if ou > 0 else 0.0:.3f} (lower "
                        f"{self.on_topic_confidence:g} bound {low:.3f}) < {self.min_on_topic_ratio}"
                    )
        if self.max_kl_per_answer > 0 and heldout:
            from ..learner.drift import answer_kl

            rows = [list(r.prompt_ids) for r in heldout[-self.kl_prompts :] if len(r.prompt_ids)]
            kl = answer_kl(cand, ref, rows, tokenizer, self.max_new_tokens)
            metrics["kl_per_answer"] = kl
            if kl > self.max_kl_per_answer:
                failed.append("kl_budget")
                reasons.append(
                    f"drift budget spent: KL {kl:.3f} nats per answer > {self.max_kl_per_answer}"
                )
        return GateResult(
            passed=not reasons, metrics=metrics, reasons=reasons, samples=samples, failed=failed
        )


__all__ = [
    "ANCHOR_TEXTS",
    "GateResult",
    "ModelView",
    "PromotionGate",
    "anchor_nll",
    "greedy_answers",
    "greedy_answers_ids",
    "heldout_score",
    "heldout_scores",
    "paired_se",
    "on_topic_score",
    "ratio_lower_bound",
]
