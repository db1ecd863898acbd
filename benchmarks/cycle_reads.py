"""What a learner cycle reads from a long deployment's SQLite store: the whole store (what
cycles did before) against the records a cycle uses (``records_with_ids``: the newest
held-out window and a bounded replay pool), side by side in one run.

    python benchmarks/cycle_reads.py [--records 100000] [--pool 4096] [--heldout 40]

Records are shaped like SmolLM2 feedback: 24 prompt tokens, 40 answer tokens, a
384-d MiniLM embedding, a short text. No model.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from sona_plugin.store import open_store
from sona_plugin.store.base import FeedbackRecord


def fill(store, n: int, rng: np.random.Generator) -> None:
    for i in range(n):
        store.add(
            FeedbackRecord(
                response_id=f"r{i}",
                prompt=f"question {i} about something a user asked",
                prompt_ids=rng.integers(0, 49152, 24).tolist(),
                response_ids=rng.integers(0, 49152, 40).tolist(),
                response_text="an answer of about forty tokens " * 6,
                reward=1.0 if i % 3 else -1.0,
                embedding=rng.standard_normal(384).astype(np.float32),
            )
        )


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--pool", type=int, default=4096)
    ap.add_argument("--heldout", type=int, default=40)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d, open_store(Path(d) / "sona.db") as store:
        t = time.perf_counter()
        fill(store, args.records, rng)
        print(f"stored {args.records} records in {time.perf_counter() - t:.0f} s")
        ids = np.arange(1, args.records + 1)
        pool = sorted(int(i) for i in rng.choice(ids, min(args.pool, len(ids)), replace=False))
        before = peak_mib()
        t = time.perf_counter()
        used = store.records_with_ids(pool) + store.records_with_ids(ids[-args.heldout :])
        bounded_s = time.perf_counter() - t
        bounded_mib = peak_mib() - before
        before = peak_mib()
        t = time.perf_counter()
        everything = store.records(since_id=0, limit=None)
        whole_s = time.perf_counter() - t
        whole_mib = peak_mib() - before
        print(
            f"records a cycle uses ({len(used)}): {bounded_s:.2f} s, +{bounded_mib:.0f} MiB peak\n"
            f"the whole store ({len(everything)}): {whole_s:.2f} s, +{whole_mib:.0f} MiB peak\n"
            f"ratio: {whole_s / bounded_s:.0f}x the time"
        )


if __name__ == "__main__":
    main()
