"""What several replicas cost: store throughput, publish-to-replica delay, leader failover.

    python benchmarks/replicas.py [--writers 1 4 16] [--adds 200] [--instants 200]
        [--forwards 100] [--publishes 20] [--failovers 10] [--out results/replicas.json]

Starts a throwaway PostgreSQL (``tests/_postgres.py``: ``initdb``/``pg_ctl`` on 127.0.0.1)
and measures, in one run:

* **feedback events/s into the store** at 1, 4 and 16 writers, SQLite (one file, WAL) beside
  PostgreSQL: each writer is its own store object, as replicas are, and adds ``--adds``
  records (a 60-token prompt, a 40-token answer, a 384-d embedding), each committed before
  ``add`` returns (the promise behind a feedback's 200);
* **instant update to every replica**: one replica logs a feedback's MicroLoRA update
  (rank 2 on SmolLM2's 576-d hidden state) in the instant log; delay until the other
  replica serves the same weights (woken by ``NOTIFY``, it reads and applies the entry),
  p50/p99 over ``--instants``;
* **feedback at the other replica**: a feedback posted to a replica that did not generate
  the response is forwarded through the database to the one that did (the holder's work,
  storing the record and its update, is stubbed out: this is the forwarding overhead),
  p50/p99 over ``--forwards``;
* **publish to every replica**: one replica's host publishes a version into the shared
  registry directory and serves it; the other replica, woken by the trainer's ``NOTIFY``
  (polling every 0.5 s is the fallback), follows it (the swap is stubbed: this is the
  notification path, a real swap adds its canary and load, ``docs/reliability.md``).
  Delay from the trainer's ``serve_version`` returning to the follower serving, p50/p99
  over ``--publishes``;
* **leader failover**: a child process holds the trainer lease and is killed with SIGKILL;
  the time until a waiting lease (polling every 10 ms) holds it, over ``--failovers``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import _postgres  # noqa: E402

from sona_plugin.store import open_store  # noqa: E402
from sona_plugin.store.base import FeedbackRecord  # noqa: E402


def record(writer: int, i: int, rng) -> FeedbackRecord:
    return FeedbackRecord(
        response_id=f"w{writer}-{i}",
        prompt="x" * 200,
        prompt_ids=rng.integers(0, 49152, 60).tolist(),
        response_ids=rng.integers(0, 49152, 40).tolist(),
        response_text="y" * 160,
        reward=float(rng.choice([-1.0, 1.0])),
        embedding=rng.standard_normal(384).astype(np.float32),
    )


def throughput(url_for_writer, writers: int, adds: int) -> float:
    """Adds per second over all writers (each its own store object and thread)."""
    stores = [open_store(url_for_writer()) for _ in range(writers)]
    barrier = threading.Barrier(writers + 1)
    errors: list[BaseException] = []

    def run(w: int) -> None:
        rng = np.random.default_rng(w)
        recs = [record(w, i, rng) for i in range(adds)]
        barrier.wait()
        try:
            for r in recs:
                stores[w].add(r)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    for s in stores:
        s.close()
    if errors:
        raise errors[0]
    return writers * adds / dt


class StubReplica:
    """A replica host over a real store, instant log and registry, without a model: the
    MicroLoRA is SmolLM2's shape, swaps are recorded, not performed."""

    @staticmethod
    def make(url: str, registry_dir: Path):
        from sona_plugin.adapters import AdapterRegistry
        from sona_plugin.integrations._host import LearningHost
        from sona_plugin.micro_lora import MicroLoRA

        class Replica(LearningHost):
            def __init__(self) -> None:
                self.store = open_store(url)
                self.registry = AdapterRegistry(registry_dir)
                self.served: int | None = None
                self.served_at: dict[int, float] = {}
                self.set_at: list[float] = []
                self.owned: set[str] = set()
                self.engine = SimpleNamespace(
                    config=SimpleNamespace(
                        background_trigger_count=10**9,
                        background_interval_ms=10**9,
                        consolidation_interval=10**9,
                    ),
                    micro_lora=MicroLoRA(576, 2),
                )
                self.learner = SimpleNamespace(
                    pending=lambda: 0, lock=threading.RLock(), follow=lambda v: None
                )
                self._start_replica()

            @property
            def adapter_version(self) -> int | None:
                return self.served

            def _serve(self, version: int) -> None:
                self.served = version
                self.served_at[version] = time.perf_counter()

            def _set_micro_arrays(self, A, B) -> None:
                super()._set_micro_arrays(A, B)
                self.set_at.append(time.perf_counter())

            def _has_recording(self, response_id: str, index: int) -> bool:
                return response_id in self.owned

            def _take_forward(self, f) -> dict:
                return {"id": f.response_id, "index": f.index, "stored_id": 0}

            def close(self) -> None:
                self._stop_replica()
                self.store.close()

        return Replica()


def instant_delays(url: str, registry_dir: Path, n: int) -> list[float]:
    """Seconds from one replica starting to log a feedback's update (read the log, update,
    append, apply) until the other serves the same weights."""
    from sona_plugin.integrations._replica import micro_digest

    a, b = StubReplica.make(url, registry_dir), StubReplica.make(url, registry_dir)
    rng = np.random.default_rng(0)
    delays = []
    try:
        for i in range(n):
            m = a.engine.micro_lora

            def update(m=m) -> None:
                m.A[...] += rng.standard_normal(m.A.shape).astype(np.float32) * 1e-3
                m.B[...] += rng.standard_normal(m.B.shape).astype(np.float32) * 1e-3

            sets = len(b.set_at)
            t0 = time.perf_counter()  # the feedback's update, logged by its replica
            a._replica.instant(f"r{i}", update)
            while len(b.set_at) == sets and time.perf_counter() - t0 < 10:
                time.sleep(0.0005)
            delays.append(b.set_at[sets] - t0 if len(b.set_at) > sets else float("inf"))
            time.sleep(0.01)
        assert micro_digest(*a._micro_arrays()) == micro_digest(*b._micro_arrays())
    finally:
        a.close()
        b.close()
    return delays


def forward_delays(url: str, registry_dir: Path, n: int) -> list[float]:
    """Seconds a feedback at the replica that did not generate the response takes to be
    answered by the one that did (its own work stubbed)."""
    holder, other = StubReplica.make(url, registry_dir), StubReplica.make(url, registry_dir)
    out = []
    try:
        for i in range(n):
            holder.owned.add(f"f{i}")
            t0 = time.perf_counter()
            res = other._replica.forward(f"f{i}", 0, 1.0, None)
            out.append(time.perf_counter() - t0)
            assert res["id"] == f"f{i}"
    finally:
        holder.close()
        other.close()
    return out


def publish_delays(url: str, registry_dir: Path, publishes: int) -> list[float]:
    from safetensors.numpy import save_file

    def write(path: Path) -> None:
        (path / "adapter_config.json").write_text("{}")
        save_file({"w": np.zeros(4, np.float32)}, str(path / "adapter_model.safetensors"))

    trainer = StubReplica.make(url, registry_dir)
    follower = StubReplica.make(url, registry_dir)
    delays = []
    try:
        for _ in range(publishes):
            v = trainer.registry.publish(write, {}, make_current=False)
            trainer.serve_version(v.version)
            t_pub = time.perf_counter()
            deadline = t_pub + 10.0
            while v.version not in follower.served_at and time.perf_counter() < deadline:
                time.sleep(0.001)
            delays.append(follower.served_at.get(v.version, float("inf")) - t_pub)
            time.sleep(0.37)  # publishes land at different phases of the poll
    finally:
        trainer.close()
        follower.close()
    return delays


HOLDER = """
import sys, time
from sona_plugin.store.leader import TrainerLease
lease = TrainerLease(sys.argv[1], "bench")
assert lease.try_acquire()
print("held", flush=True)
time.sleep(3600)
"""


def failovers(url: str, n: int) -> list[float]:
    from sona_plugin.store.leader import TrainerLease

    out = []
    for _ in range(n):
        child = subprocess.Popen(
            [sys.executable, "-c", HOLDER, url], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout.readline().strip() == "held"
        waiting = TrainerLease(url, "bench")
        assert not waiting.try_acquire()
        os.kill(child.pid, signal.SIGKILL)
        t0 = time.perf_counter()
        while not waiting.try_acquire():
            time.sleep(0.01)
        out.append(time.perf_counter() - t0)
        child.wait()
        waiting.close()
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writers", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--adds", type=int, default=200, help="records per writer")
    ap.add_argument("--instants", type=int, default=200)
    ap.add_argument("--forwards", type=int, default=100)
    ap.add_argument("--publishes", type=int, default=20)
    ap.add_argument("--failovers", type=int, default=10)
    ap.add_argument("--out", default="results/replicas.json")
    args = ap.parse_args()
    why = _postgres.unavailable()
    if why:
        raise SystemExit(f"replicas.py needs PostgreSQL: {why}")
    results: dict = {"args": vars(args), "throughput": []}
    with _postgres.postgres_server() as server, tempfile.TemporaryDirectory() as tmp:
        for w in args.writers:
            sqlite_path = Path(tmp) / f"sqlite-{w}.db"
            pg_url = server.create_database()
            row = {
                "writers": w,
                "sqlite_per_s": throughput(lambda p=sqlite_path: p, w, args.adds),
                "postgres_per_s": throughput(lambda u=pg_url: u, w, args.adds),
            }
            results["throughput"].append(row)
            print(json.dumps(row), flush=True)
        reg = Path(tmp) / "adapters"
        ins = instant_delays(server.create_database(), reg, args.instants)
        results["instant_to_replica_s"] = ins
        fwd = forward_delays(server.create_database(), reg, args.forwards)
        results["forwarded_feedback_s"] = fwd
        d = publish_delays(server.create_database(), reg, args.publishes)
        results["publish_to_replica_s"] = d
        f = failovers(server.create_database(), args.failovers)
        results["failover_s"] = f
    print("\n| writers | SQLite adds/s | PostgreSQL adds/s |\n| --- | --- | --- |")
    for r in results["throughput"]:
        print(f"| {r['writers']} | {r['sqlite_per_s']:.0f} | {r['postgres_per_s']:.0f} |")
    for label, xs in [
        ("instant update → other replica serving it", ins),
        ("feedback forwarded to the generating replica, answered", fwd),
        ("publish → other replica serving", d),
    ]:
        print(
            f"{label}: p50 {pct(xs, 50) * 1000:.1f} ms, p99 {pct(xs, 99) * 1000:.1f} ms, "
            f"max {max(xs) * 1000:.1f} ms (n={len(xs)})"
        )
    print(
        f"leader kill -9 → lease held elsewhere: p50 {statistics.median(f) * 1000:.0f} ms, "
        f"max {max(f) * 1000:.0f} ms (n={len(f)})"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
