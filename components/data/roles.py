"""The roles an arrival's images take, fixed once and deterministic for a seed (DESIGN, Splits).

A fixed share of each arrival's classes (that have two or more images) is held out forever as
`unseen`; the others are `train` classes, and a fixed share of each train class's images are its
`query` images. A class with a single image is `pending` until an arrival brings a second one,
when it gets its split like a new class (its queries drawn from all its images).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from components.config import IngestParams
from components.data.catalog import Catalog


@dataclass(frozen=True)
class Assigned:
    new: list[str]  # classes the catalog did not have
    unseen: list[str]  # classes held out (new, or pending until now)
    pending: list[str]  # new classes with a single image


def _rank(seed: int, *parts: str) -> str:
    return hashlib.sha256("\x1f".join((str(seed), *parts)).encode()).hexdigest()


def held_out_share(items: list[str], fraction: float, seed: int, salt: str) -> set[str]:
    """A fixed, deterministic share of `items` (at least one, never all, when there are 2+)."""
    if len(items) < 2:
        return set()
    count = min(max(1, round(fraction * len(items))), len(items) - 1)
    return set(sorted(items, key=lambda item: _rank(seed, salt, item))[:count])


def assign_roles(catalog: Catalog, arrival: str, stored: dict[str, list[str]], params: IngestParams) -> Assigned:
    """Record the split of every class the arrival stored images of, and the role of each of its
    images, into the catalog (in memory). `stored`: image ids stored per class."""
    count = catalog.image_counts(sorted(stored))
    new = sorted(c for c in stored if c not in catalog.classes)
    completing = sorted(
        c
        for c, ids in stored.items()
        if count[c] + len(ids) >= 2 and (c in new or catalog.classes[c]["split"] == "pending")
    )
    singles = sorted(c for c in new if c not in completing)
    unseen = held_out_share(completing, params.unseen_class_fraction, params.seed, "unseen")
    for cls in singles:
        catalog.classes[cls] = {"arrival": arrival, "split": "pending"}
    for cls in completing:
        catalog.classes[cls] = {"arrival": arrival, "split": "unseen" if cls in unseen else "train"}
    was_pending = [c for c in completing if c not in new]
    for cls, image_ids in stored.items():
        split = catalog.classes[cls]["split"]
        pool = list(image_ids)
        if cls in was_pending:  # its queries are drawn from all its images, the earlier pending one too
            pool += catalog.class_images(cls)
        queries = set()
        if split == "train":
            queries = held_out_share(sorted(pool), params.query_image_fraction, params.seed, "query")
        for image_id in image_ids:
            catalog.images[image_id] = {"class": cls, "arrival": arrival, "role": split}
        for image_id in pool:  # an unseen or pending class's images take its split as their role
            role = "query" if image_id in queries else split
            catalog.images[image_id]["role"] = role
    return Assigned(new=new, unseen=sorted(unseen), pending=singles)
