"""Best-of-k serving's reward model (sona_plugin.rerank): it learns the taste from judged
answers, picks the better candidate, survives a restart, forgets what it is told to, and
lets a newer taste displace an older one within its window."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sona_plugin import AnswerRanker, InvalidValue
from sona_plugin.rerank import answer_features, kl_bound

D = 12


def judged(rng, n: int, w: np.ndarray):
    """``n`` answers' features and the taste ``w``'s judgements (liked iff x·w > 0.5)."""
    X = rng.normal(size=(n, D)).astype(np.float32)
    return X, (X @ w > 0.5)


def test_kl_bound_is_the_best_of_k_bound():
    assert kl_bound(1) == 0.0
    assert kl_bound(4) == pytest.approx(math.log(4) - 0.75)
    assert kl_bound(8) < math.log(8)


def test_features_average_the_steps_and_refuse_an_empty_answer():
    h = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert np.allclose(answer_features(h), [2.0, 3.0])
    with pytest.raises(InvalidValue, match=r"\[T > 0, d\].*\(0, 2\)"):
        answer_features(np.zeros((0, 2), np.float32))


def test_serves_the_first_candidate_until_both_labels_are_seen():
    ranker = AnswerRanker(min_per_label=5)
    rng = np.random.default_rng(0)
    for i in range(20):  # every answer liked: nothing to tell them apart by
        ranker.add(i + 1, rng.normal(size=D).astype(np.float32), 1.0)
    assert not ranker.fitted and ranker.score(np.zeros((3, D), np.float32)) is None
    assert ranker.choose(rng.normal(size=(4, D)).astype(np.float32)) == 0
    ranker.add(99, rng.normal(size=D).astype(np.float32), 0.0)  # no label: not taken
    assert len(ranker) == 20


def test_learns_the_taste_and_best_of_k_serves_more_liked_answers():
    rng = np.random.default_rng(1)
    w = rng.normal(size=D)
    ranker = AnswerRanker(refit_every=10**6)  # one fit when both labels are in, one here
    X, liked = judged(rng, 100, w)
    for i, (x, y) in enumerate(zip(X, liked)):
        ranker.add(i + 1, x, 1.0 if y else -1.0)
    ranker.fit()
    assert ranker.fitted and ranker.fits == 2
    first, best = [], []
    for _ in range(300):  # unseen answers, four candidates a prompt
        C, ok = judged(rng, 4, w)
        first.append(ok[0])
        best.append(ok[ranker.choose(C)])
    assert np.mean(best) > np.mean(first) + 0.25, (np.mean(first), np.mean(best))


def test_a_restart_restores_the_same_scores(tmp_path):
    rng = np.random.default_rng(2)
    w = rng.normal(size=D)
    ranker = AnswerRanker(refit_every=10**6)
    X, liked = judged(rng, 40, w)
    for i, (x, y) in enumerate(zip(X, liked)):
        ranker.add(i + 1, x, 1.0 if y else -1.0)
    ranker.save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["ranker.safetensors"]  # no temp left
    again = AnswerRanker()
    assert again.load(tmp_path) and again.last_id == 40 and len(again) == 40
    probe = rng.normal(size=(16, D)).astype(np.float32)
    ranker.fit()
    assert np.allclose(again.score(probe), ranker.score(probe))
    assert not AnswerRanker().load(tmp_path / "nothing-saved")


def test_forget_drops_a_judgement_and_refits():
    rng = np.random.default_rng(3)
    ranker = AnswerRanker(refit_every=10**6)
    X, liked = judged(rng, 30, rng.normal(size=D))
    for i, (x, y) in enumerate(zip(X, liked)):
        ranker.add(i + 1, x, 1.0 if y else -1.0)
    fits = ranker.fits
    assert ranker.forget(7)
    assert ranker.fits == fits + 1 and len(ranker) == 29 and 7 not in ranker._ids
    assert not ranker.forget(7)


def test_a_newer_taste_displaces_the_old_one_within_the_window():
    rng = np.random.default_rng(4)
    w = rng.normal(size=D)
    ranker = AnswerRanker(window=60, refit_every=10**6)
    for i, (x, y) in enumerate(zip(*judged(rng, 100, w))):
        ranker.add(i + 1, x, 1.0 if y else -1.0)
    ranker.fit()
    probe, _ = judged(rng, 200, w)
    assert np.corrcoef(ranker.score(probe), probe @ w)[0, 1] > 0.5
    for i, (x, y) in enumerate(zip(*judged(rng, 60, -w))):  # the opposite taste
        ranker.add(1000 + i, x, 1.0 if y else -1.0)
    ranker.fit()
    assert len(ranker) == 60
    assert np.corrcoef(ranker.score(probe), probe @ w)[0, 1] < -0.5


def test_features_of_another_width_are_refused():
    ranker = AnswerRanker()
    ranker.add(1, np.zeros(D, np.float32), 1.0)
    with pytest.raises(InvalidValue, match=r"shape \(12,\), got \(5,\)"):
        ranker.add(2, np.zeros(5, np.float32), -1.0)


def test_a_background_fit_takes_the_judgements_that_came_while_it_ran():
    rng = np.random.default_rng(5)
    ranker = AnswerRanker(refit_every=1, background=True)
    X, liked = judged(rng, 30, rng.normal(size=D))
    for i, (x, y) in enumerate(zip(X, liked)):
        ranker.add(i + 1, x, 1.0 if y else -1.0)
    ranker.wait()
    assert ranker.fitted and ranker._thread is None
    # the judgements that came while a fit ran are in the fit that followed it
    assert ranker._model[0].n_samples_seen_ == 30


def test_catch_up_takes_what_the_store_took_after_the_save_and_drops_what_left_it(tmp_path):
    from sona_plugin.store import FeedbackRecord
    from sona_plugin.store.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "sona.db")
    try:
        for i in range(14):
            store.add(
                FeedbackRecord(
                    response_id=f"r{i}",
                    prompt="p",
                    prompt_ids=[1, 2],
                    response_ids=[3, 4, 5],
                    response_text="t",
                    reward=1.0 if i % 2 else -1.0,
                    embedding=np.zeros(4, np.float32),
                )
            )
        saved = AnswerRanker(refit_every=10**6)
        for row in range(1, 13):  # the save saw rows 1..12
            saved.add(row, np.full(D, row, np.float32), 1.0 if row % 2 else -1.0)
        saved.save(tmp_path)
        store.quarantine("r2")  # row 3, after the save
        store.delete("r4")  # row 5
        ranker = AnswerRanker(refit_every=10**6)
        ranker.load(tmp_path)
        seen = []
        taken = ranker.catch_up(store, lambda p, r: seen.append((p, r)) or np.ones((len(r), D)))
        assert taken == 2 and seen == [([1, 2], [3, 4, 5])] * 2  # rows 13 and 14
        assert ranker._ids == [1, 2, 4, *range(6, 15)] and ranker.fitted
    finally:
        store.close()
