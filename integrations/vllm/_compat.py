"""Every use of a vLLM internal, in one module (written against vLLM 0.32.0).

SONA plugs into vLLM through its documented extension points wherever one exists: the
``vllm.general_plugins`` and ``vllm.endpoint_plugins`` entry points (``pyproject.toml``),
``worker_extension_cls`` (``plugin.py``), the endpoint plugin's ``attach_router`` /
``init_state`` (``server.py``), ``collective_rpc`` and the ``EngineClient`` it is given.
What those do not offer is here: one function per internal, each naming the vLLM source it
relies on (paths relative to the ``vllm`` package, as of 0.32.0) and why no supported point
does the job. A few internals are used directly by ``server.py``'s routes; they are listed in
:data:`INTERNALS` all the same, so :func:`check` looks them up too.

:func:`check` looks every one of them up in the installed vLLM. ``plugin._enable`` calls it
when a launch config turns SONA on, so a vLLM that moved one fails the launch with a message
naming it, not with an ``AttributeError`` inside the engine.

Nothing here imports vLLM at import time: the worker's unit tests drive these functions on
a scripted model runner.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sona_plugin.errors import SonaError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)
SUPPORTED = "0.32"  # the vLLM series every internal below was checked against


class VllmIncompatible(SonaError, ImportError):
    """The installed vLLM lacks an internal SONA relies on (or a launch option turns on a
    code path SONA's hooks do not support)."""


@dataclass(frozen=True)
class Internal:
    """One vLLM internal SONA uses: what, where, and how :func:`check` finds it."""

    name: str  # the function here that uses it, or the place in server.py that does
    source: str  # vllm file::qualname it lives in (0.32.0)
    probe: Callable[[], None]  # raises _Missing naming the absent piece


class _Missing(Exception):
    pass


def _obj(path: str) -> Any:
    """``"module:Attr.attr"`` imported and looked up; _Missing naming what is absent."""
    mod_name, _, qual = path.partition(":")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise _Missing(f"module {mod_name} ({e})") from None
    for part in qual.split(".") if qual else ():
        if not hasattr(obj, part):
            raise _Missing(f"{mod_name}.{qual} (no attribute {part!r})")
        obj = getattr(obj, part)
    return obj


def _params(path: str, *names: str) -> None:
    params = inspect.signature(_obj(path)).parameters
    absent = [n for n in names if n not in params]
    if absent:
        raise _Missing(f"parameter {', '.join(absent)} of {path}")


def _fields(path: str, *names: str) -> None:
    """Fields of a dataclass or pydantic model (its annotations, inherited ones included)."""
    cls = _obj(path)
    known: set[str] = set(getattr(cls, "model_fields", {}) or {})
    for klass in getattr(cls, "__mro__", ()):
        known |= set(getattr(klass, "__annotations__", {}))
    absent = [n for n in names if n not in known]
    if absent:
        raise _Missing(f"field {', '.join(absent)} of {path}")


def _sets(path: str, *attrs: str) -> None:
    """The method at ``path`` names each of ``attrs`` (``self.attr = ...`` in an __init__):
    instance attributes have no class-level trace to look up."""
    code = inspect.unwrap(_obj(path)).__code__
    absent = [a for a in attrs if a not in code.co_names]
    if absent:
        raise _Missing(f"attribute {', '.join(absent)} set by {path}")


def _probes(*probes: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        for p in probes:
            p()

    return run


# -- front end: the launch switch (plugin.py) ----------------------------------------------


def wrap_engine_config(on_config: Callable[[Any], None]) -> None:
    """Call ``on_config(vllm_config)`` on every config ``EngineArgs`` builds.

    Relies on ``engine/arg_utils.py::EngineArgs.create_engine_config`` (the one place both
    ``vllm serve`` and ``vllm.LLM`` turn arguments into a ``VllmConfig``). No supported hook
    sees the config before the engine starts, and a general plugin gets no arguments; this is
    what lets the ``sona`` entry of ``--additional-config`` alone set the supported
    ``worker_extension_cls`` option. Only patches once ``vllm.engine.arg_utils`` is loaded
    (``load_general_plugins`` is called from there), so importing this never imports vLLM.
    """
    args_mod = sys.modules.get("vllm.engine.arg_utils")
    if args_mod is None:
        return
    cls = args_mod.EngineArgs
    if getattr(cls.create_engine_config, "_sona", False):
        return
    orig = cls.create_engine_config

    @functools.wraps(orig)
    def create_engine_config(self: Any, *a, **k):
        cfg = orig(self, *a, **k)
        on_config(cfg)
        return cfg

    create_engine_config._sona = True
    cls.create_engine_config = create_engine_config


def add_endpoint_plugin(name: str, factory: Callable[[], Any], wanted: Callable[[], bool]) -> None:
    """Load endpoint plugin ``name`` (``factory()``) whenever ``wanted()``, without
    ``VLLM_PLUGINS``.

    Relies on ``plugins/__init__.py::load_endpoint_plugins``, which
    ``plugins/endpoint_plugins/interface.py::attach_endpoint_plugins`` imports at call time.
    The supported way, the ``vllm.endpoint_plugins`` entry point (``pyproject.toml`` registers
    ``sona_feedback``), loads a plugin only when ``VLLM_PLUGINS`` names it; unset, vLLM logs
    a warning and loads none. ``VLLM_PLUGINS`` is also the allowlist of every other plugin
    group (``vllm.general_plugins``, ``vllm.platform_plugins``, ...), so setting it for SONA
    would drop the user's other plugins unless they list them all. The wrapper adds the plugin
    when the launch config asked for SONA and applies vLLM's own ``required_tasks`` gating; a
    user who names ``sona_feedback`` in ``VLLM_PLUGINS`` gets it from vLLM and not twice.
    """
    plugins_mod = sys.modules.get("vllm.plugins")
    if plugins_mod is None or getattr(plugins_mod.load_endpoint_plugins, "_sona", False):
        return
    orig = plugins_mod.load_endpoint_plugins

    @functools.wraps(orig)
    def load_endpoint_plugins(supported_tasks: tuple[str, ...] | None = None):
        plugins = orig(supported_tasks)
        if wanted() and not any(getattr(p, "name", "") == name for p in plugins):
            plugin = factory()
            required = plugin.required_tasks
            if required is None or set(required) & set(supported_tasks or ()):
                plugins.append(plugin)
            else:
                logger.warning(
                    "SONA: endpoint plugin %s needs one of the tasks %s; this server supports "
                    "%s, so its routes are off",
                    name,
                    required,
                    supported_tasks,
                )
        return plugins

    load_endpoint_plugins._sona = True
    plugins_mod.load_endpoint_plugins = load_endpoint_plugins


# -- front end: the OpenAI server (server.py) ----------------------------------------------


def wrap_adapter_choice(choose: Callable[[Any, Callable[[], bool]], Any]) -> None:
    """Let ``choose(lora, names_base_model)`` replace the LoRARequest vLLM picked for an
    OpenAI request (``names_base_model()``: the request names the served base model).

    Relies on ``entrypoints/serve/engine/serving.py::BaseServing._maybe_get_adapters``
    (every completion, chat, tokenize and pooling handler asks it) and
    ``entrypoints/openai/models/serving.py::OpenAIServingModels.is_base_model``. No supported
    point picks an adapter for a request that names the base model: LoRA resolvers
    (``lora/resolver.py``) are asked only about names vLLM does not know.
    """
    from vllm.entrypoints.serve.engine.serving import BaseServing

    if getattr(BaseServing._maybe_get_adapters, "_sona", False):
        return
    orig = BaseServing._maybe_get_adapters

    @functools.wraps(orig)
    def _maybe_get_adapters(self: Any, request: Any, *a, **k):
        lora = orig(self, request, *a, **k)
        model = getattr(request, "model", None)
        return choose(lora, lambda: model is None or self.models.is_base_model(model))

    _maybe_get_adapters._sona = True
    BaseServing._maybe_get_adapters = _maybe_get_adapters


def wrap_sampling_params(tag: Callable[[Any], None]) -> None:
    """Let ``tag(params)`` amend the SamplingParams of every chat and text completion
    request before the engine sees them (the per-request tenant, in ``extra_args``).

    Relies on ``entrypoints/openai/chat_completion/protocol.py::ChatCompletionRequest`` and
    ``entrypoints/openai/completion/protocol.py::CompletionRequest``'s
    ``to_sampling_params`` (every generation of those routes builds its SamplingParams
    there; ``SamplingParams.extra_args`` reaches the workers' ``CachedRequestState``)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    for cls in (ChatCompletionRequest, CompletionRequest):
        orig = cls.to_sampling_params
        if getattr(orig, "_sona", False):
            continue

        def to_sampling_params(self: Any, *a, _orig: Callable = orig, **k):
            params = _orig(self, *a, **k)
            tag(params)
            return params

        functools.update_wrapper(to_sampling_params, orig)
        to_sampling_params._sona = True
        cls.to_sampling_params = to_sampling_params


def lora_load_request(name: str, path: str) -> Any:
    """The body of ``POST /v1/load_lora_adapter`` for ``OpenAIServingModels.load_lora_adapter``.

    Relies on ``entrypoints/serve/lora/protocol.py::LoadLoRAAdapterRequest`` (moved there
    from ``entrypoints/openai/protocol.py`` in 0.32)."""
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

    return LoadLoRAAdapterRequest(lora_name=name, lora_path=path)


def is_error_response(result: Any) -> bool:
    """Whether a serving call answered an error instead of a result.

    Relies on ``entrypoints/serve/engine/protocol.py::ErrorResponse`` (what
    ``OpenAIServingModels.load_lora_adapter`` returns when it refuses)."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    return isinstance(result, ErrorResponse)


# -- offline: vllm.LLM (SonaLLM in __init__.py) --------------------------------------------


def add_lora(llm: Any, lora_request: Any) -> bool:
    """Load an adapter into the engine now (not on its first request).

    Relies on ``entrypoints/llm.py::LLM.llm_engine`` and
    ``v1/engine/llm_engine.py::LLMEngine.add_lora``: ``vllm.LLM`` has no LoRA methods."""
    return llm.llm_engine.add_lora(lora_request)


def remove_lora(llm: Any, lora_int_id: int) -> bool:
    """Unload an adapter. Relies on ``v1/engine/llm_engine.py::LLMEngine.remove_lora``."""
    return llm.llm_engine.remove_lora(lora_int_id)


def shutdown(llm: Any) -> None:
    """Stop the engine's processes and free their memory now, not at garbage collection.

    Relies on ``v1/engine/llm_engine.py::LLMEngine.engine_core`` and
    ``v1/engine/core_client.py::EngineCoreClient.shutdown``: ``vllm.LLM`` has no close."""
    llm.llm_engine.engine_core.shutdown()


# -- worker: the model runner (worker.py) --------------------------------------------------
# The runner is V1's ``v1/worker/gpu_model_runner.py::GPUModelRunner`` (CPUModelRunner is a
# subclass); Model Runner V2 (``v1/worker/gpu/model_runner.py``) has no ``input_batch`` or
# ``requests`` and is refused by :func:`check`.


def model_runner(worker: Any) -> Any:
    """The worker's model runner. Relies on ``v1/worker/worker_base.py::WorkerBase.model_runner``
    (the extension class is mixed into the worker, so ``self`` is the worker)."""
    return worker.model_runner


def runner_model(runner: Any) -> Any:
    """The model (``nn.Module``) outside any CUDA-graph wrapper.

    Relies on ``v1/worker/gpu_model_runner.py::GPUModelRunner.get_model``."""
    return runner.get_model()


def wrap_compute_logits(model: Any, compute_logits: Callable[..., Any]) -> None:
    """Route the model's ``compute_logits(h, ...)`` through ``compute_logits(orig, h, ...)``.

    Relies on ``GPUModelRunner.execute_model`` calling
    ``self.model.compute_logits(hidden_states[logits_indices])`` (the interface is
    ``model_executor/models/interfaces_base.py::VllmModelForTextGeneration.compute_logits``)
    outside the compiled and graph-captured region, so an instance attribute takes effect in
    every compilation mode; row i belongs to ``input_batch.req_ids[i]``."""
    orig = model.compute_logits

    def wrapped(hidden_states: torch.Tensor, *args, **kwargs):
        return compute_logits(orig, hidden_states, *args, **kwargs)

    model.compute_logits = wrapped


def wrap_sample_tokens(runner: Any, on_sampled: Callable[[list, list], None]) -> None:
    """After each ``sample_tokens``, call ``on_sampled(req_ids, sampled_token_ids)``.

    Relies on ``v1/worker/gpu_model_runner.py::GPUModelRunner.sample_tokens`` returning
    ``v1/outputs.py::ModelRunnerOutput`` (``req_ids``, ``sampled_token_ids``: one list per
    request, empty for a partial prefill). With async scheduling it returns an
    ``AsyncModelRunnerOutput`` instead, which :func:`check` refuses."""
    orig = runner.sample_tokens

    def sample_tokens(*args, **kwargs):
        out = orig(*args, **kwargs)
        req_ids = getattr(out, "req_ids", None)
        sampled = getattr(out, "sampled_token_ids", None)
        if req_ids and sampled is not None:
            on_sampled(req_ids, sampled)
        return out

    runner.sample_tokens = sample_tokens


def wrap_execute_model(
    runner: Any, step: Callable[[Iterable[str]], contextlib.AbstractContextManager]
) -> None:
    """Run each ``execute_model`` inside ``step(finished_req_ids)``.

    Relies on ``v1/worker/gpu_model_runner.py::GPUModelRunner.execute_model(scheduler_output)``
    computing the sampled rows' logits and on
    ``v1/core/sched/output.py::SchedulerOutput.finished_req_ids``."""
    orig = runner.execute_model

    def execute_model(scheduler_output: Any, *args, **kwargs):
        with step(getattr(scheduler_output, "finished_req_ids", ()) or ()):
            return orig(scheduler_output, *args, **kwargs)

    runner.execute_model = execute_model


def batch_req_ids(runner: Any, n: int) -> list[str]:
    """The request ids of the first ``n`` rows of the running batch.

    Relies on ``GPUModelRunner.input_batch`` and
    ``v1/worker/gpu_input_batch.py::InputBatch.req_ids``."""
    return list(runner.input_batch.req_ids[:n])


def request_state(runner: Any, req_id: str) -> tuple[list[int], Any]:
    """(prompt token ids, LoRARequest or None) of a request the runner holds.

    Relies on ``GPUModelRunner.requests`` (``dict[str, CachedRequestState]``) and
    ``v1/worker/gpu_input_batch.py::CachedRequestState.prompt_token_ids`` / ``.lora_request``."""
    state = runner.requests.get(req_id)
    return (
        list(getattr(state, "prompt_token_ids", None) or []),
        getattr(state, "lora_request", None),
    )


def request_tenant(runner: Any, req_id: str, key: str) -> str:
    """The SONA tenant the server gave a request (``""``: the default tenant).

    Relies on ``GPUModelRunner.requests`` and ``CachedRequestState.sampling_params``
    (``sampling_params.py::SamplingParams.extra_args``, where the server's
    ``to_sampling_params`` wrapper puts it)."""
    state = runner.requests.get(req_id)
    extra = getattr(getattr(state, "sampling_params", None), "extra_args", None)
    return str(extra.get(key, "")) if extra else ""


def lm_head_weight(model: Any) -> Any:
    """The LM head ``[vocab, hidden]`` as a detached tensor, whole on every rank.

    Relies on the model's ``lm_head`` (a
    ``model_executor/layers/vocab_parallel_embedding.py::ParallelLMHead``, e.g.
    ``model_executor/models/llama.py::LlamaForCausalLM.lm_head``; tied embeddings share its
    weight) and, with tensor parallelism, on ``distributed/parallel_state.py``'s
    ``get_tensor_model_parallel_world_size`` and ``get_tp_group().all_gather`` to join the
    vocab shards."""
    head = getattr(model, "lm_head", None)
    w = getattr(head, "weight", None)
    if w is None:
        w = model.get_input_embeddings().weight
    w = w.detach()
    try:
        from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group

        if get_tensor_model_parallel_world_size() > 1:
            w = get_tp_group().all_gather(w, dim=0)
    except Exception:  # noqa: BLE001 - no distributed state (single process)
        pass
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or w.shape[0]
    return w[:vocab]


# -- what check() looks up -----------------------------------------------------------------

_ARGS = "vllm.engine.arg_utils"
_SERVING = "vllm.entrypoints.serve.engine.serving"
_MODELS = "vllm.entrypoints.openai.models.serving"
_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
_BATCH = "vllm.v1.worker.gpu_input_batch"


def _endpoint_loader_is_looked_up_at_call_time() -> None:
    interface = _obj("vllm.plugins.endpoint_plugins.interface")
    attach = _obj("vllm.plugins.endpoint_plugins.interface:attach_endpoint_plugins")
    if hasattr(interface, "load_endpoint_plugins") or "load_endpoint_plugins" not in (
        attach.__code__.co_names
    ):
        raise _Missing(
            "attach_endpoint_plugins importing vllm.plugins.load_endpoint_plugins at call time"
        )


INTERNALS: tuple[Internal, ...] = (
    Internal(
        "wrap_engine_config",
        "engine/arg_utils.py::EngineArgs.create_engine_config",
        lambda: _params(f"{_ARGS}:EngineArgs.create_engine_config", "self"),
    ),
    Internal(
        "add_endpoint_plugin",
        "plugins/__init__.py::load_endpoint_plugins",
        _probes(
            lambda: _params("vllm.plugins:load_endpoint_plugins", "supported_tasks"),
            _endpoint_loader_is_looked_up_at_call_time,
        ),
    ),
    Internal(
        "wrap_adapter_choice",
        "entrypoints/serve/engine/serving.py::BaseServing._maybe_get_adapters",
        _probes(
            lambda: _params(f"{_SERVING}:BaseServing._maybe_get_adapters", "self", "request"),
            lambda: _obj(f"{_MODELS}:OpenAIServingModels.is_base_model"),
        ),
    ),
    Internal(
        "wrap_sampling_params",
        "entrypoints/openai/{chat_completion,completion}/protocol.py::*Request.to_sampling_params",
        _probes(
            lambda: _params(
                "vllm.entrypoints.openai.chat_completion.protocol:"
                "ChatCompletionRequest.to_sampling_params",
                "self",
            ),
            lambda: _params(
                "vllm.entrypoints.openai.completion.protocol:CompletionRequest.to_sampling_params",
                "self",
            ),
            lambda: _fields("vllm.sampling_params:SamplingParams", "extra_args"),
        ),
    ),
    Internal(
        "lora_load_request",
        "entrypoints/serve/lora/protocol.py::LoadLoRAAdapterRequest",
        lambda: _fields(
            "vllm.entrypoints.serve.lora.protocol:LoadLoRAAdapterRequest", "lora_name", "lora_path"
        ),
    ),
    Internal(
        "is_error_response",
        "entrypoints/serve/engine/protocol.py::ErrorResponse",
        lambda: _obj("vllm.entrypoints.serve.engine.protocol:ErrorResponse"),
    ),
    Internal(
        "server.py: state.openai_serving_models",
        "entrypoints/launchers/api_server/app_state.py::init_app_state",
        lambda: _sets(
            "vllm.entrypoints.launchers.api_server.app_state:init_app_state",
            "openai_serving_models",
        ),
    ),
    Internal(
        "server.py: models.lora_requests, base_model_paths[0].name / .model_path",
        "entrypoints/openai/models/serving.py::OpenAIServingModels.__init__",
        _probes(
            lambda: _sets(
                f"{_MODELS}:OpenAIServingModels.__init__", "lora_requests", "base_model_paths"
            ),
            lambda: _fields(
                "vllm.entrypoints.openai.models.protocol:BaseModelPath", "name", "model_path"
            ),
        ),
    ),
    Internal(
        "server.py: models.load_lora_adapter(request, base_model_name=)",
        "entrypoints/openai/models/serving.py::OpenAIServingModels.load_lora_adapter",
        lambda: _params(
            f"{_MODELS}:OpenAIServingModels.load_lora_adapter", "request", "base_model_name"
        ),
    ),
    Internal(
        "server.py: engine_client.remove_lora (not in the EngineClient protocol)",
        "v1/engine/async_llm.py::AsyncLLM.remove_lora",
        lambda: _params("vllm.v1.engine.async_llm:AsyncLLM.remove_lora", "lora_id"),
    ),
    Internal(
        "add_lora, remove_lora, shutdown",
        "entrypoints/llm.py::LLM.llm_engine, v1/engine/llm_engine.py::LLMEngine",
        _probes(
            lambda: _sets("vllm.entrypoints.llm:LLM.__init__", "llm_engine"),
            lambda: _params("vllm.v1.engine.llm_engine:LLMEngine.add_lora", "lora_request"),
            lambda: _params("vllm.v1.engine.llm_engine:LLMEngine.remove_lora", "lora_id"),
            lambda: _sets("vllm.v1.engine.llm_engine:LLMEngine.__init__", "engine_core"),
            lambda: _obj("vllm.v1.engine.core_client:EngineCoreClient.shutdown"),
        ),
    ),
    Internal(
        "model_runner",
        "v1/worker/worker_base.py::WorkerBase.model_runner",
        lambda: _sets("vllm.v1.worker.worker_base:WorkerBase.__init__", "model_runner"),
    ),
    Internal(
        "runner_model",
        "v1/worker/gpu_model_runner.py::GPUModelRunner.get_model",
        lambda: _obj(f"{_RUNNER}.get_model"),
    ),
    Internal(
        "wrap_compute_logits",
        "model_executor/models/interfaces_base.py::VllmModelForTextGeneration.compute_logits",
        lambda: _params(
            "vllm.model_executor.models.interfaces_base:VllmModelForTextGeneration.compute_logits",
            "hidden_states",
        ),
    ),
    Internal(
        "wrap_sample_tokens",
        "v1/worker/gpu_model_runner.py::GPUModelRunner.sample_tokens, v1/outputs.py",
        _probes(
            lambda: _obj(f"{_RUNNER}.sample_tokens"),
            lambda: _fields("vllm.v1.outputs:ModelRunnerOutput", "req_ids", "sampled_token_ids"),
        ),
    ),
    Internal(
        "wrap_execute_model",
        "v1/worker/gpu_model_runner.py::GPUModelRunner.execute_model, v1/core/sched/output.py",
        _probes(
            lambda: _params(f"{_RUNNER}.execute_model", "scheduler_output"),
            lambda: _fields("vllm.v1.core.sched.output:SchedulerOutput", "finished_req_ids"),
        ),
    ),
    Internal(
        "batch_req_ids",
        "v1/worker/gpu_model_runner.py::GPUModelRunner.input_batch, InputBatch.req_ids",
        _probes(
            lambda: _sets(f"{_RUNNER}.__init__", "input_batch"),
            lambda: _obj(f"{_BATCH}:InputBatch.req_ids"),
        ),
    ),
    Internal(
        "request_state",
        "v1/worker/gpu_model_runner.py::GPUModelRunner.requests, CachedRequestState",
        _probes(
            lambda: _sets(f"{_RUNNER}.__init__", "requests"),
            lambda: _fields(f"{_BATCH}:CachedRequestState", "prompt_token_ids", "lora_request"),
        ),
    ),
    Internal(
        "lm_head_weight",
        "distributed/parallel_state.py::get_tp_group, GroupCoordinator.all_gather",
        _probes(
            lambda: _obj("vllm.distributed:get_tensor_model_parallel_world_size"),
            lambda: _obj("vllm.distributed:get_tp_group"),
            lambda: _params(
                "vllm.distributed.parallel_state:GroupCoordinator.all_gather", "input_", "dim"
            ),
        ),
    ),
)


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def check(vllm_config: Any = None) -> None:
    """Look up every internal of :data:`INTERNALS` in the installed vLLM; with a
    ``VllmConfig``, also refuse the options that take the runner off the code paths SONA
    hooks (``config/vllm.py::VllmConfig.use_v2_model_runner``,
    ``config/scheduler.py::SchedulerConfig.async_scheduling``).

    Raises:
        VllmIncompatible: naming the missing piece, the vLLM source it was expected in and
            the installed vLLM version.
    """
    version = vllm_version()
    for internal in INTERNALS:
        try:
            internal.probe()
        except _Missing as e:
            raise VllmIncompatible(
                f"SONA cannot run on vLLM {version}: {internal.name} relies on "
                f"{internal.source}, and this vLLM lacks {e}. SONA supports vLLM "
                f"{SUPPORTED}.x (integrations/vllm/_compat.py lists what it relies on)"
            ) from None
    if vllm_config is None:
        return
    if getattr(vllm_config, "use_v2_model_runner", False):
        raise VllmIncompatible(
            f"SONA needs vLLM's V1 model runner (v1/worker/gpu_model_runner.py), but this "
            f"launch of vLLM {version} would use Model Runner V2 (v1/worker/gpu/model_runner.py), "
            "which has no input_batch or requests to record from; set "
            "VLLM_USE_V2_MODEL_RUNNER=0"
        )
    if getattr(getattr(vllm_config, "scheduler_config", None), "async_scheduling", False):
        raise VllmIncompatible(
            f"SONA needs synchronous sampled tokens, but this launch of vLLM {version} has "
            "async scheduling on (sample_tokens returns an AsyncModelRunnerOutput, "
            "v1/outputs.py); pass --no-async-scheduling (vllm.LLM: async_scheduling=False)"
        )


__all__ = ["INTERNALS", "Internal", "VllmIncompatible", "check"]
