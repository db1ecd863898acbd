"""The front-end side of SONA on vLLM: feedback, store, loop B/C, adapters.

vLLM runs the model in worker processes; SONA's per-request recordings and MicroLoRA
live there (``worker.py``). :class:`VllmHost` lives in the process that talks to the
engine (the OpenAI server's front end, or the process holding ``vllm.LLM``) and reaches
the workers through ``rpc(method, *args)`` (vLLM's ``collective_rpc``; the result of
rank 0 is used, every rank applies the same update). It owns the durable feedback store,
the pattern bank, the background trainer (``sona_plugin.learner``, on a private Hugging
Face copy of the model) and the adapter registry; ``serve(version, path)`` makes a published
version what requests for the served model get (``server.py``, ``__init__.py``).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sona_plugin.config import HostConfig, SonaConfig, _snake
from sona_plugin.errors import (
    ConfigError,
    DuplicateFeedback,
    InvalidValue,
    TenantLimit,
    UnknownResponse,
)
from sona_plugin.faults import failpoint
from sona_plugin.rerank import recorded_hidden

from .._host import (
    LM_DEFAULTS,
    FeedbackResult,
    LearningHost,
    Turns,
    load_engine,
    parse_reward,
)

if TYPE_CHECKING:
    from sona_plugin.micro_lora import MicroLoRA

logger = logging.getLogger(__name__)

# the launch config's host options (HostConfig's fields) -> their documentation
HOST_OPTIONS = HostConfig.help()
SCHEDULES = HostConfig.__dataclass_fields__["schedule"].metadata["choices"]


def split_settings(settings: dict | None) -> tuple[dict, dict]:
    """(SonaConfig fields, host options) from the ``sona`` launch config; names the bad key.

    The host options are :class:`~sona_plugin.config.HostConfig`'s fields, given flat
    (``"save_every": 10``) or nested (``"host": {"save_every": 10}``; keys apply in order,
    a later one winning); they come back flat, as given. Everything else must build a
    :class:`~sona_plugin.config.SonaConfig` (flat names or the nested form).
    """
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        raise ConfigError(f"the sona config must be a JSON object, got {settings!r}")
    engine: dict = {}
    opts: dict = {}
    for k, v in settings.items():
        if k == "host":
            if not isinstance(v, dict):
                raise ConfigError(f"host must be a JSON object of host options, got {v!r}")
            opts.update(v)
        elif _snake(k) in HOST_OPTIONS or _snake(k) == "admin_token":
            opts[k] = v
        else:
            engine[k] = v
    HostConfig.from_dict(opts)  # raise now, naming the bad option
    try:
        engine_config(engine)  # raise now, naming the bad field
    except ConfigError as e:
        raise ConfigError(
            f"{e} (sona options are SonaConfig fields or one of {sorted(HOST_OPTIONS)})"
        ) from None
    return engine, opts


def engine_config(engine: dict) -> SonaConfig:
    """The SonaConfig of the engine fields of a launch config, over the LM defaults."""
    return SonaConfig.from_dict({**LM_DEFAULTS, **engine})


def admin_token(opts: HostConfig | dict) -> str | None:
    """The admin token: the file named by ``admin_token_file``, else $SONA_ADMIN_TOKEN."""
    path = opts.admin_token_file if isinstance(opts, HostConfig) else opts.get("admin_token_file")
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as e:
            raise ConfigError(f"admin_token_file {path!r} cannot be read: {e}") from None
        if not token:
            raise ConfigError(f"admin_token_file {path!r} is empty")
        return token
    return os.environ.get("SONA_ADMIN_TOKEN") or None


TENANT_NAME = re.compile(r"[a-z0-9_]{1,32}")


def check_tenant(tenant: object) -> str:
    """``tenant`` if it is a tenant name (1-32 of ``a-z 0-9 _``), else InvalidValue."""
    if not isinstance(tenant, str) or not TENANT_NAME.fullmatch(tenant):
        raise InvalidValue(f"tenant must be 1-32 characters of a-z, 0-9 and _, got {tenant!r}")
    return tenant


def _is_postgres(url: object) -> bool:
    return isinstance(url, str) and url.split(":", 1)[0] in ("postgresql", "postgres")


def tenant_store_url(url: str, tenant: str) -> str:
    """``url`` with its tables in schema ``sona_t_{tenant}`` of the same database (created
    here if missing): each tenant's feedback and instant log apart, one server to run."""
    import psycopg

    schema = f"sona_t_{check_tenant(tenant)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


def _user_text(prompt: str) -> str:
    """The last user turn of a chat-templated prompt (what the embedder should see)."""
    marker = "<|im_start|>user"
    if marker in prompt:
        tail = prompt.rsplit(marker, 1)[1]
        return tail.split("<|im_end|>", 1)[0].strip()
    return prompt


class VllmHost(LearningHost):
    """Feedback, store and loop B/C for one vLLM engine (see the module docstring)."""

    def __init__(
        self,
        *,
        model_source: str | Path,
        settings: dict | None,
        rpc: Callable[..., Any],
        serve: Callable[..., float | None],
        generate_ids: Callable[[list[list[int]], int], list[list[int]]] | None = None,
        tenant: str = "",
        root: VllmHost | None = None,
    ):
        from transformers import AutoTokenizer

        from sona_plugin.adapters import AdapterRegistry
        from sona_plugin.models import sona_home
        from sona_plugin.store import open_store

        engine_cfg, opts = split_settings(settings)
        self.settings = settings
        self.options = opts  # as given
        self.host_config = host = HostConfig.from_dict(opts)  # with the defaults
        self.tenant = tenant
        self._lines: dict[str, VllmHost] = {}  # tenant -> its host (root only)
        self._lines_lock = threading.Lock()
        self._raw_rpc = rpc
        self._raw_serve = serve
        self._generate_ids = generate_ids
        self.model_source = Path(model_source)
        self.lora_targets = host.lora_targets
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_source))
        worker_cfg = {**LM_DEFAULTS, **engine_cfg}
        info = rpc("sona_install", worker_cfg, host.max_recordings, tenant)
        cfg = {
            "embedding_dim": 384,
            **worker_cfg,
            "hidden_dim": int(info["hidden_dim"]),
            "host": host.to_dict(),  # the engine's config says what ran
        }
        base_state = Path(host.state_dir or sona_home() / "state")
        self.state_dir = base_state / "tenants" / tenant if tenant else base_state
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # a restart keeps what was learned: patterns here, the MicroLoRA in the workers
        self.engine = load_engine(self.state_dir / "engine", SonaConfig.from_dict(cfg))
        m = self.engine.micro_lora  # float32 -> Python floats -> float32: bit-identical
        self._rpc("sona_set_micro", m.A.tolist(), m.B.tolist())
        url = host.store_url or self.engine.config.database_url
        if tenant:  # its own store: a schema of the PostgreSQL database, or its own SQLite
            url = tenant_store_url(url, tenant) if _is_postgres(url) else None
        self.store = open_store(url or self.state_dir / "sona.db")
        registry = Path(host.registry_dir) if host.registry_dir else base_state / "adapters"
        self.registry = AdapterRegistry(registry / "tenants" / tenant if tenant else registry)
        if tenant:
            self.lease_name = f"{self.lease_name}:{tenant}"
            self.training_turns = root.training_turns
        elif host.tenants != "off":
            self.training_turns = Turns()
        self._version: int | None = None
        self.save_every = host.save_every
        self.save_interval_s = float(host.save_interval_s)
        self.keep_versions = host.keep_versions
        self.retain_days = float(host.retain_days)
        self._feedback_lock = threading.Lock()
        self._serve_at_start()
        self._start_ranker(self._base_hidden)
        self._start_learner()
        self._start_replica()

    @functools.cached_property
    def _base_model(self) -> Any:
        """The base model in transformers (float32): what a restart computes the features
        of judgements stored after the ranker's last save with; loaded on first use."""
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(self.model_source), dtype=torch.float32)

    def _base_hidden(self, prompt_ids: list[int], response_ids: list[int]) -> np.ndarray:
        return recorded_hidden(self._base_model, prompt_ids, response_ids)

    def _rpc(self, method: str, *args: Any) -> Any:
        """A worker call for this host's tenant (every tenant-aware ``sona_*`` method takes
        the tenant as its last argument)."""
        return self._raw_rpc(method, *args, self.tenant)

    # -- tenants ----------------------------------------------------------------------------
    def line(self, tenant: str) -> VllmHost:
        """The host of ``tenant`` (made on first use: its MicroLoRA in the workers, its own
        store, adapter versions, learner, trainer lease); ``""`` is this host.

        Raises:
            InvalidValue: not a tenant name (1-32 of ``a-z 0-9 _``).
            TenantLimit: ``max_tenants`` tenants are held already.
        """
        if not tenant:
            return self
        with self._lines_lock:
            h = self._lines.get(tenant)
            if h is not None:
                return h
            check_tenant(tenant)
            if len(self._lines) + 1 >= self.host_config.max_tenants:
                raise TenantLimit(
                    f"tenant {tenant!r} refused: this server holds its limit of "
                    f"{self.host_config.max_tenants} tenants (max_tenants)"
                )
            h = VllmHost(
                model_source=self.model_source,
                settings=self.settings,
                rpc=self._raw_rpc,
                serve=functools.partial(self._raw_serve, tenant=tenant),
                generate_ids=self._generate_ids,
                tenant=tenant,
                root=self,
            )
            self._lines[tenant] = h
        logger.info("tenant %r: state in %s", tenant, h.state_dir)
        if self._coordinator is not None and self._coordinator.running:
            h.start_background()
        return h

    def lines(self) -> list[VllmHost]:
        """This host and its tenants' hosts."""
        with self._lines_lock:
            return [self, *self._lines.values()]

    # -- LearningHost ---------------------------------------------------------------------
    @property
    def adapter_version(self) -> int | None:
        """The BaseLoRA version requests for the served model now get (None: none)."""
        return self._version

    def _serve(self, version: int) -> float | None:
        v = self.registry.get(version)
        err = self._raw_serve(version, v.path)
        self._version = version
        return err

    def _shrink_micro(self, factor: float) -> None:
        self._rpc("sona_decay", factor)
        self.micro_lora()  # the mirror follows

    def _apply_norm_cap(self, cap: float) -> None:
        self._rpc("sona_set_norm_cap", cap)
        self.engine.micro_lora.norm_cap = float(cap)

    def sample_answers(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        if self._generate_ids is None:
            raise NotImplementedError("dreams need an offline engine (SonaLLM)")
        return self._generate_ids(prompt_ids, max_new_tokens)

    def _has_recording(self, response_id: str, index: int) -> bool:
        return self._rpc("sona_lookup", response_id, index) is not None

    def _set_micro_arrays(self, A: np.ndarray, B: np.ndarray) -> None:
        self._rpc("sona_set_micro", A.tolist(), B.tolist())
        self._mirror_micro(A, B)

    def _take_forward(self, f: Any) -> dict:
        return dict(self.feedback(f.response_id, f.reward, index=f.index, store_id=f.store_id))

    def _mirror_micro(self, A: list, B: list) -> None:
        """Keep the front-end engine's MicroLoRA equal to the workers' (float32 -> Python
        float -> float32 is exact): a save, even at shutdown when the engine processes
        may already be gone, needs no RPC."""
        import numpy as np

        with self._save_lock:
            m = self.engine.micro_lora
            m.A[...] = np.asarray(A, np.float32)
            m.B[...] = np.asarray(B, np.float32)

    # -- feedback -------------------------------------------------------------------------
    def feedback(
        self,
        response_id: str,
        reward: float | None = None,
        *,
        liked: bool | None = None,
        index: int = 0,
        store_id: str | None = None,
    ) -> FeedbackResult:
        """Judge choice ``index`` of the response vLLM returned as ``response_id``.

        The record is durable in the store when this returns, and every worker's
        MicroLoRA has taken the instant update. Policy: one feedback per response (and
        choice); a second raises InvalidValue and changes nothing. ``store_id`` is the
        key kept in the store (default: the id, with ``:index`` for index > 0).
        """
        r = parse_reward(reward, liked)
        if not isinstance(response_id, str) or not response_id:
            raise InvalidValue(f"id must be a non-empty string, got {response_id!r}")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise InvalidValue(f"index must be an integer >= 0, got {index!r}")
        key = store_id or (response_id if index == 0 else f"{response_id}:{index}")
        from sona_plugin import metrics
        from sona_plugin.store import FeedbackRecord

        if self.store.has(key):
            metrics.feedback("duplicate")
            raise DuplicateFeedback(
                f"feedback for response {key} was already given; one feedback per response"
            )
        info = self._rpc("sona_lookup", response_id, index)
        if info is not None and info.get("discarded"):
            metrics.feedback("unknown")
            raise UnknownResponse(
                f"response {response_id!r} (index {index}) was not served: best-of-k "
                f"returned another of its candidates"
            )
        if info is None:
            if self._replica is not None:
                # another replica generated it: it takes the feedback (integrations/_replica.py)
                metrics.feedback("forwarded")
                return FeedbackResult(**self._replica.forward(response_id, index, r, store_id))
            metrics.feedback("unknown")
            raise UnknownResponse(
                f"unknown response id {response_id!r} (index {index}): never generated by "
                f"this server, or evicted after {self.host_config.max_recordings} "
                f"newer requests"
            )
        with self._feedback_lock:
            if self.store.has(key):
                metrics.feedback("duplicate")
                raise DuplicateFeedback(
                    f"feedback for response {key} was already given; one feedback per response"
                )
            prompt = self.tokenizer.decode(info["prompt_ids"])
            emb = self.embed([_user_text(prompt)])[0]
            rec = FeedbackRecord(
                response_id=key,
                prompt=prompt,
                prompt_ids=list(info["prompt_ids"]),
                response_ids=list(info["response_ids"]),
                response_text=self.tokenizer.decode(info["response_ids"], skip_special_tokens=True),
                reward=r,
                embedding=emb,
                adapter_version=info["adapter_version"],
            )
            row = self.store.add(rec)  # durable from here on
            failpoint("feedback.stored")
            metrics.feedback("accepted", r)
            if self.ranker is not None:
                try:
                    (f,) = self._rpc("sona_candidates", response_id, [index])
                    if f is not None:
                        self.ranker.add(row, np.asarray(f, np.float32), r)
                except Exception:  # noqa: BLE001 - the record is stored; a restart retakes it
                    logger.exception("the best-of-k reward model did not take feedback %s", row)

            def learn() -> dict | None:
                out = self._rpc("sona_learn", response_id, index, r)
                if out and "A" in out:
                    self._mirror_micro(out["A"], out["B"])
                return out

            learned = self._instant(key, learn)
            instant = (learned or {}).get("instant")
            if instant is not None:
                metrics.instant(bool(instant.get("accepted")))
            if learned and "recordings_dropped" in learned:
                metrics.evictions(learned["recordings_dropped"])
            self._saved_after_feedback()
        return FeedbackResult(
            id=response_id,
            index=index,
            stored_id=row,
            reward=r,
            adapter_version=info["adapter_version"],
            instant=instant,
        )

    def best_of(self, response_id: str, indices: list[int], k: int) -> list[int]:
        """Best-of-k over choices ``indices`` of one response, in blocks of ``k``
        consecutive indices (one per prompt and sequence asked for): the index served of
        each block, the reward model's best. The others are discarded in the workers and
        take no feedback."""
        feats = [
            None if f is None else np.asarray(f, np.float32)
            for f in self._rpc("sona_candidates", response_id, indices)
        ]
        kept, dropped = [], []
        for b in range(0, len(indices), k):
            block = indices[b : b + k]
            i = self.ranker.choose(feats[b : b + k])
            kept.append(block[i])
            dropped.extend(x for j, x in enumerate(block) if j != i)
        self._rpc("sona_discard", response_id, dropped)
        return kept

    # -- the rest -------------------------------------------------------------------------
    def micro_lora(self) -> MicroLoRA:
        """The workers' MicroLoRA (a copy, in the front-end engine's MicroLoRA)."""

        st = self._rpc("sona_micro_state")
        self._mirror_micro(st["A"], st["B"])
        return self.engine.micro_lora

    def export_peft(self, path: str | Path) -> Path:
        """A PEFT adapter directory reproducing the served model's logits: the served
        BaseLoRA plus the workers' MicroLoRA folded into an ``lm_head`` LoRA."""
        from safetensors import safe_open

        from sona_plugin.export import write_peft_export

        W = None
        for f in sorted(self.model_source.glob("*.safetensors")):
            with safe_open(str(f), "pt") as sf:
                for name in ("lm_head.weight", "model.embed_tokens.weight"):
                    if name in sf.keys():  # noqa: SIM118 - safe_open has no __contains__
                        W = sf.get_tensor(name)
                        break
            if W is not None:
                break
        if W is None:
            raise ConfigError(f"no lm_head / embed_tokens weight in {self.model_source}")
        base = self.registry.get(self._version).path if self._version else None
        return write_peft_export(
            Path(path), self.micro_lora(), W.float(), base, str(self.model_source)
        )

    def stats(self) -> dict:
        s = self._rpc("sona_stats")
        s.update(
            {
                "feedback_stored": self.store.count(),
                "adapter_version": self._version,
                "tenant": self.tenant,
            }
        )
        return self._with_learner(s)

    def start_background(self, poll_s: float = 1.0) -> None:
        """Loop B/C in the background, for this host and every tenant's (one cycle at a
        time across tenants, in the order they became due: round-robin)."""
        super().start_background(poll_s)
        with self._lines_lock:
            lines = list(self._lines.values())
        for h in lines:
            h.start_background(poll_s)

    def close(self) -> None:
        with self._lines_lock:
            lines, self._lines = list(self._lines.values()), {}
        for h in lines:
            h.close()
        self.stop_background()
        self._stop_replica()
        self.save_state()
        self.store.close()
