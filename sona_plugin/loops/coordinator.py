"""The coordinator: decides when the background and deep loops run, off the caller's path."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..errors import ConfigError

logger = logging.getLogger(__name__)


class _Health:
    """Outcome counters and backoff of one loop (background or deep).

    After the k-th consecutive failure the next attempt waits
    ``min(max_s, base_s * 2**(k-1))``; a success resets the wait to 0.
    """

    def __init__(self, name: str, base_s: float, max_s: float):
        self.name, self.base_s, self.max_s = name, base_s, max_s
        self.ok = 0
        self.failed = 0
        self.consecutive = 0
        self.backoff_s = 0.0
        self.next_at: float | None = None  # coordinator clock; None: no wait
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # wall clock (time.time())
        self.last_success_at: float | None = None  # wall clock (time.time())

    def waiting(self, now: float) -> bool:
        return self.next_at is not None and now < self.next_at

    def succeeded(self) -> None:
        self.ok += 1
        self.consecutive = 0
        self.backoff_s = 0.0
        self.next_at = None
        self.last_success_at = time.time()

    def failed_with(self, error: BaseException, now: float) -> None:
        self.failed += 1
        self.consecutive += 1
        # the exponent is capped so a failure streak of days cannot overflow the float
        self.backoff_s = min(self.max_s, self.base_s * 2.0 ** min(self.consecutive - 1, 64))
        self.next_at = now + self.backoff_s
        self.last_error = f"{type(error).__name__}: {error}"
        self.last_error_at = time.time()

    def next_attempt_in(self, now: float) -> float:
        return max(0.0, self.next_at - now) if self.next_at is not None else 0.0


class LoopCoordinator:
    """Schedules loop B (on count, on interval, or forced) and loop C (on count).

    ``tick()`` runs whatever is due, in the calling thread. ``start()`` moves that work to
    one daemon thread; from then on ``tick()`` only wakes it, so no cycle ever runs on a
    caller's path. The thread is cancellable (``stop()``) and observable (``stats()``,
    ``last_error``, ``last_result``, ``running``).

    A failed cycle is not retried on the next poll: after the k-th consecutive failure of a
    loop its next scheduled attempt waits ``min(max_backoff_s, base_backoff_s * 2**(k-1))``
    (5, 10, 20, ... s with the defaults, up to 10 min); a success resets the wait. Loop B
    and loop C back off independently. ``force_background()`` ignores the wait. An error
    of a cycle run by ``run_due()``/``tick()`` in the caller's thread still propagates to
    the caller, after it has been counted.

    Args:
        pending: number of trajectories waiting for a background cycle.
        run_background: runs one background cycle and returns its result.
        run_deep: runs one deep cycle and returns its result.
        trigger_count: pending count that triggers a background cycle.
        interval_s: a background cycle at most this long after the last one, when anything
            is pending.
        deep_every: trajectories between deep cycles.
        poll_s: how often the background thread checks what is due.
        base_backoff_s: wait after the first of consecutive failures (>= 0; 0 retries at
            once, as before backoff existed).
        max_backoff_s: the longest wait between attempts (>= ``base_backoff_s``).
        clock: monotonic seconds for scheduling and backoff; injectable for tests.
        check_due, run_check: a light check between background cycles (the MicroLoRA's
            drift check): run when ``check_due()`` and no background cycle is due. A
            failure is logged and counted (``check_failures``), never retried early.
    """

    def __init__(
        self,
        pending: Callable[[], int],
        run_background: Callable[[], object],
        run_deep: Callable[[], object],
        trigger_count: int,
        interval_s: float,
        deep_every: int,
        poll_s: float = 1.0,
        base_backoff_s: float = 5.0,
        max_backoff_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        check_due: Callable[[], bool] | None = None,
        run_check: Callable[[], object] | None = None,
    ):
        if not base_backoff_s >= 0:  # also refuses NaN
            raise ConfigError(f"base_backoff_s must be >= 0, got {base_backoff_s}")
        if not max_backoff_s >= base_backoff_s:
            raise ConfigError(
                f"max_backoff_s must be >= base_backoff_s ({base_backoff_s}), got {max_backoff_s}"
            )
        self._pending, self._run_bg, self._run_deep = pending, run_background, run_deep
        self._check_due, self._run_check = check_due, run_check
        self.checks = self.check_failures = 0
        self.trigger_count, self.interval_s, self.deep_every = trigger_count, interval_s, deep_every
        self.poll_s = poll_s
        self._clock = clock
        self.last_background = clock()
        self.since_deep = 0
        self.last_result: object | None = None
        self.last_error: BaseException | None = None
        self._bg = _Health("background", base_backoff_s, max_backoff_s)
        self._deep = _Health("deep", base_backoff_s, max_backoff_s)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # held for a whole cycle
        self._state_lock = threading.Lock()  # counters only, so stats() never waits on a cycle

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def background_due(self) -> bool:
        """True when a background cycle should run now (False while backing off)."""
        with self._state_lock:
            if self._bg.waiting(self._clock()):
                return False
        n = self._pending()
        if n <= 0:
            return False
        return n >= self.trigger_count or self._clock() - self.last_background >= self.interval_s

    def run_due(self) -> str | None:
        """Run what is due now, in this thread; returns a status line or None.

        Raises:
            Exception: whatever a cycle raised (or ``pending`` raised while checking what
                is due), after it was counted and its loop's backoff started.
        """
        with self._lock:
            msgs = []
            try:
                if self.background_due():
                    n = self._pending()
                    res = self._run_bg()
                    self._background_done(n, res)
                    msgs.append(f"background: {getattr(res, 'status', res)}")
            except Exception as e:
                self._record_failure(self._bg, e)
                raise
            if not msgs and self._run_check is not None:
                try:
                    if self._check_due():
                        self._run_check()
                        self.checks += 1
                        msgs.append("check done")
                except Exception as e:  # the next due check tries again
                    self.check_failures += 1
                    logger.error("check between cycles failed: %s", e)
            with self._state_lock:
                deep_waiting = self._deep.waiting(self._clock())
            if self.since_deep >= self.deep_every and not deep_waiting:
                try:
                    res = self._run_deep()
                except Exception as e:
                    self._record_failure(self._deep, e)
                    raise
                self.since_deep = 0
                self.last_result = res
                with self._state_lock:
                    self._deep.succeeded()
                msgs.append("deep cycle done")
            return "; ".join(msgs) or None

    def force_background(self) -> object:
        """Run a background cycle now, whatever the schedule or backoff (an operator's
        request); a failure is counted and re-raised, a success resets the backoff."""
        with self._lock:
            try:
                n = self._pending()
                res = self._run_bg()
            except Exception as e:
                self._record_failure(self._bg, e)
                raise
            self._background_done(n, res)
            return res

    def stats(self) -> dict:
        """Health of the loops, JSON-serialisable.

        ``backoff_s`` is the current wait after the latest failure (0 when healthy) and
        ``next_attempt_in_s`` what is left of it; ``last_error`` is ``"Type: message"``;
        ``*_at`` are wall-clock epoch seconds. The ``deep_*`` keys are the same for loop C;
        ``last_error`` is the latest of either loop.
        """
        with self._state_lock:
            now = self._clock()
            bg, dp = self._bg, self._deep
            last = max(
                (h for h in (bg, dp) if h.last_error_at is not None),
                key=lambda h: h.last_error_at,
                default=None,
            )
            return {
                "cycles_ok": bg.ok,
                "cycles_failed": bg.failed,
                "consecutive_failures": bg.consecutive,
                "last_error": last.last_error if last else None,
                "last_error_at": last.last_error_at if last else None,
                "backoff_s": bg.backoff_s,
                "next_attempt_in_s": bg.next_attempt_in(now),
                "running": self.running,
                "last_success_at": bg.last_success_at,
                "checks": self.checks,
                "check_failures": self.check_failures,
                "deep_ok": dp.ok,
                "deep_failed": dp.failed,
                "deep_consecutive_failures": dp.consecutive,
                "deep_backoff_s": dp.backoff_s,
                "deep_next_attempt_in_s": dp.next_attempt_in(now),
                "deep_last_success_at": dp.last_success_at,
            }

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

    def stop(self, timeout: float | None = 10.0) -> bool:
        """Stop the thread, waiting up to ``timeout`` s for a cycle in progress; returns
        whether the thread has ended (False: a cycle was still running)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self._thread = None
        return thread is None or not thread.is_alive()

    def _background_done(self, n: int, res: object) -> None:
        self.last_background = self._clock()
        self.since_deep += n
        self.last_result = res
        with self._state_lock:
            self._bg.succeeded()

    def _record_failure(self, health: _Health, error: Exception) -> None:
        """Count ``error`` and start the backoff; call from the ``except`` that caught it."""
        self.last_error = error
        with self._state_lock:
            health.failed_with(error, self._clock())
            k, wait, text = health.consecutive, health.backoff_s, health.last_error
        # one traceback per failure streak; the retries of the same fault say only its text
        if k == 1:
            logger.exception(
                "sona coordinator: %s cycle failed; next attempt in %.1f s", health.name, wait
            )
        else:
            logger.warning(
                "sona coordinator: %s cycle failed again (%d in a row): %s; next attempt in %.1f s",
                health.name,
                k,
                text,
                wait,
            )

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
                if e is not self.last_error:  # a cycle's error is already counted and logged
                    self.last_error = e
                    logger.exception("sona coordinator failed")
