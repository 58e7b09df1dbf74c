"""Forward transfer and within-arrival episodes, against embedders whose transfer is known.

A colour embedder (each image's mean red, green and blue) transfers perfectly to an arrival
whose classes differ by colour and not at all to one whose classes share a colour and differ
by where a square sits: the figures must say so."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from components.data.catalog import Catalog
from components.data.ingest import ingest_arrival
from components.evaluation import keys
from components.evaluation.metrics import few_shot_accuracy
from components.evaluation.transfer import forward_transfer


class MeanColour(nn.Module):
    """An 'embedder' that sees only colour: the image's mean R, G, B (centred)."""

    image_size, embedding_dim = 16, 3
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # embed_files reads the device from it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.mean(dim=(2, 3)) - 0.5
        return nn.functional.normalize(v, dim=1)


def write(root, arrival: str, kind: str, classes: int = 6, per_class: int = 4):
    rng = np.random.default_rng(len(kind))
    for c in range(classes):
        folder = root / arrival / f"{kind}{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            img = np.full((16, 16, 3), 128, dtype=np.uint8)
            if kind == "hue":  # a class is a colour; the square sits anywhere
                img[:] = np.roll([230, 40, 40], c % 3) * (0.5 + 0.5 * (c // 3))
                y, x = rng.integers(0, 12, size=2)
                img[y : y + 4, x : x + 4] = 128
            else:  # a class is where a dark and a bright square sit; every image has the same mean colour
                y, x = divmod(c, 3)
                img[y * 6 : y * 6 + 4, x * 5 : x * 5 + 4] = 228
                img[15 - y * 6 - 4 : 15 - y * 6, 15 - x * 5 - 4 : 15 - x * 5] = 28
                img += rng.integers(0, 2, size=img.shape, dtype=np.uint8)
            Image.fromarray(img).save(folder / f"{i}.png")
    return root / arrival


@pytest.fixture()
def catalog(ws, params, tmp_path):
    for arrival, kind in (("colours", "hue"), ("layouts", "layout")):
        ingest_arrival(write(tmp_path / "drop", arrival, kind), ws, params.ingest)
    return Catalog.load(ws.catalog)


def test_forward_transfer_tells_an_arrival_the_model_transfers_to_from_one_it_does_not(ws, params, catalog):
    got = forward_transfer(ws, catalog, MeanColour(), ["colours", "layouts"], params.evaluate)
    good, bad = keys.transfer_values(got)["colours"], keys.transfer_values(got)["layouts"]
    assert good["recall_at_1"] == 1.0 and good["6way_1shot"] == 1.0  # every class of the arrival, 6 of them
    assert bad["recall_at_1"] < 0.5 and bad["6way_1shot"] < 0.5
    assert set(good) == {"recall_at_1", "map_at_r", "r_precision", "6way_1shot"}


def test_within_arrival_episodes_draw_every_candidate_from_one_arrival():
    # Two arrivals of 3 classes each; class i of one arrival sits where class i of the other does,
    # so they are confused across arrivals and never within one.
    centres = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float)
    labels = [f"c{i}" for i in range(6) for _ in range(4)]
    x = np.stack([centres[i % 3] + 0.001 * j for i in range(6) for j in range(4)])
    groups = {f"c{i}": ("a" if i < 3 else "b") for i in range(6)}
    across = few_shot_accuracy(x, labels, way=6, shot=1, episodes=20, seed=0)
    within = few_shot_accuracy(x, labels, way=3, shot=1, episodes=20, seed=0, groups=groups)
    assert within == 1.0 and across is not None and across < 0.75  # twins across arrivals confuse, not within
    assert few_shot_accuracy(x, labels, way=4, shot=1, episodes=20, seed=0, groups=groups) is None  # no group of 4
