"""MixedBatches: class-balanced batches that mix an arrival's new images with replayed memory exemplars."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class MixedBatches(Sampler[list[int]]):
    """Batches of m images per class: `new_per_batch` from the new images, the rest from memory.

    Dataset indices [0, n_new) are new images, [n_new, n_new + n_memory) memory exemplars.
    One epoch is one pass over the new images, by one of two lengths (`epoch_length`):
    - "groups": len(new) // new-per-batch batches, each class's m images drawn at random, so
      an epoch may skip images (up to a third of an arrival's steps when classes hold
      m + 1 images);
    - "cover": each class's images are shuffled and cut into groups of m (the last group
      topped up from the same class), and batches are filled with the classes that have
      the most groups left, so every new image is drawn at least once per epoch and a
      batch still holds m images of each of its classes.
    Each epoch draws from its own seeded generator, so a resumed run sees exactly the
    batches an uninterrupted one would.

    Across `world` ranks every rank draws the same global batches (same seed) and keeps its
    share: every world-th group of m of each pool, starting at its `rank`, so the shares are
    disjoint, equal in size and each holds m images per class and the same new/memory split.
    For that, each pool's groups per batch are rounded down to a multiple of `world` (at
    least `world` when the pool is drawn from); with one rank nothing changes.
    """

    def __init__(
        self,
        new_labels: Sequence[int],
        memory_labels: Sequence[int],
        *,
        batch_size: int,
        m: int,
        memory_ratio: float,
        seed: int,
        epoch_length: str = "groups",
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if epoch_length not in ("groups", "cover"):
            raise ValueError(f"unknown epoch_length {epoch_length!r}; choose from groups, cover")
        self.m, self.seed, self.epoch, self.epoch_length = m, seed, 0, epoch_length
        self.rank, self.world = rank, world
        self.pools = [self._by_class(new_labels, 0), self._by_class(memory_labels, len(new_labels))]
        memory_share = memory_ratio if memory_labels else 0.0
        mem = min(round(batch_size * memory_share / m) * m, m * len(self.pools[1]))
        self.per_batch = [min(batch_size - mem, m * len(self.pools[0])) // m * m, mem]
        if self.per_batch[0] == 0 and new_labels:
            self.per_batch[0] = m
        if world > 1:
            self.per_batch = [max(n // (m * world), 1) * m * world if n else 0 for n in self.per_batch]
        if not new_labels:
            self.batches = max(1, len(memory_labels) // max(mem, 1))
        elif epoch_length == "cover":
            groups = sum(-(-len(members) // m) for members in self.pools[0].values())
            self.batches = -(-groups // (self.per_batch[0] // m))
        else:
            self.batches = max(1, len(new_labels) // max(self.per_batch[0], 1))

    @staticmethod
    def _by_class(labels: Sequence[int], offset: int) -> dict[int, np.ndarray]:
        out: dict[int, list[int]] = {}
        for i, y in enumerate(labels):
            out.setdefault(y, []).append(offset + i)
        return {y: np.asarray(v) for y, v in sorted(out.items())}

    @property
    def batch_size(self) -> int:
        """The global batch: all ranks' shares together."""
        return sum(self.per_batch)

    @property
    def rank_batch_size(self) -> int:
        return self.batch_size // self.world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        streams: list[Iterator[int | list[int]]] = [self._class_stream(pool, rng) for pool in self.pools]
        if self.epoch_length == "cover" and self.pools[0]:
            streams[0] = self._covering_groups(self.pools[0], self.per_batch[0] // self.m, rng)
        for _ in range(self.batches):
            batch: list[int] = []
            for pool, stream, size in zip(self.pools, streams, self.per_batch):
                groups: list[list[int]] = []
                for _ in range(size // self.m):
                    group = next(stream)
                    if isinstance(group, list):  # a covering group: m chosen images
                        groups.append(group)
                        continue
                    members = pool[group]
                    groups.append(rng.choice(members, size=self.m, replace=len(members) < self.m).tolist())
                batch += [i for g in groups[self.rank :: self.world] for i in g]
            yield batch

    def _covering_groups(
        self, pool: dict[int, np.ndarray], per_batch: int, rng: np.random.Generator
    ) -> Iterator[list[int]]:
        """Groups of m images, `per_batch` distinct classes at a time, covering every image of the pool.

        Classes with the most groups left go first (ties in random order), so no class is left
        with groups it cannot place in a batch of distinct classes; once all are placed, further
        groups are m random images of a class, until the epoch's batches are full.
        """
        left: dict[int, list[list[int]]] = {}
        for y, members in pool.items():
            order = rng.permutation(members).tolist()
            short = -len(order) % self.m
            if short:  # top the last group up with other images of the class
                order += rng.choice(order, size=short, replace=short > len(order)).tolist()
            left[y] = [order[i : i + self.m] for i in range(0, len(order), self.m)]
        classes = list(pool)
        while True:
            tie = rng.permutation(len(classes))
            ranked = sorted(range(len(classes)), key=lambda i: (-len(left[classes[i]]), tie[i]))
            for i in ranked[:per_batch]:
                y = classes[i]
                if left[y]:
                    yield left[y].pop()
                else:
                    members = pool[y]
                    yield rng.choice(members, size=self.m, replace=len(members) < self.m).tolist()

    @staticmethod
    def _class_stream(pool: dict[int, np.ndarray], rng: np.random.Generator) -> Iterator[int]:
        """Classes in shuffled rounds, so every class appears before any repeats."""
        classes = list(pool)
        while classes:
            yield from rng.permutation(classes).tolist()
