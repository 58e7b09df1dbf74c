"""Replay memory: the budget and balance invariants after every arrival, herding, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from components.config import ReplayParams
from components.training.replay import ReplayMemory, class_quotas, herding_order
from tests.conftest import png_bytes


def _params(budget: int, selection: str = "random") -> ReplayParams:
    return ReplayParams(budget=budget, selection=selection, batch_ratio=0.5, seed=0)


def _arrival(tmp_path: Path, start: int, sizes: list[int], first_image: int = 0) -> dict[str, list[tuple[str, Path]]]:
    out = {}
    for k, n in enumerate(sizes):
        cls = f"c{start + k:03d}"
        items = []
        for i in range(first_image, first_image + n):
            path = tmp_path / cls / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png_bytes(color=(i * 7) % 256))
            items.append((f"{cls}/{i}.png", path))
        out[cls] = items
    return out


def _features(paths):
    # A deterministic stand-in for a model: one direction per file index, normalised.
    rng = np.random.default_rng([int(p.stem) for p in paths])
    x = rng.normal(size=(len(paths), 8))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("selection", ["random", "herding"])
@pytest.mark.parametrize("budget", [7, 40, 500])
def test_size_is_min_of_budget_and_seen_and_balanced_after_every_arrival(tmp_path, selection, budget):
    memory = ReplayMemory(_params(budget, selection))
    seen: dict[str, int] = {}
    rng = np.random.default_rng(budget)
    for step in range(6):
        sizes = rng.integers(1, 15, size=int(rng.integers(1, 6))).tolist()
        arrival = _arrival(tmp_path, step * 10, sizes)
        if step >= 3:  # an arrival that also extends a class that came before: c000 arrives again
            arrival |= _arrival(tmp_path, 0, [int(rng.integers(1, 6))], first_image=100 * step)
        memory.add_classes(arrival, featurize=_features)
        seen |= {c: seen.get(c, 0) + len(v) for c, v in arrival.items()}
        counts = memory.per_class()
        assert len(memory) == len(memory.exemplars()) == min(budget, sum(seen.values()))
        # Balanced within one among classes that still had images to give.
        limited = [n for c, n in counts.items() if n < seen[c]]
        if limited:
            assert max(limited) - min(limited) <= 1
            # A class that kept all its images is no bigger than the others' share.
            assert all(n <= max(limited) for c, n in counts.items() if n == seen[c])
        assert len({e.id for e in memory.exemplars()}) == len(memory)


def test_quotas_fill_small_classes_and_split_the_rest():
    assert class_quotas({"a": 2, "b": 10, "c": 10}, 12) == {"a": 2, "b": 5, "c": 5}
    assert class_quotas({"a": 10, "b": 10, "c": 10}, 10) == {"a": 4, "b": 3, "c": 3}
    assert class_quotas({"a": 1, "b": 1}, 10) == {"a": 1, "b": 1}


def test_herding_picks_the_point_nearest_the_mean_first_and_every_point_once():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]])
    order = herding_order(x)
    assert sorted(order) == [0, 1, 2, 3]
    assert order[0] == 2  # of all single points, (0.7, 0.7) is nearest the mean (0.175, 0.425)
    # The first two together approximate the mean better than any other pair containing the first.
    pair_mean = x[order[:2]].mean(axis=0)
    others = [x[[order[0], j]].mean(axis=0) for j in range(4) if j not in order[:2]]
    assert all(np.linalg.norm(pair_mean - x.mean(0)) <= np.linalg.norm(o - x.mean(0)) for o in others)


def test_shrinking_keeps_the_best_ranked_exemplars(tmp_path):
    memory = ReplayMemory(_params(12, "herding"))
    memory.add_classes(_arrival(tmp_path, 0, [12]), featurize=_features)
    first = [e.id for e in memory.exemplars()]
    memory.add_classes(_arrival(tmp_path, 1, [12, 12]), featurize=_features)
    kept = [e.id for e in memory.exemplars() if e.cls == "c000"]
    assert kept == first[: len(kept)] and len(kept) == 4


def test_saved_memory_restores_with_its_own_images(tmp_path):
    memory = ReplayMemory(_params(9, "random"))
    memory.add_classes(_arrival(tmp_path / "src", 0, [5, 5, 5]))
    saved = memory.save(tmp_path / "state")
    restored = ReplayMemory.load(saved, _params(9, "random"))
    assert [(e.id, e.cls) for e in restored.exemplars()] == [(e.id, e.cls) for e in memory.exemplars()]
    # The restored memory reads only its own copies, never the original arrival.
    assert all(str(e.path).startswith(str(saved)) and e.path.is_file() for e in restored.exemplars())
    smaller = ReplayMemory.load(saved, _params(3, "random"))
    assert len(smaller) == 3 and smaller.per_class() == {"c000": 1, "c001": 1, "c002": 1}


def test_a_damaged_memory_names_its_file(tmp_path):
    memory = ReplayMemory(_params(4))
    memory.add_classes(_arrival(tmp_path / "src", 0, [2, 2]))
    saved = memory.save(tmp_path / "state")
    next((saved / "images").rglob("*.png")).unlink()
    with pytest.raises(ValueError, match=r"memory\.json.*missing"):
        ReplayMemory.load(saved, _params(4))
