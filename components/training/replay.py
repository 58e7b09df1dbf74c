"""Exemplar replay: a fixed budget of images of old classes, class-balanced, kept across retrains.

The memory is the only view a retrain has of old classes: it is saved with every
model version (images included) and restored for the next retrain, so training
never has to reach back into old arrivals.

Selection per class is an ordered list, best first. Herding (Welling 2009, as in
iCaRL) picks images whose running mean embedding stays closest to the class mean;
random picks a seeded permutation. When the budget is shared by more classes,
each class keeps the first `quota` of its list, so shrinking never re-selects.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.config import ReplayParams

MEMORY_FILE = "memory.json"
IMAGES_DIR = "images"

# Embeds a list of image files into N x D L2-normalised vectors (for herding).
Featurizer = Callable[[Sequence[Path]], np.ndarray]


@dataclass(frozen=True)
class Exemplar:
    id: str  # the stored image id, "<class>/<sha256>.<ext>"
    cls: str
    path: Path  # where the image file can be read now


def herding_order(features: np.ndarray) -> list[int]:
    """Indices in herding order: each pick brings the running mean closest to the class mean."""
    x = np.asarray(features, dtype=np.float64)
    target = x.mean(axis=0)
    chosen: list[int] = []
    running = np.zeros_like(target)
    available = np.ones(len(x), dtype=bool)
    for k in range(1, len(x) + 1):
        # Mean after adding each candidate, distance to the class mean; taken ones excluded.
        gaps = np.linalg.norm(target - (running + x) / k, axis=1)
        gaps[~available] = np.inf
        best = int(np.argmin(gaps))
        chosen.append(best)
        available[best] = False
        running += x[best]
    return chosen


def class_quotas(sizes: Mapping[str, int], budget: int) -> dict[str, int]:
    """Split the budget over classes as evenly as their sizes allow (water-filling).

    Classes smaller than the even share keep all their images and leave the rest to
    the others; the remainder goes one each to the first classes by name, so any two
    classes not limited by their own size differ by at most one.
    """
    quotas = {c: 0 for c in sizes}
    open_classes = sorted(c for c, n in sizes.items() if n > 0)
    left = min(budget, sum(sizes.values()))
    while open_classes and left > 0:
        share, extra = divmod(left, len(open_classes))
        small = [c for c in open_classes if sizes[c] - quotas[c] <= share]
        if small:  # fill the classes that cannot take a full share, then split again
            for c in small:
                left -= sizes[c] - quotas[c]
                quotas[c] = sizes[c]
            open_classes = [c for c in open_classes if c not in small]
            continue
        for i, c in enumerate(open_classes):
            quotas[c] += share + (1 if i < extra else 0)
        left = 0
    return quotas


class ReplayMemory:
    """A class-balanced exemplar memory of at most `budget` images over all classes seen."""

    def __init__(self, params: ReplayParams) -> None:
        self.params = params
        self.ranked: dict[str, list[Exemplar]] = {}  # every candidate kept so far, best first
        self.quota: dict[str, int] = {}

    def __len__(self) -> int:
        return sum(self.quota.values())

    @property
    def classes(self) -> list[str]:
        return sorted(self.ranked)

    def exemplars(self) -> list[Exemplar]:
        """The memory's content: the first `quota` exemplars of every class."""
        return [e for c in self.classes for e in self.ranked[c][: self.quota[c]]]

    def per_class(self) -> dict[str, int]:
        return dict(self.quota)

    def add_classes(
        self, images: Mapping[str, Sequence[tuple[str, Path]]], featurize: Featurizer | None = None
    ) -> None:
        """Rank the new classes' images (id, path), then share the budget over all classes.

        Herding needs `featurize` (the freshly trained model); random selection does not.
        A class already in memory (an arrival that extends it) is re-ranked over its kept
        exemplars and the new images together, so it never shrinks to the new images alone.
        """
        for cls, new in sorted(images.items()):
            kept = {(e.id, e.path) for e in self.ranked.get(cls, [])}
            # a fixed order, so selection does not depend on file listing; an id once only
            items = sorted(dict(sorted(kept | set(new))).items())
            if not items:
                continue
            if self.params.selection == "herding":
                if featurize is None:
                    raise ValueError("herding selection needs a featurizer (the trained model)")
                order = herding_order(featurize([path for _, path in items]))
            else:
                order = list(self._rng(cls).permutation(len(items)))
            self.ranked[cls] = [Exemplar(items[i][0], cls, items[i][1]) for i in order]
        self._rebalance()

    def _rng(self, cls: str) -> np.random.Generator:
        # Seeded per class, so a class's random order does not depend on which classes came before.
        digest = hashlib.sha256(f"{self.params.seed}:{cls}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def _rebalance(self) -> None:
        self.quota = class_quotas({c: len(r) for c, r in self.ranked.items()}, self.params.budget)
        # Exemplars beyond the quota are dropped for good: the memory never grows past its budget.
        self.ranked = {c: r[: self.quota[c]] for c, r in self.ranked.items()}

    def digest(self) -> str:
        """sha256 over the content, in order: every exemplar's class, id and image bytes."""
        h = hashlib.sha256()
        for e in self.exemplars():
            data = e.path.read_bytes()
            h.update(json.dumps([e.cls, e.id, len(data)]).encode())
            h.update(data)
        return h.hexdigest()

    def save(self, directory: Path) -> Path:
        """Write memory.json and a copy of every exemplar image under `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        for e in self.exemplars():
            dst = directory / IMAGES_DIR / e.id
            if dst.resolve() != e.path.resolve():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(e.path, dst)
        manifest = {
            "budget": self.params.budget,
            "selection": self.params.selection,
            "classes": {c: [e.id for e in self.ranked[c][: self.quota[c]]] for c in self.classes},
        }
        (directory / MEMORY_FILE).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
        return directory

    @classmethod
    def load(cls, directory: Path, params: ReplayParams) -> ReplayMemory:
        """Restore a saved memory under the current params (a smaller budget shrinks it)."""
        manifest_file = directory / MEMORY_FILE
        try:
            manifest = json.loads(manifest_file.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{manifest_file}: cannot read the replay memory: {exc}") from exc
        memory = cls(params)
        for name, ids in manifest["classes"].items():
            missing = [i for i in ids if not (directory / IMAGES_DIR / i).is_file()]
            if missing:
                raise ValueError(
                    f"{manifest_file}: {len(missing)} exemplar images of class {name!r} are missing, e.g. {missing[0]}"
                )
            memory.ranked[name] = [Exemplar(i, name, directory / IMAGES_DIR / i) for i in ids]
        memory._rebalance()
        return memory
