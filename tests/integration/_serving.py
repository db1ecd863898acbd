"""Helpers for the tests that talk to a running `sona serve` over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request


def http_call(
    base: str,
    method: str,
    path: str,
    body=None,
    token: str | None = None,
    raw: bytes | None = None,
    timeout: float = 300,
    headers: dict | None = None,
    send: dict | None = None,
) -> tuple[int, dict]:
    """(status, JSON body) of one request; HTTP errors are returned, not raised. Pass a
    dict as ``headers`` to get the response's headers (lower-case names) in it; ``send``
    adds request headers."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    for k, v in (send or {}).items():
        req.add_header(k, v)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            if headers is not None:
                headers.update({k.lower(): v for k, v in r.headers.items()})
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        if headers is not None:
            headers.update({k.lower(): v for k, v in e.headers.items()})
        return e.code, json.loads(e.read() or b"{}")


def serve_command(port: int, state_dir, token_file, *options: str) -> list[str]:
    """`sona serve` on SmolLM2 as the tests run it: ``--schedule manual``, an admin token
    file, a 1024-token context, two LoRA slots and a 1 GiB KV cache, plus ``options``."""
    return [
        sys.executable,
        "-m",
        "sona_plugin.cli",
        "serve",
        "--port",
        str(port),
        "--state-dir",
        str(state_dir),
        "--schedule",
        "manual",
        "--admin-token-file",
        str(token_file),
        *options,
        "--max-model-len",
        "1024",
        "--max-loras",
        "2",
        "--kv-cache-memory-bytes",
        str(1 << 30),
    ]


def wait_healthy(base: str, proc: subprocess.Popen, seconds: float = 420) -> bool:
    """Poll ``/health`` until it answers 200 (True) or the process exits / time runs out."""
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    return False


def stop(proc: subprocess.Popen, log) -> None:
    """SIGTERM the server, SIGKILL it after a minute, and close its log."""
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
