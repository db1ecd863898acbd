"""TrainerLease: one trainer among replicas sharing a PostgreSQL store. One holder at a time,
a release or a killed holder hands the lease over, a dead connection is noticed and
replaced, and a host's loop B runs only on the holder.

Runs against a throwaway server (tests/_postgres.py); skipped, naming what is missing,
where its binaries or psycopg are not installed (CI installs both).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from sona_plugin.store import open_store

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # tests/_postgres.py
import _postgres  # noqa: E402
from _tiny import wait_for  # noqa: E402

try:
    import psycopg

    from sona_plugin.integrations._host import LearningHost
    from sona_plugin.store.leader import (
        NOT_TRAINER,
        TrainerLease,
        lease_for,
        lease_key,
        only_while_leading,
    )
except ImportError:
    psycopg = None


# Generous for a loopback socket, where the handover takes milliseconds: the bound says the
# server freed the lock when the holder's socket closed, not after some timeout.
KILL_HANDOVER_BOUND_S = 5.0


@pytest.fixture
def url(pg_server) -> str:
    """A fresh database: advisory locks are per database, so each test has its own."""
    return pg_server.create_database()


@pytest.fixture
def leases(url):
    made: list[TrainerLease] = []

    def new(name: str = "sona-trainer") -> TrainerLease:
        made.append(TrainerLease(url, name))
        return made[-1]

    yield new
    for lease in made:
        lease.close()


def test_only_one_of_two_leases_acquires_and_release_hands_it_over(leases):
    a, b = leases(), leases()
    assert not a.held and a.stats()["holder"] is False
    assert a.try_acquire() is True
    assert a.try_acquire() is True  # already held: still True, not a second lock
    assert b.try_acquire() is False
    assert a.held and not b.held
    sa, sb = a.stats(), b.stats()
    assert sa["holder"] is True and sa["acquired_at"] is not None and sa["acquisitions"] == 1
    assert sb["holder"] is False and sb["acquired_at"] is None and sb["attempts"] == 1
    assert isinstance(sa["backend_pid"], int) and sb["backend_pid"] is None

    a.release()
    assert not a.held and a.stats()["holder"] is False
    assert b.try_acquire() is True  # free the moment a released it
    assert a.try_acquire() is False
    b.close()
    assert a.try_acquire() is True  # close gives it up too
    assert b.try_acquire() is False  # and a closed lease can still ask again


def test_leases_of_other_names_are_independent(leases):
    assert leases("trainer-x").try_acquire() and leases("trainer-y").try_acquire()
    assert not leases("trainer-x").try_acquire()
    key = lease_key("sona-trainer")
    assert key == lease_key("sona-trainer") and key != lease_key("trainer-x")
    assert -(2**63) <= key < 2**63


def test_a_killed_leader_process_hands_the_lease_over(url, leases):
    child = (
        "import sys, time\n"
        "from sona_plugin.store.leader import TrainerLease\n"
        "lease = TrainerLease(sys.argv[1])\n"
        "assert lease.try_acquire()\n"
        "print('LEADER', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child, url], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    guard = threading.Timer(60, proc.kill)  # never hang the suite on a stuck child
    guard.start()
    try:
        assert proc.stdout.readline().strip() == "LEADER"
        waiting = leases()
        assert waiting.try_acquire() is False
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        assert wait_for(waiting.try_acquire, timeout=30.0)
        handover_s = time.monotonic() - t0
    finally:
        guard.cancel()
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    print(f"kill -9 -> other process holds the lease: {handover_s * 1000:.1f} ms")
    assert handover_s < KILL_HANDOVER_BOUND_S


def test_held_turns_false_when_the_server_ends_the_session_then_it_reconnects(url, leases):
    a, b = leases(), leases()
    assert a.try_acquire()
    pid = a.stats()["backend_pid"]
    with psycopg.connect(url, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
        assert wait_for(
            lambda: (
                admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
                is None
            )
        )
    assert a.held is False  # its SELECT 1 failed on the dead connection
    s = a.stats()
    assert s["holder"] is False and s["losses"] == 1 and s["backend_pid"] is None
    assert s["last_error"]
    assert b.try_acquire()  # the server freed the lock with the session
    assert a.try_acquire() is False  # a connects again, and finds b holding it
    b.release()
    assert a.try_acquire() is True
    assert a.held and a.stats()["backend_pid"] not in (None, pid)


def test_only_the_holder_runs_the_wrapped_cycle(leases):
    a, b = leases(), leases()
    runs = {"a": 0, "b": 0}

    def learner(who):
        def learn():
            runs[who] += 1
            return {"trained": who}

        return learn

    learn_a = only_while_leading(a, learner("a"))
    learn_b = only_while_leading(b, learner("b"))
    pending_b = only_while_leading(b, lambda: 7, otherwise=0)
    assert learn_a() == {"trained": "a"}
    for _ in range(3):
        assert learn_b() == {"skipped": NOT_TRAINER}
        assert pending_b() == 0  # a follower's coordinator sees nothing to do
        learn_a()
    assert runs == {"a": 4, "b": 0}

    a.close()  # the trainer stops (or dies): the follower's next tick trains
    assert pending_b() == 7
    assert learn_b() == {"trained": "b"}
    assert learn_a() == {"skipped": NOT_TRAINER}
    assert runs == {"a": 4, "b": 1}


class Replica(LearningHost):
    """A host's loop B/C scheduling over a real store, with training stubbed out (no model
    in unit tests): ``learn`` counts its calls."""

    def __init__(self, store) -> None:
        self.store = store
        self.engine = SimpleNamespace(
            config=SimpleNamespace(
                background_trigger_count=1,
                background_interval_ms=0,
                consolidation_interval=10**9,
                gate_micro_check_every=0,
            )
        )
        self.learner = SimpleNamespace(pending=lambda: 5, micro_check_due=lambda every: False)
        self.cycles = 0

    def learn(self, **kwargs) -> dict:
        self.cycles += 1
        return {"status": "trained"}

    def deep_cycle(self, dreams=None) -> dict:
        return {}


def test_host_on_a_postgres_store_trains_only_while_it_holds_the_lease(url, tmp_path):
    stores = [open_store(url), open_store(url)]
    hosts = [Replica(s) for s in stores]
    try:
        for h in hosts:
            h.start_background(poll_s=0.01)
        assert wait_for(lambda: sum(h.cycles for h in hosts) >= 5)
        leader, follower = sorted(hosts, key=lambda h: -h.cycles)
        assert follower.cycles == 0 and leader.cycles >= 5
        assert leader._trainer_lease.stats()["holder"] is True
        assert follower._trainer_lease.stats()["holder"] is False
        assert follower.coordinator.stats()["cycles_ok"] == 0  # nothing ran, nothing counted

        leader.stop_background()  # what close() does first: the lease is given up
        assert leader._trainer_lease.stats()["holder"] is False
        assert wait_for(lambda: follower.cycles >= 3)
        assert follower._trainer_lease.stats()["holder"] is True
    finally:
        for h in hosts:
            h.stop_background()
        for s in stores:
            s.close()

    sqlite = Replica(open_store(tmp_path / "sona.db"))
    try:
        assert lease_for(sqlite.store) is None
        sqlite.start_background(poll_s=0.01)
        assert wait_for(lambda: sqlite.cycles >= 3)  # one host: no election, it just trains
        assert sqlite._trainer_lease is None
    finally:
        sqlite.stop_background()
        sqlite.store.close()


class PublishingReplica(Replica):
    """A Replica whose cycles publish a version into a registry directory shared with the
    other replica (weights stubbed: the swap itself is recorded, not performed)."""

    def __init__(self, store, registry_dir: Path) -> None:
        super().__init__(store)
        from sona_plugin.adapters import AdapterRegistry
        from sona_plugin.micro_lora import MicroLoRA

        self.registry = AdapterRegistry(registry_dir)
        self.engine.micro_lora = MicroLoRA(8)  # what the replica thread keeps in step
        self.served: int | None = None
        self.followed: list[int] = []
        self.learner = SimpleNamespace(
            pending=lambda: 1 if self.cycles == 0 else 0,
            lock=threading.RLock(),
            follow=self.followed.append,
        )

    @property
    def adapter_version(self) -> int | None:
        return self.served

    def _serve(self, version: int) -> None:
        self.served = version

    def _shrink_micro(self, factor: float) -> None:
        pass

    def learn(self, **kwargs) -> dict:
        self.cycles += 1

        def write(path: Path) -> None:
            (path / "adapter_config.json").write_text("{}")
            from safetensors.numpy import save_file

            save_file({"w": np.zeros(2, np.float32)}, str(path / "adapter_model.safetensors"))

        v = self.registry.publish(write, {}, make_current=False)
        self.serve_version(v.version)
        return {"published": True, "version": v.version}


def test_a_version_the_trainer_publishes_serves_on_every_replica(url, tmp_path):
    stores = [open_store(url), open_store(url)]
    hosts = [PublishingReplica(s, tmp_path / "adapters") for s in stores]
    try:
        for h in hosts:
            h._start_replica()  # what a host does at start-up: follows the registry
            h.start_background(poll_s=0.01)
        assert wait_for(lambda: any(h.cycles and h.served == 1 for h in hosts))
        trainer, replica = sorted(hosts, key=lambda h: -h.cycles)
        assert trainer.served == 1 and trainer.followed == []  # its own publish: no follow
        # within a NOTIFY plus the swap; follow_registry serves first and tells the learner
        # after, so wait for the last step (waiting for `served` raced it)
        assert wait_for(lambda: replica.followed == [1])
        assert replica.served == 1 and replica.cycles == 0
        assert replica.registry.current_version() == 1
    finally:
        for h in hosts:
            h.stop_background()
            h._stop_replica()
        for s in stores:
            s.close()


def test_the_session_gives_a_silent_peer_up_on_both_ends(url, leases):
    """The bound of a partition (module docstring): keepalives 5 s idle, 3 probes 2 s apart,
    on libpq's socket and on the server's; a URL's own value wins."""
    lease = leases()
    assert lease.try_acquire()
    conn = lease._conn  # the lease's own session: nothing else can SHOW its settings
    client = conn.info.get_parameters()
    assert (client["keepalives"], client["keepalives_idle"]) == ("1", "5")
    assert (client["keepalives_interval"], client["keepalives_count"]) == ("2", "3")
    assert client["tcp_user_timeout"] == "11000"  # ms: 5 + 2 * 3 s
    server = {
        k: conn.execute(f"SHOW {k}").fetchone()[0]
        for k in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")
    }
    assert server == {
        "tcp_keepalives_idle": "5",
        "tcp_keepalives_interval": "2",
        "tcp_keepalives_count": "3",
    }
    assert conn.execute("SHOW tcp_user_timeout").fetchone()[0] == "11000"  # ms

    mine = TrainerLease(url + "?keepalives_idle=30", name="other")
    try:
        assert mine.try_acquire()
        assert mine._conn.info.get_parameters()["keepalives_idle"] == "30"
    finally:
        mine.close()


def test_the_password_never_shows(pg_server, caplog):
    secret = "s3cr3t-pw"
    url = f"postgresql://postgres:{secret}@127.0.0.1:{_postgres.free_port()}/nodb"
    lease = TrainerLease(url)
    with caplog.at_level(logging.DEBUG, logger="sona_plugin.store.leader"):
        assert lease.try_acquire() is False  # nothing listens there
        assert lease.try_acquire() is False
    s = lease.stats()
    assert s["last_error"] and s["attempts"] == 2
    assert "Connection refused" in caplog.text
    for text in (repr(lease), str(s), lease.url, caplog.text):
        assert secret not in text
    assert "***" in lease.url
    lease.close()
