"""The BaseLoRA objective: REINFORCE with a baseline plus a full-vocabulary KL to the base.

For a stored response ``y`` to prompt ``x`` with advantage ``a`` the policy-gradient term
is ``-a · (1/|y|) Σ_t log π(y_t | x, y_<t)`` (Williams 1992), averaged over the batch; the
per-token mean keeps long answers from dominating. The KL term is
``β · mean over response positions of KL(π(·|ctx) ‖ π_ref(·|ctx))`` over the whole
vocabulary, with ``π_ref`` the same PEFT model with its adapter disabled. DESIGN.md
measured this objective (advantage = reward − running mean, clipped to ±1, β = 0.05,
AdamW lr 5e-4) as the one that learns from binary feedback on SmolLM2-135M.

Batches are right-padded: row ``i`` is ``prompt_ids + response_ids`` followed by padding
with attention mask 0, so positions (and RoPE phases) match the unpadded sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidValue
from ..store.base import FeedbackRecord


@dataclass
class ResponseBatch:
    """Right-padded ``prompt + response`` token rows and where the response tokens sit.

    Attributes:
        input_ids: [B, L] long, padded with ``pad_id``.
        attention_mask: [B, L] long, 1 on real tokens.
        target_mask: [B, L-1] bool: position ``j`` of the shifted logits predicts a
            response token (``input_ids[:, j+1]`` belongs to the response).
        targets: [B, L-1] long, ``input_ids[:, 1:]``.
        lengths: response lengths per row (tokens scored), after any truncation.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor

    @property
    def row_of_position(self) -> torch.Tensor:
        """Row index of every selected (response) position, in ``target_mask`` order."""
        rows = torch.arange(self.target_mask.shape[0], device=self.target_mask.device)
        return rows[:, None].expand_as(self.target_mask)[self.target_mask]


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def make_batch(
    records: Sequence[FeedbackRecord],
    device: Any = None,
    pad_id: int = 0,
    max_length: int | None = None,
) -> ResponseBatch:
    """Build the right-padded batch that scores each record's response tokens.

    Args:
        records: records with non-empty ``response_ids``.
        device: where the tensors go (default CPU).
        pad_id: the id written into padding (masked, so any valid id works).
        max_length: if set, rows longer than this lose tokens from the start of the
            prompt (the response is kept whole; a response alone longer than
            ``max_length - 1`` is cut at its end).

    Raises:
        InvalidValue: no records, or a record without response tokens.
    """
    if not records:
        raise InvalidValue("records must not be empty")
    rows, starts = [], []
    for r in records:
        p, y = list(r.prompt_ids), list(r.response_ids)
        if not y:
            raise InvalidValue(f"record {r.response_id!r} has no response tokens to score")
        if not p:
            raise InvalidValue(
                f"record {r.response_id!r} has no prompt tokens: the first "
                "response token has no context to be predicted from"
            )
        if max_length is not None and len(p) + len(y) > max_length:
            if max_length < 2:
                raise InvalidValue(f"max_length must be >= 2, got {max_length}")
            y = y[: max_length - 1]
            p = p[len(p) - (max_length - len(y)) :]
        rows.append(p + y)
        starts.append(len(p))
    L = max(len(t) for t in rows)
    ids = torch.full((len(rows), L), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    tmask = torch.zeros((len(rows), L - 1), dtype=torch.bool)
    for i, (t, s) in enumerate(zip(rows, starts)):
        ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        mask[i, : len(t)] = 1
        tmask[i, s - 1 : len(t) - 1] = True  # logit j predicts token j+1
    lengths = tmask.sum(dim=1)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return ResponseBatch(
        ids.to(dev), mask.to(dev), tmask.to(dev), ids[:, 1:].to(dev), lengths.to(dev)
    )


def _response_logits(model: Any, batch: ResponseBatch) -> torch.Tensor:
    """Logits [N, V] at the N response positions of the batch (in ``target_mask`` order).

    Only the columns from the first response position on go through the LM head
    (``logits_to_keep``): with a 49k vocabulary the head over prompt positions would
    cost as much as a quarter of the forward and backward pass for nothing.
    """
    L = batch.input_ids.shape[1]
    cols = batch.target_mask.any(dim=0).nonzero()
    lo = int(cols[0]) if cols.numel() else 0
    try:
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            use_cache=False,
            logits_to_keep=L - lo,
        )
    except TypeError:  # a model without logits_to_keep
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits = out.logits
    if logits.shape[1] != L:
        if logits.shape[1] != L - lo:
            raise InvalidValue(
                f"model returned logits for {logits.shape[1]} positions, "
                f"expected {L - lo} (logits_to_keep) or {L}"
            )
        return logits[:, :-1][batch.target_mask[:, lo:]].float()
    return logits[:, :-1][batch.target_mask].float()


def _per_record_mean(values: torch.Tensor, batch: ResponseBatch) -> torch.Tensor:
    """Mean over each row's response positions of per-position ``values`` [N] -> [B]."""
    rows = batch.row_of_position
    sums = torch.zeros(batch.lengths.shape[0], dtype=values.dtype, device=values.device)
    sums = sums.index_add(0, rows, values)
    return sums / batch.lengths.to(values.dtype)


def response_logprobs(
    model: Any,
    records: Sequence[FeedbackRecord],
    device: Any = None,
    *,
    pad_id: int = 0,
    max_length: int | None = None,
    with_logits: bool = False,
) -> Any:
    """Log-probabilities of each record's response tokens under ``model``.

    Gradients flow unless the caller wraps the call in ``torch.no_grad()``.

    Args:
        model: a causal LM returning ``.logits`` (a transformers model or PeftModel).
        records: the (prompt_ids, response_ids) to score.
        device: where to build the batch (default: the model's device).
        with_logits: also return the response-position logits.

    Returns:
        ``token_logps``: a list, per record, of the [T_i] log π(y_t) tensors. With
        ``with_logits``: ``(token_logps, logits [N, V], batch)``, the logits of all
        response positions concatenated in record order.
    """
    dev = _model_device(model) if device is None else torch.device(device)
    batch = make_batch(records, dev, pad_id, max_length)
    logits = _response_logits(model, batch)
    tok = logits.log_softmax(-1).gather(-1, batch.targets[batch.target_mask][:, None])[:, 0]
    per_record = list(torch.split(tok, batch.lengths.tolist()))
    if with_logits:
        return per_record, logits, batch
    return per_record


def mean_response_logprob(
    model: Any,
    records: Sequence[FeedbackRecord],
    batch_size: int = 8,
    device: Any = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """Per-record mean log π(y_t) over response tokens, no gradient: a [n] float tensor."""
    out = []
    with torch.no_grad():
        for s in range(0, len(records), batch_size):
            lps = response_logprobs(
                model, records[s : s + batch_size], device, max_length=max_length
            )
            out.extend(lp.mean() for lp in lps)
    if not out:
        return torch.zeros(0)
    return torch.stack(out)


def _adapter_disabled(model: Any):
    """``model.disable_adapter()`` for a PeftModel; a no-op context for a plain model."""
    fn = getattr(model, "disable_adapter", None)
    return fn() if callable(fn) else nullcontext()


def reinforce_kl_loss(
    model: Any,
    records: Sequence[FeedbackRecord],
    advantages: torch.Tensor,
    beta: float,
    *,
    device: Any = None,
    max_length: int | None = None,
    ref_logprobs: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE with a baseline plus β·KL(π ‖ π_ref) on a batch of stored responses.

    ``loss = −(1/B) Σ_i a_i · (1/T_i) Σ_t log π(y_{i,t})
             + β · (1/N) Σ_{response positions} Σ_v π(v) [log π(v) − log π_ref(v)]``

    with ``N = Σ_i T_i``. The advantages are taken as given (the trainer computes
    reward − running mean, clipped to ±1). ``π_ref`` is ``model`` with its adapter
    disabled (``PeftModel.disable_adapter()``), evaluated without gradient; for a model
    without adapters π_ref = π and the KL is 0.

    Args:
        model: the PeftModel being trained.
        records: B records with prompt and response tokens.
        advantages: [B] advantages (any float dtype; moved to the model's device).
        beta: KL weight β ≥ 0; with β = 0 the reference pass is skipped.
        ref_logprobs: optional precomputed reference log-softmax [N, V] for exactly these
            records in this order (saves the reference forward pass).
        old_logprobs: with ``clip``, log π_old(y_t) [N] of the response tokens under the
            weights the cycle started from (in record order).
        clip: PPO's clipped surrogate (Schulman et al. 2017) per token: the
            policy-gradient term becomes ``−min(ρ·a, clip(ρ, 1−ε, 1+ε)·a)`` with
            ``ρ = π(y_t)/π_old(y_t)``: a token whose
            probability already moved by ``ε`` in the advantage's direction stops pulling.
            At ``ρ = 1`` the gradient equals REINFORCE's.

    Returns:
        ``(loss, stats)``: the differentiable scalar loss and floats ``pg_loss``, ``kl``,
        ``mean_logp`` (token-weighted), ``tokens``.

    Raises:
        InvalidValue: advantages of the wrong length, or non-finite, or β < 0.
    """
    if not beta >= 0:
        raise InvalidValue(f"beta must be >= 0, got {beta!r}")
    dev = _model_device(model) if device is None else torch.device(device)
    adv = torch.as_tensor(advantages, dtype=torch.float32, device=dev).reshape(-1)
    if adv.shape[0] != len(records):
        raise InvalidValue(
            f"advantages must have one value per record ({len(records)}), got {adv.shape[0]}"
        )
    if not torch.isfinite(adv).all():
        raise InvalidValue("advantages contain a non-finite value")
    batch = make_batch(records, dev, 0, max_length)
    logits = _response_logits(model, batch)
    logp = logits.log_softmax(-1)
    tok = logp.gather(-1, batch.targets[batch.target_mask][:, None])[:, 0]
    if clip is None:
        per_rec = _per_record_mean(tok, batch)
        pg = -(adv * per_rec).mean()
    else:
        if old_logprobs is None or old_logprobs.shape != tok.shape:
            raise InvalidValue(
                f"clip needs old_logprobs of shape {tuple(tok.shape)}, got "
                f"{None if old_logprobs is None else tuple(old_logprobs.shape)}"
            )
        a_tok = adv[batch.row_of_position]
        ratio = (tok - old_logprobs.to(tok.device)).exp()
        surrogate = torch.minimum(ratio * a_tok, ratio.clamp(1.0 - clip, 1.0 + clip) * a_tok)
        pg = -_per_record_mean(surrogate, batch).mean()
    kl = torch.zeros((), dtype=logp.dtype, device=dev)
    if beta > 0:
        if ref_logprobs is None:
            with torch.no_grad(), _adapter_disabled(model):
                ref_logprobs = _response_logits(model, batch).log_softmax(-1)
        elif ref_logprobs.shape != logp.shape:
            raise InvalidValue(
                f"ref_logprobs has shape {tuple(ref_logprobs.shape)}, expected {tuple(logp.shape)}"
            )
        kl = (logp.exp() * (logp - ref_logprobs)).sum(-1).mean()
    loss = pg + beta * kl
    stats = {
        "pg_loss": float(pg.detach()),
        "kl": float(kl.detach()),
        "mean_logp": float(tok.detach().mean()),
        "tokens": int(tok.shape[0]),
    }
    return loss, stats


def reference_logprobs(
    model: Any, records: Sequence[FeedbackRecord], device: Any = None, max_length: int | None = None
) -> torch.Tensor:
    """Log-softmax [N, V] of π_ref (adapter disabled) at the records' response positions."""
    dev = _model_device(model) if device is None else torch.device(device)
    batch = make_batch(records, dev, 0, max_length)
    with torch.no_grad(), _adapter_disabled(model):
        return _response_logits(model, batch).log_softmax(-1)


__all__ = [
    "ResponseBatch",
    "make_batch",
    "mean_response_logprob",
    "reference_logprobs",
    "reinforce_kl_loss",
    "response_logprobs",
]
