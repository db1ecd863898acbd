"""SONA's routes on vLLM's OpenAI-compatible server, and serving the newest adapter.

Routes (added when the launch config has ``sona``, see ``plugin.py``; or by naming
``sona_feedback`` in ``VLLM_PLUGINS``):

* ``POST /v1/feedback {"id": ..., "reward": r}`` (or ``"liked": true|false``; ``"index"``
  picks a choice when ``n > 1``): ``id`` is the ``id`` of a completion or chat
  completion. The record is durable and the instant update applied before the answer.
  400 malformed body / bad reward, 404 unknown id, 409 feedback already given.
* ``GET /sona/stats``.
* ``GET /sona/adapters``, ``POST /sona/adapters/rollback {"version": v}``,
  ``POST /sona/learn [{"gate": false, "epochs": 1}]`` (run loop B now): admin routes; when an admin token is configured
  (``admin_token`` or ``$SONA_ADMIN_TOKEN``) they need ``Authorization: Bearer TOKEN``.

Serving: each promoted BaseLoRA version is loaded under a new immutable name
(``sona-v000007``, never reused for other weights, so no stale prefix-cache blocks), and
requests that name the served base model get it; older versions are unloaded (engine
slot freed) once a newer one and its predecessor are in place.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

# at module level: FastAPI resolves the (string) annotation `Request` in module globals
from fastapi import APIRouter, Request

from .worker import ADAPTER_PREFIX, adapter_name

logger = logging.getLogger(__name__)

_current: dict[str, Any] = {"lora": None}  # the LoRARequest base-model requests get


def _error(status: int, message: str, kind: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "code": status}},
                        status_code=status)


def _patch_serving() -> None:
    """Requests for the served base model get the current SONA adapter."""
    from vllm.entrypoints.serve.engine.serving import BaseServing

    if getattr(BaseServing._maybe_get_adapters, "_sona", False):
        return
    orig = BaseServing._maybe_get_adapters

    def _maybe_get_adapters(self, request, *a, **k):
        lora = orig(self, request, *a, **k)
        cur = _current["lora"]
        model = getattr(request, "model", None)
        if lora is None and cur is not None and (model is None or self.models.is_base_model(model)):
            return cur
        return lora

    _maybe_get_adapters._sona = True
    BaseServing._maybe_get_adapters = _maybe_get_adapters


class SonaEndpointPlugin:
    """``vllm.endpoint_plugins`` entry: SONA's HTTP routes and its front-end host."""

    name = "sona_feedback"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        router = APIRouter()

        def host(request: Request):
            return getattr(request.app.state, "sona", None)

        def admin_denied(request: Request):
            import hmac

            token = getattr(request.app.state, "sona_admin_token", None)
            given = request.headers.get("authorization") or ""
            if token and not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _error(401, "this SONA admin route needs 'Authorization: Bearer <token>'",
                              "Unauthorized")
            return None

        async def body_of(request: Request):
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
                return None, _error(400, "the body must be a JSON object", "BadRequestError")
            if not isinstance(body, dict):
                return None, _error(400, "the body must be a JSON object", "BadRequestError")
            return body, None

        @router.post("/v1/feedback")
        async def feedback(request: Request):
            from sona_plugin.errors import DuplicateFeedback, SonaError, UnknownTrajectory

            h = host(request)
            if h is None:
                return _error(503, "SONA is not ready", "ServiceUnavailable")
            body, err = await body_of(request)
            if err is not None:
                return err
            unknown = set(body) - {"id", "response_id", "reward", "liked", "index"}
            if unknown:
                return _error(400, f"unknown field(s) {sorted(unknown)}; expected id, reward or "
                                   f"liked, and optionally index", "BadRequestError")
            rid = body.get("id", body.get("response_id"))
            if rid is None:
                return _error(400, "missing field 'id' (the id of the completion)",
                              "BadRequestError")
            try:
                out = await asyncio.to_thread(h.feedback, rid, body.get("reward"),
                                              liked=body.get("liked"),
                                              index=body.get("index", 0))
            except UnknownTrajectory as e:
                return _error(404, str(e).strip("'\""), "NotFoundError")
            except DuplicateFeedback as e:
                return _error(409, str(e), "Conflict")
            except SonaError as e:
                return _error(400, str(e), "BadRequestError")
            return out

        @router.get("/sona/stats")
        async def stats(request: Request):
            h = host(request)
            if h is None:
                return _error(503, "SONA is not ready", "ServiceUnavailable")
            out = await asyncio.to_thread(h.stats)
            models = getattr(request.app.state, "openai_serving_models", None)
            if models is not None:
                out["loaded_adapters"] = sorted(n for n in models.lora_requests
                                                if n.startswith(ADAPTER_PREFIX))
            return out

        @router.get("/sona/adapters")
        async def adapters(request: Request):
            denied = admin_denied(request)
            if denied is not None:
                return denied
            h = host(request)
            return {"served": h.adapter_version, "versions": h.adapters()}

        @router.post("/sona/adapters/rollback")
        async def rollback(request: Request):
            from sona_plugin.errors import SonaError

            denied = admin_denied(request)
            if denied is not None:
                return denied
            body, err = await body_of(request)
            if err is not None:
                return err
            v = body.get("version")
            if isinstance(v, bool) or not isinstance(v, int):
                return _error(400, f"'version' must be an integer, got {v!r}", "BadRequestError")
            h = host(request)
            try:
                await asyncio.to_thread(h.rollback, v)
            except SonaError as e:
                return _error(404 if "not found" in str(e) else 400, str(e), "BadRequestError")
            return {"served": h.adapter_version}

        @router.post("/sona/learn")
        async def learn(request: Request):
            denied = admin_denied(request)
            if denied is not None:
                return denied
            body = {}
            if await request.body():
                body, err = await body_of(request)
                if err is not None:
                    return err
            kw = {k: body[k] for k in ("gate", "epochs") if k in body}
            if not isinstance(kw.get("gate", True), bool) or not (
                    isinstance(kw.get("epochs", 1), int) and kw.get("epochs", 1) >= 1):
                return _error(400, "'gate' must be true/false and 'epochs' an integer >= 1",
                              "BadRequestError")
            h = host(request)
            return _jsonable(await asyncio.to_thread(h.learn, **kw))

        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        from .host import VllmHost
        from .plugin import sona_settings

        if engine_client is None:
            return
        settings = sona_settings(getattr(args, "additional_config", None))
        if settings is None:
            logger.warning("sona_feedback is loaded but the launch config has no 'sona' entry; "
                           "SONA stays off")
            return
        loop = asyncio.get_running_loop()

        def rpc(method: str, *a):
            fut = asyncio.run_coroutine_threadsafe(engine_client.collective_rpc(method, args=a),
                                                   loop)
            return fut.result()[0]

        models = state.openai_serving_models

        async def serve_async(version: int, path: Path) -> None:
            from vllm.entrypoints.serve.engine.protocol import ErrorResponse
            from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

            name = adapter_name(version)
            if name not in models.lora_requests:
                res = await models.load_lora_adapter(
                    LoadLoRAAdapterRequest(lora_name=name, lora_path=str(path)),
                    base_model_name=models.base_model_paths[0].name)
                if isinstance(res, ErrorResponse):
                    raise RuntimeError(f"vLLM refused adapter {name}: {res}")
            previous = _current["lora"]
            _current["lora"] = models.lora_requests[name]
            keep = {name, getattr(previous, "lora_name", None)}
            for old_name, old in list(models.lora_requests.items()):
                if old_name.startswith(ADAPTER_PREFIX) and old_name not in keep:
                    del models.lora_requests[old_name]
                    await engine_client.remove_lora(old.lora_int_id)

        def serve(version: int, path: Path) -> None:
            asyncio.run_coroutine_threadsafe(serve_async(version, path), loop).result()

        _patch_serving()
        model_dir = getattr(args, "model", None) or models.base_model_paths[0].model_path
        h = await asyncio.to_thread(VllmHost, model_source=model_dir, settings=settings,
                                    rpc=rpc, serve=serve)
        state.sona = h
        state.sona_admin_token = h.options.get("admin_token") or os.environ.get("SONA_ADMIN_TOKEN")
        if h.options.get("schedule", "background") == "background":
            h.start_background()
        logger.info("SONA ready: state in %s, serving adapter version %s", h.state_dir,
                    h.adapter_version)


def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
