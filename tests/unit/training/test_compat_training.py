"""Backward-compatible training's parts (components/training/compat.py): BCT's influence loss against
its brute-force value, and the old -> new transform recovering a map it is fitted on."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from components.config import CompatParams
from components.evaluation.metrics import unit_rows
from components.training.compat import Influence, Transform, class_prototypes, fit_transform

PARAMS = CompatParams(
    mode="bct",
    influence_weight=2.0,
    temperature=0.5,
    transform_hidden=32,
    transform_epochs=300,
    transform_lr=0.01,
    backfill_rows=10,
)


def test_influence_is_the_cross_entropy_of_a_cosine_classifier_over_the_old_prototypes():
    prototypes = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 2.0]), "c": np.array([-1.0, -1.0])}
    influence = Influence(prototypes, PARAMS).order(["b", "a", "c", "d"])  # the loop's label order; d has none
    embeddings = torch.tensor([[2.0, 1.0], [0.5, -3.0], [1.0, 1.0]])
    labels = torch.tensor([1, 0, 3])  # a, b, d (left out: no prototype)

    got = influence(embeddings, labels)["compat_influence"].item()

    unit = {c: np.asarray(v) / np.linalg.norm(v) for c, v in prototypes.items()}
    order = ["b", "a", "c"]
    by_hand = []
    for e, want in zip(embeddings.numpy()[:2], ["a", "b"]):
        logits = [float(e / np.linalg.norm(e) @ unit[c]) / PARAMS.temperature for c in order]
        by_hand.append(-logits[order.index(want)] + math.log(sum(math.exp(z) for z in logits)))
    assert abs(got - PARAMS.influence_weight * float(np.mean(by_hand))) < 1e-5


def test_influence_is_zero_for_a_batch_of_classes_the_old_model_never_placed():
    influence = Influence({"a": np.array([1.0, 0.0])}, PARAMS).order(["x", "a"])
    assert influence(torch.randn(4, 2), torch.tensor([0, 0, 0, 0]))["compat_influence"].item() == 0.0


def test_class_prototypes_are_unit_class_means():
    got = class_prototypes(np.array([[1.0, 0.0], [0.0, 1.0], [0.0, -3.0]]), ["p", "p", "q"])
    np.testing.assert_allclose(got["p"], [math.sqrt(0.5), math.sqrt(0.5)], atol=1e-6)
    np.testing.assert_allclose(got["q"], [0.0, -1.0], atol=1e-6)


def test_a_fitted_transform_maps_old_vectors_onto_the_new_ones_and_survives_a_round_trip(tmp_path: Path):
    rng = np.random.default_rng(0)
    old = unit_rows(rng.normal(size=(400, 8)))
    rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    new = old @ rotation.T  # the new model: the same geometry in another basis
    transform, fit = fit_transform(old, new, PARAMS)
    assert fit > 0.99  # mean cosine similarity to the new vectors on what it was fitted on
    held_out = unit_rows(rng.normal(size=(50, 8)))
    mapped = transform.to_new(held_out)
    assert float(np.mean(np.sum(mapped * (held_out @ rotation.T), axis=1))) > 0.97
    loaded = Transform.load(transform.save(tmp_path / "transform.pt"))
    np.testing.assert_allclose(loaded.to_new(held_out), mapped, atol=1e-6)
