"""Torch datasets over stored image files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from components.data.transforms import open_rgb


class ImageFiles(Dataset):
    """(image tensor, integer label) for each path; labels index `classes`."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], transform: Callable) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = list(paths)
        self.labels = list(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(open_rgb(self.paths[i])), self.labels[i]


def encode_labels(names: Sequence[str]) -> tuple[list[int], list[str]]:
    """Integer labels for class names, and the sorted class list they index."""
    classes = sorted(set(names))
    index = {name: i for i, name in enumerate(classes)}
    return [index[name] for name in names], classes
