"""`sona export --patterns/--preferences` and `sona stats` on a state directory (no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sona_plugin import SonaEngine, StateError
from sona_plugin.cli import main
from sona_plugin.store import FeedbackRecord, open_store


@pytest.fixture()
def state(tmp_path):
    store = open_store(tmp_path / "sona.db")
    rng = np.random.default_rng(0)
    for i, reward in enumerate((1.0, -1.0, 0.0, 0.5)):
        store.add(
            FeedbackRecord(
                response_id=f"r{i}",
                prompt=f"<user>q{i}</user>",
                prompt_ids=[1, 2],
                response_ids=[3, 4],
                response_text=f"answer {i}",
                reward=reward,
                embedding=rng.standard_normal(384).astype(np.float32),
            )
        )
    store.close()
    eng = SonaEngine(16, embedding_dim=16)
    for i in range(12):
        tid = eng.begin_trajectory(rng.standard_normal(16))
        eng.end_trajectory(tid, 0.9 if i % 2 else 0.2)
    eng.run_background_cycle()
    eng.save(tmp_path / "engine")
    (tmp_path / "pipeline.json").write_text(json.dumps({"model_source": None}))
    return tmp_path


def test_preferences_are_kto_rows_without_neutral_feedback(state, tmp_path, capsys):
    out = tmp_path / "prefs.jsonl"
    assert main(["export", "--state-dir", str(state), "--preferences", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == [True, False, True]
    assert {"prompt", "completion", "label"} <= set(rows[0])
    assert rows[0]["prompt"] == "<user>q0</user>" and rows[0]["completion"] == "answer 0"
    assert "3 preference rows" in capsys.readouterr().out


def test_preferences_read_the_store_a_page_at_a_time(state):
    from sona_plugin.export import _all_records

    store = open_store(state / "sona.db")
    store.quarantine("r1")
    pages: list[int] = []
    real = store.records
    store.records = lambda **k: pages.append(len(got := real(**k))) or got
    assert [r.response_id for r in _all_records(store, page=2)] == ["r0", "r2", "r3"]
    assert pages == [2, 1, 0]  # never more than a page in memory
    store.close()


def test_patterns_export_one_json_line_per_pattern(state, tmp_path):
    out = tmp_path / "patterns.jsonl"
    assert main(["export", "--state-dir", str(state), "--patterns", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    n = SonaEngine.load(state / "engine").reasoning_bank.pattern_count
    assert len(rows) == n > 0
    assert len(rows[0]["centroid"]) == 16 and 0 <= rows[0]["avg_quality"] <= 1


def test_export_names_a_state_dir_without_saved_state(tmp_path):
    with pytest.raises(StateError, match="pipeline.json"):
        main(["export", "--state-dir", str(tmp_path), "--patterns", str(tmp_path / "p.jsonl")])


def test_stats_reads_the_state_dir(state, capsys):
    assert main(["stats", "--state-dir", str(state)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["feedback_records"] == 4 and out["current_version"] is None
