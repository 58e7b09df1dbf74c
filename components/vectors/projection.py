"""The embedding map: a fixed sample of a table's rows projected to 2-D by PCA, for people to see where
classes and arrivals land. (UMAP is not offered: no extra pins umap-learn yet; `Method` is where it
would be named.)

Bounded whatever the table's size: at most `sample` rows are read (random row offsets, then only those
rows), so the cost is the count, one `take` of `sample` rows and an SVD of a sample x dim matrix; at 1M
rows and the default 2,000 rows that is well under a second and a few MB (bench/page.py measures it).
A map is computed once per table version and kept as JSON under <workspace>/cache/maps/: a new Lance
version (a catch-up, a backfill batch) gets a new map, a reader of an unchanged table reads the file.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, Field

from components.vectors.rows import stored_vectors
from components.vectors.tables import COLUMNS, VECTOR, connect, open_table, reading
from components.workspace import Workspace

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Method = Literal["pca"]
SAMPLE = 2000  # rows on a map: enough to see every class of the demo, few enough for a browser to draw
SEED = 0  # the same rows for the same table size: maps of two tables compare like with like


class MapPoint(BaseModel):
    id: str
    cls: str = Field(alias="class")
    arrival: str
    role: str
    x: float
    y: float

    model_config = {"populate_by_name": True}


class EmbeddingMap(BaseModel):
    """A table's sample, projected: what GET /map answers for each model."""

    table: str
    table_version: int = Field(description="the Lance version of the table the map was computed on")
    rows: int = Field(description="rows in the table then")
    method: Method
    explained: list[float] = Field(description="PCA: the share of the sample's variance each axis explains")
    seconds: float = Field(description="what computing it cost (reading the sample included)")
    points: list[MapPoint]


def sample_offsets(rows: int, sample: int, seed: int = SEED) -> np.ndarray:
    """`sample` distinct row positions of a table of `rows` rows, sorted (all of them when it is smaller)."""
    if rows <= sample:
        return np.arange(rows, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(rows, size=sample, replace=False)).astype(np.int64)


def project(vectors: np.ndarray, method: Method = "pca") -> tuple[np.ndarray, list[float]]:
    """(n x 2 coordinates, the share of the sample's variance each axis explains)."""
    x = np.asarray(vectors, dtype=np.float64)
    if len(x) == 0:
        return np.zeros((0, 2)), []
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2]
    coords = centred @ axes.T
    if coords.shape[1] < 2:  # one-dimensional data: a flat second axis
        coords = np.hstack([coords, np.zeros((len(coords), 2 - coords.shape[1]))])
    # A sign per axis fixed by the data (SVD's is arbitrary): the same table always gives the same picture.
    signs = np.sign(coords[np.abs(coords).argmax(axis=0), range(coords.shape[1])])
    coords = coords * np.where(signs == 0, 1, signs)
    total = float((s**2).sum())
    return coords, [float(v) / total if total else 0.0 for v in (s[:2] ** 2)]


def _cache_file(
    ws: Workspace, table: str, version: int, method: Method, sample: int, like: EmbeddingMap | None
) -> Path:
    which = "own" if like is None else f"like-{like.table}@{like.table_version}"
    return ws.root / "cache" / "maps" / f"{table}@{version}-{method}-{sample}-{which}.json"


def embedding_map(
    ws: Workspace,
    table: str,
    *,
    sample: int = SAMPLE,
    method: Method = "pca",
    like: EmbeddingMap | None = None,
) -> tuple[EmbeddingMap, bool]:
    """(the map of `table`'s sample, whether it was read from the cache). With `like` (another table's
    map: the champion's), the sample is that map's images, each as this table's model embedded it."""
    tbl = open_table(connect(ws), ws, table)
    version = int(tbl.version)
    path = _cache_file(ws, table, version, method, sample, like)
    if path.is_file():
        try:
            return EmbeddingMap.model_validate_json(path.read_text()), True
        except ValueError:  # a file cut short by a crash: computed again below
            pass
    start = time.perf_counter()
    with reading(table):
        rows = tbl.count_rows()
        if like is None:
            data = tbl.to_lance().take(sample_offsets(rows, sample), columns=[*COLUMNS, VECTOR])
            meta = [
                {"id": i, "class": c, "arrival": a, "role": r}
                for i, c, a, r in zip(*(data[c].to_pylist() for c in COLUMNS))
            ]
            vectors = np.asarray(data[VECTOR].to_pylist(), dtype=np.float32).reshape(len(meta), -1)
        else:
            found = stored_vectors(tbl, [p.id for p in like.points])
            kept = ~np.isnan(found).any(axis=1)  # images this table lacks are left off its map
            meta = [p.model_dump(by_alias=True, include={"id", "cls", "arrival", "role"}) for p in like.points]
            meta = [m for m, keep in zip(meta, kept) if keep]
            vectors = found[kept]
    coords, explained = project(vectors, method)
    result = EmbeddingMap(
        table=table,
        table_version=version,
        rows=rows,
        method=method,
        explained=explained,
        seconds=time.perf_counter() - start,
        points=[MapPoint(**m, x=round(float(x), 5), y=round(float(y), 5)) for m, (x, y) in zip(meta, coords.tolist())],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(result.model_dump_json(by_alias=True))
    tmp.replace(path)  # whole or not at all: a reader never sees half a map
    return result, False


def map_figure(maps: Sequence[tuple[str, EmbeddingMap]], colour_by: str = "arrival") -> Figure:
    """The maps side by side (title, map), points coloured by arrival (or class, role); for MLflow."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * max(1, len(maps)), 5.0))
    axes = fig.subplots(1, max(1, len(maps)), squeeze=False)[0]
    groups = sorted({getattr(p, "cls" if colour_by == "class" else colour_by) for _, m in maps for p in m.points})
    palette = {g: f"C{i % 10}" for i, g in enumerate(groups)}
    for ax, (title, m) in zip(axes, maps):
        for g in groups:
            pts = [p for p in m.points if getattr(p, "cls" if colour_by == "class" else colour_by) == g]
            if pts:
                ax.scatter([p.x for p in pts], [p.y for p in pts], s=6, color=palette[g], label=g)
        ax.set_title(f"{title}: {m.method.upper()} of {len(m.points)} of {m.rows} rows")
        ax.set_xticks([])
        ax.set_yticks([])
    if groups and len(groups) <= 20:
        axes[0].legend(fontsize=7, markerscale=2, title=colour_by, title_fontsize=7)
    fig.tight_layout()
    return fig
