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

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sona_plugin.config import SonaConfig
from sona_plugin.errors import ConfigError, DuplicateFeedback, InvalidValue, UnknownResponse
from sona_plugin.faults import failpoint

from .._host import LM_DEFAULTS, FeedbackResult, LearningHost, load_engine, parse_reward

logger = logging.getLogger(__name__)

# keys of the launch config that are not SonaConfig fields
HOST_OPTIONS = {
    "state_dir": "where the feedback store, adapter versions and engine state live "
    "(default $SONA_HOME/state)",
    "store_url": "feedback store: a SQLite path or sqlite:/// URL, or postgresql://... "
    "(pip install 'sona_plugin[postgres]'); default state_dir/sona.db",
    "schedule": "'background' (loop B/C in a thread on the config's schedule, default) or "
    "'manual' (only POST /sona/learn or learn())",
    "admin_token_file": "file holding the bearer token the admin routes require (default: "
    "$SONA_ADMIN_TOKEN; never the token itself in the config: vLLM logs it)",
    "open_admin": "true: admin routes answer without a token even when the server listens "
    "beyond loopback (default false: then they answer 403)",
    "feedback_rate": "feedback requests a second per client (API key when vLLM checks keys, "
    "else address), token bucket; 0 = no limit (default 10)",
    "feedback_burst": "feedback requests a client may send at once (default 50)",
    "keep_versions": "adapter versions kept on disk; older ones are pruned after each cycle, "
    "never the served one (default 20)",
    "retain_days": "feedback records older than this are deleted after each cycle; 0 = keep "
    "forever (default 90)",
    "save_interval_s": "also save the MicroLoRA this many seconds after an unsaved feedback "
    "(default 60; 0 = only every save_every feedbacks)",
    "save_every": "save the workers' MicroLoRA every this many feedbacks (default 25): a "
    "crash loses at most that many instant updates",
    "max_recordings": "requests a worker keeps recordings of, for feedback (default 1000; "
    "about 150 kB each at 50 steps of a 576-d model); older ones are evicted",
    "lora_targets": "modules the BaseLoRA trains (default q_proj, k_proj, v_proj, o_proj; "
    "never lm_head: vLLM 0.32 leaks an lm_head LoRA into other requests)",
}
SCHEDULES = ("background", "manual")


def split_settings(settings: dict | None) -> tuple[dict, dict]:
    """(SonaConfig fields, host options) from the ``sona`` launch config; names the bad key."""
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        raise ConfigError(f"the sona config must be a JSON object, got {settings!r}")
    engine = {k: v for k, v in settings.items() if k not in HOST_OPTIONS}
    opts = {k: v for k, v in settings.items() if k in HOST_OPTIONS}
    if opts.get("schedule", "background") not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {SCHEDULES}, got {opts['schedule']!r}")
    every = opts.get("save_every", 25)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ConfigError(f"save_every must be an integer >= 0 (0: only on close), got {every!r}")
    max_rec = opts.get("max_recordings", 1000)
    if isinstance(max_rec, bool) or not isinstance(max_rec, int) or max_rec < 1:
        raise ConfigError(f"max_recordings must be an integer >= 1, got {max_rec!r}")
    if "admin_token" in settings:
        raise ConfigError(
            "admin_token: give the admin token in $SONA_ADMIN_TOKEN or a file "
            "named by 'admin_token_file', not in the launch config (vLLM logs the "
            "config and the command line is visible to every user)"
        )
    for key, lo, default in (
        ("feedback_rate", 0.0, 10.0),
        ("feedback_burst", 1.0, 50),
        ("retain_days", 0.0, 90),
        ("save_interval_s", 0.0, 60),
    ):
        v = opts.get(key, default)
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not v >= lo
            or v == float("inf")
        ):
            raise ConfigError(f"{key} must be a finite number >= {lo:g}, got {v!r}")
    keep = opts.get("keep_versions", 20)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ConfigError(f"keep_versions must be an integer >= 1, got {keep!r}")
    if not isinstance(opts.get("open_admin", False), bool):
        raise ConfigError(f"open_admin must be true or false, got {opts['open_admin']!r}")
    tf = opts.get("admin_token_file")
    if tf is not None and not isinstance(tf, str):
        raise ConfigError(f"admin_token_file must be a path, got {tf!r}")
    targets = opts.get("lora_targets")
    if targets is not None and (
        not isinstance(targets, list)
        or not targets
        or "lm_head" in targets
        or "embed_tokens" in targets
    ):
        raise ConfigError(
            "lora_targets must be a non-empty list of attention/MLP module names "
            f"(not lm_head or embed_tokens), got {targets!r}"
        )
    try:
        SonaConfig.from_dict({**LM_DEFAULTS, **engine})  # raise now, naming the bad field
    except ConfigError as e:
        raise ConfigError(
            f"{e} (sona options are SonaConfig fields or one of {sorted(HOST_OPTIONS)})"
        ) from None
    return engine, opts


def admin_token(opts: dict) -> str | None:
    """The admin token: the file named by ``admin_token_file``, else $SONA_ADMIN_TOKEN."""
    path = opts.get("admin_token_file")
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as e:
            raise ConfigError(f"admin_token_file {path!r} cannot be read: {e}") from None
        if not token:
            raise ConfigError(f"admin_token_file {path!r} is empty")
        return token
    return os.environ.get("SONA_ADMIN_TOKEN") or None


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
        serve: Callable[[int, Path], None],
        generate_ids: Callable[[list[list[int]], int], list[list[int]]] | None = None,
    ):
        from transformers import AutoTokenizer

        from sona_plugin.adapters import AdapterRegistry
        from sona_plugin.models import sona_home
        from sona_plugin.store import open_store

        engine_cfg, opts = split_settings(settings)
        self.options = opts
        self._rpc = rpc
        self._serve_path = serve
        self._generate_ids = generate_ids
        self.model_source = Path(model_source)
        self.lora_targets = opts.get("lora_targets")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_source))
        worker_cfg = {**LM_DEFAULTS, **engine_cfg}
        info = rpc("sona_install", worker_cfg, opts.get("max_recordings", 1000))
        cfg = {"embedding_dim": 384, **worker_cfg, "hidden_dim": int(info["hidden_dim"])}
        self.state_dir = Path(opts.get("state_dir") or sona_home() / "state")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # a restart keeps what was learned: patterns here, the MicroLoRA in the workers
        self.engine = load_engine(self.state_dir / "engine", SonaConfig.from_dict(cfg))
        m = self.engine.micro_lora  # float32 -> Python floats -> float32: bit-identical
        rpc("sona_set_micro", m.A.tolist(), m.B.tolist())
        self.store = open_store(
            opts.get("store_url") or engine_cfg.get("database_url") or self.state_dir / "sona.db"
        )
        self.registry = AdapterRegistry(self.state_dir / "adapters")
        self._version: int | None = None
        self.save_every = opts.get("save_every", 25)
        self.save_interval_s = float(opts.get("save_interval_s", 60))
        self.keep_versions = opts.get("keep_versions", 20)
        self.retain_days = float(opts.get("retain_days", 90))
        self._feedback_lock = threading.Lock()
        self._serve_at_start()
        self._start_learner()

    # -- LearningHost ---------------------------------------------------------------------
    @property
    def adapter_version(self) -> int | None:
        """The BaseLoRA version requests for the served model now get (None: none)."""
        return self._version

    def _serve(self, version: int) -> float | None:
        v = self.registry.get(version)
        err = self._serve_path(version, v.path)
        self._version = version
        return err

    def _shrink_micro(self, factor: float) -> None:
        self._rpc("sona_decay", factor)
        self.micro_lora()  # the mirror follows

    def sample_answers(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        if self._generate_ids is None:
            raise NotImplementedError("dreams need an offline engine (SonaLLM)")
        return self._generate_ids(prompt_ids, max_new_tokens)

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

        with self._feedback_lock:
            if self.store.has(key):
                metrics.feedback("duplicate")
                raise DuplicateFeedback(
                    f"feedback for response {key} was already given; one feedback per response"
                )
            info = self._rpc("sona_lookup", response_id, index)
            if info is None:
                metrics.feedback("unknown")
                raise UnknownResponse(
                    f"unknown response id {response_id!r} (index {index}): never generated by "
                    f"this server, or evicted after {self.options.get('max_recordings', 1000)} "
                    f"newer requests"
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
            learned = self._rpc("sona_learn", response_id, index, r)
            instant = (learned or {}).get("instant")
            if instant is not None:
                metrics.instant(bool(instant.get("accepted")))
            if learned and "recordings_dropped" in learned:
                metrics.evictions(learned["recordings_dropped"])
            if learned and "A" in learned:
                self._mirror_micro(learned["A"], learned["B"])
            self._saved_after_feedback()
        return FeedbackResult(
            id=response_id,
            index=index,
            stored_id=row,
            reward=r,
            adapter_version=info["adapter_version"],
            instant=instant,
        )

    # -- the rest -------------------------------------------------------------------------
    def micro_lora(self):
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
        s.update({"feedback_stored": self.store.count(), "adapter_version": self._version})
        return self._with_learner(s)

    def close(self) -> None:
        self.stop_background()
        self.save_state()
        self.store.close()
