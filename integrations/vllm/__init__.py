"""SONA for vLLM: learn from feedback on a running vLLM engine.

Server (one launch switch; ``sona serve`` adds it for you):

    python -m vllm.entrypoints.openai.api_server --model MODEL --enable-lora \\
        --max-lora-rank 8 --additional-config '{"sona": {}}'

then ``POST /v1/feedback {"id": <completion id>, "reward": 1}`` (``server.py``).

Offline, :class:`SonaLLM` wraps ``vllm.LLM``::

    llm = SonaLLM()                                      # embedded default model
    outs = llm.generate(["Name a colour."], SamplingParams(max_tokens=32))
    llm.feedback(outs[0].response_id, reward=1.0)        # instant update, durable record
    llm.learn()                                          # loop B now: train, gate, swap

Pieces: ``plugin.py`` (the switch), ``worker.py`` (recording + MicroLoRA in each worker),
``host.py`` (feedback, store, trainer, registry in the front end), ``server.py`` (routes).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _compat
from .host import VllmHost, engine_config, split_settings
from .worker import adapter_name

if TYPE_CHECKING:
    from vllm import PromptType, RequestOutput, SamplingParams

CPU_KV_CACHE_BYTES = 2 << 30


def cpu_defaults(given: Iterable[str], *, on_gpu: bool | None = None) -> dict[str, Any]:
    """The vLLM options SONA sets when vLLM runs on CPU and the user did not set them.

    ``dtype="float32"``: the CPU backend's bfloat16 ruins small models.
    ``kv_cache_memory_bytes`` = 2 GiB, unless ``gpu_memory_utilization`` is given: otherwise
    the CPU backend reserves a share of the machine's memory for the KV cache (92 % by
    default), and refuses to start when others hold it.

    Args:
        given: option names the user set, as ``vllm.LLM`` keywords (``kv_cache_memory_bytes``)
            or command-line flags (``--kv-cache-memory-bytes``).
        on_gpu: whether vLLM runs on a GPU; None asks ``torch.cuda.is_available()``.

    Returns:
        ``vllm.LLM`` keyword -> value (empty on GPU); ``sona serve`` turns each key into
        ``--key-with-dashes``.
    """
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    if on_gpu:
        return {}
    names = {g.split("=", 1)[0].lstrip("-").replace("-", "_") for g in given}
    out: dict[str, Any] = {}
    if "dtype" not in names:
        out["dtype"] = "float32"
    if not names & {"gpu_memory_utilization", "kv_cache_memory_bytes"}:
        out["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    return out


class SonaLLM:
    """``vllm.LLM`` with SONA on. Each generated output gets a ``response_id``.

    Args:
        model: model path; None means the embedded default (SmolLM2-135M-Instruct).
        sona_config: a SonaConfig as a dict, flat or nested (``SonaConfig.from_dict``),
            host options included (``HostConfig``; the schedule defaults to 'manual'
            here: call ``learn()``).
        state_dir: shorthand for ``sona_config["state_dir"]``; it wins over that.
        **llm_kwargs: passed to ``vllm.LLM``; defaults ``enable_lora=True``,
            ``max_lora_rank`` = the BaseLoRA rank (at least 8); on CPU ``cpu_defaults``:
            ``dtype="float32"`` (bfloat16 ruins a 135M model) and a 2 GiB KV cache unless
            ``gpu_memory_utilization`` or ``kv_cache_memory_bytes`` is given.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        sona_config: dict | None = None,
        state_dir: str | Path | None = None,
        **llm_kwargs: Any,
    ):
        from vllm import LLM

        from sona_plugin.models import default_llm_path

        source = Path(model) if model is not None else default_llm_path()
        # keys apply in order: the default schedule first, the state_dir keyword last
        settings = {"schedule": "manual", **(sona_config or {})}
        if state_dir is not None:
            settings.pop("state_dir", None)
            settings["state_dir"] = str(state_dir)
        engine, _ = split_settings(settings)  # a bad option fails here, naming it
        llm_kwargs.setdefault("enable_lora", True)
        if llm_kwargs["enable_lora"]:
            rank = engine_config(engine).base_lora_rank
            llm_kwargs.setdefault("max_lora_rank", max(8, rank))
        llm_kwargs.update(cpu_defaults(llm_kwargs))
        extra = dict(llm_kwargs.pop("additional_config", None) or {})
        extra["sona"] = settings
        self.llm = LLM(model=str(source), additional_config=extra, **llm_kwargs)
        self._session = uuid.uuid4().hex[:12]
        self._lora = None
        self.host = VllmHost(
            model_source=source,
            settings=settings,
            rpc=self._rpc,
            serve=self._serve,
            generate_ids=self._generate_ids,
        )
        if self.host.host_config.schedule == "background":
            self.host.start_background()

    # -- plumbing -------------------------------------------------------------------------
    def _rpc(self, method: str, *args):
        return self.llm.collective_rpc(method, args=args)[0]

    def _serve(self, version: int, path: Path) -> float | None:
        """Load ``version``, check its canary (undone if it fails), then serve it; returns
        the canary's relative error (None: a version without a canary)."""
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        from sona_plugin.learner import canary

        new = LoRARequest(adapter_name(version), version, str(path))
        _compat.add_lora(self.llm, new)  # load now, not on the next request
        err = None
        expected = canary.read(path)
        if expected is not None:
            out = self.llm.generate(
                [{"prompt_token_ids": expected[0]}],
                SamplingParams(max_tokens=1, temperature=0.0),
                lora_request=new,
                use_tqdm=False,
            )[0]
            try:
                err = canary.check(
                    version, self._rpc("sona_take_hidden", out.request_id), expected[1]
                )
            except Exception:
                if self._lora is None or self._lora.lora_int_id != version:
                    _compat.remove_lora(self.llm, version)
                raise
        old, self._lora = self._lora, new
        if old is not None and old.lora_int_id != version:
            _compat.remove_lora(self.llm, old.lora_int_id)
        return err

    def _generate_ids(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        from vllm import SamplingParams

        sp = SamplingParams(max_tokens=max_new_tokens, temperature=1.0, top_p=0.95)
        outs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompt_ids],
            sp,
            lora_request=self._lora,
            use_tqdm=False,
        )
        return [list(o.outputs[0].token_ids) for o in outs]

    def _tag(self, outs: list[RequestOutput]):
        for o in outs:
            o.response_id = f"{self._session}-{o.request_id}"
        return outs

    def _call(self, method: Callable[..., list[RequestOutput]], prompts: Any, sp: Any, **kwargs):
        """``method`` on the served adapter; with best-of-k (``rerank.candidates`` k > 1)
        a sampled call draws k times ``n`` outputs per prompt and keeps, of each k, the
        one the reward model scores best (its ``index`` is the one feedback names)."""
        kwargs.setdefault("use_tqdm", False)
        k = self.host.engine.config.rerank.candidates
        if sp is None and k > 1:
            sp = self.llm.get_default_sampling_params()
        if k < 2 or isinstance(sp, Sequence) or sp.temperature == 0 or sp.n * k > 64:
            return self._tag(method(prompts, sp, lora_request=self._lora, **kwargs))
        wide = sp.clone()
        wide.n = sp.n * k
        outs = method(prompts, wide, lora_request=self._lora, **kwargs)
        for o in outs:
            indices = sorted(c.index for c in o.outputs)
            kept = set(self.host.best_of(o.request_id, indices, k))
            o.outputs = [c for c in sorted(o.outputs, key=lambda c: c.index) if c.index in kept]
        return self._tag(outs)

    # -- the API --------------------------------------------------------------------------
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        **kwargs,
    ) -> list[RequestOutput]:
        """``vllm.LLM.generate`` on the served adapter; every output gets ``response_id``
        (best-of-k: ``_call``)."""
        return self._call(self.llm.generate, prompts, sampling_params, **kwargs)

    def chat(
        self,
        messages: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        **kwargs,
    ) -> list[RequestOutput]:
        """``vllm.LLM.chat`` on the served adapter; every output gets ``response_id``
        (best-of-k: ``_call``)."""
        return self._call(self.llm.chat, messages, sampling_params, **kwargs)

    def feedback(
        self,
        response_id: str,
        reward: float | None = None,
        *,
        liked: bool | None = None,
        index: int = 0,
    ) -> dict:
        """Judge an output (choice ``index`` when ``n > 1``): reward in [-1, 1] or liked."""
        prefix = f"{self._session}-"
        if not isinstance(response_id, str) or not response_id.startswith(prefix):
            from sona_plugin.errors import UnknownResponse

            raise UnknownResponse(
                f"unknown response_id {response_id!r}: not generated by this SonaLLM"
            )
        return self.host.feedback(
            response_id[len(prefix) :],
            reward,
            liked=liked,
            index=index,
            store_id=response_id if index == 0 else f"{response_id}:{index}",
        )

    @property
    def adapter_version(self) -> int | None:
        return self.host.adapter_version

    def __getattr__(self, name: str):
        # learn, deep_cycle, adapters, rollback, stats, export_peft, mark_task_boundary, ...
        if name in ("host", "llm"):
            raise AttributeError(name)
        return getattr(self.host, name)

    def close(self) -> None:
        """Save SONA's state and shut the vLLM engine down (its processes and memory)."""
        self.host.close()
        _compat.shutdown(self.llm)


__all__ = ["SonaLLM", "VllmHost", "cpu_defaults"]
