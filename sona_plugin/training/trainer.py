"""BaseLoRA training (loop B): a PEFT LoRA on the host model, REINFORCE + KL + EWC++.

Per step, on a batch of stored feedback records::

    loss = −mean_i a_i · mean_t log π(y_{i,t})                 (objective.reinforce_kl_loss)
           + β · mean_{response positions} KL(π ‖ π_ref)        (π_ref: adapter disabled)
           + λ Σ_tasks Σ_i F_i (θ_i − θ*_i)²                    (EwcPlusPlus.penalty)

with advantages ``a_i = clip(r_i − b, −1, 1)`` and ``b`` the running mean of all rewards
seen in earlier :meth:`BaseLoRATrainer.train` calls (0 before any), AdamW and global
gradient-norm clipping at 1.0. DESIGN.md measured this setting (β = 0.05, lr 5e-4, rank
8 on q/k/v/o) as the one that learns from binary feedback on SmolLM2-135M.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import SonaConfig
from ..errors import InvalidValue, StateError
from ..store.base import FeedbackRecord
from .objective import reference_logprobs, reinforce_kl_loss, response_logprobs

logger = logging.getLogger(__name__)

_FORMAT = "sona_plugin.training.trainer"
_VERSION = 1
_ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class TrainReport:
    """What one :meth:`BaseLoRATrainer.train` call did.

    Attributes:
        steps: optimiser steps taken (0 when skipped).
        losses: total loss (objective + EWC++ penalty) of every step.
        penalty: the EWC++ penalty at the last step (0 without remembered tasks).
        kl: the mean KL(π ‖ π_ref) per response token at the last step.
        seconds: wall time of the call.
        skipped: why nothing was trained, or None when it trained.
        records: records trained on; dropped: records ignored for lack of prompt or
            response tokens.
        baseline: the reward baseline b used for this call's advantages.
        first_epoch_loss: mean objective loss (without penalty) over the first epoch.
    """

    steps: int = 0
    losses: list[float] = field(default_factory=list)
    penalty: float = 0.0
    kl: float = 0.0
    seconds: float = 0.0
    skipped: str | None = None
    records: int = 0
    dropped: int = 0
    epochs: int = 0
    baseline: float = 0.0
    first_epoch_loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise InvalidValue(f"{name} must be an integer >= 1, got {v!r}")
    return int(v)


class BaseLoRATrainer:
    """Trains a PEFT LoRA on a private copy of the host model from stored feedback.

    Args:
        base_model: a transformers causal LM. It is wrapped in place (LoRA layers are
            injected), so it must be a copy that does not serve requests.
        config: uses ``base_lora_rank`` (r), ``lora_dropout`` and ``base_lora_lr``.
            ``lora_alpha`` of the PEFT adapter is ``2·r`` (scale α/r = 2), independent
            of ``config.lora_alpha``, which sets the MicroLoRA scale.
        target_modules: module names that get a LoRA (DESIGN.md: q/k/v/o).
        ewc: an EwcPlusPlus over the LoRA parameters (registered here by their PEFT
            names), or None for no consolidation.
        beta: KL weight β (DESIGN.md: 0.05; 0.2 learned much less).
        seed: seeds the LoRA initialisation and the batch order.
        max_length: rows longer than this lose prompt tokens from the left (None: no
            limit beyond the model's own).
        max_grad_norm: global L2 clip of each step's gradient.
        ref_cache_mb: memory (MiB) for caching π_ref's log-softmax across epochs, so that
            later epochs skip the reference forward pass; 0 disables the cache.
        fisher_samples: records per :meth:`train` call whose per-record gradients
            estimate the Fisher for EWC++ (one backward pass each).
        clip: PPO's clipped surrogate with ratio bound ``clip`` against the weights each
            :meth:`train` call starts from (None: plain REINFORCE). Measured in
            ``benchmarks/efficiency.py``; off by default.
        optimizer: ``"adamw"`` (default) or ``"sgd"`` (plain gradient steps: Adam moves
            every LoRA coordinate by about ``lr`` per step whatever its gradient, noise
            included; ``benchmarks/efficiency.py`` compares the two).

    Raises:
        InvalidValue: ``base_model`` already has PEFT adapters, or bad arguments.
    """

    def __init__(
        self,
        base_model: Any,
        config: SonaConfig,
        *,
        target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
        ewc: Any = None,
        beta: float = 0.05,
        seed: int = 0,
        max_length: int | None = None,
        max_grad_norm: float = 1.0,
        ref_cache_mb: float = 256.0,
        fisher_samples: int = 24,
        clip: float | None = None,
        optimizer: str = "adamw",
    ):
        from peft import LoraConfig, PeftModel, get_peft_model

        if isinstance(base_model, PeftModel) or hasattr(base_model, "peft_config"):
            raise InvalidValue(
                "base_model already carries PEFT adapters; pass the plain "
                "transformers model (a private copy) instead"
            )
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
            raise InvalidValue(f"beta must be a finite number >= 0, got {beta!r}")
        if not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise InvalidValue(f"max_grad_norm must be > 0, got {max_grad_norm!r}")
        if not target_modules:
            raise InvalidValue("target_modules must name at least one module")
        self.config = config
        self.beta = float(beta)
        self.seed = int(seed)
        self.max_length = max_length
        self.max_grad_norm = float(max_grad_norm)
        self.ref_cache_bytes = int(max(ref_cache_mb, 0) * 2**20)
        self.fisher_samples = _positive_int("fisher_samples", fisher_samples)
        if clip is not None and not (isinstance(clip, (int, float)) and 0 < clip < 1):
            raise InvalidValue(f"clip must be None or in (0, 1), got {clip!r}")
        self.clip = None if clip is None else float(clip)
        if optimizer not in ("adamw", "sgd"):
            raise InvalidValue(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        self.optimizer = optimizer
        self.target_modules = tuple(target_modules)
        r = int(config.base_lora_rank)
        self.lora_config = LoraConfig(
            r=r,
            lora_alpha=2 * r,
            lora_dropout=config.lora_dropout,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model = get_peft_model(base_model, self.lora_config)
        self.model.eval()
        self.ewc = ewc
        self._reward_mean = 0.0
        self._reward_count = 1  # one neutral prior reward
        self._calls = 0
        self._steps_total = 0
        if ewc is not None:
            ewc.register({n: p.detach().cpu().numpy() for n, p in self.named_lora_params().items()})

    # -------------------------------------------------------------------- params
    @property
    def peft_model(self) -> Any:
        """The PeftModel being trained (the same object as ``self.model``)."""
        return self.model

    def named_lora_params(self) -> dict[str, torch.Tensor]:
        """The trainable LoRA tensors by their PEFT parameter names (live, with grad)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad and "lora_" in n}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def reward_baseline(self) -> float:
        """The running mean of rewards that the next call's advantages subtract."""
        return self._reward_mean

    # -------------------------------------------------------------------- training
    def advantages(self, rewards: Sequence[float]) -> torch.Tensor:
        """``clip(r − b, −1, 1)`` with the current baseline ``b`` (nothing is updated)."""
        r = torch.as_tensor(list(rewards), dtype=torch.float32)
        return (r - self._reward_mean).clamp(-1.0, 1.0)

    def _fold_rewards(self, rewards: Sequence[float]) -> None:
        # A count-based mean whose count saturates at trajectory_capacity: an exact mean
        # early on, an exponential average (horizon = capacity) once the history is long,
        # so the baseline can follow a policy that improves.
        cap = max(int(self.config.trajectory_capacity), 1)
        for r in rewards:
            self._reward_count = min(self._reward_count + 1, cap)
            self._reward_mean += (float(r) - self._reward_mean) / self._reward_count

    def train(
        self,
        records: Sequence[FeedbackRecord],
        epochs: int = 2,
        batch_size: int = 8,
        lr: float | None = None,
        baselines: Sequence[float] | None = None,
    ) -> TrainReport:
        """Train the LoRA on ``records`` for ``epochs`` passes; see the module docstring.

        ``baselines`` (one per record) replaces the running mean in the advantages
        ``clip(r − b_i, ±1)`` (for example the mean reward of similar prompts; the running
        mean is still folded in).

        The call's rewards are first folded into the running mean (which starts from one
        neutral prior reward of 0); every record's advantage is ``clip(r − mean, ±1)``
        with that mean, the same in every epoch. A fresh AdamW (``lr`` or
        ``config.base_lora_lr``, default weight decay) is built per call: the trainer's
        behaviour is then fully determined by the adapter weights and :meth:`state_dict`,
        which is what survives a restart.

        The EWC++ penalty (with an EWC++ instance holding tasks) is part of every step;
        the Fisher is *not* updated here: the caller folds it in with
        :meth:`update_fisher` once it knows which weights serve (a candidate the gate
        refuses must not become what EWC++ remembers).

        Returns:
            A TrainReport; ``skipped`` says why when nothing was trained (no records, or
            no record with both prompt and response tokens).

        Raises:
            InvalidValue: bad epochs/batch_size/lr, or a non-finite reward.
        """
        t0 = time.perf_counter()
        epochs = _positive_int("epochs", epochs)
        batch_size = _positive_int("batch_size", batch_size)
        lr = float(self.config.base_lora_lr if lr is None else lr)
        if not (math.isfinite(lr) and lr > 0):
            raise InvalidValue(f"lr must be a finite number > 0, got {lr!r}")
        usable = [r for r in records if len(r.response_ids) > 0 and len(r.prompt_ids) > 0]
        report = TrainReport(
            dropped=len(records) - len(usable),
            epochs=epochs,
            baseline=self._reward_mean,
            records=len(usable),
        )
        if not usable:
            report.skipped = (
                "no records"
                if not records
                else f"none of the {len(records)} records has both prompt and response tokens"
            )
            report.seconds = time.perf_counter() - t0
            logger.info("BaseLoRA training skipped: %s", report.skipped)
            return report
        rewards = [float(r.reward) for r in usable]
        if not all(math.isfinite(x) for x in rewards):
            raise InvalidValue("a record has a non-finite reward")
        # the baseline includes this call's rewards (and one neutral prior reward): with
        # mostly-disliked feedback, a baseline of 0 made every dislike a full -1 and the
        # first cycle's candidate collapsed off the question (measured on SmolLM2)
        self._fold_rewards(rewards)
        report.baseline = self._reward_mean
        if baselines is None:
            adv = self.advantages(rewards)
        else:
            baselines = [float(x) for x in baselines]
            b = [
                x
                for x, r in zip(baselines, records)
                if len(r.response_ids) > 0 and len(r.prompt_ids) > 0
            ]
            if len(baselines) != len(records) or not all(math.isfinite(x) for x in b):
                raise InvalidValue(
                    f"baselines must be {len(records)} finite numbers, one per record"
                )
            adv = (torch.tensor(rewards) - torch.tensor(b)).clamp(-1.0, 1.0)

        params = self.named_lora_params()
        plist = list(params.values())
        opt = (
            torch.optim.AdamW(plist, lr=lr)
            if self.optimizer == "adamw"
            else torch.optim.SGD(plist, lr=lr)
        )
        ref_cache: dict[int, torch.Tensor] = {}
        cache_bytes = 0
        first_epoch: list[float] = []
        order_rng = np.random.default_rng([self.seed, self._calls])
        dev = self.device
        old: list[torch.Tensor] = []
        if self.clip is not None:  # log π_old(y_t) at the weights this call starts from
            with torch.no_grad():
                for s in range(0, len(usable), batch_size):
                    old.extend(
                        response_logprobs(
                            self.model, usable[s : s + batch_size], dev, max_length=self.max_length
                        )
                    )
        # Only the LoRA dropout trains: base-model dropout would make π and π_ref noisy.
        for name, m in self.model.named_modules():
            if name.endswith("lora_dropout"):
                m.train()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 1_000_003 + self._calls)
                for epoch in range(epochs):
                    order = order_rng.permutation(len(usable))
                    for s in range(0, len(order), batch_size):
                        idx = [int(i) for i in order[s : s + batch_size]]
                        batch = [usable[i] for i in idx]
                        ref = None
                        if self.beta > 0 and epochs > 1 and self.ref_cache_bytes > 0:
                            if all(i in ref_cache for i in idx):
                                ref = torch.cat([ref_cache[i] for i in idx])
                            else:
                                ref = reference_logprobs(self.model, batch, dev, self.max_length)
                                lens = [
                                    min(len(r.response_ids), self.max_length - 1)
                                    if self.max_length
                                    else len(r.response_ids)
                                    for r in batch
                                ]
                                for i, part in zip(idx, torch.split(ref, lens)):
                                    nbytes = part.numel() * part.element_size()
                                    if (
                                        i not in ref_cache
                                        and cache_bytes + nbytes <= self.ref_cache_bytes
                                    ):
                                        ref_cache[i] = part
                                        cache_bytes += nbytes
                        opt.zero_grad(set_to_none=True)
                        loss, stats = reinforce_kl_loss(
                            self.model,
                            batch,
                            adv[idx],
                            self.beta,
                            device=dev,
                            max_length=self.max_length,
                            ref_logprobs=ref,
                            old_logprobs=torch.cat([old[i] for i in idx]) if old else None,
                            clip=self.clip,
                        )
                        loss.backward()
                        pen_value = 0.0
                        if self.ewc is not None and self.ewc.task_count > 0:
                            pen = self.ewc.penalty(params)
                            pen.backward()
                            pen_value = float(pen.detach())
                        torch.nn.utils.clip_grad_norm_(plist, self.max_grad_norm)
                        opt.step()
                        report.steps += 1
                        report.losses.append(float(loss.detach()) + pen_value)
                        report.penalty = pen_value
                        report.kl = stats["kl"]
                        if epoch == 0:
                            first_epoch.append(float(loss.detach()))
        finally:
            self.model.eval()
            opt.zero_grad(set_to_none=True)
        report.first_epoch_loss = float(np.mean(first_epoch))
        self._calls += 1
        self._steps_total += report.steps
        report.seconds = time.perf_counter() - t0
        logger.info(
            "BaseLoRA trained %d records x %d epochs: %d steps, last loss %.4f, KL %.4f, %.1f s",
            len(usable),
            epochs,
            report.steps,
            report.losses[-1],
            report.kl,
            report.seconds,
        )
        return report

    def update_fisher(self, records: Sequence[FeedbackRecord]) -> float | None:
        """Fold the Fisher of the current weights on ``records`` into EWC++
        (``F ← γF + (1−γ)·F_call``, :meth:`fisher_diagonal` on ``fisher_samples`` of them).

        Returns:
            The mean of this call's per-token Fisher (None without EWC++ or records).
        """
        usable = [r for r in records if len(r.response_ids) > 0 and len(r.prompt_ids) > 0]
        if self.ewc is None or not usable:
            return None
        fisher = self.fisher_diagonal(usable, self.fisher_samples)
        self.ewc.update_fisher({n: f.sqrt().cpu().numpy() for n, f in fisher.items()})
        return float(
            sum(f.sum() for f in fisher.values()) / sum(f.numel() for f in fisher.values())
        )

    def fisher_diagonal(
        self, records: Sequence[FeedbackRecord], samples: int
    ) -> dict[str, torch.Tensor]:
        """The diagonal Fisher of the LoRA's answer distribution, per answer token.

        ``F_i = mean_r (∂ Σ_t log π(y_{r,t}) / ∂θ_i)² / T_r`` over up to ``samples``
        records ``r`` (chosen at random, one backward pass each, dropout off). The answers
        were sampled from the served model, so this estimates the model's own Fisher; the
        score's cross-token terms vanish in expectation, which makes ``F/T`` the Fisher of
        one answer token and ``½ Σ_i F_i Δθ_i² ≈ KL`` per answer token. The EWC++
        penalty ``λ Σ F Δθ²`` is then about ``2λ ×`` the per-token KL that a change
        ``Δθ`` causes on earlier tasks' answers, a scale that does not depend on the batch
        size or on the rewards (the squared gradients of the advantage-weighted batch loss,
        used before, were near zero on balanced feedback: an inert penalty).
        """
        usable = [r for r in records if len(r.response_ids) > 0 and len(r.prompt_ids) > 0]
        params = self.named_lora_params()
        out = {n: torch.zeros_like(p) for n, p in params.items()}
        if not usable or samples < 1:
            return out
        rng = np.random.default_rng([self.seed, self._calls, 7])
        pick = rng.choice(len(usable), size=min(samples, len(usable)), replace=False)
        was_training = self.model.training
        self.model.eval()
        try:
            for i in pick:
                rec = usable[int(i)]
                self.model.zero_grad(set_to_none=True)
                (lp,) = response_logprobs(
                    self.model, [rec], self.device, max_length=self.max_length
                )
                lp.sum().backward()
                for n, p in params.items():
                    if p.grad is not None:
                        out[n] += p.grad.detach() ** 2 / lp.numel()
        finally:
            self.model.zero_grad(set_to_none=True)
            self.model.train(was_training)
        for f in out.values():
            f /= len(pick)
        return out

    # ------------------------------------------------------------------ adapters
    def save_adapter(self, path: str | Path) -> Path:
        """Write the adapter in PEFT format (``adapter_config.json`` + safetensors).

        ``save_embedding_layers=False``: with tied embeddings PEFT would otherwise also
        write the whole embedding matrix, although the LoRA does not touch it.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(path), save_embedding_layers=False)
        return path

    def load_adapter_weights(self, path: str | Path) -> None:
        """Load LoRA weights saved by :meth:`save_adapter` (a directory or the file).

        All or nothing: every LoRA tensor of this trainer must be in the file with its
        shape, and the file must hold nothing else.

        Raises:
            StateError: missing file, missing/extra tensors or mismatched shapes.
        """
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(path)
        file = path / _ADAPTER_FILE if path.is_dir() else path
        if not file.exists():
            raise StateError(f"no adapter weights at {file}")
        try:
            sd = load_file(str(file), device=str(self.device))
        except Exception as e:  # safetensors raises its own error types
            raise StateError(f"cannot read adapter weights {file}: {e}") from e
        expected = get_peft_model_state_dict(self.model)
        missing = sorted(set(expected) - set(sd))
        extra = sorted(set(sd) - set(expected))
        if missing or extra:
            raise StateError(
                f"adapter {file} does not match this trainer's LoRA: missing "
                f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                f"{extra[:3]}{'...' if len(extra) > 3 else ''}"
            )
        for k, v in expected.items():
            if tuple(sd[k].shape) != tuple(v.shape):
                raise StateError(
                    f"adapter tensor {k!r} has shape {tuple(sd[k].shape)}, "
                    f"expected {tuple(v.shape)}"
                )
        set_peft_model_state_dict(self.model, sd)
        got = get_peft_model_state_dict(self.model)
        if any(not torch.equal(got[k], sd[k].to(got[k].dtype)) for k in sd):
            raise StateError(f"adapter {file} was not applied completely")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The trainer's small state (JSON-serialisable); the weights live in the adapter."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "reward_mean": self._reward_mean,
            "reward_count": self._reward_count,
            "calls": self._calls,
            "steps_total": self._steps_total,
            "beta": self.beta,
            "seed": self.seed,
            "rank": int(self.lora_config.r),
            "target_modules": list(self.target_modules),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (all or nothing).

        Raises:
            StateError: wrong format, or a rank/target_modules other than this trainer's.
        """
        try:
            if state.get("format") != _FORMAT or state.get("version") != _VERSION:
                raise StateError(
                    f"not a {_FORMAT} v{_VERSION} state: format "
                    f"{state.get('format')!r} version {state.get('version')!r}"
                )
            if int(state["rank"]) != int(self.lora_config.r) or list(
                state["target_modules"]
            ) != list(self.target_modules):
                raise StateError(
                    f"trainer state is for rank {state['rank']} on "
                    f"{state['target_modules']}, this trainer has rank "
                    f"{self.lora_config.r} on {list(self.target_modules)}"
                )
            mean = float(state["reward_mean"])
            count = int(state["reward_count"])
            calls = int(state["calls"])
            steps = int(state["steps_total"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StateError(f"corrupt trainer state: {type(e).__name__}: {e}") from e
        if not math.isfinite(mean) or count < 0:
            raise StateError(f"corrupt trainer state: reward_mean {mean}, reward_count {count}")
        self._reward_mean, self._reward_count = mean, count
        self._calls, self._steps_total = calls, steps


__all__ = ["BaseLoRATrainer", "TrainReport"]
