"""DVC stage `report`: what the evaluate stage measured, as plots `dvc plots show/diff` draw.

- unseen_recall_at_k.json: Recall@K on unseen classes, the model next to raw pixels, per K;
- seen_slices.json: seen-class Recall@1 per arrival slice;
- seen_recall.png: the same slices as the heatmap the gate report draws (one row: this model);
- report.md: both tables for people.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from components.evaluation import keys
from components.evaluation.forgetting import ForgettingMatrix, forgetting_heatmap

PLOTS = "plots"  # under the workspace's dvc/ folder


def recall_curve(metrics: Mapping[str, float | None], ks: Sequence[int]) -> list[dict[str, float | None]]:
    """One row per K: the model's and the pixel baseline's unseen-class Recall@K."""
    return [
        {
            "k": k,
            "model": metrics.get(keys.unseen(f"recall_at_{k}")),
            "pixels": metrics.get(keys.baseline(keys.unseen(f"recall_at_{k}"))),
        }
        for k in ks
    ]


def slice_rows(metrics: Mapping[str, float | None]) -> list[dict[str, float | str | None]]:
    """One row per arrival slice: the model's seen-class Recall@1 on that arrival's held-out queries."""
    finite = {k: v for k, v in metrics.items() if v is not None}
    return [{"slice": s, "recall_at_1": v} for s, v in sorted(keys.slice_values(finite).items())]


def report_markdown(curve: list[dict], slices: list[dict]) -> str:
    lines = [
        "# DVC pipeline report",
        "",
        "## Unseen classes: Recall@K",
        "",
        "| K | model | pixels |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {r['k']} | {_cell(r['model'])} | {_cell(r['pixels'])} |" for r in curve]
    lines += ["", "## Seen classes: Recall@1 per arrival", "", "| arrival | Recall@1 |", "|---|---:|"]
    lines += [f"| {r['slice']} | {_cell(r['recall_at_1'])} |" for r in slices] or ["| – | – |"]
    return "\n".join(lines) + "\n"


def _cell(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


def write_report(metrics: Mapping[str, float | None], ks: Sequence[int], out: Path) -> None:
    """The plots and the markdown report of one evaluate stage's metrics, into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    curve, slices = recall_curve(metrics, ks), slice_rows(metrics)
    (out / "unseen_recall_at_k.json").write_text(json.dumps(curve, indent=1) + "\n")
    (out / "seen_slices.json").write_text(json.dumps(slices, indent=1) + "\n")
    matrix = ForgettingMatrix(
        versions=["this model"],
        slices=[str(r["slice"]) for r in slices],
        values=np.array([[r["recall_at_1"] for r in slices]], dtype=float).reshape(1, len(slices)),
    )
    forgetting_heatmap(matrix).savefig(out / "seen_recall.png", dpi=100)
    (out / "report.md").write_text(report_markdown(curve, slices))
