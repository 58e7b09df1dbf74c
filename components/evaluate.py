"""Retrieval metrics (exact, leave-one-out), the pixel-space baseline, and the gate decision.

Every image of the evaluated set queries all the others: Recall@K is the share of queries
with a same-class image among their K nearest neighbours; MAP@R is mean average precision
over the first R neighbours, R being the number of other images of the query's class
(Musgrave et al., "A Metric Learning Reality Check"). Queries without any other image of
their class are left out, as pytorch-metric-learning does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from components.config import EvaluateParams, GateParams, Workspace, stage_setup
from components.data.class_registry import ClassRegistry, ImageRecord
from components.modeling.embedder import Embedder, embed_files, load_embedder


@dataclass(frozen=True)
class RetrievalMetrics:
    recall_at: dict[int, float]
    map_at_r: float
    queries: int

    def as_dict(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}_recall_at_{k}": v for k, v in self.recall_at.items()}
        out[f"{prefix}_map_at_r"] = self.map_at_r
        return out


def retrieval_metrics(
    embeddings: np.ndarray | torch.Tensor,
    labels: Sequence,
    ks: Sequence[int] = (1, 5, 10),
    *,
    chunk: int = 1024,
    device: str | torch.device = "cpu",
) -> RetrievalMetrics:
    """Exact Recall@K and MAP@R by cosine similarity, chunked over queries to bound memory."""
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32, device=device)
    if x.ndim != 2 or len(x) != len(labels):
        raise ValueError(f"need N x D embeddings for {len(labels)} labels, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinite values")
    x = torch.nn.functional.normalize(x, dim=1)
    _, y = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    y = torch.as_tensor(y, device=device)
    n = len(y)
    r_of = (torch.bincount(y)[y] - 1)  # other images of each query's class
    depth = min(n - 1, max(max(ks), int(r_of.max()) if n else 0))
    hits = {k: 0.0 for k in ks}
    ap_sum, counted = 0.0, 0
    for start in range(0, n, chunk):
        q = slice(start, min(start + chunk, n))
        sims = x[q] @ x.T
        rows = torch.arange(sims.shape[0], device=device)
        sims[rows, rows + start] = -torch.inf  # a query never retrieves itself
        order = sims.topk(depth, dim=1).indices
        rel = (y[order] == y[q, None]).float()
        r = r_of[q]
        valid = r > 0
        for k in ks:
            hits[k] += rel[valid, :k].amax(dim=1).sum().item()
        ranks = torch.arange(1, depth + 1, device=device)
        within_r = ranks[None, :] <= r[:, None]
        precision = rel.cumsum(dim=1) / ranks
        ap = (precision * rel * within_r).sum(dim=1) / r.clamp(min=1)
        ap_sum += ap[valid].sum().item()
        counted += int(valid.sum())
    if counted == 0:
        raise ValueError("no query has another image of its class; cannot score retrieval")
    return RetrievalMetrics(recall_at={k: hits[k] / counted for k in ks}, map_at_r=ap_sum / counted, queries=counted)


def pixel_vectors(paths: Sequence[Path], size: int) -> np.ndarray:
    """The baseline's 'embedding': grey pixels at size x size, centred and L2-normalised."""
    rows = []
    for path in paths:
        with Image.open(path) as img:
            grey = img.convert("L").resize((size, size), Image.Resampling.BILINEAR)
        v = np.asarray(grey, dtype=np.float32).ravel()
        v -= v.mean()
        rows.append(v / (np.linalg.norm(v) + 1e-8))
    return np.stack(rows)


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: list[str] = field(default_factory=list)


def prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float] | None:
    """The metrics whose keys start with prefix, prefix removed; None when there are none."""
    found = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
    return found or None


def decide(candidate: dict[str, float], champion: dict[str, float] | None, gate: GateParams) -> GateDecision:
    """Promote or reject, with every reason. Change thresholds are skipped without a champion."""
    reasons: list[str] = []
    ok = True
    r1 = candidate["unseen_recall_at_1"]
    if not np.isfinite(r1) or r1 < gate.min_unseen_recall_at_1:
        ok = False
        reasons.append(f"unseen Recall@1 {r1:.4f} is below the floor {gate.min_unseen_recall_at_1:.4f}")
    else:
        reasons.append(f"unseen Recall@1 {r1:.4f} meets the floor {gate.min_unseen_recall_at_1:.4f}")
    if champion is None:
        reasons.append("no champion: change thresholds skipped")
    else:
        drop = champion["unseen_recall_at_1"] - r1
        if drop > gate.max_unseen_recall_at_1_drop:
            ok = False
            reasons.append(f"unseen Recall@1 dropped {drop:.4f} against the champion, more than {gate.max_unseen_recall_at_1_drop:.4f}")
        else:
            reasons.append(f"unseen Recall@1 changed {-drop:+.4f} against the champion (allowed drop {gate.max_unseen_recall_at_1_drop:.4f})")
    return GateDecision(promote=ok, reasons=reasons)


def score_embedder(model: Embedder, paths: Sequence[Path], labels: Sequence[str], ks: Sequence[int], batch_size: int) -> RetrievalMetrics:
    """Embed the images with `model` and score leave-one-out retrieval among them."""
    return retrieval_metrics(embed_files(model, paths, batch_size=batch_size), labels, ks)


def score_pixels(paths: Sequence[Path], labels: Sequence[str], ks: Sequence[int], size: int) -> RetrievalMetrics:
    """The same retrieval scored on raw pixels: what a model has to beat."""
    return retrieval_metrics(pixel_vectors(paths, size), labels, ks)


def score_unseen(
    ws: Workspace, unseen: Sequence[ImageRecord], params: EvaluateParams, candidate: Embedder, champion: Embedder | None = None
) -> dict[str, float]:
    """Candidate, champion (when there is one) and the pixel baseline, on the same unseen-class images.

    Keys: unseen_*, champion_unseen_*, baseline_unseen_* (recall_at_K for each K, map_at_r).
    """
    paths, labels = [ws.classes_dir / r.id for r in unseen], [r.cls for r in unseen]
    ks = params.recall_at
    metrics = score_embedder(candidate, paths, labels, ks, params.batch_size).as_dict("unseen")
    metrics |= score_pixels(paths, labels, ks, params.baseline_image_size).as_dict("baseline_unseen")
    if champion is not None:
        metrics |= score_embedder(champion, paths, labels, ks, params.batch_size).as_dict("champion_unseen")
    return metrics


def main(argv: list[str] | None = None) -> None:
    """DVC stage: score the trained embedder and the pixel baseline on the unseen classes."""
    params, ws = stage_setup(argv, main.__doc__)
    unseen = ClassRegistry.load(ws.class_registry).records("unseen")
    metrics = score_unseen(ws, unseen, params.evaluate, load_embedder(ws.dvc_outputs / "embedder.pt"))
    (ws.dvc_outputs / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
