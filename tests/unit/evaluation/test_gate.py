"""The gate as a pure function: every reason, value vs change thresholds, forgetting, the report."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from components.evaluation.forgetting import (
    ForgettingMatrix,
    forgetting_heatmap,
    forgetting_matrix,
    forgetting_metrics,
    slice_forgetting,
)
from components.evaluation.gate import GateDecision, decide, gate_markdown, gate_report
from components.registry.mlflow_registry import INDEX_VALIDATED_TAG, SMOKE_TAG, TABLE_TAG, VERDICT_TAG, ModelVersionInfo
from components.registry.promotion import promotion_refusals
from components.registry.promotion_log import PromotionEntry, previous_champion

HEALTHY = {
    "unseen_recall_at_1": 0.6,
    "unseen_map_at_r": 0.3,
    "baseline_unseen_recall_at_1": 0.05,  # raw pixels, measured in the same run
    "baseline_unseen_map_at_r": 0.02,
    "embedding_spread": 0.4,
    "non_finite_embeddings": 0.0,
}


@pytest.fixture()
def gate(repo_params):
    return repo_params.gate.model_copy(
        update={
            "min_unseen_recall_at_1": 0.2,
            "min_unseen_map_at_r": 0.1,
            "min_embedding_spread": 0.01,
            "max_unseen_recall_at_1_drop": 0.05,
            "max_slice_forgetting": 0.1,
        }
    )


def test_first_model_is_promoted_on_value_thresholds_alone(gate):
    d = decide(HEALTHY, None, gate)
    assert d.promote and d.verdict == "promote" and not d.failed
    assert "no champion: change thresholds skipped" in d.reasons
    # Change thresholds are skipped: a huge "forgetting" cannot reject a first model.
    assert decide(HEALTHY | {"forgetting_a": 0.9}, None, gate).promote


def test_collapsed_embeddings_are_rejected_with_the_spread(gate):
    d = decide(HEALTHY | {"embedding_spread": 0.0001}, None, gate)
    assert not d.promote
    assert d.failed == ["embeddings collapsed: spread 0.0001 is below the floor 0.0100"]


def test_non_finite_embeddings_are_rejected_not_raised(gate):
    nan = dict.fromkeys(["unseen_recall_at_1", "unseen_map_at_r", "embedding_spread"], math.nan)
    d = decide(HEALTHY | nan | {"non_finite_embeddings": 12.0}, {"unseen_recall_at_1": 0.6}, gate)
    assert not d.promote
    assert "12 embeddings contain NaN or infinite values" in d.failed
    assert any("unseen Recall@1 nan is below the floor" in r for r in d.failed)


def test_every_failed_threshold_is_a_reason(gate):
    d = decide(HEALTHY | {"unseen_recall_at_1": 0.1, "unseen_map_at_r": 0.05}, {"unseen_recall_at_1": 0.6}, gate)
    assert d.failed == [
        "unseen Recall@1 0.1000 is below the floor 0.2000",
        "unseen MAP@R 0.0500 is below the floor 0.1000",
        "unseen Recall@1 dropped 0.5000 against the champion, more than 0.0500",
    ]
    assert len(d.reasons) > len(d.failed)  # the passed checks are reasons too


def test_a_metric_that_was_not_measured_never_promotes(gate):
    d = decide({"unseen_recall_at_1": 0.9}, None, gate)
    assert not d.promote
    assert "embeddings were not checked for NaN/inf" in d.failed


def test_forgetting_on_any_slice_beyond_the_threshold_rejects(gate):
    champion = {"unseen_recall_at_1": 0.6}
    ok = decide(HEALTHY | {"forgetting_a": 0.02, "forgetting_b": -0.1}, champion, gate)
    assert ok.promote and "largest forgetting +0.0200 (slice a) is within 0.1000" in ok.reasons
    bad = decide(HEALTHY | {"forgetting_a": 0.02, "forgetting_b": 0.25}, champion, gate)
    assert not bad.promote and bad.failed == ["forgot 0.2500 of seen Recall@1 on slice b, more than 0.1000"]


def test_with_check_adds_a_late_reason():
    d = GateDecision(True, ["fine"]).with_check(False, "index smoke test: 1 of 8 probes lost")
    assert not d.promote and d.failed == ["index smoke test: 1 of 8 probes lost"] and len(d.reasons) == 2


def test_forgetting_matrix_from_served_history_and_fresh_scores():
    served = [
        ("1", {"seen_a_recall_at_1": 0.9}),
        ("3", {"seen_a_recall_at_1": 0.7, "seen_b_recall_at_1": 0.8}),
        ("2", {"seen_a_recall_at_1": 0.95, "seen_a_map_at_r": 0.5}),
    ]
    fresh = {
        "seen_a_recall_at_1": 0.75,
        "seen_b_recall_at_1": 0.85,
        "seen_c_recall_at_1": 0.6,
        "champion_seen_a_recall_at_1": 0.72,
        "champion_seen_b_recall_at_1": 0.81,
    }
    m = forgetting_matrix(served, fresh, champion="3")
    assert m.versions == ["1", "2", "3", "candidate"] and m.slices == ["a", "b", "c"]
    expected = [[0.9, np.nan, np.nan], [0.95, np.nan, np.nan], [0.72, 0.81, np.nan], [0.75, 0.85, 0.6]]
    np.testing.assert_allclose(m.values, expected)  # the champion's row is its fresh score, not its logged one
    assert m.forgetting() == pytest.approx({"a": 0.20, "b": -0.04})  # c is new: nothing to forget
    np.testing.assert_allclose(slice_forgetting(m.values), [0.20, -0.04, np.nan])
    metrics = forgetting_metrics(m)
    assert metrics["forgetting_a"] == pytest.approx(0.2) and "forgetting_c" not in metrics
    assert metrics["average_forgetting"] == pytest.approx(0.08)


def test_no_history_means_nothing_forgotten():
    m = forgetting_matrix([], {"seen_a_recall_at_1": 0.5})
    assert m.versions == ["candidate"] and m.forgetting() == {}
    assert forgetting_metrics(m) == {"average_forgetting": 0.0}


def test_report_puts_metrics_side_by_side_with_deltas(gate):
    metrics = HEALTHY | {
        "champion_unseen_recall_at_1": 0.5,
        "seen_a_recall_at_1": 0.7,
        "champion_seen_a_recall_at_1": 0.75,
        "forgetting_a": 0.05,
        "baseline_unseen_recall_at_1": 0.3,
        "unseen_r_precision": math.nan,
    }
    decision = decide(metrics, {"unseen_recall_at_1": 0.5}, gate)
    matrix = ForgettingMatrix(["1", "candidate"], ["a"], np.array([[0.75], [0.7]]))
    report = gate_report("2", "1", metrics, decision, gate, matrix)
    json.dumps(report, allow_nan=False)  # strict JSON: NaN became null
    assert report["verdict"] == "promote" and report["reasons"] == decision.reasons
    assert report["metrics"]["unseen_recall_at_1"] == {"candidate": 0.6, "champion": 0.5, "delta": pytest.approx(0.1)}
    assert report["metrics"]["seen_a_recall_at_1"]["delta"] == pytest.approx(-0.05)
    assert report["metrics"]["unseen_r_precision"]["candidate"] is None
    assert report["forgetting"] == {"a": 0.05} and report["thresholds"]["max_slice_forgetting"] == 0.1
    assert report["forgetting_matrix"]["versions"] == ["1", "v2 (candidate)"]
    md = gate_markdown(report)
    assert "# Gate: v2 — **PROMOTE**" in md and "against champion v1" in md
    assert "| unseen_recall_at_1 | 0.6000 | 0.5000 | +0.1000 |" in md
    assert all(f"- {r}" in md for r in decision.reasons)


def test_heatmap_shows_every_version_and_slice_with_its_value():
    matrix = ForgettingMatrix(["1", "2", "candidate"], ["a", "b"], np.array([[0.9, np.nan], [0.8, 0.7], [0.85, 0.75]]))
    fig = forgetting_heatmap(matrix)
    ax = fig.axes[0]
    drawn = ax.images[0].get_array()
    assert drawn.shape == (3, 2) and drawn.mask[0, 1]  # a slice a version never saw is blank, not 0
    np.testing.assert_allclose(drawn.filled(np.nan), matrix.values)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["v1", "v2", "candidate"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    assert sorted(t.get_text() for t in ax.texts) == ["0.70", "0.75", "0.80", "0.85", "0.90"]
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    with Image.open(buf) as png:  # a real image of the figure's size, not an empty canvas
        assert png.size == tuple(int(x) for x in fig.get_size_inches() * fig.dpi)
        assert len(png.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 20
    empty = forgetting_heatmap(ForgettingMatrix(["candidate"], [], np.zeros((1, 0))))
    assert [t.get_text() for t in empty.axes[0].texts] == ["no seen-class slice scored yet"]


def entry(kind, frm, to):
    return PromotionEntry(time="t", from_version=frm, to_version=to, reason="", actor="me", kind=kind)


def test_rollback_walks_back_through_promotions_not_back_and_forth():
    log = [entry("promote", None, "1"), entry("promote", "1", "2"), entry("promote", "2", "3")]
    assert previous_champion(log, "3") == "2"
    log.append(entry("rollback", "3", "2"))
    assert previous_champion(log, "2") == "1"  # a second rollback goes further back, not to 3
    log.append(entry("rollback", "2", "1"))
    assert previous_champion(log, "1") is None
    assert previous_champion([], "1") is None


def test_promotion_refusals_name_every_problem_and_force_only_skips_the_gate():
    def info(**tags):
        return ModelVersionInfo(name="m", version="4", run_id="r", tags=tags)

    gated = {TABLE_TAG: "t_v4", INDEX_VALIDATED_TAG: "true", VERDICT_TAG: "promote", SMOKE_TAG: "passed"}
    assert promotion_refusals(info(**gated)) == []
    rejected = info(**{TABLE_TAG: "t_v4", VERDICT_TAG: "reject", SMOKE_TAG: "passed"})
    assert promotion_refusals(rejected) == ["v4 failed the gate (see `mnemo status`); --force promotes it anyway"]
    assert promotion_refusals(rejected, force=True) == []
    broken = info(**{TABLE_TAG: "t_v4", INDEX_VALIDATED_TAG: "false", SMOKE_TAG: "failed", VERDICT_TAG: "reject"})
    assert len(promotion_refusals(broken, force=True)) == 2
    assert promotion_refusals(info(), force=True) == [
        "v4 has no validated index table (build one with `mnemo reindex 4`)"
    ]
    assert promotion_refusals(info(), force=True, table="t_v4") == []  # a table found in the index counts


def test_promotion_fails_closed_on_a_version_never_gated_or_smoke_tested():
    def info(**tags):
        return ModelVersionInfo(name="m", version="4", run_id="r", tags={TABLE_TAG: "t_v4"} | tags)

    assert promotion_refusals(info()) == [
        "v4 was never gated (no gate verdict); --force promotes it anyway",
        "v4 was never smoke-tested against its table; --force promotes it anyway",
    ]
    assert promotion_refusals(info(**{VERDICT_TAG: "promote"})) == [
        "v4 was never smoke-tested against its table; --force promotes it anyway"
    ]
    assert promotion_refusals(info(), force=True) == []


def test_forward_transfer_is_reported_and_checked_only_against_a_floor_that_is_set(gate):
    transfer = {
        "transfer_demo-003_recall_at_1": 0.41,
        "transfer_demo-003_map_at_r": 0.2,
        "transfer_demo-003_8way_1shot": 0.5,
    }
    said = decide(HEALTHY | transfer, None, gate.model_copy(update={"min_forward_transfer_recall_at_1": None}))
    assert said.promote
    assert any(r.startswith("forward transfer to arrival demo-003") and "8way_1shot 0.5000" in r for r in said.reasons)
    floored = decide(HEALTHY | transfer, None, gate.model_copy(update={"min_forward_transfer_recall_at_1": 0.5}))
    assert not floored.promote
    assert floored.failed == [
        "forward transfer to arrival demo-003 (the champion before training on it): R@1 0.4100, MAP@R 0.2000, "
        "8way_1shot 0.5000, below the floor 0.5000"
    ]
    matrix = ForgettingMatrix(["candidate"], [], np.zeros((1, 0)))
    report = gate_report("2", "1", HEALTHY | transfer, said, gate, matrix)
    assert report["forward_transfer"] == {"demo-003": {"8way_1shot": 0.5, "map_at_r": 0.2, "recall_at_1": 0.41}}
    assert "| demo-003 | 0.5000 | 0.2000 | 0.4100 |" in gate_markdown(report)
