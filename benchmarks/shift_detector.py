"""The liked-rate CUSUM (``sona_plugin.learner.shift.ShiftDetector``) on simulated streams:
false alarms, delays, and the long run's own round rates; beside the reference it replaced
(an exponential average that followed the stream, 25-feedback horizon, frozen while a
CUSUM was past half its threshold).

    python benchmarks/shift_detector.py [--runs 100] [--seed 0]

No model: Bernoulli streams of likes (+1) and dislikes (−1). A few seconds.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from sona_plugin.learner.shift import ShiftDetector


class FollowedReference(ShiftDetector):
    """The earlier rule (δ 0.25, h 7, warm-up 20, then the reference follows the stream
    with horizon 25 while both CUSUMs are below h/2)."""

    def __init__(self) -> None:
        super().__init__(delta=0.25, h=7.0, warmup=20)

    def update(self, reward: float) -> str | None:
        n_before = self.n
        side = super().update(reward)
        if side is None and n_before >= self.warmup and max(self.s_up, self.s_down) < 3.5:
            q = min(max((float(reward) + 1.0) / 2.0, 0.0), 1.0)
            self.p += (q - self.p) / 25.0
        return side


def likes(rng: np.random.Generator, p: float, n: int) -> np.ndarray:
    return np.where(rng.random(n) < p, 1.0, -1.0)


def first_down(det: ShiftDetector, stream: np.ndarray) -> float:
    for i, r in enumerate(stream):
        if det.update(r) == "down":
            return i
    return math.inf


def study(make, runs: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out: dict = {"stationary_per_1000": {}}
    for p in (0.1, 0.4, 0.9):
        det = make()
        alarms = sum(det.update(r) is not None for r in likes(rng, p, 20_000))
        out["stationary_per_1000"][p] = alarms / 20
    downs = 0
    for _ in range(runs):  # learning: 0.3 -> 0.9 over 200 feedbacks, then 100 at 0.9
        det = make()
        rate = np.r_[np.linspace(0.3, 0.9, 200), np.full(100, 0.9)]
        downs += sum(det.update(r) == "down" for r in np.where(rng.random(300) < rate, 1.0, -1.0))
    out["down_alarms_per_learning_run"] = downs / runs
    out["drops"] = {}
    for a, b in ((0.7, 0.2), (0.84, 0.56), (0.78, 0.56), (0.7, 0.45), (0.5, 0.3)):
        delays = []
        for _ in range(runs):
            det = make()
            for r in likes(rng, a, 300):
                det.update(r)
            delays.append(first_down(det, likes(rng, b, 200)))
        d = np.array(delays)
        out["drops"][f"{a}->{b}"] = {
            "median": float(np.median(d)),
            "within_100": float(np.mean(d < 100)),
            "within_200": float(np.mean(d < 200)),
        }
    # the long run's rounds of 50 (docs/benchmarks.md): taste A, then B with no hint
    false_a, delays = 0, []
    for _ in range(3 * runs):
        det = make()
        a = np.concatenate([likes(rng, p, 50) for p in (0.32, 0.46, 0.74, 0.84)])
        false_a += any(det.update(r) == "down" for r in a)
        delays.append(
            first_down(det, np.concatenate([likes(rng, p, 50) for p in (0.56, 0.54, 0.46, 0.56)]))
        )
    d = np.array(delays)
    out["long_run_rounds"] = {
        "false_alarm_in_A": false_a / (3 * runs),
        "B_within_100": float(np.mean(d < 100)),
        "B_within_200": float(np.mean(d < 200)),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for name, make in (
        ("fixed reference (shipped)", ShiftDetector),
        ("followed", FollowedReference),
    ):
        r = study(make, args.runs, args.seed)
        print(f"## {name}")
        print("  false alarms per 1,000 stationary feedbacks:", r["stationary_per_1000"])
        print("  'down' alarms per learning run (0.3 -> 0.9):", r["down_alarms_per_learning_run"])
        for k, v in r["drops"].items():
            print(
                f"  drop {k}: median {v['median']}, within 100 {v['within_100']:.0%}, "
                f"within 200 {v['within_200']:.0%}"
            )
        print("  long run's rounds:", r["long_run_rounds"])


if __name__ == "__main__":
    main()
