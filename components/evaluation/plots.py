"""Annotated heatmaps of version x something matrices (forgetting per slice, compatibility between
versions), drawn on a bare matplotlib Figure: no pyplot, so no global backend and no GUI."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def version_label(v: str) -> str:
    return f"v{v}" if v.isdigit() else v


def annotated_heatmap(
    values: np.ndarray,
    rows: Sequence[str],
    columns: Sequence[str],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    empty: str,
) -> Figure:
    """values[i, j] coloured on [0, 1] and written in each cell (NaN cells left blank); `empty` is
    said instead when there are no columns."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 1.1 * len(columns) + 2.5), max(2.5, 0.5 * len(rows) + 1.5)))
    ax = fig.add_subplot()
    if not len(columns):
        ax.text(0.5, 0.5, empty, ha="center", va="center")
        ax.set_axis_off()
        return fig
    image = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), list(columns), rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), list(rows))
    for (i, j), v in np.ndenumerate(values):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig
