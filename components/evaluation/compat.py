"""Compatibility between model versions: can one model's queries be searched among another's vectors?

Scored on the unseen classes (no model trained on them), as the rest of the gate:
  new/new   the candidate's queries among its own vectors          unseen_<metric>
  old/old   the champion's queries among its own vectors           champion_unseen_<metric>
  cross     the candidate's queries among the champion's vectors   compat_unseen_<metric>
            (mapped into the candidate's space by its transform, when it has one: compat.mode transform)
Shen et al. (CVPR 2020) call the candidate compatible with the champion when cross beats old/old:
a user searching the champion's gallery with the candidate's queries is then better off than with
the champion's own. mnemo asks that of Recall@1 and MAP@R, by more than gate.min_compat_gain, before
it promotes the candidate on the champion's vectors (gate.py decides; vectors/compat.py builds).

The cross-version matrix scores every pair of versions whose tables are kept (and the candidate):
row i's model embeds the queries, column j's table holds the gallery, as the rows it stores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from components.data.catalog import ImageRecord
from components.evaluation import keys
from components.evaluation.metrics import json_number, metrics_device, retrieval_metrics
from components.evaluation.plots import annotated_heatmap, version_label
from components.modeling.embedder import Embedder, embed_files
from components.workspace import Workspace

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def cross_scores(
    queries: np.ndarray, gallery: np.ndarray, labels: Sequence[str], ks: Sequence[int]
) -> dict[str, float]:
    """compat_unseen_<metric>: each image's query vector searching the other images' gallery vectors."""
    if not (np.isfinite(queries).all() and np.isfinite(gallery).all()):
        return {keys.compat(keys.unseen(m)): float("nan") for m in [f"recall_at_{k}" for k in ks] + ["map_at_r"]}
    found = retrieval_metrics(queries, labels, ks, gallery=gallery, device=metrics_device())
    return found.as_dict(keys.compat(keys.UNSEEN))


@dataclass(frozen=True)
class Compatibility:
    """Whether the candidate may answer from the champion's vectors, with the sentence saying why."""

    compatible: bool
    reason: str


def compatibility(metrics: Mapping[str, float], min_gain: float) -> Compatibility | None:
    """BCT's criterion on unseen Recall@1 and MAP@R: cross minus old/old above `min_gain` for both.
    None without a champion scored on the same images (a first model has nothing to be compatible with)."""
    pairs = []
    for metric, name in (("recall_at_1", "R@1"), ("map_at_r", "MAP@R")):
        cross, old = metrics.get(keys.compat(keys.unseen(metric))), metrics.get(keys.champion(keys.unseen(metric)))
        if cross is None or old is None:
            return None
        pairs.append((name, float(cross), float(old)))
    ok = all(cross - old > min_gain for _, cross, old in pairs)
    said = ", ".join(f"{name} {cross:.4f} against the champion's own {old:.4f}" for name, cross, old in pairs)
    if ok:
        return Compatibility(
            True,
            f"compatible with the champion: its queries among the champion's vectors score {said} "
            f"(each gain above {min_gain:.4f}): it goes live on those vectors, then a backfill re-embeds them",
        )
    return Compatibility(
        False,
        f"not compatible with the champion: its queries among the champion's vectors score {said} "
        f"(a gain above {min_gain:.4f} is needed on both): its table is built whole before it may go live",
    )


@dataclass(frozen=True)
class KeptVersion:
    """A version whose table is kept: its model (loaded when called) and its table's stored vectors by image id."""

    version: str
    model: Callable[[], Embedder]
    stored: Callable[[Sequence[str]], np.ndarray]  # rows for ids the table lacks are NaN


@dataclass(frozen=True)
class CompatMatrix:
    """recall[i, j] and map_at_r[i, j]: unseen Recall@1 and MAP@R of versions[i]'s queries among
    versions[j]'s stored vectors (the candidate, last, among its own fresh ones)."""

    versions: list[str]
    recall: np.ndarray
    map_at_r: np.ndarray

    def labelled(self, candidate_version: str) -> CompatMatrix:
        """The same matrix with the candidate named by its registered version."""
        named = [f"v{candidate_version} (candidate)" if v == "candidate" else v for v in self.versions]
        return CompatMatrix(named, self.recall, self.map_at_r)

    def as_dict(self) -> dict:
        return {
            "versions": self.versions,
            "recall_at_1": [[json_number(v) for v in row] for row in self.recall.tolist()],
            "map_at_r": [[json_number(v) for v in row] for row in self.map_at_r.tolist()],
        }


def compat_matrix(
    queries: Mapping[str, np.ndarray], galleries: Mapping[str, np.ndarray], labels: Sequence[str]
) -> CompatMatrix:
    """Every (query model, gallery) pair on the same images; a pair with a NaN row (an image a table
    lacks) is scored on the images both have."""
    versions = list(queries)
    recall = np.full((len(versions), len(versions)), np.nan)
    maps = np.full_like(recall, np.nan)
    labels_array = np.asarray(labels, dtype=object)
    for i, q in enumerate(versions):
        for j, g in enumerate(versions):
            rows = np.isfinite(queries[q]).all(axis=1) & np.isfinite(galleries[g]).all(axis=1)
            if len(set(labels_array[rows])) < 2:
                continue
            found = retrieval_metrics(
                queries[q][rows], labels_array[rows].tolist(), [1], gallery=galleries[g][rows], device=metrics_device()
            )
            recall[i, j], maps[i, j] = found.recall_at[1], found.map_at_r
    return CompatMatrix(versions, recall, maps)


def version_matrix(
    ws: Workspace,
    unseen: Sequence[ImageRecord],
    candidate: np.ndarray,
    kept: Sequence[KeptVersion],
    batch_size: int,
    candidate_label: str = "candidate",
) -> CompatMatrix:
    """The matrix over the kept versions and the candidate (its vectors of `unseen` given), on the
    unseen images: each kept model embeds them, each kept table gives its stored rows of them."""
    paths, ids = [ws.classes_dir / r.id for r in unseen], [r.id for r in unseen]
    queries = {k.version: embed_files(k.model(), paths, batch_size=batch_size) for k in kept}
    galleries = {k.version: k.stored(ids) for k in kept}
    queries[candidate_label] = galleries[candidate_label] = candidate
    return compat_matrix(queries, galleries, [r.cls for r in unseen])


def compat_heatmap(matrix: CompatMatrix) -> Figure:
    """The matrix's Recall@1 as a heatmap: rows the query model, columns the gallery table."""
    labels = [version_label(v) for v in matrix.versions]
    return annotated_heatmap(
        matrix.recall,
        labels,
        labels,
        xlabel="gallery: the vectors of",
        ylabel="queries: the model of",
        title="unseen Recall@1 across versions",
        empty="no kept version to compare with",
    )
