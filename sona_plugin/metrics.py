"""SONA's Prometheus series, in the process's default registry.

vLLM's OpenAI server mounts that registry on ``/metrics`` (one API server process; with
``--api-server-count > 1`` vLLM switches to multiprocess collection, which these series do
not join), so the series below appear next to vLLM's own without a second endpoint. A
transformers host can expose them with ``prometheus_client.start_http_server``.

Counters only grow; ``/sona/stats`` reads them (and a few in-memory numbers), never the
disk. Without ``prometheus_client`` installed every call here is a no-op.

* ``sona_feedback_total{outcome}``: accepted, duplicate, unknown, invalid,
  rate_limited, too_large, forwarded (to the replica that generated the response, which
  counts it as accepted);
* ``sona_feedback_liked_total``: accepted feedback with reward > 0 (liked-rate =
  liked / accepted);
* ``sona_instant_updates_total{outcome}``: accepted, refused (by the MicroLoRA's checks);
* ``sona_cycles_total{outcome}``: published, refused, skipped, failed;
* ``sona_gate_refusals_total{check}``: one per failed gate check of a refused point;
* ``sona_served_version``: the BaseLoRA version base-model requests get (0: none);
* ``sona_swap_seconds``: load + verify + switch of one adapter version;
* ``sona_swaps_total{outcome}``: ok, refused (the engine did not serve the
  version's weights: undone);
* ``sona_recorder_evictions``: recordings evicted before feedback came (per worker
  total, as last reported).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

try:
    import prometheus_client as _prom
except ImportError:  # pragma: no cover - prometheus_client comes with vLLM and fastapi
    _prom = None

FEEDBACK_OUTCOMES = ("accepted", "duplicate", "unknown", "invalid", "rate_limited", "too_large")
CYCLE_OUTCOMES = ("published", "refused", "skipped", "failed")


class _Series:
    """The series, created once per process (a registry refuses duplicates)."""

    def __init__(self) -> None:
        self.local: Counter = Counter()  # the same numbers, for /sona/stats
        self.gauges: dict[str, float] = {}
        self._lock = threading.Lock()
        if _prom is None:
            self.prom = None
            return
        self.prom = {
            "feedback": _prom.Counter("sona_feedback", "feedback requests by outcome", ["outcome"]),
            "liked": _prom.Counter("sona_feedback_liked", "accepted feedback with reward > 0"),
            "instant": _prom.Counter(
                "sona_instant_updates", "instant (MicroLoRA) updates", ["outcome"]
            ),
            "cycles": _prom.Counter("sona_cycles", "loop-B cycles by outcome", ["outcome"]),
            "gate": _prom.Counter("sona_gate_refusals", "failed gate checks", ["check"]),
            "swaps": _prom.Counter("sona_swaps", "adapter swaps by outcome", ["outcome"]),
            "served": _prom.Gauge("sona_served_version", "BaseLoRA version served (0: none)"),
            "evictions": _prom.Gauge(
                "sona_recorder_evictions", "recordings evicted before feedback"
            ),
            "swap_s": _prom.Histogram(
                "sona_swap_seconds",
                "load, verify and switch one adapter version",
                buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            ),
        }

    def inc(self, name: str, label: str | None = None, n: float = 1.0) -> None:
        with self._lock:
            self.local[(name, label)] += n
        if self.prom is not None:
            m = self.prom[name]
            (m.labels(label) if label is not None else m).inc(n)

    def set(self, name: str, value: float) -> None:
        self.gauges[name] = float(value)
        if self.prom is not None:
            self.prom[name].set(value)

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self.local[(name + "_count", None)] += 1
            self.local[(name + "_sum", None)] += value
        if self.prom is not None:
            self.prom[name].observe(value)

    def snapshot(self) -> dict[str, Any]:
        """The process's totals since start, for ``/sona/stats``."""
        with self._lock:
            out: dict[str, Any] = {}
            for (name, label), v in self.local.items():
                if label is None:
                    out[name] = v
                else:
                    out.setdefault(name, {})[label] = v
        out.update(self.gauges)
        return out


SERIES = _Series()


def feedback(outcome: str, reward: float | None = None) -> None:
    SERIES.inc("feedback", outcome)
    if outcome == "accepted" and reward is not None and reward > 0:
        SERIES.inc("liked")


def instant(accepted: bool) -> None:
    SERIES.inc("instant", "accepted" if accepted else "refused")


def cycle(report: dict | None, failed: bool = False) -> None:
    """Count one loop-B cycle from its report (and its gate's failed checks)."""
    if failed or report is None:
        SERIES.inc("cycles", "failed")
        return
    if report.get("published"):
        SERIES.inc("cycles", "published")
    elif report.get("skipped"):
        SERIES.inc("cycles", "skipped")
    else:
        SERIES.inc("cycles", "refused")
    for point in (report.get("gate") or {}).get("tried", []):
        if not point.get("passed"):
            for check in point.get("failed", []) or []:
                SERIES.inc("gate", check)


def swap(seconds: float, ok: bool, version: int | None) -> None:
    SERIES.inc("swaps", "ok" if ok else "refused")
    SERIES.observe("swap_s", seconds)
    if ok:
        SERIES.set("served", version or 0)


def evictions(n: int) -> None:
    SERIES.set("evictions", n)


def snapshot() -> dict[str, Any]:
    return SERIES.snapshot()
