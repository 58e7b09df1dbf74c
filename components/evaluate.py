"""Retrieval metrics (exact, leave-one-out), seen-class slices and forgetting, sanity checks,
the index smoke test, and the gate: a pure decision with every reason, and its report.

Every image of the evaluated set queries all the others: Recall@K is the share of queries
with a same-class image among their K nearest neighbours; R-precision is the share of
same-class images among the first R neighbours and MAP@R the mean average precision over
them, R being the number of other images of the query's class (Musgrave et al., "A Metric
Learning Reality Check"). Queries without any other image of their class are left out, as
pytorch-metric-learning does.

Metric keys (what is logged to MLflow and what the gate reads):
  unseen_*                      the candidate on the unseen classes (never trained on)
  seen_<slice>_*                the candidate on the held-out queries of the classes an arrival brought
  champion_unseen_*, champion_seen_<slice>_*   the champion on the same images
  baseline_unseen_*             raw pixels on the unseen classes: what a model has to beat
  forgetting_<slice>            best seen Recall@1 a served version had on the slice minus the candidate's
  non_finite_embeddings, embedding_spread      sanity of the candidate's unseen-class embeddings
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from PIL import Image

from components.config import EvaluateParams, GateParams, IndexParams, Workspace, stage_setup
from components.data.class_registry import ClassRegistry, ImageRecord
from components.modeling.embedder import Embedder, embed_files, load_embedder

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

FORGETTING_METRIC = "recall_at_1"  # the seen-class metric forgetting is measured on
BLOCK_BYTES = 256 * 2**20  # similarity rows computed at once: a 100k gallery needs ~670 query rows per block


@dataclass(frozen=True)
class RetrievalMetrics:
    recall_at: dict[int, float]
    map_at_r: float
    r_precision: float
    queries: int

    def as_dict(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}_recall_at_{k}": v for k, v in self.recall_at.items()}
        out[f"{prefix}_map_at_r"] = self.map_at_r
        out[f"{prefix}_r_precision"] = self.r_precision
        return out


def retrieval_metrics(
    embeddings: np.ndarray | torch.Tensor,
    labels: Sequence,
    ks: Sequence[int] = (1, 5, 10),
    *,
    chunk: int | None = None,
    device: str | torch.device = "cpu",
) -> RetrievalMetrics:
    """Exact Recall@K, MAP@R and R-precision by cosine similarity.

    Brute force over query blocks (`chunk` rows, by default sized to keep one block of
    similarities near 256 MiB) so memory stays bounded for a 100k-image gallery.
    """
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32, device=device)
    if x.ndim != 2 or len(x) != len(labels):
        raise ValueError(f"need N x D embeddings for {len(labels)} labels, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinite values")
    x = torch.nn.functional.normalize(x, dim=1)
    _, y = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    y = torch.as_tensor(y, device=device)
    n = len(y)
    chunk = chunk or max(1, min(4096, BLOCK_BYTES // (4 * max(n, 1))))
    r_of = (torch.bincount(y)[y] - 1)  # other images of each query's class
    depth = min(n - 1, max(max(ks), int(r_of.max()) if n else 0))
    hits = {k: 0.0 for k in ks}
    ap_sum, rp_sum, counted = 0.0, 0.0, 0
    ranks = torch.arange(1, depth + 1, device=device)
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
        within_r = (ranks[None, :] <= r[:, None]).float()
        precision = rel.cumsum(dim=1) / ranks
        ap = (precision * rel * within_r).sum(dim=1) / r.clamp(min=1)
        rp = (rel * within_r).sum(dim=1) / r.clamp(min=1)
        ap_sum += ap[valid].sum().item()
        rp_sum += rp[valid].sum().item()
        counted += int(valid.sum())
    if counted == 0:
        raise ValueError("no query has another image of its class; cannot score retrieval")
    return RetrievalMetrics(recall_at={k: hits[k] / counted for k in ks}, map_at_r=ap_sum / counted,
                            r_precision=rp_sum / counted, queries=counted)


def metrics_device() -> str:
    """Where brute-force scoring runs: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


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


# --- sanity -------------------------------------------------------------------------------


def embedding_spread(embeddings: np.ndarray) -> float:
    """Mean cosine distance between distinct embeddings: ~0 when a model maps everything to one point.

    For unit vectors the mean of x_i . x_j over all ordered pairs is |mean x|^2, so this
    is exact in O(N D) rather than O(N^2 D).
    """
    x = np.asarray(embeddings, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
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


# --- what is scored -----------------------------------------------------------------------


def slice_key(arrival: str) -> str:
    """An arrival id as it appears in metric names (MLflow allows word characters, '.' and '-')."""
    return re.sub(r"[^\w.-]", "_", arrival)


def seen_slices(catalog: ClassRegistry) -> dict[str, list[ImageRecord]]:
    """The held-out query images of the trained classes, grouped by the arrival that brought each class."""
    slices: dict[str, list[ImageRecord]] = {}
    for r in catalog.records("query"):
        arrival = catalog.classes.get(r.cls, {}).get("arrival", r.arrival)
        slices.setdefault(slice_key(arrival), []).append(r)
    return dict(sorted(slices.items()))


def _scores(embeddings: np.ndarray, labels: Sequence[str], ks: Sequence[int], prefix: str) -> dict[str, float]:
    """Retrieval metrics under prefix; NaN for every key when an embedding is not finite."""
    if not np.isfinite(embeddings).all():
        return {f"{prefix}_recall_at_{k}": math.nan for k in ks} | {f"{prefix}_map_at_r": math.nan, f"{prefix}_r_precision": math.nan}
    return retrieval_metrics(embeddings, labels, ks, device=metrics_device()).as_dict(prefix)


def score_embedder(model: Embedder, paths: Sequence[Path], labels: Sequence[str], ks: Sequence[int], batch_size: int) -> RetrievalMetrics:
    """Embed the images with `model` and score leave-one-out retrieval among them."""
    return retrieval_metrics(embed_files(model, paths, batch_size=batch_size), labels, ks, device=metrics_device())


def score_pixels(paths: Sequence[Path], labels: Sequence[str], ks: Sequence[int], size: int) -> RetrievalMetrics:
    """The same retrieval scored on raw pixels: what a model has to beat."""
    return retrieval_metrics(pixel_vectors(paths, size), labels, ks)


def score_unseen(
    ws: Workspace, unseen: Sequence[ImageRecord], params: EvaluateParams, candidate: Embedder, champion: Embedder | None = None
) -> dict[str, float]:
    """Candidate, champion (when there is one) and the pixel baseline, on the same unseen-class images.

    Keys: unseen_*, champion_unseen_*, baseline_unseen_* (recall_at_K for each K, map_at_r, r_precision).
    """
    paths, labels = [ws.classes_dir / r.id for r in unseen], [r.cls for r in unseen]
    ks = params.recall_at
    metrics = score_embedder(candidate, paths, labels, ks, params.batch_size).as_dict("unseen")
    metrics |= score_pixels(paths, labels, ks, params.baseline_image_size).as_dict("baseline_unseen")
    if champion is not None:
        metrics |= score_embedder(champion, paths, labels, ks, params.batch_size).as_dict("champion_unseen")
    return metrics


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
    metrics = sanity_metrics(x) | _scores(x, labels, ks, "unseen")
    metrics |= score_pixels(paths, labels, ks, params.baseline_image_size).as_dict("baseline_unseen")
    if champion is not None:
        metrics |= _scores(embed_files(champion, paths, batch_size=bs), labels, ks, "champion_unseen")
    champion_slices = {slice_key(a) for a in champion_arrivals}
    for key, records in seen_slices(catalog).items():
        labels = [r.cls for r in records]
        if len(labels) - len(set(labels)) == 0:
            continue  # no class has two query images: nothing to retrieve
        paths = [ws.classes_dir / r.id for r in records]
        metrics |= _scores(embed_files(candidate, paths, batch_size=bs), labels, ks, f"seen_{key}")
        if champion is not None and key in champion_slices:
            metrics |= _scores(embed_files(champion, paths, batch_size=bs), labels, ks, f"champion_seen_{key}")
    return metrics


# --- forgetting -----------------------------------------------------------------------------


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


def slice_values(metrics: Mapping[str, float], prefix: str = "seen_", metric: str = FORGETTING_METRIC) -> dict[str, float]:
    """{slice: value} from keys `<prefix><slice>_<metric>`."""
    head, tail = prefix, f"_{metric}"
    return {k[len(head):-len(tail)]: v for k, v in metrics.items()
            if k.startswith(head) and k.endswith(tail) and len(k) > len(head) + len(tail)}


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
        return {"versions": self.versions, "slices": self.slices,
                "values": [[_json_number(v) for v in row] for row in self.values.tolist()]}


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
    rows = {str(v): slice_values(m) for v, m in served}
    if champion is not None:
        rows[str(champion)] = rows.get(str(champion), {}) | slice_values(candidate, "champion_seen_")
    order = sorted(rows, key=lambda v: (int(v), v) if v.isdigit() else (math.inf, v))
    last = slice_values(candidate)
    slices = sorted({s for v in order for s in rows[v]} | set(last))
    values = np.array([[rows[v].get(s, math.nan) for s in slices] for v in order] + [[last.get(s, math.nan) for s in slices]],
                      dtype=float).reshape(len(order) + 1, len(slices))
    return ForgettingMatrix(versions=[*order, candidate_label], slices=slices, values=values)


def forgetting_metrics(matrix: ForgettingMatrix) -> dict[str, float]:
    """forgetting_<slice> for every slice the candidate can have forgotten, and their mean."""
    per_slice = matrix.forgetting()
    out = {f"forgetting_{s}": v for s, v in per_slice.items()}
    out["average_forgetting"] = average_forgetting(matrix.values) if len(matrix.versions) > 1 else 0.0
    return out


def forgetting_heatmap(matrix: ForgettingMatrix, title: str = "seen-class Recall@1 per arrival slice") -> Figure:
    """The matrix as a heatmap (rows: versions, columns: slices), each cell annotated."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI

    fig = Figure(figsize=(max(4.0, 1.1 * len(matrix.slices) + 2.5), max(2.5, 0.5 * len(matrix.versions) + 1.5)))
    ax = fig.add_subplot()
    if not matrix.slices:
        ax.text(0.5, 0.5, "no seen-class slice scored yet", ha="center", va="center")
        ax.set_axis_off()
        return fig
    image = ax.imshow(np.ma.masked_invalid(matrix.values), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(matrix.slices)), matrix.slices, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix.versions)), [v if not v.isdigit() else f"v{v}" for v in matrix.versions])
    for (i, j), v in np.ndenumerate(matrix.values):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
    ax.set_xlabel("arrival slice")
    ax.set_ylabel("model version")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


# --- index smoke test ---------------------------------------------------------------------


class Predictor(Protocol):
    """What the smoke test needs of a loaded model: mlflow.pyfunc's predict on a DataFrame of image bytes."""

    def predict(self, data: pd.DataFrame) -> np.ndarray: ...


@dataclass(frozen=True)
class SmokeTest:
    passed: bool
    probes: int
    detail: str


def probe_records(records: Sequence[ImageRecord], count: int) -> list[ImageRecord]:
    """`count` records spread evenly over the (stably ordered) records."""
    if not records:
        return []
    picks = np.linspace(0, len(records) - 1, num=min(count, len(records))).round().astype(int)
    return [records[i] for i in sorted(set(picks.tolist()))]


def index_smoke_test(ws: Workspace, table: str, model: Predictor, records: Sequence[ImageRecord], params: IndexParams) -> SmokeTest:
    """Embed `params.probes` stored images with the model as users load it (image bytes in, through
    its signature) and query the new table the way readers do: each must find itself.

    The table build validates with the in-memory network; this catches a logged model that
    differs from it (weights, preprocessing, packaging) before the pair can go live.
    """
    import pandas as pd

    from components.index import search

    picked = probe_records(records, params.probes)
    if not picked:
        return SmokeTest(False, 0, "no stored images to probe the table with")
    vectors = np.asarray(model.predict(pd.DataFrame({"image": [(ws.classes_dir / r.id).read_bytes() for r in picked]})))
    if not np.isfinite(vectors).all():
        return SmokeTest(False, len(picked), "the loaded model returns non-finite embeddings")
    try:
        results = search(ws, table, vectors, 3, params)
    except FileNotFoundError as exc:
        return SmokeTest(False, len(picked), str(exc))
    lost = []
    for record, hits in zip(picked, results):
        # Identical images stored twice tie at distance 0; either one is "itself".
        nearest = [h["id"] for h in hits if hits and h["distance"] <= hits[0]["distance"] + 1e-4]
        if record.id not in nearest:
            lost.append(f"{record.id} -> {hits[0]['id'] if hits else 'nothing'}")
    if lost:
        return SmokeTest(False, len(picked), f"{len(lost)} of {len(picked)} probes did not find themselves in {table}: "
                         + ", ".join(lost[:3]))
    return SmokeTest(True, len(picked), f"all {len(picked)} probes found themselves in {table}")


# --- the gate -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: list[str] = field(default_factory=list)  # every check, passed or not, in order
    failed: list[str] = field(default_factory=list)  # the reasons that reject

    @property
    def verdict(self) -> str:
        return "promote" if self.promote else "reject"

    def with_check(self, passed: bool, reason: str) -> GateDecision:
        """The decision with one more check (e.g. the index smoke test, run after registration)."""
        return replace(self, promote=self.promote and passed, reasons=[*self.reasons, reason],
                       failed=self.failed if passed else [*self.failed, reason])


def prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float] | None:
    """The metrics whose keys start with prefix, prefix removed; None when there are none."""
    found = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
    return found or None


def _number(metrics: Mapping[str, float], key: str) -> float:
    value = metrics.get(key, math.nan)
    return float(value) if value is not None else math.nan


def decide(candidate: dict[str, float], champion: dict[str, float] | None, gate: GateParams) -> GateDecision:
    """Promote or reject, with every reason (passed checks included).

    Value thresholds (floors and sanity) always apply; change thresholds against the
    champion (unseen Recall@1 drop, forgetting per slice) are skipped without one. A
    metric that is missing or not a number fails its check: a model is never promoted
    on something that was not measured.
    """
    reasons: list[str] = []
    failed: list[str] = []

    def check(passed: bool, yes: str, no: str) -> None:
        reasons.append(yes if passed else no)
        if not passed:
            failed.append(no)

    bad_rows = _number(candidate, "non_finite_embeddings")
    check(bad_rows == 0, "embeddings are finite",
          "embeddings were not checked for NaN/inf" if math.isnan(bad_rows) else f"{bad_rows:.0f} embeddings contain NaN or infinite values")
    spread = _number(candidate, "embedding_spread")
    check(spread >= gate.min_embedding_spread, f"embedding spread {spread:.4f} meets the floor {gate.min_embedding_spread:.4f}",
          f"embeddings collapsed: spread {spread:.4f} is below the floor {gate.min_embedding_spread:.4f}")
    for key, name, floor in (("unseen_recall_at_1", "unseen Recall@1", gate.min_unseen_recall_at_1),
                             ("unseen_map_at_r", "unseen MAP@R", gate.min_unseen_map_at_r)):
        value = _number(candidate, key)
        check(value >= floor, f"{name} {value:.4f} meets the floor {floor:.4f}", f"{name} {value:.4f} is below the floor {floor:.4f}")

    if champion is None:
        reasons.append("no champion: change thresholds skipped")
        return GateDecision(promote=not failed, reasons=reasons, failed=failed)
    r1, before = _number(candidate, "unseen_recall_at_1"), _number(champion, "unseen_recall_at_1")
    if math.isnan(before):
        reasons.append("the champion's unseen Recall@1 is unknown: drop not checked")
    else:
        drop, allowed = before - r1, gate.max_unseen_recall_at_1_drop
        check(drop <= allowed, f"unseen Recall@1 changed {-drop:+.4f} against the champion (allowed drop {allowed:.4f})",
              f"unseen Recall@1 dropped {drop:.4f} against the champion, more than {allowed:.4f}"
              if not math.isnan(drop) else "unseen Recall@1 is not a number: drop against the champion unknown")
    forgetting = {k[len("forgetting_"):]: float(v) for k, v in sorted(candidate.items()) if k.startswith("forgetting_")}
    allowed = gate.max_slice_forgetting
    over = {s: f for s, f in forgetting.items() if not f <= allowed}  # NaN counts as over: unknown is not fine
    for s, f in over.items():
        check(False, "", f"forgot {f:.4f} of seen Recall@1 on slice {s}, more than {allowed:.4f}")
    if not forgetting:
        reasons.append("no seen-class slice scored by an earlier champion: forgetting not checked")
    elif not over:
        s, f = max(forgetting.items(), key=lambda kv: kv[1])
        reasons.append(f"largest forgetting {f:+.4f} (slice {s}) is within {allowed:.4f}")
    return GateDecision(promote=not failed, reasons=reasons, failed=failed)


# --- the gate report ------------------------------------------------------------------------


def _json_number(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def gate_report(
    candidate_version: str,
    champion_version: str | None,
    metrics: Mapping[str, float],
    decision: GateDecision,
    gate: GateParams,
    matrix: ForgettingMatrix,
) -> dict:
    """The gate's verdict as plain JSON: metrics side by side, deltas, thresholds, forgetting, reasons."""
    side_by_side = {}
    for key in sorted(k for k in metrics if k.startswith(("unseen_", "seen_"))):
        mine, theirs = metrics[key], metrics.get(f"champion_{key}")
        side_by_side[key] = {"candidate": _json_number(mine), "champion": _json_number(theirs),
                             "delta": _json_number(mine - theirs) if theirs is not None else None}
    for key in ("embedding_spread", "non_finite_embeddings", "average_forgetting"):
        if key in metrics:
            side_by_side[key] = {"candidate": _json_number(metrics[key]), "champion": None, "delta": None}
    return {
        "candidate": str(candidate_version),
        "champion": champion_version,
        "verdict": decision.verdict,
        "reasons": list(decision.reasons),
        "thresholds": gate.model_dump(mode="json"),
        "metrics": side_by_side,
        "baseline": {k: _json_number(v) for k, v in sorted(metrics.items()) if k.startswith("baseline_")},
        "forgetting": {k[len("forgetting_"):]: _json_number(v) for k, v in sorted(metrics.items()) if k.startswith("forgetting_")},
        "forgetting_matrix": matrix.labelled(str(candidate_version)).as_dict(),
    }


def _cell(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


def gate_markdown(report: Mapping) -> str:
    """The report for people: verdict, reasons, the side-by-side table, forgetting per slice."""
    champion = f"v{report['champion']}" if report["champion"] else "none"
    lines = [f"# Gate: v{report['candidate']} — **{report['verdict'].upper()}**", "",
             f"Candidate v{report['candidate']} against champion {champion}.", "", "## Reasons", ""]
    lines += [f"- {r}" for r in report["reasons"]]
    lines += ["", "## Metrics", "", "| metric | candidate | champion | delta |", "|---|---:|---:|---:|"]
    for key, row in report["metrics"].items():
        delta = "–" if row["delta"] is None else f"{row['delta']:+.4f}"
        lines.append(f"| {key} | {_cell(row['candidate'])} | {_cell(row['champion'])} | {delta} |")
    if report["baseline"]:
        lines += ["", "Pixel baseline: " + ", ".join(f"{k} {_cell(v)}" for k, v in report["baseline"].items())]
    if report["forgetting"]:
        lines += ["", "## Forgetting (best served seen Recall@1 minus the candidate's)", "", "| slice | forgetting |", "|---|---:|"]
        lines += [f"| {s} | {_cell(v)} |" for s, v in report["forgetting"].items()]
    lines += ["", "## Thresholds", "", "```json", json.dumps(report["thresholds"], indent=1), "```", ""]
    return "\n".join(lines)


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


def main(argv: list[str] | None = None) -> None:
    """DVC stage: score the trained embedder and the pixel baseline on unseen classes and seen slices."""
    params, ws = stage_setup(argv, main.__doc__)
    catalog = ClassRegistry.load(ws.class_registry)
    metrics = evaluate_models(ws, catalog, params.evaluate, load_embedder(ws.dvc_outputs / "embedder.pt"))
    metrics = {k: _json_number(v) for k, v in metrics.items()}
    (ws.dvc_outputs / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
