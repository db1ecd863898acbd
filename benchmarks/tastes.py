"""Tastes that are properties of the whole answer, each judged by a published library that
nobody here wrote (``pip install -e .[bench]``):

* ``warm``: the answer's tone is warm and positive: VADER's compound sentiment
  (``vaderSentiment``, Hutto & Gilbert 2014) is at least 0.6;
* ``plain``: the answer reads easily: its Flesch reading ease (``textstat``) is at least 75
  (roughly "fairly easy" and above: short sentences, short words).

The thresholds put SmolLM2-135M-Instruct's base liked-rates near those of the marker tasks
(``docs/benchmarks.md`` has the measured rates), so that +30 points is a real change.
"""

from __future__ import annotations

from functools import lru_cache

from sona_plugin.demo import Rule

WARM_MIN_COMPOUND = 0.6
PLAIN_MIN_READING_EASE = 75.0


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def warmth(text: str) -> float:
    return float(_vader().polarity_scores(text)["compound"])


def reading_ease(text: str) -> float:
    import textstat

    return float(textstat.flesch_reading_ease(text)) if text.strip() else 0.0


def _warm(text: str) -> bool:
    return warmth(text) >= WARM_MIN_COMPOUND


def _plain(text: str) -> bool:
    return bool(text.strip()) and reading_ease(text) >= PLAIN_MIN_READING_EASE


TASTES = {
    "warm": Rule("warm", f"likes answers with a warm, positive tone (VADER compound >= "
                         f"{WARM_MIN_COMPOUND})", _warm),
    "plain": Rule("plain", f"likes answers that read easily (Flesch reading ease >= "
                           f"{PLAIN_MIN_READING_EASE:g}, textstat)", _plain),
}
