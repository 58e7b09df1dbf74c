"""Evaluation: the candidate and the champion scored on the same images (unseen classes,
each seen slice, sanity), forgetting against every served version, compatibility with the
champion and the other kept versions, and the gate's decision.

The pieces live in metrics.py (retrieval, pixels, sanity), forgetting.py (slices, matrix),
compat.py (cross-version retrieval) and gate.py (the decision and its report); this module puts
them together.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from components.config import EvaluateParams, GateParams
from components.data.catalog import Catalog, ImageRecord
from components.evaluation import keys
from components.evaluation.compat import CompatMatrix, KeptVersion, cross_scores, version_matrix
from components.evaluation.forgetting import (
    ForgettingMatrix,
    forgetting_matrix,
    forgetting_metrics,
    seen_slice_rows,
)
from components.evaluation.gate import GateDecision, decide
from components.evaluation.metrics import few_shot_metrics, pixel_vectors, sanity_metrics, score_vectors
from components.evaluation.transfer import forward_transfer
from components.modeling.embedder import Embedder, embed_files
from components.training.compat import Transform
from components.workspace import Workspace


@dataclass(frozen=True)
class Evaluation:
    """What evaluate_models measured, and the candidate's vectors of the unseen images it measured on."""

    metrics: dict[str, float]
    unseen: list[ImageRecord]
    candidate_unseen: np.ndarray


def evaluate_models(
    ws: Workspace,
    catalog: Catalog,
    params: EvaluateParams,
    candidate: Embedder,
    champion: Embedder | None = None,
    champion_arrivals: Sequence[str] = (),
    transform: Transform | None = None,
) -> Evaluation:
    """Candidate and champion on the same images: unseen classes, each seen slice, and sanity (the
    metrics, and the candidate's vectors of the unseen images they were measured on).

    Unseen classes are scored among themselves (retrieval and few-shot episodes), next to
    raw pixels. Each seen slice (the held-out queries of one arrival's classes) searches
    every stored image, as the live table answers it, so an old class confused with a newer
    one counts as forgetting. The champion is scored only on the slices of arrivals it was
    trained on, and on every class of each arrival it has not learned (forward transfer, from
    the same vectors); the candidate's queries are scored among the champion's unseen vectors
    (compat_unseen_*, mapped by `transform` when there is one: backward compatibility).
    A candidate with non-finite embeddings gets NaN metrics (and a sanity count) instead of an
    error, so the gate can reject it with a reason.
    """
    ks, bs = params.recall_at, params.batch_size
    records = catalog.records()  # the whole gallery, as the live table holds it (pending classes are distractors)
    paths, labels = [ws.classes_dir / r.id for r in records], np.array([r.cls for r in records], dtype=object)
    unseen = np.array([i for i, r in enumerate(records) if r.role == "unseen"], dtype=int)
    slices = seen_slice_rows(catalog, records)
    champion_slices = {keys.slice_key(a) for a in champion_arrivals}

    arrival_of = {c: meta["arrival"] for c, meta in catalog.classes.items()}  # within-arrival episodes

    def scored(x: np.ndarray, slice_keys: Collection[str]) -> dict[str, float]:
        xu, lu = x[unseen], labels[unseen].tolist()
        out = score_vectors(xu, lu, ks, keys.UNSEEN) | few_shot_metrics(xu, lu, params, keys.UNSEEN, arrival_of)
        for s in slice_keys:
            out |= score_vectors(x, labels.tolist(), ks, keys.key(keys.SEEN, s), queries=slices[s])
        return out

    x = embed_files(candidate, paths, batch_size=bs)
    metrics = sanity_metrics(x[unseen]) | scored(x, slices)
    pixels = pixel_vectors([paths[i] for i in unseen], params.baseline_image_size)
    on_pixels = score_vectors(pixels, labels[unseen].tolist(), ks, keys.UNSEEN)
    on_pixels |= few_shot_metrics(pixels, labels[unseen].tolist(), params, keys.UNSEEN, arrival_of)
    metrics |= {keys.baseline(k): v for k, v in on_pixels.items()}
    if champion is not None:
        xc = embed_files(champion, paths, batch_size=bs)
        theirs = scored(xc, slices.keys() & champion_slices)
        metrics |= {keys.champion(k): v for k, v in theirs.items()}
        # forward transfer: the same vectors, on every class each arrival the champion has not learned brought
        row = {r.id: i for i, r in enumerate(records)}
        new = sorted(set(catalog.arrivals) - set(champion_arrivals))
        metrics |= forward_transfer(ws, catalog, champion, new, params, vectors=lambda rs: xc[[row[r.id] for r in rs]])
        gallery = xc[unseen] if transform is None else transform.to_new(xc[unseen])
        metrics |= cross_scores(x[unseen], gallery, labels[unseen].tolist(), ks)
    return Evaluation(metrics, [records[i] for i in unseen], x[unseen])


@dataclass(frozen=True)
class Assessment:
    """Everything the gate saw and said about one candidate."""

    metrics: dict[str, float]
    matrix: ForgettingMatrix
    decision: GateDecision
    compat: CompatMatrix | None = None  # unseen retrieval across the kept versions and the candidate


def assess(
    ws: Workspace,
    catalog: Catalog,
    params: EvaluateParams,
    gate: GateParams,
    candidate: Embedder,
    *,
    champion: Embedder | None = None,
    champion_version: str | None = None,
    champion_arrivals: Sequence[str] = (),
    served: Sequence[tuple[str, Mapping[str, float]]] = (),
    kept: Sequence[KeptVersion] = (),
    transform: Transform | None = None,
) -> Assessment:
    """Score candidate and champion on the same images, add forgetting against the served versions,
    compatibility across the kept versions, decide.

    `served` holds the logged metrics of every version that was ever champion (from the
    registry), so forgetting is measured against what users actually got; `kept` the versions whose
    tables are kept; `transform` the candidate's map from the champion's space (compat.mode transform).
    """
    found = evaluate_models(ws, catalog, params, candidate, champion, champion_arrivals, transform)
    metrics = found.metrics
    matrix = forgetting_matrix(served, metrics, champion=champion_version if champion is not None else None)
    metrics |= forgetting_metrics(matrix)
    decision = decide(metrics, (keys.under(metrics, keys.CHAMPION) or None) if champion is not None else None, gate)
    compat = (
        version_matrix(ws, found.unseen, found.candidate_unseen, kept, params.batch_size)
        if kept and len(found.unseen)
        else None
    )
    return Assessment(metrics=metrics, matrix=matrix, decision=decision, compat=compat)
