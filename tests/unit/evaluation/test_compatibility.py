"""Compatibility between versions (components/evaluation/compat.py): one model's queries among another's
vectors against brute force, BCT's criterion in the gate's words, the cross-version matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from components.data.catalog import Catalog
from components.data.ingest import ingest_arrival
from components.evaluation import keys
from components.evaluation.assessment import assess
from components.evaluation.compat import compat_matrix, compatibility, cross_scores
from components.evaluation.gate import decide
from components.evaluation.metrics import unit_rows

PALETTE = [
    (220, 40, 40),
    (40, 200, 40),
    (40, 40, 220),
    (220, 220, 40),
    (220, 40, 220),
    (40, 220, 220),
    (120, 60, 20),
    (20, 120, 160),
    (160, 160, 160),
    (250, 140, 0),
    (90, 0, 140),
    (0, 90, 40),
]


class Colour(nn.Module):
    """An 'embedder' of an image's mean colour (centred); `nuisance` mixes in where its dark square
    sits, which varies within a class: a worse model of the same space. `permute` rotates the
    channels: the same geometry in another basis (as good, and useless among the others' vectors)."""

    image_size, embedding_dim = 16, 5
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def __init__(self, nuisance: float = 0.0, permute: bool = False) -> None:
        super().__init__()
        self.nuisance, self.permute = nuisance, permute
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # embed_files reads the device from it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        colour = x.mean(dim=(2, 3)) - 0.5
        dark = (x.mean(dim=1) < 0.1).float()  # where the square sits
        grid = torch.linspace(-1, 1, x.shape[-1])
        where = torch.stack([(dark.sum(1) * grid).sum(1), (dark.sum(2) * grid).sum(1)], dim=1) / 16
        v = torch.cat([colour, self.nuisance * where], dim=1)
        return nn.functional.normalize(v[:, [1, 2, 0, 3, 4]] if self.permute else v, dim=1)


@pytest.fixture()
def colours(ws, params, tmp_path):
    """One arrival of 12 colour classes, 6 images each, a dark square anywhere in each image."""
    rng = np.random.default_rng(0)
    for c, rgb in enumerate(PALETTE):
        folder = tmp_path / "drop" / "colours" / f"c{c:02d}"
        folder.mkdir(parents=True)
        for i in range(6):
            img = np.zeros((16, 16, 3), dtype=np.uint8) + np.array(rgb, dtype=np.uint8)
            y, x = rng.integers(0, 12, size=2)
            img[y : y + 4, x : x + 4] = 0
            Image.fromarray(img).save(folder / f"{i}.png")
    ingest_arrival(tmp_path / "drop" / "colours", ws, params.ingest)
    return Catalog.load(ws.catalog)


def test_assess_declares_a_better_model_of_the_same_space_compatible_and_a_rotated_one_not(ws, params, colours):
    old, better, rotated = Colour(nuisance=3.0), Colour(), Colour(permute=True)
    gate = params.gate.model_copy(update={"min_margin_over_pixels": -1.0})

    def judged(candidate: nn.Module):
        return assess(ws, colours, params.evaluate, gate, candidate, champion=old, champion_version="1")  # type: ignore[arg-type]

    good, bad = judged(better), judged(rotated)
    r1 = keys.unseen("recall_at_1")
    old_old = good.metrics[keys.champion(r1)]
    assert good.metrics[keys.compat(r1)] > old_old and good.decision.compatible
    assert bad.metrics[r1] == good.metrics[r1]  # as good on its own ...
    assert bad.metrics[keys.compat(r1)] < old_old and not bad.decision.compatible  # ... but not among old vectors


def test_cross_recall_at_1_is_each_query_s_nearest_other_gallery_vector_by_brute_force():
    rng = np.random.default_rng(1)
    labels = ["a", "a", "b", "b", "c"]
    queries, gallery = unit_rows(rng.normal(size=(5, 3))), unit_rows(rng.normal(size=(5, 3)))
    got = cross_scores(queries, gallery, labels, [1])
    hits = []
    for i in range(4):  # c has no other image: not a query
        sims = gallery @ queries[i]
        sims[i] = -np.inf  # an image never retrieves its own stored vector
        hits.append(labels[int(np.argmax(sims))] == labels[i])
    assert got[keys.compat(keys.unseen("recall_at_1"))] == np.mean(hits)


def test_a_model_is_compatible_only_when_its_queries_beat_the_old_model_s_among_the_old_vectors():
    old = {keys.champion(keys.unseen("recall_at_1")): 0.80, keys.champion(keys.unseen("map_at_r")): 0.50}
    better = old | {keys.compat(keys.unseen("recall_at_1")): 0.83, keys.compat(keys.unseen("map_at_r")): 0.52}
    worse_map = old | {keys.compat(keys.unseen("recall_at_1")): 0.83, keys.compat(keys.unseen("map_at_r")): 0.49}
    verdict = compatibility(better, 0.0)
    assert (
        verdict is not None and verdict.compatible and "R@1 0.8300 against the champion's own 0.8000" in verdict.reason
    )
    assert not compatibility(worse_map, 0.0).compatible  # both metrics must gain
    assert not compatibility(better, 0.05).compatible  # by more than the gate's margin
    assert compatibility({}, 0.0) is None  # no champion scored: nothing to be compatible with


def test_the_gate_says_whether_a_promotion_may_use_the_champion_s_vectors(params):
    scored = {
        "non_finite_embeddings": 0.0,
        "embedding_spread": 0.5,
        keys.unseen("recall_at_1"): 0.9,
        keys.unseen("map_at_r"): 0.6,
        keys.champion(keys.unseen("recall_at_1")): 0.8,
        keys.champion(keys.unseen("map_at_r")): 0.5,
    }
    champion = keys.under(scored, keys.CHAMPION)
    compatible = scored | {keys.compat(keys.unseen("recall_at_1")): 0.85, keys.compat(keys.unseen("map_at_r")): 0.55}
    incompatible = scored | {keys.compat(keys.unseen("recall_at_1")): 0.10, keys.compat(keys.unseen("map_at_r")): 0.05}
    yes, no = decide(compatible, champion, params.gate), decide(incompatible, champion, params.gate)
    assert yes.promote and yes.compatible and any(r.startswith("compatible with the champion") for r in yes.reasons)
    assert no.promote and not no.compatible  # promoted all the same, on a table built whole
    assert any(r.startswith("not compatible") for r in no.reasons) and not no.failed
    assert not decide(compatible, None, params.gate).compatible  # a first model: nothing to be compatible with


def test_the_cross_version_matrix_holds_every_query_model_against_every_gallery():
    labels = ["a", "a", "b", "b"]
    base = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], dtype=np.float32)
    swapped = base[:, ::-1].copy()  # another basis: its queries land on the wrong class among base's vectors
    matrix = compat_matrix({"1": base, "2": swapped}, {"1": base, "2": swapped}, labels)
    assert matrix.recall[0, 0] == matrix.recall[1, 1] == 1.0
    assert matrix.recall[0, 1] == matrix.recall[1, 0] == 0.0
    assert matrix.as_dict()["versions"] == ["1", "2"]
