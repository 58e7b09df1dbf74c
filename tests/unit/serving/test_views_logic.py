"""The pure parts of the views of change: the history's marks, the progress's stages, the map's
projection, the side-by-side's marks, each checked against what a person would read off them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np

from components.evaluation.history import few_shot_keys, history_figure, model_history
from components.progress import STAGES, FlowState, TaskState, retrain_progress
from components.registry.promotion_log import PromotionEntry
from components.serving.compare import mark_changes
from components.serving.stamped import StampedCache
from components.vectors.projection import project, sample_offsets


def entry(kind: str, from_: str | None, to: str) -> PromotionEntry:
    return PromotionEntry(
        time="2026-12-06T00:00:00", from_version=from_, to_version=to, reason="r", actor="a", kind=kind
    )


def test_history_marks_each_version_as_the_log_and_the_gate_have_it():
    metrics = {
        "unseen_recall_at_1": 0.5,
        "unseen_map_at_r": 0.3,
        "baseline_unseen_recall_at_1": 0.2,
        "unseen_20way_1shot": 0.7,
        "unseen_5way_5shot": 0.9,
        "unseen_5way_1shot_within_arrival": 0.6,
        "seen_a0_recall_at_1": 0.8,
        "forgetting_a0": 0.05,
    }
    versions = [
        ("10", metrics, {"gate_verdict": "promote"}),
        ("2", {"unseen_recall_at_1": 0.4}, {"gate_verdict": "promote"}),
        ("3", {}, {"gate_verdict": "reject"}),
    ]
    h = model_history(
        "m", versions, [entry("promote", None, "2"), entry("promote", "2", "10"), entry("rollback", "10", "2")], "2"
    )
    assert [v.version for v in h.versions] == ["2", "3", "10"]  # by number, not as text
    v2, v3, v10 = h.versions
    assert v2.champion and v2.promoted and v2.rolled_back_to
    assert v3.verdict == "reject" and not v3.promoted and not v3.champion
    assert v10.promoted and not v10.rolled_back_to
    assert v10.metrics["unseen_20way_1shot"] == 0.7 and v2.metrics["unseen_20way_1shot"] is None
    assert "unseen_5way_1shot_within_arrival" not in h.metrics  # within-arrival episodes are not a headline
    assert h.slices == ["a0"] and v10.forgetting == {"a0": 0.05} and v2.forgetting == {"a0": None}
    assert [e.kind for e in h.events] == ["promote", "promote", "rollback"]
    assert history_figure(h).axes  # drawn without pyplot


def test_few_shot_keys_put_the_hardest_task_first():
    assert few_shot_keys({"unseen_5way_5shot": 1, "unseen_20way_1shot": 1, "unseen_5way_1shot": 1}) == [
        "unseen_20way_1shot",
        "unseen_5way_1shot",
        "unseen_5way_5shot",
    ]


def test_progress_stages_follow_the_tasks():
    t0 = datetime(2026, 12, 6, tzinfo=UTC)
    flow = FlowState(id="f", name="brave-fox", state="RUNNING", state_name="Running", start=t0, end=None)
    tasks = [
        TaskState("ingest_pending", "COMPLETED", t0),
        TaskState("load_models", "COMPLETED", t0 + timedelta(seconds=1)),
        TaskState("train", "RUNNING", t0 + timedelta(seconds=2)),
    ]
    p = retrain_progress(flow, tasks, epochs=5, loss=[0.9, 0.7], mlflow_run_id="r")
    assert p.running and p.stage == "train" and (p.epoch, p.epochs) == (2, 5)
    assert [s.state for s in p.stages] == ["done", "running", "waiting", "waiting", "waiting", "waiting"]
    assert p.line() == "brave-fox train epoch 2 of 5 (loss 0.7000)"

    # Between loading the models and the train task, before its MLflow run is open: training, no epoch done.
    opening = retrain_progress(flow, tasks[:2], epochs=None, loss=[], mlflow_run_id=None)
    assert (opening.stage, opening.epoch, opening.loss) == ("train", 0, [])

    ended = FlowState(id="f", name="brave-fox", state="COMPLETED", state_name="Promoted", start=t0, end=t0)
    names = ["ingest_pending", "train", "evaluate", "register", "build_index", "smoke_test", "publish_gate", "promote"]
    done = retrain_progress(
        ended, [TaskState(n, "COMPLETED", t0) for n in names], epochs=5, loss=[0.5] * 5, mlflow_run_id="r", champion="4"
    )
    assert (
        not done.running and done.outcome == "promoted v4" and [s.state for s in done.stages] == ["done"] * len(STAGES)
    )

    rejected = retrain_progress(
        ended,
        [TaskState(n, "COMPLETED", t0) for n in names[:4] + ["publish_gate"]],
        epochs=5,
        loss=[],
        mlflow_run_id=None,
    )
    assert rejected.outcome == "nothing promoted"
    assert [s.state for s in rejected.stages] == ["done", "done", "done", "skipped", "done", "skipped"]

    failed = FlowState(id="f", name="x", state="FAILED", state_name="Failed", start=t0, end=t0)
    p = retrain_progress(
        failed,
        [TaskState("ingest_pending", "COMPLETED", t0), TaskState("train", "FAILED", t0)],
        epochs=5,
        loss=[0.9],
        mlflow_run_id="r",
    )
    assert p.outcome == "failed during train" and p.stages[1].state == "failed"


def test_pca_keeps_the_two_directions_of_largest_spread_and_a_fixed_sign():
    rng = np.random.default_rng(0)
    x = np.zeros((200, 8))
    x[:, 3] = rng.normal(0, 5, 200)  # the widest direction
    x[:, 6] = rng.normal(0, 2, 200)
    x += rng.normal(0, 0.01, x.shape)
    coords, explained = project(x)
    assert abs(np.corrcoef(coords[:, 0], x[:, 3])[0, 1]) > 0.999
    assert abs(np.corrcoef(coords[:, 1], x[:, 6])[0, 1]) > 0.99
    assert explained[0] > explained[1] and sum(explained) > 0.99
    again, _ = project(-x)  # the same cloud mirrored: the same picture (signs fixed by the data)
    assert np.allclose(np.abs(again), np.abs(coords))
    assert np.allclose(project(x)[0], coords)


def test_sample_offsets_are_bounded_distinct_sorted_and_fixed():
    s = sample_offsets(1_000_000, 2000)
    assert len(s) == 2000 == len(set(s.tolist())) and (np.diff(s) > 0).all() and s.max() < 1_000_000
    assert (s == sample_offsets(1_000_000, 2000)).all()
    assert sample_offsets(5, 2000).tolist() == [0, 1, 2, 3, 4]


def test_marks_say_what_a_promotion_moves():
    def hits(ids):
        return [{"id": i, "class": "c", "distance": 0.1} for i in ids]

    champion, challenger = mark_changes(hits(["a", "b", "c", "d"]), hits(["a", "c", "e", "b"]))
    assert [(h.id, h.mark, h.other_rank) for h in champion] == [
        ("a", "same", 1),
        ("b", "moved", 4),
        ("c", "moved", 2),
        ("d", "left", None),
    ]
    assert [(h.id, h.mark) for h in challenger] == [("a", "same"), ("c", "moved"), ("e", "entered"), ("b", "moved")]


def test_stamped_cache_computes_once_per_stamp():
    calls = []
    cache: StampedCache[int] = StampedCache(size=2)
    for stamp in (1, 1, 2, 1, 3, 1):
        cache.get(stamp, lambda s=stamp: calls.append(s) or s)
    assert calls == [1, 2, 3, 1]  # 1 fell out once 2 and 3 came in
