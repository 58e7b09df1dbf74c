"""Forgetting: seen-class slices (one per arrival), the matrix of their Recall@1 over the
versions that served, forgetting per slice, and the matrix as a heatmap."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from components.data.catalog import Catalog, ImageRecord
from components.evaluation import keys
from components.evaluation.metrics import json_number
from components.evaluation.plots import annotated_heatmap, version_label

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def seen_slices(catalog: Catalog) -> dict[str, list[ImageRecord]]:
    """The held-out query images of the trained classes, grouped by the arrival that brought each class."""
    slices: dict[str, list[ImageRecord]] = {}
    for r in catalog.records("query"):
        arrival = catalog.classes.get(r.cls, {}).get("arrival", r.arrival)
        slices.setdefault(keys.slice_key(arrival), []).append(r)
    return dict(sorted(slices.items()))


def seen_slice_rows(catalog: Catalog, gallery: Sequence[ImageRecord]) -> dict[str, list[int]]:
    """Each seen slice's queries as rows of `gallery` (every stored image), slices whose queries have
    no other image of their class in it left out: there is nothing for them to retrieve."""
    row = {r.id: i for i, r in enumerate(gallery)}
    per_class = Counter(r.cls for r in gallery)
    out = {}
    for key, records in seen_slices(catalog).items():
        rows = [row[r.id] for r in records if r.id in row]
        if any(per_class[gallery[i].cls] > 1 for i in rows):
            out[key] = rows
    return out


def slice_forgetting(matrix: np.ndarray) -> np.ndarray:
    """Forgetting of each slice after the last step: its best earlier value minus its last value.

    matrix[i, j] is a seen-class metric of slice j after step i (NaN before slice j arrived).
    Slices first seen at the last step have nothing to forget and come out NaN.
    """
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or len(m) < 2:
        return np.full(m.shape[-1] if m.ndim == 2 else 0, np.nan)
    earlier = m[:-1]
    seen = ~np.isnan(earlier).all(axis=0)
    best = np.where(seen, np.nanmax(np.where(np.isnan(earlier), -np.inf, earlier), axis=0), np.nan)
    return best - m[-1]


def average_forgetting(matrix: np.ndarray) -> float:
    """Mean forgetting over the slices seen before the last step (Chaudhry et al. 2018); 0 with one step."""
    f = slice_forgetting(matrix)
    f = f[~np.isnan(f)]
    return float(f.mean()) if len(f) else 0.0


@dataclass(frozen=True)
class ForgettingMatrix:
    """values[i, j]: seen Recall@1 of slice j by versions[i] (NaN before the slice arrived); the candidate is last."""

    versions: list[str]
    slices: list[str]
    values: np.ndarray

    def forgetting(self) -> dict[str, float]:
        """Per slice, the best value an earlier row had minus the candidate's; slices new to it are left out."""
        f = slice_forgetting(self.values) if len(self.versions) else np.array([])
        return {s: float(v) for s, v in zip(self.slices, f) if not np.isnan(v)}

    def labelled(self, candidate_version: str) -> ForgettingMatrix:
        """The same matrix with the candidate's row named by its registered version."""
        return replace(self, versions=[*self.versions[:-1], f"v{candidate_version} (candidate)"])

    def as_dict(self) -> dict:
        return {
            "versions": self.versions,
            "slices": self.slices,
            "values": [[json_number(v) for v in row] for row in self.values.tolist()],
        }


def forgetting_matrix(
    served: Sequence[tuple[str, Mapping[str, float]]],
    candidate: Mapping[str, float],
    *,
    champion: str | None = None,
    candidate_label: str = "candidate",
) -> ForgettingMatrix:
    """The seen-slice matrix over the versions that served (each as logged by its own run), then the candidate.

    `candidate` holds the fresh metrics of this evaluation: its seen_* keys are the last row,
    and its champion_seen_* keys replace the logged row of version `champion`, so the
    champion is compared on exactly the images the candidate was scored on.
    """
    rows = {str(v): keys.slice_values(m) for v, m in served}
    if champion is not None:
        rows[str(champion)] = rows.get(str(champion), {}) | keys.slice_values(keys.under(candidate, keys.CHAMPION))
    order = sorted(rows, key=lambda v: (int(v), v) if v.isdigit() else (math.inf, v))
    last = keys.slice_values(candidate)
    slices = sorted({s for v in order for s in rows[v]} | set(last))
    values = np.array(
        [[rows[v].get(s, math.nan) for s in slices] for v in order] + [[last.get(s, math.nan) for s in slices]],
        dtype=float,
    ).reshape(len(order) + 1, len(slices))
    return ForgettingMatrix(versions=[*order, candidate_label], slices=slices, values=values)


def forgetting_metrics(matrix: ForgettingMatrix) -> dict[str, float]:
    """forgetting_<slice> for every slice the candidate can have forgotten, and their mean."""
    per_slice = matrix.forgetting()
    out = {keys.forgetting(s): v for s, v in per_slice.items()}
    out["average_forgetting"] = average_forgetting(matrix.values) if len(matrix.versions) > 1 else 0.0
    return out


def forgetting_heatmap(matrix: ForgettingMatrix, title: str = "seen-class Recall@1 per arrival slice") -> Figure:
    """The matrix as a heatmap (rows: versions, columns: slices), each cell annotated."""
    return annotated_heatmap(
        matrix.values,
        [version_label(v) for v in matrix.versions],
        matrix.slices,
        xlabel="arrival slice",
        ylabel="model version",
        title=title,
        empty="no seen-class slice scored yet",
    )
