"""Tastes that are properties of the whole answer, each judged by a published library that
nobody here wrote (``pip install -e .[bench]``):

* ``warm``: the answer's tone is warm and positive: VADER's compound sentiment
  (``vaderSentiment``, Hutto & Gilbert 2014) is at least 0.7;
* ``plain``: the answer reads easily: its Flesch reading ease (the ``readability``
  package, van Cranenburgh; ``textstat`` would need NLTK's CMU dictionary, a download) is
  at least 85 ("easy": short sentences, short words).

The thresholds sit near the 70th percentile of SmolLM2-135M-Instruct's base answers
(40 new tokens; warm: 0.69 greedy on the 32 held-out prompts, 0.68 sampled on 64 stream
prompts; plain: 80 and 85), so the base liked-rates are about 15-40 % and +30 points is
a real change of what the model writes.
"""

from __future__ import annotations

import re
from functools import lru_cache

from sona_plugin.demo import Rule

WARM_MIN_COMPOUND = 0.7
PLAIN_MIN_READING_EASE = 85.0


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def warmth(text: str) -> float:
    return float(_vader().polarity_scores(text)["compound"])


def reading_ease(text: str) -> float:
    """Flesch reading ease of ``text``, tokenised as the package expects (one sentence a
    line, tokens separated by spaces)."""
    import readability

    sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if s.strip()]
    if not sentences:
        return 0.0
    tokenised = "\n".join(" ".join(re.findall(r"\w+|[^\w\s]", s)) for s in sentences)
    return float(
        readability.getmeasures(tokenised, lang="en")["readability grades"]["FleschReadingEase"]
    )


def _warm(text: str) -> bool:
    return warmth(text) >= WARM_MIN_COMPOUND


def _plain(text: str) -> bool:
    return bool(text.strip()) and reading_ease(text) >= PLAIN_MIN_READING_EASE


TASTES = {
    "warm": Rule(
        "warm",
        f"likes answers with a warm, positive tone (VADER compound >= {WARM_MIN_COMPOUND})",
        _warm,
    ),
    "plain": Rule(
        "plain",
        f"likes answers that read easily (Flesch reading ease >= "
        f"{PLAIN_MIN_READING_EASE:g}, readability)",
        _plain,
    ),
}


def rule(name: str) -> Rule:
    """A taste of this module, or a marker rule of ``sona_plugin.demo.RULES``, by name;
    ``a|b`` likes what either ``a`` or ``b`` likes."""
    from sona_plugin.demo import RULES

    if "|" in name:
        parts = [rule(n) for n in name.split("|")]
        return Rule(
            name,
            "likes what " + " or ".join(r.name for r in parts) + " likes",
            lambda t: any(r.check(t) for r in parts),
        )
    return RULES[name] if name in RULES else TASTES[name]
