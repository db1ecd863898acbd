"""SONA inside a vLLM worker: trajectory recording and the MicroLoRA, keyed by request id.

vLLM mixes :class:`SonaWorkerExtension` into its worker class (``worker_extension_cls``,
set for you by the ``sona`` launch config, see ``plugin.py``); the front end reaches its
``sona_*`` methods with ``collective_rpc``. ``sona_install`` wraps three methods of the
worker's model runner (through ``_compat``, which names the vLLM source each relies on), all
of which run *outside* vLLM's compiled / graph-captured region,
so they work in every compilation mode (a forward hook on the final norm does not fire
under the default CPU compile; ``shared/notes/vllm-integration.md`` §3):

* ``model.compute_logits(h)`` gets the final hidden states at the logits rows (row i is
  request ``input_batch.req_ids[i]``): it records each row's ``h`` (before the MicroLoRA),
  applies the MicroLoRA ``h + s·B(Ah)`` (C++ kernel on CPU float32, torch otherwise),
  and records the top-k log-probs of the adapted logits;
* ``sample_tokens`` pairs each recorded row with the token sampled for it (rows of a
  partial prefill sample nothing and are dropped);
* ``execute_model`` notes finished requests (``scheduler_output.finished_req_ids``) and
  marks the logits computed inside it as the sampled rows (prompt log-probs, computed
  later in ``sample_tokens``, get the MicroLoRA but are not recorded).

A request's recording survives batch-slot reuse and preemption (it is keyed by request
id, and a preempted request's recomputation only adds the rows it samples after it
resumes). Memory is bounded: at most ``max_recordings`` requests are held (the oldest,
finished first, are evicted and counted), each with the hidden state and top-k of its
first ``max_trajectory_steps`` tokens (about 3 kB per step at 576-d; later tokens are
kept as ids only, for the feedback record). ``n > 1`` child requests are recorded
separately (vLLM names them ``{index}_{id}``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sona_plugin import kernels

from . import _compat

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

logger = logging.getLogger(__name__)

ADAPTER_PREFIX = "sona-v"  # the default tenant's versions: sona-v000001
TENANT_PREFIX = "sona-t."  # a tenant's: sona-t.{tenant}.v000001 (no "." in tenant names)
TENANT_ARG = "sona_tenant"  # SamplingParams.extra_args key the server sets per request


def adapter_name(version: int, tenant: str = "") -> str:
    if tenant:
        return f"{TENANT_PREFIX}{tenant}.v{version:06d}"
    return f"{ADAPTER_PREFIX}{version:06d}"


def parse_adapter_name(name: str | None) -> tuple[str, int] | None:
    """(tenant, version) of a SONA adapter name, None for any other name."""
    if not name:
        return None
    if name.startswith(ADAPTER_PREFIX):
        tenant, digits = "", name[len(ADAPTER_PREFIX) :]
    elif name.startswith(TENANT_PREFIX):
        tenant, _, v = name[len(TENANT_PREFIX) :].rpartition(".")
        if not tenant or not v.startswith("v"):
            return None
        digits = v[1:]
    else:
        return None
    return (tenant, int(digits)) if digits.isdigit() else None


def adapter_version(lora_request: LoRARequest | None) -> int | None:
    """The SONA BaseLoRA version a request was served with (None: no SONA adapter)."""
    name = getattr(lora_request, "lora_name", None) if lora_request is not None else None
    parsed = parse_adapter_name(name)
    return parsed[1] if parsed else None


def external_id(internal_id: str) -> str:
    """vLLM's internal request id is ``{external}-{8 random chars}``."""
    head, sep, tail = internal_id.rpartition("-")
    return head if sep and len(tail) == 8 else internal_id


def _parse_engine_id(internal_id: str) -> tuple[str, int | None]:
    """(the id the request was submitted under, its ``n > 1`` child index or None)."""
    ext = external_id(internal_id)
    head, sep, tail = ext.partition("_")
    if sep and head.isdigit():
        return tail, int(head)
    return ext, None


@dataclass
class Recording:
    """What one request generated: per sampled token its hidden state and top-k."""

    internal_id: str
    prompt_ids: list[int]
    version: int | None
    tenant: str = ""
    hidden: list[np.ndarray] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    topk_ids: list[np.ndarray] = field(default_factory=list)
    topk_lp: list[np.ndarray] = field(default_factory=list)
    finished: bool = False
    judged: bool = False  # feedback taken: the steps are dropped, the ids kept for lookup
    discarded: bool = False  # best-of-k served a sibling: never shown, takes no feedback


class WorkerSona:
    """The SONA state of one worker: a SonaEngine (MicroLoRA + instant loop) and the
    recordings of recent requests."""

    def __init__(self, runner: Any, settings: dict, capacity: int = 1000):
        model = _compat.runner_model(runner)
        self.runner = runner
        self.head = _full_head_weight(model)
        self.settings = dict(settings)
        self.engines: dict[str, Any] = {}  # tenant -> SonaEngine ("" the default tenant)
        engine = self.add_tenant("")
        cfg = engine.config
        self.capacity = int(capacity)
        self.max_steps = cfg.max_trajectory_steps
        self.top_k = cfg.logit_top_k
        self.recordings: OrderedDict[str, Recording] = OrderedDict()
        self.pending: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.dropped = 0
        self.steps_dropped = 0
        self.recorded_tokens = 0
        self.lock = threading.Lock()
        self._in_step = False
        self._install(model)

    @property
    def engine(self) -> Any:
        """The default tenant's engine."""
        return self.engines[""]

    def add_tenant(self, tenant: str) -> Any:
        """The engine (MicroLoRA, instant loop) of ``tenant``, made on first use."""
        from sona_plugin.config import SonaConfig
        from sona_plugin.engine import SonaEngine

        engine = self.engines.get(tenant)
        if engine is None:
            cfg = SonaConfig.from_dict({**self.settings, "hidden_dim": int(self.head.shape[1])})
            engine = SonaEngine(cfg)
            engine.set_output_head(self.head)  # one head array, shared by every tenant
            self.engines[tenant] = engine
        return engine

    def tenant_engine(self, tenant: str) -> Any:
        engine = self.engines.get(tenant)
        if engine is None:
            raise RuntimeError(f"SONA tenant {tenant!r} is not installed in this worker")
        return engine

    # -- the wrapped runner methods ------------------------------------------------------
    def _install(self, model: torch.nn.Module) -> None:
        _compat.wrap_compute_logits(model, self._compute_logits)
        _compat.wrap_sample_tokens(self.runner, self._after_sample)
        _compat.wrap_execute_model(self.runner, self._step)

    @contextlib.contextmanager
    def _step(self, finished_ids: Iterable[str]):
        self._finished(finished_ids)
        self._in_step = True  # the logits rows computed now are the sampled ones
        try:
            yield
        finally:
            self._in_step = False

    def _compute_logits(
        self, orig: Callable[..., torch.Tensor | None], h: torch.Tensor, *args, **kwargs
    ):
        n = h.shape[0]
        # prompt log-probs and warm-up runs also call compute_logits: record only the rows
        # of a model step (one per request), which is what sample_tokens samples from
        ids = _compat.batch_req_ids(self.runner, n) if self._in_step else []
        record = len(ids) == n
        h_rec = h.detach().to(torch.float32).cpu().numpy().copy() if record else None
        if len(self.engines) == 1 or not record:
            # one tenant, or rows of no known request: the default tenant's MicroLoRA
            h = _apply_micro(self.engine, h)
        else:
            h = self._apply_per_tenant(h, ids)
        logits = orig(h, *args, **kwargs)
        if h_rec is not None and logits is not None:
            lp = torch.log_softmax(logits.detach().float(), dim=-1)
            top = torch.topk(lp, min(self.top_k, lp.shape[-1]), dim=-1)
            ti, tl = top.indices.cpu().numpy(), top.values.cpu().numpy()
            with self.lock:
                for i, rid in enumerate(ids):
                    self.pending[rid] = (h_rec[i], ti[i], tl[i])
        return logits

    def _apply_per_tenant(self, h: torch.Tensor, ids: list[str]) -> torch.Tensor:
        """Each row with its request's tenant's MicroLoRA (rows grouped per tenant)."""
        rows: dict[str, list[int]] = {}
        for i, rid in enumerate(ids):
            rows.setdefault(_compat.request_tenant(self.runner, rid, TENANT_ARG), []).append(i)
        if len(rows) == 1:
            (tenant,) = rows
            return _apply_micro(self.engines.get(tenant, self.engine), h)
        out = h.clone()
        for tenant, idx in rows.items():
            sel = torch.tensor(idx, device=h.device)
            out[sel] = _apply_micro(self.engines.get(tenant, self.engine), h[sel])
        return out

    def _after_sample(self, req_ids: list[str], sampled: list[list[int]]) -> None:
        with self.lock:
            for i, rid in enumerate(req_ids):
                row = self.pending.pop(rid, None)
                toks = sampled[i] if i < len(sampled) else None
                if row is None or not toks:
                    continue  # a partial prefill samples nothing
                rec = self.recordings.get(rid)
                if rec is None:
                    prompt_ids, lora = _compat.request_state(self.runner, rid)
                    tenant = _compat.request_tenant(self.runner, rid, TENANT_ARG)
                    rec = Recording(rid, prompt_ids, adapter_version(lora), tenant)
                    self.recordings[rid] = rec
                    self._evict()
                rec.tokens.append(int(toks[0]))
                self.recorded_tokens += 1
                if len(rec.hidden) < self.max_steps and not rec.judged:
                    rec.hidden.append(row[0])
                    rec.topk_ids.append(row[1])
                    rec.topk_lp.append(row[2])
                else:
                    self.steps_dropped += 1
            self.pending.clear()

    def _finished(self, ids: Iterable[str]) -> None:
        if not ids:
            return
        with self.lock:
            for rid in ids:
                rec = self.recordings.get(rid)
                if rec is not None:
                    rec.finished = True

    def _evict(self) -> None:
        while len(self.recordings) > self.capacity:
            victim = next((k for k, r in self.recordings.items() if r.finished), None)
            if victim is None:
                victim = next(iter(self.recordings))
            del self.recordings[victim]
            self.dropped += 1

    # -- feedback ------------------------------------------------------------------------
    def find(self, response_id: str, index: int, tenant: str | None = None) -> Recording | None:
        """:meth:`find_any`, only if the response was generated for ``tenant`` (None: any):
        one tenant never reaches another's recordings."""
        rec = self.find_any(response_id, index)
        if rec is not None and tenant is not None and rec.tenant != tenant:
            return None
        return rec

    def find_any(self, response_id: str, index: int) -> Recording | None:
        """The recording of choice ``index`` of the response the client knows as
        ``response_id``: the ``id`` of a chat completion (engine id ``{id}``, or
        ``{index}_{id}`` when ``n > 1``), of a completion (engine ids ``{id}-{prompt}``,
        ``{k}_{id}-{prompt}`` when ``n > 1``; choice ``index`` counts ``k`` within each
        prompt, prompts in order, as vLLM numbers the choices), or an offline request id."""
        completion: list[tuple[int, int, str]] = []
        with self.lock:
            for rid in self.recordings:
                base, child = _parse_engine_id(rid)
                if base == response_id and (child == index or (child is None and index == 0)):
                    return self.recordings[rid]
                head, sep, prompt = base.rpartition("-")
                if sep and head == response_id and prompt.isdigit():
                    completion.append((int(prompt), child or 0, rid))
            completion.sort()
            if index < len(completion):
                return self.recordings[completion[index][2]]
        return None

    def learn(self, rec: Recording, reward: float) -> dict | None:
        """The instant update from one judged response, at most once per recording.

        Its steps (hidden states, top-k) are released; the recording stays, ids only, so
        that the choice numbering of its siblings (``find``) does not shift."""
        from sona_plugin.types import Trajectory, TrajectoryStep

        with self.lock:
            if rec.judged:
                return None
            rec.judged = True
            hidden, topk_ids, topk_lp = rec.hidden, rec.topk_ids, rec.topk_lp
            rec.hidden, rec.topk_ids, rec.topk_lp = [], [], []
        if not hidden:
            return None
        steps = [
            TrajectoryStep(
                hidden[i],
                np.zeros(0, np.float32),
                reward,
                rec.tokens[i],
                0,
                topk_ids[i],
                topk_lp[i],
            )
            for i in range(len(hidden))
        ]
        t = Trajectory(
            id=0,
            query_embedding=np.zeros(0, np.float32),
            steps=steps,
            final_quality=(reward + 1.0) / 2.0,
        )
        engine = self.engines.get(rec.tenant)
        if engine is None:
            return None
        report = engine.learn_trajectory(t, (reward + 1.0) / 2.0)
        return report.to_dict() if report is not None else None

    def stats(self, tenant: str = "") -> dict:
        with self.lock:
            held = len(self.recordings)
        s = self.tenant_engine(tenant).stats()
        s.update(
            {
                "recordings_held": held,
                "recordings_dropped": self.dropped,
                "tokens_recorded": self.recorded_tokens,
                "steps_dropped": self.steps_dropped,
            }
        )
        return s


def _full_head_weight(model: torch.nn.Module) -> np.ndarray:
    """The LM head [vocab, hidden] as float32 NumPy; with tensor parallelism each rank
    holds a vocab shard, gathered here so every rank takes the same instant update."""
    return _compat.lm_head_weight(model).to(torch.float32).cpu().numpy()


class SonaWorkerExtension:
    """Mixed into vLLM's worker class; every method here is a ``collective_rpc`` target.

    Names start with ``sona_`` so they cannot clash with the worker's own attributes.
    """

    def sona_install(self, settings: dict, max_recordings: int = 1000, tenant: str = "") -> dict:
        """Install SONA in this worker (first call), or add ``tenant``'s MicroLoRA."""
        runner = _compat.model_runner(self)
        st = getattr(runner, "_sona", None)
        if st is None:
            st = WorkerSona(runner, settings, max_recordings)
            runner._sona = st
            logger.info(
                "SONA installed in the worker (hidden %d, MicroLoRA rank %d)",
                st.engine.config.hidden_dim,
                st.engine.config.micro_lora_rank,
            )
        if tenant:
            st.add_tenant(tenant)
        return {"hidden_dim": st.engine.config.hidden_dim}

    def _sona(self) -> WorkerSona:
        st = getattr(_compat.model_runner(self), "_sona", None)
        if st is None:
            raise RuntimeError("SONA is not installed in this worker (call sona_install first)")
        return st

    def sona_lookup(self, response_id: str, index: int = 0, tenant: str = "") -> dict | None:
        """Prompt/response tokens and adapter version of a response recorded for
        ``tenant``, or None."""
        rec = self._sona().find(response_id, index, tenant)
        if rec is None:
            return None
        return {
            "internal_id": rec.internal_id,
            "prompt_ids": rec.prompt_ids,
            "response_ids": list(rec.tokens),
            "adapter_version": rec.version,
            "finished": rec.finished,
            "discarded": rec.discarded,
        }

    def sona_candidates(
        self, response_id: str, indices: list[int], tenant: str = ""
    ) -> list[list[float] | None]:
        """Best-of-k: the features (``rerank.answer_features``) of choices ``indices``."""
        st = self._sona()
        return [_features(st.find(response_id, i, tenant)) for i in indices]

    def sona_discard(self, response_id: str, indices: list[int], tenant: str = "") -> None:
        """Best-of-k: choices ``indices`` were not served; they take no feedback (their
        steps are released, their ids kept so that sibling choices keep their numbers)."""
        st = self._sona()
        for i in indices:
            rec = st.find(response_id, i, tenant)
            if rec is not None:
                with st.lock:
                    rec.discarded = True
                    rec.hidden, rec.topk_ids, rec.topk_lp = [], [], []

    def sona_learn(
        self, response_id: str, index: int, reward: float, tenant: str = ""
    ) -> dict | None:
        """The instant update from one judged response of ``tenant`` (then its recording
        is dropped)."""
        st = self._sona()
        rec = st.find(response_id, index, tenant)
        if rec is None:
            return None
        instant = st.learn(rec, float(reward))
        m = st.tenant_engine(tenant).micro_lora  # ~9 kB at rank 2, 576-d: the front end mirrors it
        return {
            "instant": instant,
            "recordings_dropped": st.dropped,
            "A": m.A.tolist(),
            "B": m.B.tolist(),
        }

    def sona_take_hidden(self, response_id: str) -> dict | None:
        """The first recorded hidden state of a request (before the MicroLoRA) and the
        adapter version it ran with, then its recording is dropped: the swap canary."""
        st = self._sona()
        rec = st.find(response_id, 0)
        if rec is None:
            return None
        with st.lock:
            st.recordings.pop(rec.internal_id, None)
        if not rec.hidden:
            return None
        return {"hidden": rec.hidden[0].tolist(), "adapter_version": rec.version}

    def sona_decay(self, factor: float, tenant: str = "") -> None:
        """Shrink the MicroLoRA (after a BaseLoRA swap has taken over its lesson)."""
        self._sona().tenant_engine(tenant).micro_lora.shrink(float(factor))

    def sona_set_norm_cap(self, cap: float, tenant: str = "") -> None:
        """Bound the MicroLoRA's ``||s·B·A||_F`` from the next update on (the learner's
        drift checks set it)."""
        self._sona().tenant_engine(tenant).micro_lora.norm_cap = float(cap)

    def sona_set_micro(self, A: list, B: list, tenant: str = "") -> None:
        """Restore saved MicroLoRA weights (a restarted server keeps what it learned)."""
        m = self._sona().tenant_engine(tenant).micro_lora
        m.A[...] = np.asarray(A, np.float32)
        m.B[...] = np.asarray(B, np.float32)

    def sona_micro_state(self, tenant: str = "") -> dict:
        m = self._sona().tenant_engine(tenant).micro_lora
        return {
            "A": m.A.tolist(),
            "B": m.B.tolist(),
            "scale": float(m.scale),
            "norm_cap": float(m.norm_cap),
        }

    def sona_set_enabled(self, enabled: bool, tenant: str | None = None) -> None:
        """Switch the MicroLoRA on or off for ``tenant`` (None: every tenant)."""
        st = self._sona()
        engines = st.engines.values() if tenant is None else [st.tenant_engine(tenant)]
        for engine in engines:
            engine.set_enabled(bool(enabled))

    def sona_stats(self, tenant: str = "") -> dict:
        return self._sona().stats(tenant)


def _features(rec: Recording | None) -> list[float] | None:
    """A recording's answer features (its hidden states averaged), None without steps."""
    if rec is None or not rec.hidden:
        return None
    from sona_plugin.rerank import answer_features

    return answer_features(np.stack(rec.hidden)).tolist()


def _apply_micro(engine: Any, h: torch.Tensor) -> torch.Tensor:
    micro = engine.micro_lora
    if engine.is_enabled() and micro.B.any():
        return kernels.apply_micro_lora_torch(h, micro.A, micro.B, micro.scale)
    return h


__all__ = [
    "SonaWorkerExtension",
    "WorkerSona",
    "adapter_name",
    "adapter_version",
    "external_id",
    "parse_adapter_name",
]
