"""LanceDB: one table per model version, holding every stored image's embedding.

A version's table is built and checked before the version may become champion, so a
reader that resolves champion -> version -> table never sees a half-built index.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import lancedb
import numpy as np
import pyarrow as pa
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from components.config import Workspace
from components.data.class_registry import ImageRecord
from components.data.transforms import open_rgb
from components.modeling.embedder import Embedder, embed_images

COLUMNS = ["id", "class", "arrival", "split"]  # split: the image's role, train | query | unseen


class IndexValidationError(RuntimeError):
    """A freshly built table does not hold what it should; it must not go live."""


@dataclass(frozen=True)
class IndexBuild:
    table: str
    rows: int
    seconds: float


def table_name(prefix: str, version: str | int) -> str:
    return f"{prefix}_v{version}"


def _schema(dim: int) -> pa.Schema:
    return pa.schema([*(pa.field(c, pa.string()) for c in COLUMNS), pa.field("vector", pa.list_(pa.float32(), dim))])


def build_table(
    ws: Workspace,
    table: str,
    model: Embedder,
    records: Sequence[ImageRecord],
    *,
    batch_size: int,
) -> IndexBuild:
    """Embed every record into a new table (replacing a leftover of the same name), then validate it."""
    start = time.perf_counter()
    db = lancedb.connect(ws.lancedb_uri)
    db.drop_table(table, ignore_missing=True)  # a leftover of a failed build never goes live
    tbl = db.create_table(table, schema=_schema(model.embedding_dim))
    with Progress(TextColumn(f"[bold]index[/] {table}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as progress:
        task = progress.add_task("index", total=len(records))
        for lo in range(0, len(records), batch_size):
            chunk = records[lo : lo + batch_size]
            vectors = embed_images(model, (open_rgb(ws.classes_dir / r.id) for r in chunk), batch_size=batch_size)
            tbl.add(pa.table(
                {"id": [r.id for r in chunk], "class": [r.cls for r in chunk], "arrival": [r.arrival for r in chunk],
                 "split": [r.role for r in chunk],
                 "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), model.embedding_dim)},
                schema=_schema(model.embedding_dim),
            ))
            progress.advance(task, len(chunk))
    rows = tbl.count_rows()
    if rows != len(records):
        raise IndexValidationError(f"table {table} holds {rows} rows, expected {len(records)}")
    return IndexBuild(table=table, rows=rows, seconds=time.perf_counter() - start)


def search(ws: Workspace, table: str, vectors: np.ndarray, k: int) -> list[list[dict]]:
    """The k nearest rows (cosine distance) for each query vector, nearest first."""
    tbl = _open(ws, table)
    results = []
    for v in np.asarray(vectors, dtype=np.float32):
        rows = tbl.search(v).distance_type("cosine").limit(k).select(COLUMNS).to_list()
        results.append([{"class": r["class"], "distance": float(r["_distance"]), "id": r["id"]} for r in rows])
    return results


def table_rows(ws: Workspace, table: str) -> int | None:
    """Rows in a table, or None when it does not exist (a live pair that lost its index)."""
    try:
        return _open(ws, table).count_rows()
    except FileNotFoundError:
        return None


def _open(ws: Workspace, table: str) -> lancedb.table.Table:
    try:
        return lancedb.connect(ws.lancedb_uri).open_table(table)
    except (ValueError, FileNotFoundError):  # lancedb says ValueError for a missing table
        raise FileNotFoundError(f"index table {table} is missing from {ws.lancedb_uri}") from None
