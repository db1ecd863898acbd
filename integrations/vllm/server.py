"""SONA's routes on vLLM's OpenAI-compatible server, and serving the newest adapter.

Routes (added when the launch config has ``sona``, see ``plugin.py``; or by naming
``sona_feedback`` in ``VLLM_PLUGINS``); bodies are validated by the models in
``guard.py`` (unknown fields refused, 16 KiB at most), errors map by class
(``sona_plugin.errors.http_status``):

* ``POST /v1/feedback {"id": ..., "reward": r}`` (or ``"liked": true|false``; ``"index"``
  picks a choice when ``n > 1``): ``id`` is the ``id`` of a completion or chat
  completion. The record is durable and the instant update applied before the answer.
  400 malformed body / bad reward, 404 unknown id, 409 feedback already given, 413 body
  too large, 429 past the client's feedback rate (``Retry-After`` says when to retry).
* ``GET /sona/stats``: counters and in-memory state (never reads the version dirs).
* Admin (``guard.AdminPolicy``: a bearer token, or loopback-only binding, or the explicit
  ``open_admin`` opt-out; 401/403 otherwise): ``GET /sona/adapters``,
  ``POST /sona/adapters/rollback {"version": v}``, ``POST /sona/learn [{"gate": false,
  "epochs": 1}]`` (loop B now), ``GET /sona/feedback?since_id=0&limit=100`` (records,
  text truncated), ``POST /sona/feedback/{id}/quarantine {"reason": ...}`` (never trained
  on again), ``DELETE /sona/feedback/{id}``.

Every response carries ``x-sona-adapter-version``: the BaseLoRA version that answered it
(``0``: the base model), chosen when the request was admitted, so a client that names the
base model still sees which weights answered; the feedback record stores the version the
worker actually ran.

Serving: each promoted BaseLoRA version is loaded under a new immutable name
(``sona-v000007``, never reused for other weights, so no stale prefix-cache blocks), a
canary request checks that the engine serves that version's weights
(``sona_plugin.learner.canary``; a mismatch unloads it and the previous version keeps
serving), and only then do requests that name the served base model get it; older versions
are unloaded once a newer one and its predecessor are in place. On shutdown (SIGTERM) the
host saves the MicroLoRA and the learner's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

# at module level: FastAPI resolves the (string) annotation `Request` in module globals
from fastapi import APIRouter, Request

from . import _compat, guard
from .worker import TENANT_ARG, adapter_name, adapter_version, parse_adapter_name

if TYPE_CHECKING:
    from argparse import Namespace

    from fastapi import FastAPI
    from pydantic import BaseModel
    from starlette.datastructures import State
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
    from vllm.engine.protocol import EngineClient
    from vllm.lora.request import LoRARequest

logger = logging.getLogger(__name__)

VERSION_HEADER = "x-sona-adapter-version"
TENANT_HEADER = "x-sona-tenant"
_current: dict[str, Any] = {}  # tenant -> the LoRARequest its base-model requests get
# per request: the tenant it belongs to ("": the default tenant; set by TenantScope)
_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("sona_tenant", default="")
# per request: which SONA version its adapter choice gave (read by the header middleware)
_answered_by: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "sona_answered_by", default=None
)


def _error(status: int, message: str, kind: str | None = None, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    kinds = {
        400: "BadRequestError",
        401: "Unauthorized",
        403: "Forbidden",
        404: "NotFoundError",
        409: "Conflict",
        413: "PayloadTooLarge",
        429: "TooManyRequests",
        503: "ServiceUnavailable",
    }
    return JSONResponse(
        {"error": {"message": message, "type": kind or kinds.get(status, "Error"), "code": status}},
        status_code=status,
        headers=headers,
    )


def _patch_serving() -> None:
    """Requests for the served base model get the current SONA adapter, and every request
    notes the version it got (for the ``x-sona-adapter-version`` header)."""

    def choose(lora: LoRARequest | None, names_base_model: Callable[[], bool]):
        cur = _current.get(_tenant.get())
        if lora is None and cur is not None and names_base_model():
            lora = cur
        holder = _answered_by.get()
        if holder is not None:
            v = adapter_version(lora)
            holder["version"] = v if v is not None else (0 if lora is None else None)
        return lora

    _compat.wrap_adapter_choice(choose)

    def tag(params: Any) -> None:  # the workers pick the tenant's MicroLoRA by it
        tenant = _tenant.get()
        if tenant and params is not None:
            params.extra_args = {**(params.extra_args or {}), TENANT_ARG: tenant}

    _compat.wrap_sampling_params(tag)


def request_tenant(headers: dict[bytes, bytes], source: str) -> str:
    """The tenant a request names: its ``X-Sona-Tenant`` header (``source`` "header") or
    a digest of its bearer key (``source`` "api_key"); "" (the default tenant) without
    one, or when tenants are off."""
    import hashlib

    if source == "header":
        return headers.get(TENANT_HEADER.encode(), b"").decode("latin-1").strip()
    if source == "api_key":
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() == "bearer" and key.strip():
            return "k" + hashlib.sha256(key.strip().encode()).hexdigest()[:16]
    return ""


class TenantScope:
    """ASGI middleware: the tenant of each request (``request_tenant``), its host made on
    first use (400: not a tenant name, 403: past ``max_tenants``), and set for the
    request's adapter choice, its workers' MicroLoRA and SONA's routes."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        host = getattr(getattr(scope.get("app"), "state", None), "sona", None)
        if scope["type"] != "http" or host is None or host.host_config.tenants == "off":
            return await self.app(scope, receive, send)
        tenant = request_tenant(dict(scope.get("headers") or []), host.host_config.tenants)
        if tenant:
            from sona_plugin.errors import SonaError, http_status

            try:
                await asyncio.to_thread(host.line, tenant)
            except SonaError as e:
                return await _error(http_status(e), str(e))(scope, receive, send)
        token = _tenant.set(tenant)
        try:
            await self.app(scope, receive, send)
        finally:
            _tenant.reset(token)


class VersionHeader:
    """ASGI middleware: adds ``x-sona-adapter-version`` to responses whose request got an
    adapter choice (at response start, so streamed responses carry it too)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        holder: dict = {}
        token = _answered_by.set(holder)

        async def send_with_version(message: Message):
            if message["type"] == "http.response.start" and holder.get("version") is not None:
                message = {
                    **message,
                    "headers": [
                        *message.get("headers", []),
                        (VERSION_HEADER.encode(), str(holder["version"]).encode()),
                    ],
                }
            await send(message)

        try:
            await self.app(scope, receive, send_with_version)
        finally:
            _answered_by.reset(token)


RERANKED_PATHS = ("/v1/chat/completions", "/v1/completions")


class BestOfK:
    """ASGI middleware: best-of-k serving (``rerank.candidates`` k > 1, ``sona_plugin.rerank``).

    A sampled, non-streamed completion or chat completion asks vLLM for k times the
    choices it names (``n``) and returns, of each block of k, the one the tenant's reward
    model scores best. A returned choice keeps the ``index`` vLLM gave it, which is the
    ``index`` its feedback names; the candidates not returned take no feedback (404).
    Streamed and greedy (``temperature`` 0) requests are served as they are.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        root = getattr(getattr(scope.get("app"), "state", None), "sona", None)
        if (
            scope["type"] != "http"
            or root is None
            or scope.get("method") != "POST"
            or scope.get("path") not in RERANKED_PATHS
        ):
            return await self.app(scope, receive, send)
        host = root.line(_tenant.get())  # TenantScope has made it
        k = host.engine.config.rerank.candidates
        if host.ranker is None or k < 2:
            return await self.app(scope, receive, send)
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not _sampled_and_whole(body):
            return await self.app(scope, _replay(raw, receive), send)
        body["n"] = (body.get("n") or 1) * k  # an n of 0 never gets here
        raw = json.dumps(body).encode()
        scope = {**scope, "headers": _with_length(scope.get("headers") or [], len(raw))}
        start: dict | None = None
        chunks: list[bytes] = []

        async def capture(message: Message):
            nonlocal start
            if message["type"] == "http.response.start":
                start = dict(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            else:
                await send(message)

        await self.app(scope, _replay(raw, receive), capture)
        if start is None:
            return
        out = b"".join(chunks)
        if start["status"] == 200:
            out = await asyncio.to_thread(_best_of, host, out, k)
        start["headers"] = _with_length(start.get("headers") or [], len(out))
        await send(start)
        await send({"type": "http.response.body", "body": out, "more_body": False})


def _sampled_and_whole(body: Any) -> bool:
    """Best-of-k applies: a JSON object, not streamed, sampled, ``n`` a small integer."""
    if not isinstance(body, dict) or body.get("stream"):
        return False
    t, n = body.get("temperature"), body.get("n", 1)
    n = 1 if n is None else n
    sampled = t is None or (isinstance(t, (int, float)) and t > 0)
    whole = isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 64
    return sampled and whole and not body.get("use_beam_search")


def _replay(raw: bytes, receive: Receive) -> Receive:
    """A receive that gives the (rewritten) body once, then the client's own messages
    (its disconnect)."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replay


def _with_length(headers: list, length: int) -> list:
    return [(h, v) for h, v in headers if h.lower() != b"content-length"] + [
        (b"content-length", str(length).encode())
    ]


def _best_of(host: Any, out: bytes, k: int) -> bytes:
    """The completion ``out`` with, of each block of k choices, the best-scored only."""
    data = json.loads(out)
    rid, choices = data.get("id"), sorted(data.get("choices") or [], key=lambda c: c["index"])
    if not rid or not choices or len(choices) % k:
        logger.warning("best-of-%d: %d choices, not blocks of k; served whole", k, len(choices))
        return out
    kept = set(host.best_of(rid, [c["index"] for c in choices], k))
    data["choices"] = [c for c in choices if c["index"] in kept]
    return json.dumps(data).encode()


def _shutdown_hook(app: FastAPI) -> None:
    """Save SONA's state when the server shuts down (SIGTERM, Ctrl-C): vLLM never calls a
    plugin's close(), so the lifespan is wrapped."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI):
        async with inner(a) as state:
            try:
                yield state
            finally:
                h = getattr(getattr(a, "state", None), "sona", None)
                if h is not None:
                    try:
                        await asyncio.wait_for(asyncio.to_thread(h.close), 120)
                        logger.info("SONA state saved on shutdown")
                    except Exception:  # noqa: BLE001 - shutdown goes on; the log says why
                        logger.exception("SONA could not save its state on shutdown")

    app.router.lifespan_context = lifespan


class SonaEndpointPlugin:
    """``vllm.endpoint_plugins`` entry: SONA's HTTP routes and its front-end host."""

    name = "sona_feedback"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        from sona_plugin import metrics
        from sona_plugin.errors import SonaError, http_status

        router = APIRouter()

        def host(request: Request):
            """The host of the request's tenant (TenantScope made it)."""
            h = getattr(request.app.state, "sona", None)
            return h.line(_tenant.get()) if h is not None else None

        def admin_denied(request: Request):
            policy = getattr(request.app.state, "sona_admin", None)
            if policy is None:
                return _error(503, "SONA is not ready")
            denied = policy.check(request.headers.get("authorization"))
            return _error(*denied) if denied else None

        async def body(request: Request, model: type[BaseModel]):
            return guard.parse(model, await guard.read_body(request))

        def failure(e: Exception):
            if isinstance(e, guard.BadRequest):
                return _error(e.status, str(e))
            if isinstance(e, SonaError):
                return _error(http_status(e), str(e))
            raise e

        @router.post("/v1/feedback")
        async def feedback(request: Request):
            h = host(request)
            if h is None:
                return _error(503, "SONA is not ready")
            limiter = request.app.state.sona_limiter
            wait = limiter.take(
                guard.client_key(
                    request.headers.get("authorization"),
                    request.client.host if request.client else None,
                    request.app.state.sona_keys_checked,
                )
            )
            if wait > 0:
                metrics.feedback("rate_limited")
                return _error(
                    429,
                    f"feedback rate limit: {limiter.rate:g}/s per client (burst "
                    f"{limiter.burst:g}); retry in {wait:.1f} s",
                    headers={"Retry-After": str(max(1, int(wait + 0.999)))},
                )
            try:
                b = await body(request, guard.FeedbackBody)
                rid = b.target()
            except guard.BadRequest as e:
                metrics.feedback("too_large" if e.status == 413 else "invalid")
                return failure(e)
            except ValueError as e:
                metrics.feedback("invalid")
                return _error(400, str(e))
            try:
                return await asyncio.to_thread(
                    h.feedback, rid, b.reward, liked=b.liked, index=b.index
                )
            except SonaError as e:
                return failure(e)

        @router.get("/sona/stats")
        async def stats(request: Request):
            h = host(request)
            if h is None:
                return _error(503, "SONA is not ready")
            out = await asyncio.to_thread(h.stats)
            out["admin"] = request.app.state.sona_admin.mode
            models = getattr(request.app.state, "openai_serving_models", None)
            if models is not None:
                out["loaded_adapters"] = sorted(
                    n
                    for n in models.lora_requests
                    if (parse_adapter_name(n) or (None,))[0] == _tenant.get()
                )
            return _jsonable(out)

        @router.get("/sona/adapters")
        async def adapters(request: Request):
            if (denied := admin_denied(request)) is not None:
                return denied
            h = host(request)
            return {"served": h.adapter_version, "versions": h.adapters()}

        @router.post("/sona/adapters/rollback")
        async def rollback(request: Request):
            if (denied := admin_denied(request)) is not None:
                return denied
            h = host(request)
            try:
                b = await body(request, guard.RollbackBody)
                await asyncio.to_thread(h.rollback, b.version)
            except (guard.BadRequest, SonaError) as e:
                return failure(e)
            return {"served": h.adapter_version}

        @router.post("/sona/learn")
        async def learn(request: Request):
            if (denied := admin_denied(request)) is not None:
                return denied
            h = host(request)
            try:
                b = await body(request, guard.LearnBody)
                kw = {"gate": b.gate, **({"epochs": b.epochs} if b.epochs else {})}
                return _jsonable(await asyncio.to_thread(h.learn, **kw))
            except (guard.BadRequest, SonaError) as e:
                return failure(e)

        @router.get("/sona/feedback")
        async def list_feedback(
            request: Request, since_id: int = 0, limit: int = 100, include_quarantined: bool = True
        ):
            if (denied := admin_denied(request)) is not None:
                return denied
            try:
                rows = await asyncio.to_thread(
                    host(request).store.list_records, since_id, limit, include_quarantined
                )
            except SonaError as e:
                return failure(e)
            return {"records": rows}

        @router.post("/sona/feedback/{response_id}/quarantine")
        async def quarantine(request: Request, response_id: str):
            if (denied := admin_denied(request)) is not None:
                return denied
            try:
                b = await body(request, guard.QuarantineBody)
                await asyncio.to_thread(host(request).quarantine, response_id, b.reason)
            except (guard.BadRequest, SonaError) as e:
                return failure(e)
            return {"quarantined": response_id}

        @router.delete("/sona/feedback/{response_id}")
        async def delete(request: Request, response_id: str):
            if (denied := admin_denied(request)) is not None:
                return denied
            try:
                await asyncio.to_thread(host(request).delete_record, response_id)
            except SonaError as e:
                return failure(e)
            return {"deleted": response_id}

        app.include_router(router)
        app.add_middleware(BestOfK)  # inside TenantScope: it serves the tenant's reward model
        app.add_middleware(VersionHeader)
        app.add_middleware(TenantScope)  # added last: runs first, VersionHeader sees the tenant
        _shutdown_hook(app)

    async def init_state(
        self, engine_client: EngineClient | None, state: State, args: Namespace
    ) -> None:
        from sona_plugin.learner import canary

        from .host import VllmHost, admin_token
        from .plugin import sona_settings

        if engine_client is None:
            return
        settings = sona_settings(getattr(args, "additional_config", None))
        if settings is None:
            logger.warning(
                "sona_feedback is loaded but the launch config has no 'sona' entry; SONA stays off"
            )
            return
        loop = asyncio.get_running_loop()

        def rpc(method: str, *a):
            fut = asyncio.run_coroutine_threadsafe(
                engine_client.collective_rpc(method, args=a), loop
            )
            return fut.result()[0]

        models = state.openai_serving_models

        async def canary_run(name: str, prompt_ids: list[int]) -> dict | None:
            from vllm import SamplingParams

            rid = f"sona-canary-{uuid.uuid4().hex}"
            async for _ in engine_client.generate(
                {"prompt_token_ids": prompt_ids},
                SamplingParams(max_tokens=1, temperature=0.0),
                rid,
                lora_request=models.lora_requests[name],
            ):
                pass
            return (await engine_client.collective_rpc("sona_take_hidden", args=(rid,)))[0]

        async def serve_async(version: int, path: Path, tenant: str) -> float | None:
            name = adapter_name(version, tenant)
            fresh = name not in models.lora_requests
            if fresh:
                res = await models.load_lora_adapter(
                    _compat.lora_load_request(name, str(path)),
                    base_model_name=models.base_model_paths[0].name,
                )
                if _compat.is_error_response(res):
                    from sona_plugin.errors import SwapRefused

                    raise SwapRefused(f"vLLM refused adapter {name}: {res}")
            err = None
            expected = canary.read(path)
            if expected is not None:
                try:
                    err = canary.check(version, await canary_run(name, expected[0]), expected[1])
                except Exception:
                    if fresh and _current.get(tenant) is not models.lora_requests.get(name):
                        old = models.lora_requests.pop(name)
                        await engine_client.remove_lora(old.lora_int_id)
                    raise
            previous = _current.get(tenant)
            _current[tenant] = models.lora_requests[name]
            keep = {name, getattr(previous, "lora_name", None)}
            for old_name, old in list(models.lora_requests.items()):
                parsed = parse_adapter_name(old_name)
                if parsed and parsed[0] == tenant and old_name not in keep:
                    del models.lora_requests[old_name]
                    await engine_client.remove_lora(old.lora_int_id)
            return err

        def serve(version: int, path: Path, tenant: str = "") -> float | None:
            return asyncio.run_coroutine_threadsafe(
                serve_async(version, path, tenant), loop
            ).result()

        _patch_serving()
        model_dir = getattr(args, "model", None) or models.base_model_paths[0].model_path
        h = await asyncio.to_thread(
            VllmHost, model_source=model_dir, settings=settings, rpc=rpc, serve=serve
        )
        state.sona = h
        opts = h.host_config
        state.sona_admin = guard.AdminPolicy(
            admin_token(opts), getattr(args, "host", None), opts.open_admin
        )
        state.sona_limiter = guard.RateLimiter(opts.feedback_rate, opts.feedback_burst)
        state.sona_keys_checked = bool(
            getattr(args, "api_key", None) or os.environ.get("VLLM_API_KEY")
        )
        if opts.schedule == "background":
            h.start_background()
        logger.info(
            "SONA ready: state in %s, serving adapter version %s, admin routes: %s",
            h.state_dir,
            h.adapter_version,
            state.sona_admin.mode,
        )


def _jsonable(x: Any):
    return json.loads(
        json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    )
