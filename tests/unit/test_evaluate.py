"""Retrieval metrics against hand-computed values, brute force, and pytorch-metric-learning."""

import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

from components.gate import decide
from components.metrics import embedding_spread, retrieval_metrics


def on_circle(degrees):
    rad = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


def test_five_point_fixture_matches_hand_computed_values():
    # a at 0, 10 and 100 degrees; b at 25 and 90. Neighbour orders (worked out by hand):
    # a0: a1 b0 b1 a2 | a1: a0 b0 b1 a2 | b0: a1 a0 b1 a2 | b1: a2 b0 a1 a0 | a2: b1 b0 a1 a0
    x = on_circle([0, 10, 25, 90, 100])
    labels = ["a", "a", "b", "b", "a"]
    m = retrieval_metrics(x, labels, ks=(1, 2, 4))
    assert m.recall_at[1] == pytest.approx(2 / 5)
    assert m.recall_at[2] == pytest.approx(3 / 5)
    assert m.recall_at[4] == pytest.approx(1.0)
    # AP@R: a0 and a1 get 1/2 (first of R=2 is right), the other three get 0; R-precision alike.
    assert m.map_at_r == pytest.approx((0.5 + 0.5) / 5)
    assert m.r_precision == pytest.approx((0.5 + 0.5) / 5)
    assert m.queries == 5


def test_five_point_fixture_where_map_at_r_and_r_precision_differ():
    # a at 0, 22 and 180 degrees; b at 10 and 60. Neighbour orders (by angle, worked out by hand):
    # a0: b10 a22 b60 a180 | b10: a0 a22 b60 a180 | a22: b10 a0 b60 a180 | b60: a22 b10 a0 a180 | a180: b60 a22 b10 a0
    x = on_circle([0, 10, 22, 60, 180])
    labels = ["a", "b", "a", "b", "a"]
    m = retrieval_metrics(x, labels, ks=(1, 2))
    assert m.recall_at[1] == 0.0
    assert m.recall_at[2] == pytest.approx(4 / 5)  # all but b10, whose R=1 neighbour b60 comes third
    # Each a query (R=2) has its first hit at rank 2: R-precision 1/2, AP@R (1/2)/2; each b gets 0.
    assert m.r_precision == pytest.approx(3 * 0.5 / 5)
    assert m.map_at_r == pytest.approx(3 * 0.25 / 5)


def brute_force(x, labels, ks):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    hits = {k: 0 for k in ks}
    aps = []
    for q in range(n):
        others = [j for j in range(n) if j != q]
        order = sorted(others, key=lambda j: -float(x[q] @ x[j]))
        rel = [labels[j] == labels[q] for j in order]
        r = sum(rel)
        if r == 0:
            continue
        for k in ks:
            hits[k] += any(rel[:k])
        correct, ap = 0, 0.0
        for i in range(r):
            if rel[i]:
                correct += 1
                ap += correct / (i + 1)
        aps.append(ap / r)
    return {k: hits[k] / len(aps) for k in ks}, sum(aps) / len(aps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_random_data(seed):
    rng = np.random.default_rng(seed)
    labels = list(rng.integers(0, 6, size=60).astype(str)) + ["lonely"]  # a singleton is skipped
    x = rng.normal(size=(61, 8)).astype(np.float32)
    recall, map_r = brute_force(x, labels, (1, 5, 10))
    m = retrieval_metrics(x, labels, ks=(1, 5, 10), chunk=7)  # small chunks exercise the chunking
    assert m.queries == 60
    for k in (1, 5, 10):
        assert m.recall_at[k] == pytest.approx(recall[k])
    assert m.map_at_r == pytest.approx(map_r)


def test_matches_pytorch_metric_learning():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 8, size=200)
    centres = rng.normal(size=(8, 16))
    x = (centres[labels] + rng.normal(scale=1.5, size=(200, 16))).astype(np.float32)
    ours = retrieval_metrics(x, labels, ks=(1,))
    theirs = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        knn_func=CustomKNN(CosineSimilarity()),  # exact search, no faiss needed
    ).get_accuracy(torch.tensor(x), torch.tensor(labels))
    assert ours.recall_at[1] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours.map_at_r == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours.r_precision == pytest.approx(theirs["r_precision"], abs=1e-6)


def test_chunk_size_does_not_change_the_result():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 5, size=50)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    whole, pieces = retrieval_metrics(x, labels, chunk=50), retrieval_metrics(x, labels, chunk=3)
    assert whole.recall_at == pytest.approx(pieces.recall_at)
    assert (whole.map_at_r, whole.r_precision) == pytest.approx((pieces.map_at_r, pieces.r_precision))


def test_embedding_spread_is_zero_for_collapse_and_one_for_orthogonal_vectors():
    assert embedding_spread(np.tile([[0.6, 0.8]], (10, 1))) == pytest.approx(0.0, abs=1e-12)
    assert embedding_spread(np.eye(8)) == pytest.approx(1.0)  # every pair at cosine distance 1
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 6))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    brute = np.mean([1 - x[i] @ x[j] for i in range(30) for j in range(30) if i != j])
    assert embedding_spread(x) == pytest.approx(brute)


def test_non_finite_embeddings_are_refused():
    x = on_circle([0, 10, 20])
    x[1, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(x, ["a", "a", "b"])


HEALTHY = {"unseen_recall_at_1": 0.5, "unseen_map_at_r": 0.3, "embedding_spread": 0.4, "non_finite_embeddings": 0.0}


def test_gate_first_model_skips_change_thresholds(repo_params):
    gate = repo_params.gate.model_copy(update={"min_unseen_recall_at_1": 0.3})
    first = decide(HEALTHY, None, gate)
    assert first.promote and any("no champion" in r for r in first.reasons)
    assert not decide(HEALTHY | {"unseen_recall_at_1": 0.2}, None, gate).promote


def test_gate_rejects_a_drop_against_the_champion_with_a_reason(repo_params):
    gate = repo_params.gate.model_copy(update={"min_unseen_recall_at_1": 0.0, "max_unseen_recall_at_1_drop": 0.05})
    worse = decide(HEALTHY | {"unseen_recall_at_1": 0.40}, {"unseen_recall_at_1": 0.50}, gate)
    assert not worse.promote
    assert any("dropped 0.1000" in r for r in worse.failed)
    assert decide(HEALTHY | {"unseen_recall_at_1": 0.47}, {"unseen_recall_at_1": 0.50}, gate).promote
    assert not decide(HEALTHY | {"unseen_recall_at_1": math.nan}, None, gate).promote
