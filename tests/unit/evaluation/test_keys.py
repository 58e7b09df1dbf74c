"""Metric keys are built and parsed in one place: what the gate and the reports read back is what was logged."""

from __future__ import annotations

from components.evaluation import keys


def test_keys_built_are_the_keys_parsed():
    logged = {
        keys.unseen("recall_at_1"): 0.8,
        keys.seen(keys.slice_key("demo 000"), "recall_at_1"): 0.7,
        keys.seen("demo-001", "map_at_r"): 0.4,
        keys.champion(keys.seen("demo-001", "recall_at_1")): 0.6,
        keys.baseline(keys.unseen("recall_at_1")): 0.3,
        keys.forgetting("demo-001"): 0.02,
    }
    assert set(logged) == {
        "unseen_recall_at_1",
        "seen_demo_000_recall_at_1",
        "seen_demo-001_map_at_r",
        "champion_seen_demo-001_recall_at_1",
        "baseline_unseen_recall_at_1",
        "forgetting_demo-001",
    }
    assert keys.slice_values(logged) == {"demo_000": 0.7}  # Recall@1 only, the candidate's own
    assert keys.slice_values(keys.under(logged, keys.CHAMPION)) == {"demo-001": 0.6}
    assert keys.under(logged, keys.FORGETTING) == {"demo-001": 0.02}
    assert keys.under(logged, keys.BASELINE) == {"unseen_recall_at_1": 0.3}
    assert [k for k in logged if keys.is_scored(k)] == [
        "unseen_recall_at_1",
        "seen_demo_000_recall_at_1",
        "seen_demo-001_map_at_r",
    ]
    assert keys.unseen(keys.few_shot(20, 1)) == "unseen_20way_1shot"
