"""Evaluation: the candidate and the champion scored on the same images (unseen classes,
each seen slice, sanity), forgetting against every served version, and the gate's decision.

The pieces live in metrics.py (retrieval, pixels, sanity), forgetting.py (slices, matrix)
and gate.py (the decision and its report); this module puts them together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from components.config import EvaluateParams, GateParams, Workspace
from components.data.class_registry import ClassRegistry
from components.forgetting import ForgettingMatrix, forgetting_matrix, forgetting_metrics, seen_slices, slice_key
from components.gate import GateDecision, decide, prefixed
from components.metrics import sanity_metrics, score_pixels, score_vectors
from components.modeling.embedder import Embedder, embed_files


def evaluate_models(
    ws: Workspace,
    catalog: ClassRegistry,
    params: EvaluateParams,
    candidate: Embedder,
    champion: Embedder | None = None,
    champion_arrivals: Sequence[str] = (),
) -> dict[str, float]:
    """Candidate and champion on the same images: unseen classes, each seen slice, and sanity.

    The champion is scored only on the slices of arrivals it was trained on. A candidate
    with non-finite embeddings gets NaN metrics (and a sanity count) instead of an error,
    so the gate can reject it with a reason. Slices too small to score (no class with two
    query images) are left out.
    """
    ks, bs = params.recall_at, params.batch_size
    unseen = catalog.records("unseen")
    paths, labels = [ws.classes_dir / r.id for r in unseen], [r.cls for r in unseen]
    x = embed_files(candidate, paths, batch_size=bs)
    metrics = sanity_metrics(x) | score_vectors(x, labels, ks, "unseen")
    metrics |= score_pixels(paths, labels, ks, params.baseline_image_size).as_dict("baseline_unseen")
    if champion is not None:
        metrics |= score_vectors(embed_files(champion, paths, batch_size=bs), labels, ks, "champion_unseen")
    champion_slices = {slice_key(a) for a in champion_arrivals}
    for key, records in seen_slices(catalog).items():
        labels = [r.cls for r in records]
        if len(labels) - len(set(labels)) == 0:
            continue  # no class has two query images: nothing to retrieve
        paths = [ws.classes_dir / r.id for r in records]
        metrics |= score_vectors(embed_files(candidate, paths, batch_size=bs), labels, ks, f"seen_{key}")
        if champion is not None and key in champion_slices:
            metrics |= score_vectors(embed_files(champion, paths, batch_size=bs), labels, ks, f"champion_seen_{key}")
    return metrics


@dataclass(frozen=True)
class Assessment:
    """Everything the gate saw and said about one candidate."""

    metrics: dict[str, float]
    matrix: ForgettingMatrix
    decision: GateDecision


def assess(
    ws: Workspace,
    catalog: ClassRegistry,
    params: EvaluateParams,
    gate: GateParams,
    candidate: Embedder,
    *,
    champion: Embedder | None = None,
    champion_version: str | None = None,
    champion_arrivals: Sequence[str] = (),
    served: Sequence[tuple[str, Mapping[str, float]]] = (),
) -> Assessment:
    """Score candidate and champion on the same images, add forgetting against the served versions, decide.

    `served` holds the logged metrics of every version that was ever champion (from the
    registry), so forgetting is measured against what users actually got.
    """
    metrics = evaluate_models(ws, catalog, params, candidate, champion, champion_arrivals)
    matrix = forgetting_matrix(served, metrics, champion=champion_version if champion is not None else None)
    metrics |= forgetting_metrics(matrix)
    decision = decide(metrics, prefixed(metrics, "champion_") if champion is not None else None, gate)
    return Assessment(metrics=metrics, matrix=matrix, decision=decision)
