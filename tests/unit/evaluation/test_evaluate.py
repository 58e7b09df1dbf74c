"""Retrieval metrics against hand-computed values, brute force, and pytorch-metric-learning."""

import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

from components.evaluation.gate import decide
from components.evaluation.metrics import embedding_spread, retrieval_metrics


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


HEALTHY = {
    "unseen_recall_at_1": 0.5,
    "unseen_map_at_r": 0.3,
    "baseline_unseen_recall_at_1": 0.2,
    "baseline_unseen_map_at_r": 0.1,
    "embedding_spread": 0.4,
    "non_finite_embeddings": 0.0,
}


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


def test_queries_search_the_whole_gallery_so_confusion_with_newer_classes_counts():
    # Slice 1 holds a query of class "old" at 0 degrees; its only other image is at 40 degrees.
    # A newer class "new" sits at 5 degrees: within the slice "old" is found at once, in the whole
    # gallery (as the live table answers) the newer class comes first.
    x = on_circle([0, 40, 5, 50])
    labels = ["old", "old", "new", "new"]
    within_slice = retrieval_metrics(x[:2], labels[:2], ks=(1,))
    whole = retrieval_metrics(x, labels, ks=(1, 2), queries=[0])
    assert within_slice.recall_at[1] == 1.0
    assert whole.queries == 1 and whole.recall_at[1] == 0.0 and whole.recall_at[2] == 1.0
    # MAP@R over the whole gallery: R = 1 (the other "old" image), found at rank 2 -> AP@R 0.
    assert whole.map_at_r == 0.0
    # Every row asking equals the default.
    assert retrieval_metrics(x, labels, ks=(1,), queries=range(4)) == retrieval_metrics(x, labels, ks=(1,))


def brute_force_episodes(x, labels, way, shot, episodes, seed):
    """The same seeded draws as few_shot_accuracy, judged query by query with plain loops."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    by_class = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    eligible = sorted(c for c, rows in by_class.items() if len(rows) > shot)
    rng = np.random.default_rng(seed)
    accuracies = []
    for _ in range(episodes):
        classes = rng.choice(len(eligible), size=way, replace=False)
        support, queries = {}, []
        for c in classes:
            rows = rng.permutation(by_class[eligible[c]])
            support[eligible[c]] = x[rows[:shot]].mean(axis=0)
            queries += [(q, eligible[c]) for q in rows[shot:]]
        right = 0
        for q, truth in queries:
            best = max(support, key=lambda c: float(x[q] @ support[c]))
            right += best == truth
        accuracies.append(right / len(queries))
    return float(np.mean(accuracies))


def test_few_shot_accuracy_matches_brute_force_and_says_when_it_cannot_run():
    from components.evaluation.metrics import few_shot_accuracy

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(8, 6))
    labels = [f"c{i % 8}" for i in range(48)]
    x = centres[[i % 8 for i in range(48)]] + rng.normal(scale=0.9, size=(48, 6))
    for way, shot in ((5, 1), (3, 2), (8, 5)):
        got = few_shot_accuracy(x, labels, way=way, shot=shot, episodes=40, seed=7)
        assert got == pytest.approx(brute_force_episodes(x, labels, way, shot, 40, 7))
        assert 0.0 < got < 1.0
    # Perfectly separated classes: every episode is right.
    assert few_shot_accuracy(centres[[i % 8 for i in range(48)]], labels, way=8, shot=1, episodes=5, seed=0) == 1.0
    # Too few classes with shot + 1 images: not measured, rather than measured on an easier task.
    assert few_shot_accuracy(x, labels, way=9, shot=1, episodes=5, seed=0) is None
    assert few_shot_accuracy(x, labels, way=2, shot=6, episodes=5, seed=0) is None


def test_gate_never_promotes_a_model_that_loses_to_raw_pixels(repo_params):
    gate = repo_params.gate.model_copy(update={"min_margin_over_pixels": 0.0})
    worse = HEALTHY | {"baseline_unseen_recall_at_1": 0.55}
    first = decide(worse, None, gate)  # the first model is held to it too
    assert not first.promote
    assert first.failed == ["unseen Recall@1 0.5000 does not beat raw pixels (0.5500) by more than 0.0000"]
    assert not decide(HEALTHY | {"baseline_unseen_recall_at_1": 0.5}, None, gate).promote  # a tie is not a win
    assert decide(HEALTHY, None, gate).promote
    # The margin is the gate's own setting: a wider one refuses the same model, a negative one lets a loser through.
    margin = gate.model_copy(update={"min_margin_over_pixels": 0.35})
    assert decide(HEALTHY, None, margin).failed == [
        "unseen Recall@1 0.5000 does not beat raw pixels (0.2000) by more than 0.3500",
        "unseen MAP@R 0.3000 does not beat raw pixels (0.1000) by more than 0.3500",
    ]
    assert decide(worse, None, gate.model_copy(update={"min_margin_over_pixels": -1.0})).promote
    assert not decide({k: v for k, v in HEALTHY.items() if not k.startswith("baseline_")}, None, gate).promote


def test_gate_few_shot_floor(repo_params):
    gate = repo_params.gate.model_copy(update={"min_unseen_few_shot": {"20way_1shot": 0.8}})
    assert decide(HEALTHY | {"unseen_20way_1shot": 0.85}, None, gate).promote
    low = decide(HEALTHY | {"unseen_20way_1shot": 0.75}, None, gate)
    assert low.failed == ["unseen 20way_1shot accuracy 0.7500 is below the floor 0.8000"]
    unmeasured = decide(HEALTHY, None, gate)
    assert unmeasured.failed == [
        "unseen 20way_1shot accuracy was not measured (too few unseen classes with enough images)"
    ]
