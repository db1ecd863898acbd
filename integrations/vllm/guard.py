"""What stands between SONA's HTTP routes and a hostile client (no vLLM imports here).

* **Request models** (pydantic, unknown fields refused): every body is read with a size
  cap (:data:`MAX_BODY_BYTES`, 413 beyond it) and validated into one of the models below;
  a 400 names each bad field.
* **Admin access** (:class:`AdminPolicy`): the routes that change what is served, train,
  or read/delete users' feedback need ``Authorization: Bearer <token>`` when a token is
  set (compared in constant time). Without a token they answer only when the server
  binds loopback alone, or when the operator opted out with ``open_admin: true``;
  otherwise 403, whatever the request: a server on ``0.0.0.0`` is never open by accident.
* **Feedback rate** (:class:`RateLimiter`): a token bucket per client — its API key when
  vLLM checks keys (``--api-key``), else its address — 429 with ``Retry-After``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

MAX_BODY_BYTES = 16 * 1024
MAX_ID_CHARS = 256
MAX_INDEX = 1024
MAX_EPOCHS = 10
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "ip6-localhost"}

Reward = Annotated[float, Field(ge=-1.0, le=1.0, allow_inf_nan=False, strict=True)]
ResponseId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FeedbackBody(_Body):
    """``POST /v1/feedback``: one judgement of one choice of one response."""

    id: ResponseId | None = None
    response_id: ResponseId | None = None  # alias of id
    reward: Reward | None = None
    liked: StrictBool | None = None
    index: Annotated[int, Field(ge=0, le=MAX_INDEX)] = 0

    def target(self) -> str:
        rid = self.id if self.id is not None else self.response_id
        if rid is None:
            raise ValueError("missing field 'id' (the id of the completion)")
        return rid


class RollbackBody(_Body):
    """``POST /sona/adapters/rollback``."""

    version: Annotated[int, Field(ge=1)]


class LearnBody(_Body):
    """``POST /sona/learn``: run loop B now."""

    gate: StrictBool = True
    epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] | None = None


class QuarantineBody(_Body):
    """``POST /sona/feedback/{id}/quarantine``."""

    reason: Annotated[str, Field(max_length=500)] = ""


class BadRequest(Exception):
    """A body that is not what the route takes: ``status`` (400 or 413) and a message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def describe(e: ValidationError) -> str:
    """One line naming every bad field and what it must be."""
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"]) or "body"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field '{where}'")
        else:
            parts.append(f"field '{where}': {err['msg']}")
    return "; ".join(parts)


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """Validate a JSON body (already size-capped) into ``model``; BadRequest otherwise."""
    import json

    if not raw.strip():
        raw = b"{}"
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise BadRequest(400, "the body must be a JSON object") from None
    if not isinstance(obj, dict):
        raise BadRequest(400, "the body must be a JSON object")
    if (
        model is FeedbackBody
        and isinstance(obj.get("reward"), float)
        and not math.isfinite(obj["reward"])
    ):
        raise BadRequest(
            400, f"field 'reward' must be a finite number in [-1, 1], got {obj['reward']}"
        )
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise BadRequest(400, describe(e)) from None


async def read_body(request: Any, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (checked on the declared
    length first, then while reading, so a lying or chunked client cannot get past it)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise BadRequest(413, f"body of {declared} bytes is over the {limit}-byte limit")
        except ValueError:
            raise BadRequest(400, f"bad Content-Length {declared!r}") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


class AdminPolicy:
    """Who may call the admin routes (see the module docstring).

    Args:
        token: the admin bearer token (None: no token).
        bind_host: the address the server listens on (None: every interface).
        open_admin: the operator's explicit opt-out: no token needed anywhere.
    """

    def __init__(self, token: str | None, bind_host: str | None, open_admin: bool = False):
        self._token = f"Bearer {token}".encode() if token else None
        self.loopback_only = bind_host in LOOPBACK_HOSTS
        self.open_admin = bool(open_admin)

    @property
    def mode(self) -> str:
        if self._token is not None:
            return "token"
        if self.open_admin:
            return "open (open_admin)"
        return "loopback" if self.loopback_only else "closed"

    def check(self, authorization: str | None) -> tuple[int, str] | None:
        """None when allowed, else (status, message)."""
        if self._token is not None:
            given = (authorization or "").encode()
            if not hmac.compare_digest(given, self._token):
                return 401, "this SONA admin route needs 'Authorization: Bearer <token>'"
            return None
        if self.open_admin or self.loopback_only:
            return None
        return 403, (
            "SONA's admin routes are off: this server listens beyond loopback and "
            "has no admin token. Set $SONA_ADMIN_TOKEN or the 'admin_token_file' "
            "option, bind 127.0.0.1, or opt out with 'open_admin': true"
        )


class RateLimiter:
    """A token bucket per key: ``rate`` tokens a second, at most ``burst`` saved up.
    At most ``max_keys`` buckets are kept (the least recently used go: a client that
    comes back after that starts with a full bucket). ``rate`` 0 turns it off."""

    def __init__(
        self,
        rate: float,
        burst: float,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.rate, self.burst, self.max_keys = float(rate), float(burst), int(max_keys)
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when the request may go ahead, else the seconds until it may."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                wait = 0.0
            else:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        return wait


def client_key(authorization: str | None, client_host: str | None, keys_checked: bool) -> str:
    """The rate limiter's key: the API key (hashed) when vLLM checks keys, else the
    client's address (an unchecked header would let a client pick a fresh bucket)."""
    if keys_checked and authorization:
        return "key:" + hashlib.sha256(authorization.encode()).hexdigest()[:24]
    return f"addr:{client_host or '?'}"
