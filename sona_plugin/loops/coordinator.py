"""The coordinator: decides when the background and deep loops run, off the caller's path."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class LoopCoordinator:
    """Schedules loop B (on count, on interval, or forced) and loop C (on count).

    ``tick()`` runs whatever is due, in the calling thread. ``start()`` moves that work to
    one daemon thread; from then on ``tick()`` only wakes it, so no cycle ever runs on a
    caller's path. The thread is cancellable (``stop()``) and observable (``last_error``,
    ``last_result``, ``running``).

    Args:
        pending: number of trajectories waiting for a background cycle.
        run_background: runs one background cycle and returns its result.
        run_deep: runs one deep cycle and returns its result.
        trigger_count: pending count that triggers a background cycle.
        interval_s: a background cycle at most this long after the last one, when anything
            is pending.
        deep_every: trajectories between deep cycles.
    """

    def __init__(self, pending: Callable[[], int], run_background: Callable[[], object],
                 run_deep: Callable[[], object], trigger_count: int, interval_s: float,
                 deep_every: int, poll_s: float = 1.0):
        self._pending, self._run_bg, self._run_deep = pending, run_background, run_deep
        self.trigger_count, self.interval_s, self.deep_every = trigger_count, interval_s, deep_every
        self.poll_s = poll_s
        self.last_background = time.monotonic()
        self.since_deep = 0
        self.last_result: object | None = None
        self.last_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def background_due(self) -> bool:
        n = self._pending()
        if n <= 0:
            return False
        return n >= self.trigger_count or time.monotonic() - self.last_background >= self.interval_s

    def run_due(self) -> str | None:
        """Run what is due now, in this thread; returns a status line or None."""
        with self._lock:
            msgs = []
            if self.background_due():
                n = self._pending()
                res = self._run_bg()
                self.last_background = time.monotonic()
                self.since_deep += n
                self.last_result = res
                msgs.append(f"background: {getattr(res, 'status', res)}")
            if self.since_deep >= self.deep_every:
                res = self._run_deep()
                self.since_deep = 0
                self.last_result = res
                msgs.append("deep cycle done")
            return "; ".join(msgs) or None

    def force_background(self) -> object:
        with self._lock:
            n = self._pending()
            res = self._run_bg()
            self.last_background = time.monotonic()
            self.since_deep += n
            self.last_result = res
            return res

    def tick(self) -> str | None:
        if self.running:
            self._wake.set()
            return None
        return self.run_due()

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="sona-coordinator", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                msg = self.run_due()
                if msg:
                    logger.info("sona coordinator: %s", msg)
            except Exception as e:  # keep the thread alive; the error stays observable
                self.last_error = e
                logger.exception("sona coordinator cycle failed")
