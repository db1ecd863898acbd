"""Preference-shift detection on the feedback stream itself: a two-sided Bernoulli CUSUM.

Each feedback's reward ``r ∈ [-1, 1]`` becomes ``q = (r + 1)/2`` (1 liked, 0 disliked). The
in-control liked-rate ``p`` is the mean of the first ``warmup`` feedbacks after a start or
an alarm, then an exponential average with horizon ``horizon`` feedbacks (so the slow rise
that learning itself causes is followed), frozen while either CUSUM is above ``h/2`` (so an
abrupt change is not absorbed before it is detected). Per feedback, the log-likelihood
ratios of ``p ± delta`` against ``p`` (Page 1954; quasi-likelihood for fractional ``q``)

    ``S⁺ ← max(0, S⁺ + q·ln(p⁺/p) + (1−q)·ln((1−p⁺)/(1−p)))``, likewise ``S⁻`` with ``p⁻``,

raise an alarm when either exceeds ``h``; both are then reset and the warm-up starts again.

Measured by simulation (``tests/unit/test_learner_parts.py`` checks the same figures on
smaller runs): with the defaults (``delta`` 0.25, ``h`` 7, ``warmup`` 20, ``horizon`` 25),
about 0.13 false alarms per 1,000 feedbacks on a stationary stream (liked-rate 0.05-0.95
alike), 0.07 per 300 feedbacks while learning lifts the liked-rate 0.3 → 0.6 over 200
feedbacks, and a drop 0.7 → 0.2 is found after a median 20 feedbacks (90 % within 37); a
rise 0.3 → 0.75 after a median 26.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class ShiftDetector:
    """Two-sided CUSUM on liked-rates (see the module docstring). State is plain floats."""

    delta: float = 0.25
    h: float = 7.0
    warmup: int = 20
    horizon: float = 25.0
    n: int = 0
    p: float = 0.5
    s_up: float = 0.0
    s_down: float = 0.0
    seen: int = 0
    alarms: int = 0

    def update(self, reward: float) -> str | None:
        """Fold in one feedback; returns ``"up"`` or ``"down"`` at an alarm, else None."""
        q = min(max((float(reward) + 1.0) / 2.0, 0.0), 1.0)
        self.seen += 1
        if self.n < self.warmup:
            self.n += 1
            self.p += (q - self.p) / self.n  # the mean of the warm-up
            return None
        p = min(max(self.p, 0.02), 0.98)
        up, down = min(p + self.delta, 0.99), max(p - self.delta, 0.01)
        self.s_up = max(
            0.0, self.s_up + q * math.log(up / p) + (1 - q) * math.log((1 - up) / (1 - p))
        )
        self.s_down = max(
            0.0, self.s_down + q * math.log(down / p) + (1 - q) * math.log((1 - down) / (1 - p))
        )
        if self.s_up > self.h or self.s_down > self.h:
            side = "up" if self.s_up > self.h else "down"
            self.alarms += 1
            self.n, self.p, self.s_up, self.s_down = 0, 0.5, 0.0, 0.0
            return side
        if max(self.s_up, self.s_down) < 0.5 * self.h:
            self.p += (q - self.p) / self.horizon
        return None

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> ShiftDetector:
        return cls(**{k: state[k] for k in cls.__dataclass_fields__ if k in state})
