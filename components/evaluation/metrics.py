"""Retrieval metrics (exact, leave-one-out), the raw-pixel baseline, and sanity checks.

Every image of the evaluated set queries all the others: Recall@K is the share of queries
with a same-class image among their K nearest neighbours; R-precision is the share of
same-class images among the first R neighbours and MAP@R the mean average precision over
them, R being the number of other images of the query's class (Musgrave et al., "A Metric
Learning Reality Check"). Queries without any other image of their class are left out, as
pytorch-metric-learning does.

The metric keys (unseen_*, seen_<slice>_*, champion_*, baseline_*, forgetting_*) are built and
parsed in keys.py; sanity adds non_finite_embeddings and embedding_spread.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image

from components.config import EvaluateParams
from components.data.catalog import ImageRecord
from components.data.transforms import open_rgb
from components.evaluation import keys
from components.modeling.embedder import Embedder, embed_files
from components.workspace import Workspace

BLOCK_BYTES = 256 * 2**20  # similarity rows computed at once: a 100k gallery needs ~670 query rows per block


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (cosine similarity becomes a dot product); zero rows stay zero."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def exact_top_k(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, gallery rows) of each query's k largest inner products, largest first (faiss.knn:
    exact, blocked BLAS); on unit rows that is the k nearest by cosine. At most len(gallery) per query."""
    k = min(k, len(gallery))
    if k == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    q, g = (np.ascontiguousarray(a, dtype=np.float32) for a in (queries, gallery))
    return faiss.knn(q, g, k, metric=faiss.METRIC_INNER_PRODUCT)


@dataclass(frozen=True)
class RetrievalMetrics:
    recall_at: dict[int, float]
    map_at_r: float
    r_precision: float
    queries: int

    def as_dict(self, prefix: str) -> dict[str, float]:
        out = {keys.key(prefix, f"recall_at_{k}"): v for k, v in self.recall_at.items()}
        out[keys.key(prefix, "map_at_r")] = self.map_at_r
        out[keys.key(prefix, "r_precision")] = self.r_precision
        return out


def retrieval_metrics(
    embeddings: np.ndarray | torch.Tensor,
    labels: Sequence,
    ks: Sequence[int] = (1, 5, 10),
    *,
    queries: Sequence[int] | np.ndarray | None = None,
    gallery: np.ndarray | None = None,
    chunk: int | None = None,
    device: str | torch.device = "cpu",
) -> RetrievalMetrics:
    """Exact Recall@K, MAP@R and R-precision by cosine similarity.

    Every row is in the gallery; `queries` (row indices, default: every row) are the images
    that search it, each leaving itself out. With `gallery` (the same images, row for row, as
    another model embedded them) the queries' vectors search those instead: one model's queries
    among another's stored vectors, as a compatible upgrade answers them. Scoring one arrival's held-out queries against
    every stored image is how the live table answers them, so a class confused with a newer
    one counts. Brute force over query blocks (`chunk` rows, by default sized to keep one
    block of similarities near 256 MiB) so memory stays bounded for a 100k-image gallery.
    """
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32, device=device)
    if x.ndim != 2 or len(x) != len(labels):
        raise ValueError(f"need N x D embeddings for {len(labels)} labels, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinite values")
    x = torch.nn.functional.normalize(x, dim=1)
    g = x
    if gallery is not None:
        g = torch.as_tensor(np.asarray(gallery), dtype=torch.float32, device=device)
        if g.shape[0] != len(x) or not torch.isfinite(g).all():
            raise ValueError(f"need a finite gallery of {len(x)} rows, got shape {tuple(g.shape)}")
        g = torch.nn.functional.normalize(g, dim=1)
    _, codes = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    y = torch.as_tensor(codes, device=device)
    n = len(y)
    asked = torch.arange(n, device=device) if queries is None else torch.as_tensor(np.asarray(queries), device=device)
    chunk = chunk or max(1, min(4096, BLOCK_BYTES // (4 * max(n, 1))))
    r_of = torch.bincount(y)[y] - 1  # other images of each row's class in the gallery
    depth = min(n - 1, max(max(ks), int(r_of[asked].max()) if len(asked) else 0))
    hits = {k: 0.0 for k in ks}
    ap_sum, rp_sum, counted = 0.0, 0.0, 0
    ranks = torch.arange(1, depth + 1, device=device)
    for start in range(0, len(asked), chunk):
        q = asked[start : start + chunk]
        sims = x[q] @ g.T
        sims[torch.arange(len(q), device=device), q] = -torch.inf  # a query never retrieves itself
        order = sims.topk(depth, dim=1).indices
        rel = (y[order] == y[q, None]).float()
        r = r_of[q]
        valid = r > 0
        for k in ks:
            hits[k] += rel[valid, :k].amax(dim=1).sum().item()
        within_r = (ranks[None, :] <= r[:, None]).float()
        precision = rel.cumsum(dim=1) / ranks
        ap = (precision * rel * within_r).sum(dim=1) / r.clamp(min=1)
        rp = (rel * within_r).sum(dim=1) / r.clamp(min=1)
        ap_sum += ap[valid].sum().item()
        rp_sum += rp[valid].sum().item()
        counted += int(valid.sum())
    if counted == 0:
        raise ValueError("no query has another image of its class; cannot score retrieval")
    return RetrievalMetrics(
        recall_at={k: hits[k] / counted for k in ks},
        map_at_r=ap_sum / counted,
        r_precision=rp_sum / counted,
        queries=counted,
    )


def metrics_device() -> str:
    """Where brute-force scoring runs: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def pixel_vectors(paths: Sequence[Path], size: int) -> np.ndarray:
    """The baseline's 'embedding': grey pixels at size x size, centred and L2-normalised."""
    rows = []
    for path in paths:
        grey = open_rgb(path).convert("L").resize((size, size), Image.Resampling.BILINEAR)  # upright, as embedded
        v = np.asarray(grey, dtype=np.float32).ravel()
        rows.append(v - v.mean())
    return unit_rows(np.stack(rows))


# --- sanity -------------------------------------------------------------------------------


def embedding_spread(embeddings: np.ndarray) -> float:
    """Mean cosine distance between distinct embeddings: ~0 when a model maps everything to one point.

    For unit vectors the mean of x_i . x_j over all ordered pairs is |mean x|^2, so this
    is exact in O(N D) rather than O(N^2 D).
    """
    x = unit_rows(np.asarray(embeddings, dtype=np.float64))
    n = len(x)
    if n < 2:
        return math.nan
    m = x.mean(axis=0)
    return float(n / (n - 1) * (1.0 - m @ m))


def sanity_metrics(embeddings: np.ndarray) -> dict[str, float]:
    """Rows with a NaN or infinite value, and the spread of the finite rows."""
    x = np.asarray(embeddings, dtype=np.float64)
    finite = np.isfinite(x).all(axis=1)
    return {"non_finite_embeddings": float((~finite).sum()), "embedding_spread": embedding_spread(x[finite])}


def score_vectors(
    embeddings: np.ndarray,
    labels: Sequence[str],
    ks: Sequence[int],
    prefix: str,
    queries: Sequence[int] | np.ndarray | None = None,
) -> dict[str, float]:
    """Retrieval metrics under prefix; NaN for every key when an embedding is not finite."""
    if not np.isfinite(embeddings).all():
        return RetrievalMetrics({k: math.nan for k in ks}, math.nan, math.nan, 0).as_dict(prefix)
    return retrieval_metrics(embeddings, labels, ks, queries=queries, device=metrics_device()).as_dict(prefix)


def score_embedder(
    model: Embedder, paths: Sequence[Path], labels: Sequence[str], ks: Sequence[int], batch_size: int
) -> RetrievalMetrics:
    """Embed the images with `model` and score leave-one-out retrieval among them."""
    return retrieval_metrics(embed_files(model, paths, batch_size=batch_size), labels, ks, device=metrics_device())


def score_pixels(paths: Sequence[Path], labels: Sequence[str], ks: Sequence[int], size: int) -> RetrievalMetrics:
    """The same retrieval scored on raw pixels: what a model has to beat."""
    return retrieval_metrics(pixel_vectors(paths, size), labels, ks)


def score_unseen(
    ws: Workspace,
    unseen: Sequence[ImageRecord],
    params: EvaluateParams,
    candidate: Embedder,
    champion: Embedder | None = None,
) -> dict[str, float]:
    """Candidate, champion (when there is one) and the pixel baseline, on the same unseen-class images.

    Keys: unseen_*, champion_unseen_*, baseline_unseen_* (recall_at_K for each K, map_at_r, r_precision).
    """
    paths, labels = [ws.classes_dir / r.id for r in unseen], [r.cls for r in unseen]
    ks = params.recall_at
    metrics = score_embedder(candidate, paths, labels, ks, params.batch_size).as_dict(keys.UNSEEN)
    metrics |= score_pixels(paths, labels, ks, params.baseline_image_size).as_dict(keys.baseline(keys.UNSEEN))
    if champion is not None:
        metrics |= score_embedder(champion, paths, labels, ks, params.batch_size).as_dict(keys.champion(keys.UNSEEN))
    return metrics


# --- few-shot episodes ---------------------------------------------------------------------


def few_shot_accuracy(
    embeddings: np.ndarray,
    labels: Sequence[str],
    *,
    way: int,
    shot: int,
    episodes: int,
    seed: int,
    groups: Mapping[str, str] | None = None,
) -> float | None:
    """Mean accuracy of seeded N-way K-shot episodes (Vinyals et al. 2016; Lake et al.'s one-shot task
    at way 20, shot 1), None when fewer than `way` classes have `shot` + 1 images.

    Each episode draws `way` classes, `shot` support images of each and every other image of
    them as queries; a query is right when the nearest class mean of the (L2-normalised)
    support embeddings, by cosine similarity, is its own class. With `groups` (class -> group,
    e.g. the arrival that brought it) every episode draws all its classes from one group, as
    Lake et al. draw a trial's 20 characters from one alphabet: the fine-grained task, where
    the candidates look alike; groups with fewer than `way` eligible classes take no part.
    """
    x = unit_rows(np.asarray(embeddings, dtype=np.float64))
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(str(label), []).append(i)
    eligible = sorted(c for c, rows in by_class.items() if len(rows) > shot)
    pools: list[list[str]] = [eligible]
    if groups is not None:
        grouped: dict[str, list[str]] = {}
        for c in eligible:
            grouped.setdefault(groups[c], []).append(c)
        pools = [members for _, members in sorted(grouped.items())]
    pools = [pool for pool in pools if len(pool) >= way]
    if not pools or episodes < 1:
        return None
    rng = np.random.default_rng(seed)
    accuracies = []
    for _ in range(episodes):
        pool = pools[rng.integers(len(pools))] if len(pools) > 1 else pools[0]
        classes = rng.choice(len(pool), size=way, replace=False)
        prototypes, query_rows, truth = [], [], []
        for j, c in enumerate(classes):
            rows = rng.permutation(by_class[pool[c]])
            prototypes.append(x[rows[:shot]].mean(axis=0))
            query_rows += rows[shot:].tolist()
            truth += [j] * (len(rows) - shot)
        guess = (x[query_rows] @ np.stack(prototypes).T).argmax(axis=1)
        accuracies.append(float((guess == np.asarray(truth)).mean()))
    return float(np.mean(accuracies))


def few_shot_metrics(
    embeddings: np.ndarray,
    labels: Sequence[str],
    params: EvaluateParams,
    prefix: str,
    groups: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """`<prefix>_<N>way_<K>shot[_within_arrival]` for every task in params that the classes allow
    (NaN embeddings: NaN); tasks `within: arrival` draw each episode from one group of `groups`."""
    out = {}
    for task in params.few_shot:
        key = keys.key(prefix, keys.few_shot(task.way, task.shot, task.within))
        if not np.isfinite(embeddings).all():
            out[key] = math.nan
            continue
        if task.within == "arrival" and groups is None:
            continue
        accuracy = few_shot_accuracy(
            embeddings,
            labels,
            way=task.way,
            shot=task.shot,
            episodes=params.few_shot_episodes,
            seed=params.seed,
            groups=groups if task.within == "arrival" else None,
        )
        if accuracy is not None:
            out[key] = accuracy
    return out


def json_number(v: float | None) -> float | None:
    """A metric for JSON: NaN and infinities (a model that produced NaN) become null."""
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)
