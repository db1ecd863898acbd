"""SONA for Hugging Face transformers: a text-generation pipeline that learns from feedback.

``sona_plugin.pipeline(...)`` returns a :class:`SonaPipeline`. While it generates, two
hooks on the model's output layer (``lm_head``) do SONA's work in-process:

* a forward pre-hook applies the MicroLoRA to the final hidden state (the input of
  ``lm_head``, after the final norm) through the C++ kernel on the CPU tensor, without a
  copy; so ``pipe.model(input_ids).logits`` are the adapted logits;
* inside a generation it records, per generated token, that hidden state and the
  head's top-k log-probs; the chosen tokens come from the generated sequences.

``pipe.feedback(response_id, reward)`` stores the (prompt, response, reward, embedding)
record durably and applies the instant update at once; ``pipe.learn()`` trains the
PEFT BaseLoRA on the stored feedback (loop B), gates it, publishes it as an immutable
version and hot-swaps it in; each response says which adapter version answered it.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers.pipelines.text_generation import TextGenerationPipeline

from sona_plugin import kernels
from sona_plugin.config import SonaConfig
from sona_plugin.engine import SonaEngine
from sona_plugin.errors import ConfigError, DuplicateFeedback, UnknownResponse
from sona_plugin.faults import failpoint
from sona_plugin.rerank import answer_features, recorded_hidden
from sona_plugin.types import Trajectory, TrajectoryStep

from ._host import LM_DEFAULTS, FeedbackResult, LearningHost, load_engine, parse_reward

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

    from sona_plugin.store import TrajectoryStore

logger = logging.getLogger(__name__)


class _RWLock:
    """Many generations at once, or one adapter swap: a swap waits for running
    generations to finish and holds new ones back, so every response is generated
    entirely by one adapter version."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class _Recorder:
    """Per-generation capture: one entry per forward pass of the model."""

    hidden: list[np.ndarray] = field(default_factory=list)  # [rows, d] last position
    topk_ids: list[np.ndarray] = field(default_factory=list)  # [rows, k]
    topk_lp: list[np.ndarray] = field(default_factory=list)  # [rows, k]


@dataclass
class Response:
    """What the pipeline remembers about one generated sequence until its feedback."""

    response_id: str
    prompt: str
    embed_text: str
    prompt_ids: list[int]
    response_ids: list[int]
    response_text: str
    hidden: np.ndarray  # [T, d] final hidden states h_t (before the MicroLoRA)
    topk_ids: np.ndarray  # [T, k]
    topk_logprobs: np.ndarray  # [T, k]
    adapter_version: int | None
    created_at: float = field(default_factory=time.time)


class SonaTextGenerationPipeline(TextGenerationPipeline):
    """transformers' text-generation pipeline that adds a ``response_id`` to every sequence."""

    sona: SonaPipeline

    def _forward(self, model_inputs: dict[str, Any], **generate_kwargs):
        _fold_into_generation_config(generate_kwargs, self.generation_config)
        prompt_text = model_inputs.get("prompt_text")
        with self.sona._generation() as (rec, version):
            out = super()._forward(model_inputs, **generate_kwargs)
        handles = self.sona._register(
            out["generated_sequence"], out["input_ids"], prompt_text, rec, version
        )
        out["sona_response_handle"] = handles
        return out

    def postprocess(self, model_outputs: dict[str, Any], *args, **kwargs) -> list[dict[str, Any]]:
        # taken out before transformers sees it: how extra outputs reach the records
        # differs between transformers versions
        handles = model_outputs.pop("sona_response_handle", None)
        if not args:  # transformers 5 warns on every call that this clean-up corrupts BPE
            kwargs.setdefault("clean_up_tokenization_spaces", False)
        records = super().postprocess(model_outputs, *args, **kwargs)
        if handles is not None:
            row = handles[0] if handles.dim() > 1 else handles  # one prompt: [n]
            for r, h in zip(records, row.tolist()):
                r["response_id"] = self.sona._handle_to_id.pop(int(h))
        return records


class SonaPipeline(LearningHost):
    """A text-generation pipeline that learns from feedback (see the module docstring).

    Use :func:`sona_plugin.pipeline` to build one. Attributes: ``engine`` (the
    SonaEngine holding the MicroLoRA and the pattern bank), ``store``, ``registry``.
    """

    def __init__(
        self,
        hf_pipeline: SonaTextGenerationPipeline,
        engine: SonaEngine,
        *,
        state_dir: Path,
        store: TrajectoryStore,
        model_source: Any,
        max_responses: int = 1000,
        save_every: int = 25,
        registry_dir: Path | None = None,
    ):
        self._pipe = hf_pipeline
        hf_pipeline.sona = self
        self.engine = engine
        self.state_dir = state_dir
        self.store = store
        self.model_source = Path(model_source) if model_source else None  # for training
        self.lora_targets = None
        self._responses: OrderedDict[str, Response] = OrderedDict()
        self._max_responses = max_responses
        self._handle_to_id: dict[int, str] = {}
        self._next_handle = 0
        self._local = threading.local()
        self._swap = _RWLock()
        self._meta_lock = threading.Lock()
        self._peft = None  # PeftModel once a BaseLoRA version is served
        self._served_version: int | None = None
        self._served_name: str | None = None
        self._embedder = None
        self._coordinator = None  # start_background()
        self.save_every = save_every
        self.responses_evicted = 0
        model = hf_pipeline.model
        self._lm_head = model.get_output_embeddings()
        self._hooks = [
            self._lm_head.register_forward_pre_hook(self._pre_hook),
            self._lm_head.register_forward_hook(self._post_hook),
        ]
        from sona_plugin.adapters import AdapterRegistry

        self.registry = AdapterRegistry(registry_dir or state_dir / "adapters")
        self._serve_at_start()
        self._start_ranker(self.answer_hidden)
        self._start_learner()
        self._start_replica()
        # interpreter exit (end of script, Ctrl-C) saves the MicroLoRA even without close();
        # a SIGTERM that the application does not handle skips this: save_every and
        # save_interval_s bound what it loses
        atexit.register(_save_at_exit, weakref.ref(self))

    # -- hooks ----------------------------------------------------------------------------
    def _pre_hook(self, module: torch.nn.Module, args: tuple[Any, ...]):
        (h,) = args[:1]
        micro = self.engine.micro_lora
        rec: _Recorder | None = getattr(self._local, "rec", None)
        if rec is not None:
            rec.hidden.append(h[:, -1, :].detach().to(torch.float32).cpu().numpy().copy())
        if not self.engine.is_enabled():
            return None
        return (kernels.apply_micro_lora_torch(h, micro.A, micro.B, micro.scale), *args[1:])

    def _post_hook(self, module: torch.nn.Module, args: tuple[Any, ...], logits: torch.Tensor):
        rec: _Recorder | None = getattr(self._local, "rec", None)
        if rec is not None:
            last = logits[:, -1, :].detach().float()
            lp = torch.log_softmax(last, dim=-1)
            top = torch.topk(lp, min(self.engine.config.logit_top_k, lp.shape[-1]), dim=-1)
            rec.topk_ids.append(top.indices.cpu().numpy())
            rec.topk_lp.append(top.values.cpu().numpy())
        return None

    @contextmanager
    def _generation(self):
        with self._swap.read():
            rec = _Recorder()
            self._local.rec = rec
            try:
                yield rec, self._served_version
            finally:
                self._local.rec = None

    def _register(
        self,
        generated: torch.Tensor,
        input_ids: torch.Tensor | None,
        prompt_text: Any,
        rec: _Recorder,
        version: int | None,
    ) -> torch.Tensor:
        """Turn one generate call's capture into Responses; returns handles [in_b, n]."""
        in_b, n, _ = generated.shape
        P = 0 if input_ids is None else input_ids.shape[1]
        tok = self._pipe.tokenizer
        stop = set()
        for t in (tok.eos_token_id, tok.pad_token_id):
            if t is not None:
                stop.add(int(t))
        gen_cfg = getattr(self._pipe.model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        if eos is not None:
            stop.update([int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])])
        H = np.stack(rec.hidden, axis=1) if rec.hidden else np.zeros((in_b * n, 0, 1), np.float32)
        Ki = np.stack(rec.topk_ids, axis=1) if rec.topk_ids else None
        Kl = np.stack(rec.topk_lp, axis=1) if rec.topk_lp else None
        handles = torch.zeros((in_b, n), dtype=torch.long)
        texts = _prompt_texts(prompt_text, in_b)
        for i in range(in_b):
            prompt_ids = [] if input_ids is None else input_ids[i].tolist()
            if input_ids is not None and tok.pad_token_id is not None:
                # left padding of a batch is not part of the prompt
                k = 0
                while k < len(prompt_ids) and prompt_ids[k] == tok.pad_token_id:
                    k += 1
                prompt_ids = prompt_ids[k:]
            prompt_str = tok.decode(prompt_ids) if prompt_ids else ""
            for j in range(n):
                row = i * n + j
                seq = generated[i, j, P:].tolist()
                T = next((k + 1 for k, tok_id in enumerate(seq) if tok_id in stop), len(seq))
                T = min(T, H.shape[1])
                rid = uuid.uuid4().hex
                r = Response(
                    response_id=rid,
                    prompt=prompt_str,
                    embed_text=texts[i] or prompt_str,
                    prompt_ids=prompt_ids,
                    response_ids=seq[:T],
                    response_text=tok.decode(seq[:T], skip_special_tokens=True),
                    hidden=np.ascontiguousarray(H[row, :T], np.float32),
                    topk_ids=Ki[row, :T] if Ki is not None else np.zeros((T, 0), np.int64),
                    topk_logprobs=Kl[row, :T] if Kl is not None else np.zeros((T, 0), np.float32),
                    adapter_version=version,
                )
                with self._meta_lock:
                    self._responses[rid] = r
                    while len(self._responses) > self._max_responses:
                        self._responses.popitem(last=False)
                        self.responses_evicted += 1
                    h = self._next_handle
                    self._next_handle += 1
                    self._handle_to_id[h] = rid
                handles[i, j] = h
        return handles

    # -- the pipeline ---------------------------------------------------------------------
    def __call__(self, inputs: Any, **kwargs):
        """Generate, as transformers' pipeline does; every sequence gets a ``response_id``.

        With ``rerank.candidates`` k > 1, a sampled generation (``do_sample``) draws k
        sequences for each one asked for and returns the one the reward model scores best
        (``sona_plugin.rerank``); the others are dropped and cannot take feedback.
        """
        if self.ranker is None or not self._samples(kwargs):
            return self._pipe(inputs, **kwargs)
        k = self.engine.config.rerank.candidates
        n = int(kwargs.get("num_return_sequences", 1))
        out = self._pipe(inputs, **{**kwargs, "num_return_sequences": n * k})
        batched = bool(out) and isinstance(out[0], list)
        picked = [self._best_of(group, n, k) for group in (out if batched else [out])]
        return picked if batched else picked[0]

    def _samples(self, kwargs: dict) -> bool:
        gc = kwargs.get("generation_config") or self._pipe.generation_config
        return bool(kwargs.get("do_sample", getattr(gc, "do_sample", False)))

    def _best_of(self, records: list[dict], n: int, k: int) -> list[dict]:
        """Of each block of ``k`` records (one prompt's candidates), the best-scored."""
        chosen = []
        for b in range(n):
            block = records[b * k : (b + 1) * k]
            with self._meta_lock:
                held = [self._responses.get(r["response_id"]) for r in block]
            i = self.ranker.choose(
                [
                    answer_features(r.hidden) if r is not None and len(r.hidden) else None
                    for r in held
                ]
            )
            with self._meta_lock:
                for j, r in enumerate(block):
                    if j != i:
                        self._responses.pop(r["response_id"], None)
            chosen.append(block[i])
        return chosen

    def answer_hidden(self, prompt_ids: list[int], response_ids: list[int]) -> np.ndarray:
        """What a generation of ``response_ids`` records (``rerank.recorded_hidden``), by
        one forward pass of the served model: ``[T, d]``."""
        with self._swap.read():
            return recorded_hidden(self._pipe.model, prompt_ids, response_ids)

    @property
    def model(self) -> PreTrainedModel:
        """The live model, hooks on: ``pipe.model(input_ids).logits`` are the adapted logits."""
        return self._pipe.model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._pipe.tokenizer

    @property
    def adapter_version(self) -> int | None:
        """The BaseLoRA version now served (None: the base model)."""
        return self._served_version

    def response(self, response_id: str) -> Response:
        r = self._responses.get(response_id)
        if r is None:
            raise UnknownResponse(
                f"unknown response_id {response_id!r} (never generated here, "
                f"or evicted after {self._max_responses} newer responses)"
            )
        return r

    # -- feedback -------------------------------------------------------------------------
    def feedback(
        self, response_id: str, reward: float | None = None, *, liked: bool | None = None
    ) -> FeedbackResult:
        """Judge a response: ``reward`` in [-1, 1], or ``liked=True/False`` (+1 / -1).

        The record is durable in the store when this returns, and the MicroLoRA has taken
        its instant update. Policy: one feedback per response; a second raises
        InvalidValue and changes nothing (the first judgement stands).
        """
        from sona_plugin import metrics

        reward = parse_reward(reward, liked)
        if self.store.has(response_id):
            metrics.feedback("duplicate")
            raise DuplicateFeedback(
                f"feedback for response {response_id} was already given; one feedback per response"
            )
        if self._replica is not None and response_id not in self._responses:
            # another replica generated it: it takes the feedback (integrations/_replica.py)
            metrics.feedback("forwarded")
            return FeedbackResult(**self._replica.forward(response_id, 0, reward, None))
        r = self.response(response_id)
        from sona_plugin.store import FeedbackRecord

        emb = self.embed([r.embed_text])[0]
        rec = FeedbackRecord(
            response_id=r.response_id,
            prompt=r.prompt,
            prompt_ids=r.prompt_ids,
            response_ids=r.response_ids,
            response_text=r.response_text,
            reward=reward,
            embedding=emb,
            adapter_version=r.adapter_version,
        )
        row = self.store.add(rec)  # durable from here on
        failpoint("feedback.stored")
        metrics.feedback("accepted", reward)
        if self.ranker is not None and len(r.hidden):
            try:
                self.ranker.add(row, answer_features(r.hidden), reward)
            except Exception:  # noqa: BLE001 - the record is stored; a restart retakes it
                logger.exception("the best-of-k reward model did not take feedback %s", row)
        report = None
        if len(r.response_ids):
            t = Trajectory(
                id=row,
                query_embedding=emb,
                steps=[
                    TrajectoryStep(
                        r.hidden[i],
                        np.zeros(0, np.float32),
                        reward,
                        int(r.response_ids[i]),
                        0,
                        r.topk_ids[i],
                        r.topk_logprobs[i],
                    )
                    for i in range(len(r.response_ids))
                ],
                final_quality=(reward + 1.0) / 2.0,
            )
            report = self._instant(
                response_id, lambda: self.engine.learn_trajectory(t, (reward + 1.0) / 2.0)
            )
            if report is not None:
                metrics.instant(bool(report.update.accepted))
        with self._meta_lock:
            self._responses.pop(response_id, None)
        self._saved_after_feedback()
        return FeedbackResult(
            id=response_id,
            index=0,
            stored_id=row,
            reward=reward,
            adapter_version=r.adapter_version,
            instant=report.to_dict() if report is not None else None,
        )

    def _has_recording(self, response_id: str, index: int) -> bool:
        return index == 0 and response_id in self._responses

    def _serve(self, version: int) -> float | None:
        """Load ``version`` under a fresh adapter name, check its canary, make it active;
        returns the canary's relative error (None: a version without one).

        Runs under the swap lock's write side: in-flight generations finish on the old
        version first, new ones start on the new one; nothing fails or mixes versions. A
        failed canary (``SwapRefused``) unloads the new adapter; the old one stays active.
        """
        from peft import PeftModel

        from sona_plugin.learner import canary

        v = self.registry.get(version)
        expected = canary.read(v.path)
        name = f"v{version:06d}"
        model = self._pipe.model
        with self._swap.write():
            old = self._served_name
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(model, str(v.path), adapter_name=name)
            elif name != old:
                if name in self._peft.peft_config:
                    self._peft.delete_adapter(name)
                self._peft.load_adapter(str(v.path), adapter_name=name)
                self._peft.set_adapter(name)
            self._peft.eval()
            err = None
            if expected is not None:
                try:
                    err = canary.check(
                        version,
                        {
                            "hidden": canary.last_hidden(self._peft, expected[0]),
                            "adapter_version": version,
                        },
                        expected[1],
                    )
                except Exception:
                    if name != old:
                        self._unload(name, old)
                    raise
            if old is not None and old != name:
                self._peft.delete_adapter(old)
            self._served_version, self._served_name = version, name
        return err

    def _unload(self, name: str, restore: str | None) -> None:
        """Drop adapter ``name`` and make ``restore`` (None: the base model) active again."""
        if restore is None:
            self._peft.unload()  # the LoRA layers out again: the plain base model
            self._peft = None
            return
        self._peft.set_adapter(restore)
        self._peft.delete_adapter(name)

    def sample_answers(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        tok = self._pipe.tokenizer
        out_all = []
        with self._swap.read(), torch.no_grad():
            for p in prompt_ids:
                ids = torch.tensor([p])
                out = self._pipe.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=True,
                    top_p=0.95,
                    pad_token_id=tok.pad_token_id,
                )
                resp = out[0, ids.shape[1] :].tolist()
                if tok.eos_token_id in resp:
                    resp = resp[: resp.index(tok.eos_token_id) + 1]
                out_all.append(resp)
        return out_all

    def export_peft(self, path: str | Path) -> Path:
        """A PEFT adapter directory reproducing this pipeline's adapted logits: the served
        BaseLoRA plus the MicroLoRA folded into an ``lm_head`` LoRA (``write_peft_export``)."""
        from sona_plugin.export import write_peft_export

        base = self.registry.get(self._served_version).path if self._served_version else None
        return write_peft_export(
            Path(path),
            self.engine.micro_lora,
            self._lm_head.weight,
            base,
            str(self.model_source) if self.model_source else None,
        )

    def stats(self) -> dict:
        s = self.engine.stats()
        s.update(
            {
                "responses_held": len(self._responses),
                "responses_evicted": self.responses_evicted,
                "feedback_stored": self.store.count(),
                "adapter_version": self._served_version,
            }
        )
        return self._with_learner(s)

    def close(self) -> None:
        self.stop_background()
        self._stop_replica()
        self.save_state()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.store.close()


def _fold_into_generation_config(kw: dict, default: GenerationConfig | None) -> None:
    """transformers' pipeline passes its ``generation_config`` *and* the call's generation
    arguments to ``generate``, which transformers 5 warns about on every call (and, with
    ``max_new_tokens``, about ``max_length`` too): fold the arguments into a copy of the
    config instead, as ``generate`` expects."""
    import copy

    gc = kw.get("generation_config", default)
    if gc is None:
        return
    gc = copy.deepcopy(gc)
    for k in [k for k in kw if k != "generation_config" and hasattr(gc, k)]:
        setattr(gc, k, kw.pop(k))
    if gc.max_new_tokens is not None:
        gc.max_length = None
    if not gc.do_sample:  # greedy: the model's sampling defaults would only draw warnings
        gc.temperature = gc.top_p = gc.top_k = None
    kw["generation_config"] = gc


def _save_at_exit(ref: weakref.ref[SonaPipeline]) -> None:
    p = ref()
    if p is not None and p._hooks and p._unsaved_feedback:
        try:
            p.save_engine()
        except Exception:  # noqa: BLE001 - at exit: log and go on
            logging.getLogger(__name__).exception("saving SONA's engine at exit failed")


def _prompt_texts(prompt_text: Any, in_b: int) -> list[str]:
    """The user's own words per batch row (the last user message for chats)."""
    items = (
        prompt_text
        if isinstance(prompt_text, (list, tuple)) and len(prompt_text) == in_b and in_b > 1
        else [prompt_text] * in_b
    )
    out = []
    for p in items:
        msgs = getattr(p, "messages", None)
        if msgs is None and isinstance(p, (list, tuple)) and p and isinstance(p[0], dict):
            msgs = p
        if msgs is not None:
            users = [m.get("content", "") for m in msgs if m.get("role") == "user"]
            out.append(str(users[-1]) if users else "")
        else:
            out.append(p if isinstance(p, str) else "")
    return out


def pipeline(
    task: str = "text-generation",
    model: str | Path | PreTrainedModel | None = None,
    tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
    sona_config: SonaConfig | dict | None = None,
    *,
    state_dir: str | Path | None = None,
    store: TrajectoryStore | None = None,
    save_every: int | None = None,
    save_interval_s: float | None = None,
    keep_versions: int | None = None,
    retain_days: float | None = None,
    **pipeline_kwargs,
) -> SonaPipeline:
    """A transformers text-generation pipeline with SONA on.

    Args:
        task: only "text-generation".
        model: a model path or a loaded causal LM; None means the embedded default
            (SmolLM2-135M-Instruct, converted once under ``$SONA_HOME``).
        tokenizer: tokenizer (or path); default: the model's.
        sona_config: SonaConfig (or a dict of its keys, flat or nested); for a dict,
            ``hidden_dim`` defaults to the model's hidden size and ``embedding_dim`` to the
            embedder's (384). Its host options (``HostConfig``: ``state_dir``,
            ``store_url``, ``save_every``, ``save_interval_s``, ``keep_versions``,
            ``retain_days``) apply; the keywords below override them.
        state_dir: where the feedback store and the adapter versions live (None: the
            config's ``host.state_dir``, default ``$SONA_HOME/state``).
        store: a TrajectoryStore (default: the config's ``host.store_url`` or
            ``database_url``, else SQLite in ``state_dir``).
        save_every: save the engine (MicroLoRA, patterns) every this many feedbacks, so
            that a crash loses at most that many instant updates (their records are
            durable in the store at once). None: ``host.save_every`` (default 25).
        save_interval_s: also save it this many seconds after an unsaved feedback (0: off).
            None: ``host.save_interval_s`` (default 60).
        keep_versions: adapter versions kept on disk (older ones pruned after each
            cycle; never the served one). None: ``host.keep_versions`` (default 20).
        retain_days: feedback records older than this are deleted after each cycle (0:
            kept forever). None: ``host.retain_days`` (default 90).
        **pipeline_kwargs: passed to ``transformers.pipeline``.
    """

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import pipeline as hf_pipeline

    from sona_plugin.models import default_llm_path, sona_home
    from sona_plugin.store import open_store

    if task != "text-generation":
        raise ConfigError(f"task must be 'text-generation', got {task!r}")
    # the whole config is checked before the model loads: a bad option fails at once
    if isinstance(sona_config, SonaConfig):
        cfg, given_hidden = sona_config, sona_config.hidden_dim
    else:
        d = dict(sona_config or {})
        given_hidden = d.pop("hidden_dim", None)
        cfg = SonaConfig.from_dict({"embedding_dim": 384, **LM_DEFAULTS, **d})
    given = {
        "state_dir": state_dir,
        "save_every": save_every,
        "save_interval_s": save_interval_s,
        "keep_versions": keep_versions,
        "retain_days": retain_days,
    }
    host = dataclasses.replace(cfg.host, **{k: v for k, v in given.items() if v is not None})
    source: Any = None
    if model is None or isinstance(model, (str, Path)):
        source = Path(model) if model is not None else default_llm_path()
        # the embedded default is on disk: never ask a hub (the process's settings stay)
        local = {"local_files_only": True} if model is None else {}
        tok = (
            tokenizer
            if tokenizer is not None and not isinstance(tokenizer, (str, Path))
            else AutoTokenizer.from_pretrained(tokenizer or source, **local)
        )
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **local)
    else:
        source = getattr(model, "name_or_path", None) or None
        tok = (
            tokenizer
            if tokenizer is not None and not isinstance(tokenizer, (str, Path))
            else AutoTokenizer.from_pretrained(tokenizer or model.name_or_path)
        )
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    hidden = int(model.get_output_embeddings().weight.shape[1])
    if given_hidden is not None and given_hidden != hidden:
        raise ConfigError(
            f"hidden_dim must equal the model's hidden size {hidden}, got {given_hidden}"
        )
    cfg = dataclasses.replace(cfg, hidden_dim=hidden, host=host)
    sd = Path(host.state_dir) if host.state_dir is not None else sona_home() / "state"
    sd.mkdir(parents=True, exist_ok=True)
    engine = load_engine(sd / "engine", cfg)  # a restart keeps what the engine learned
    engine.set_output_head(model.get_output_embeddings().weight)
    st = (
        store
        if store is not None
        else open_store(host.store_url or cfg.database_url or sd / "sona.db")
    )
    pipe = hf_pipeline(
        "text-generation",
        model=model,
        tokenizer=tok,
        pipeline_class=SonaTextGenerationPipeline,
        **pipeline_kwargs,
    )
    sp = SonaPipeline(
        pipe,
        engine,
        state_dir=sd,
        store=st,
        model_source=source,
        save_every=host.save_every,
        registry_dir=Path(host.registry_dir) if host.registry_dir else None,
    )
    sp.save_interval_s, sp.keep_versions, sp.retain_days = (
        float(host.save_interval_s),
        host.keep_versions,
        float(host.retain_days),
    )
    return sp


__all__ = ["Response", "SonaPipeline", "SonaTextGenerationPipeline", "pipeline"]
