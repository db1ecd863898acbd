"""LoopCoordinator: a failing cycle backs off instead of retrying every poll, and says so."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from sona_plugin.errors import ConfigError
from sona_plugin.loops.coordinator import LoopCoordinator


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, s: float) -> None:
        self.now += s


class Cycle:
    """A cycle that fails while ``fail`` is set, counting its calls."""

    def __init__(self, fail: BaseException | None = None, result: object = "ok"):
        self.fail, self.result, self.calls = fail, result, 0

    def __call__(self) -> object:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return self.result


def make(
    bg: Cycle,
    deep: Cycle | None = None,
    clock: FakeClock | None = None,
    pending=5,
    deep_every=1000,
    **kw,
) -> LoopCoordinator:
    return LoopCoordinator(
        pending=pending if callable(pending) else (lambda: pending),
        run_background=bg,
        run_deep=deep or Cycle(),
        trigger_count=1,
        interval_s=60.0,
        deep_every=deep_every,
        clock=clock or FakeClock(),
        **kw,
    )


def wait_for(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.005)
    return pred()


def test_failed_cycle_is_not_retried_until_the_backoff_passed():
    clock, bg = FakeClock(), Cycle(fail=OSError("disk full"))
    coord = make(bg, clock=clock)
    with pytest.raises(OSError, match="disk full"):  # run in the caller: the error reaches it
        coord.run_due()
    assert bg.calls == 1
    assert not coord.background_due()
    assert coord.run_due() is None and bg.calls == 1  # the next poll does not retry
    clock.advance(4.9)
    assert coord.run_due() is None and bg.calls == 1
    clock.advance(0.1)
    assert coord.background_due()
    with pytest.raises(OSError):
        coord.tick()  # no thread: tick runs in the caller and the error propagates too
    assert bg.calls == 2
    assert coord.stats()["cycles_failed"] == 2


def test_waits_double_up_to_the_max():
    clock, bg = FakeClock(), Cycle(fail=RuntimeError("corrupt database"))
    coord = make(bg, clock=clock, base_backoff_s=5.0, max_backoff_s=30.0)
    waits = []
    for _ in range(6):
        with pytest.raises(RuntimeError):
            coord.run_due()
        s = coord.stats()
        assert s["next_attempt_in_s"] == s["backoff_s"]
        waits.append(s["backoff_s"])
        clock.advance(s["backoff_s"] - 0.5)
        assert not coord.background_due()
        clock.advance(0.5)
    assert waits == [5.0, 10.0, 20.0, 30.0, 30.0, 30.0]
    assert bg.calls == 6


def test_default_backoff_is_5_s_doubling_to_600_s():
    clock, bg = FakeClock(), Cycle(fail=RuntimeError("x"))
    coord = make(bg, clock=clock)
    waits = []
    for _ in range(10):
        with pytest.raises(RuntimeError):
            coord.run_due()
        waits.append(coord.stats()["backoff_s"])
        clock.advance(waits[-1])
    assert waits == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 600.0, 600.0, 600.0]


def test_success_resets_the_backoff():
    clock, bg = FakeClock(), Cycle(fail=RuntimeError("flaky"))
    coord = make(bg, clock=clock)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            coord.run_due()
        clock.advance(coord.stats()["backoff_s"])
    bg.fail = None
    assert coord.run_due() == "background: ok"
    s = coord.stats()
    assert (s["consecutive_failures"], s["backoff_s"], s["next_attempt_in_s"]) == (0, 0.0, 0.0)
    assert coord.background_due()  # healthy again: the schedule alone decides
    bg.fail = RuntimeError("flaky")
    with pytest.raises(RuntimeError):
        coord.run_due()
    assert coord.stats()["backoff_s"] == 5.0  # a new streak starts from the base wait


def test_force_background_ignores_the_backoff_and_its_success_resets_it():
    clock, bg = FakeClock(), Cycle(fail=RuntimeError("disk full"))
    coord = make(bg, clock=clock)
    with pytest.raises(RuntimeError):
        coord.run_due()
    with pytest.raises(RuntimeError):  # an operator's request runs at once, even now
        coord.force_background()
    assert bg.calls == 2
    s = coord.stats()
    assert s["consecutive_failures"] == 2 and s["backoff_s"] == 10.0  # and is counted
    bg.fail = None
    assert coord.force_background() == "ok"  # clock not advanced: still inside the backoff
    s = coord.stats()
    assert (s["consecutive_failures"], s["backoff_s"], s["next_attempt_in_s"]) == (0, 0.0, 0.0)
    assert s["cycles_ok"] == 1
    assert coord.background_due()


def test_stats_fields_and_counts():
    clock, bg = FakeClock(), Cycle()
    coord = make(bg, clock=clock)
    s = coord.stats()
    assert s["cycles_ok"] == s["cycles_failed"] == s["consecutive_failures"] == 0
    assert s["last_error"] is None and s["last_error_at"] is None
    assert s["last_success_at"] is None and s["backoff_s"] == s["next_attempt_in_s"] == 0
    assert s["running"] is False

    coord.run_due()
    bg.fail = ValueError("bad row 7")
    clock.advance(60)
    with pytest.raises(ValueError):
        coord.run_due()
    clock.advance(2)
    s = coord.stats()
    assert (s["cycles_ok"], s["cycles_failed"], s["consecutive_failures"]) == (1, 1, 1)
    assert s["last_error"] == "ValueError: bad row 7"
    assert isinstance(s["last_error_at"], float) and isinstance(s["last_success_at"], float)
    assert s["last_error_at"] >= s["last_success_at"]
    assert s["backoff_s"] == 5.0 and s["next_attempt_in_s"] == pytest.approx(3.0)
    assert json.loads(json.dumps(s)) == s
    assert isinstance(coord.last_error, ValueError)  # the exception itself stays readable


def test_deep_cycle_failures_are_counted_and_back_off_on_their_own():
    clock, bg, deep = FakeClock(), Cycle(), Cycle(fail=RuntimeError("consolidation failed"))
    coord = make(bg, deep, clock=clock, deep_every=5)
    with pytest.raises(RuntimeError, match="consolidation"):
        coord.run_due()
    assert (bg.calls, deep.calls) == (1, 1)
    s = coord.stats()
    assert (s["deep_ok"], s["deep_failed"], s["deep_consecutive_failures"]) == (0, 1, 1)
    assert s["deep_backoff_s"] == 5.0
    assert s["last_error"] == "RuntimeError: consolidation failed"
    assert (s["cycles_ok"], s["consecutive_failures"], s["backoff_s"]) == (1, 0, 0.0)
    clock.advance(60)  # interval passed, deep backoff too: the background cycle still runs
    deep.fail = None
    assert coord.run_due() == "background: ok; deep cycle done"
    s = coord.stats()
    assert (s["deep_ok"], s["deep_consecutive_failures"], s["deep_backoff_s"]) == (1, 0, 0.0)


def test_deep_backoff_holds_the_deep_cycle_not_the_background_one():
    clock, bg, deep = FakeClock(), Cycle(), Cycle(fail=RuntimeError("x"))
    coord = make(bg, deep, clock=clock, deep_every=5)
    with pytest.raises(RuntimeError):
        coord.run_due()
    clock.advance(1)
    assert coord.run_due() == "background: ok"  # deep waits out its backoff
    assert (bg.calls, deep.calls) == (2, 1)


def test_a_failing_pending_count_backs_off_too():
    clock = FakeClock()
    calls = []

    def pending() -> int:
        calls.append(1)
        raise RuntimeError("database disk image is malformed")

    coord = make(Cycle(), clock=clock, pending=pending)
    with pytest.raises(RuntimeError):
        coord.run_due()
    assert coord.run_due() is None and len(calls) == 1  # not asked again while backing off
    assert coord.stats()["consecutive_failures"] == 1


def test_logs_one_traceback_per_failure_streak(caplog):
    clock, bg = FakeClock(), Cycle(fail=OSError("disk full"))
    coord = make(bg, clock=clock)
    with caplog.at_level(logging.INFO, logger="sona_plugin.loops.coordinator"):
        for _ in range(3):
            with pytest.raises(OSError):
                coord.run_due()
            clock.advance(coord.stats()["backoff_s"])
    recs = caplog.records
    assert len(recs) == 3
    assert recs[0].levelno == logging.ERROR and recs[0].exc_info is not None
    assert "5.0 s" in recs[0].getMessage()
    for r, wait in zip(recs[1:], ("10.0 s", "20.0 s")):
        assert r.levelno == logging.WARNING and not r.exc_info
        assert "OSError: disk full" in r.getMessage() and wait in r.getMessage()


def test_thread_keeps_running_after_failures_and_stop_joins_promptly(caplog):
    clock, bg = FakeClock(), Cycle(fail=OSError("disk full"))
    coord = make(bg, clock=clock, poll_s=60.0)  # only tick() wakes it within the test
    with caplog.at_level(logging.INFO, logger="sona_plugin.loops.coordinator"):
        coord.start()
        thread = coord._thread
        try:
            assert coord.tick() is None  # wakes the thread; the caller gets no error
            assert wait_for(lambda: coord.stats()["cycles_failed"] == 1)
            assert coord.running and coord.stats()["running"] is True
            clock.advance(5.0)
            coord.tick()
            assert wait_for(lambda: coord.stats()["cycles_failed"] == 2)
            assert coord.running
            s = coord.stats()
            assert s["consecutive_failures"] == 2 and s["backoff_s"] == 10.0
            bg.fail = None
            clock.advance(10.0)
            coord.tick()
            assert wait_for(lambda: coord.stats()["cycles_ok"] == 1)
            assert coord.stats()["consecutive_failures"] == 0
        finally:
            coord.stop(timeout=5.0)
    assert not thread.is_alive()  # woken out of its 60 s poll, not waited out
    assert not coord.running and coord.stats()["running"] is False
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1  # the thread does not log the counted error a second time


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"base_backoff_s": -1.0}, "base_backoff_s"),
        ({"base_backoff_s": float("nan")}, "base_backoff_s"),
        ({"max_backoff_s": 1.0}, "max_backoff_s"),
    ],
)
def test_bad_backoff_settings_are_refused_naming_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        make(Cycle(), **kw)


def test_zero_base_backoff_retries_on_the_next_poll():
    bg = Cycle(fail=RuntimeError("x"))
    coord = make(bg, base_backoff_s=0.0, max_backoff_s=0.0)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            coord.run_due()
    assert bg.calls == 3 and coord.stats()["consecutive_failures"] == 3


def test_stats_does_not_wait_for_a_running_cycle():
    started, release = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        release.wait(10)
        return "ok"

    coord = make(slow)
    worker = threading.Thread(target=coord.force_background)
    worker.start()
    try:
        assert started.wait(10)
        assert coord.stats()["cycles_ok"] == 0  # answered while the cycle holds its lock
    finally:
        release.set()
        worker.join(10)
    assert coord.stats()["cycles_ok"] == 1


def test_stop_says_whether_the_thread_ended():
    """A host gives its trainer lease up only once no cycle of its own is left running."""
    started, release = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        release.wait(10)
        return "ok"

    coord = make(slow, poll_s=60.0)
    assert coord.stop() is True  # never started
    coord.start()
    thread = coord._thread
    try:
        coord.tick()
        assert started.wait(10)
        assert coord.stop(timeout=0.05) is False  # the cycle outlived the wait
        assert thread.is_alive()
    finally:
        release.set()
        thread.join(10)
    assert coord.stats()["cycles_ok"] == 1
    coord.start()
    assert coord.stop(timeout=5.0) is True


def test_tenants_take_training_turns_in_the_order_they_asked():
    import threading

    from sona_plugin.integrations._host import Turns

    turns, order = Turns(), []
    gate = threading.Event()

    def cycle(name: str) -> None:
        with turns.turn():
            order.append(name)
            if name == "first":
                gate.wait(5)  # the others queue up behind the running cycle

    first = threading.Thread(target=cycle, args=("first",))
    first.start()
    while not order:
        time.sleep(0.001)
    others = []
    for name in ("b", "c", "d"):
        t = threading.Thread(target=cycle, args=(name,))
        t.start()
        others.append(t)
        while len(turns._queue) < len(others) + 1:  # queued in this order
            time.sleep(0.001)
    gate.set()
    for t in [first, *others]:
        t.join(5)
    assert order == ["first", "b", "c", "d"]


def test_the_check_between_cycles_runs_when_due_and_a_failure_is_logged_not_raised(caplog):
    bg, check = Cycle(), Cycle()
    due = {"check": True}
    co = make(bg, pending=lambda: 0, check_due=lambda: due["check"], run_check=check)
    assert co.run_due() == "check done" and check.calls == 1 and bg.calls == 0
    due["check"] = False
    assert co.run_due() is None and check.calls == 1
    co2 = make(bg, pending=5, check_due=lambda: True, run_check=check)
    assert co2.run_due().startswith("background") and check.calls == 1  # a cycle checks too
    check.fail = RuntimeError("trainer copy gone")
    due["check"] = True
    with caplog.at_level(logging.ERROR):
        assert co.run_due() is None
    assert "trainer copy gone" in caplog.text
    s = co.stats()
    assert (s["checks"], s["check_failures"], s["cycles_failed"]) == (1, 1, 0)
