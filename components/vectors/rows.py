"""A table's rows: stored images embedded from their files, in the table's schema.

What every writer of a table shares: the full build (build.py), the sharded build's
fragments, and the catch-up that appends images a table lacks (catch_up.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import lancedb
import numpy as np
import pyarrow as pa

from components.data.catalog import ImageRecord
from components.evaluation.metrics import unit_rows
from components.modeling.embedder import Embedder, embed_files
from components.vectors.tables import EMBEDDED_BY, VECTOR, sql_strings, table_schema
from components.workspace import Workspace


def embedded_rows(
    ws: Workspace, model: Embedder, records: Sequence[ImageRecord], batch_size: int, embedded_by: str | None = None
) -> pa.Table:
    """The records' rows: id, class, arrival, role, and the image embedded by `model`; with
    `embedded_by` (for a compatible table, which says per row whose model embedded it) that version too."""
    vectors = embed_files(model, [ws.classes_dir / r.id for r in records], batch_size=batch_size)
    rows = pa.table(
        {
            "id": [r.id for r in records],
            "class": [r.cls for r in records],
            "arrival": [r.arrival for r in records],
            "role": [r.role for r in records],
            VECTOR: pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), model.embedding_dim),
        },
        schema=table_schema(model.embedding_dim),
    )
    if embedded_by is None:
        return rows
    return rows.append_column(pa.field(EMBEDDED_BY, pa.string()), pa.array([embedded_by] * len(records), pa.string()))


def in_chunks(records: Sequence[ImageRecord], size: int) -> Iterable[Sequence[ImageRecord]]:
    """The records `size` at a time: one LanceDB write (one Lance version or fragment) each."""
    for lo in range(0, len(records), size):
        yield records[lo : lo + size]


def unit_vectors(batch: pa.RecordBatch) -> np.ndarray:
    """A batch's vector column as float32 unit rows (inner product = cosine similarity)."""
    column = batch.column(VECTOR)
    return unit_rows(np.asarray(column.flatten(), dtype=np.float32).reshape(len(column), -1))


def stored_vectors(tbl: lancedb.table.Table, ids: Sequence[str], chunk: int = 1000) -> np.ndarray:
    """The table's vectors of `ids`, row for row (NaN rows for ids it lacks): what it answers with."""
    dim = tbl.schema.field(VECTOR).type.list_size
    out = np.full((len(ids), dim), np.nan, dtype=np.float32)
    where = {i: n for n, i in enumerate(ids)}
    for lo in range(0, len(ids), chunk):
        found = tbl.search().where(f"id IN ({sql_strings(ids[lo : lo + chunk])})").select(["id", VECTOR]).limit(None)
        for batch in found.to_batches():
            vectors = np.asarray(batch.column(VECTOR).flatten(), dtype=np.float32).reshape(len(batch), -1)
            out[[where[i] for i in batch.column("id").to_pylist()]] = vectors
    return out


def stored_class_means(tbl: lancedb.table.Table, classes: Sequence[str], chunk: int = 200) -> dict[str, np.ndarray]:
    """Each class's mean stored vector, unit length (classes the table lacks are left out): where the
    table's model put the class, over every image of it the table holds."""
    sums: dict[str, np.ndarray] = {}
    for lo in range(0, len(classes), chunk):
        found = tbl.search().where(f"class IN ({sql_strings(classes[lo : lo + chunk])})").select(["class", VECTOR])
        for batch in found.limit(None).to_batches():
            vectors = np.asarray(batch.column(VECTOR).flatten(), dtype=np.float64).reshape(len(batch), -1)
            for cls, v in zip(batch.column("class").to_pylist(), vectors):
                sums[cls] = sums.get(cls, 0.0) + v
    return {c: unit_rows(s[None, :].astype(np.float32))[0] for c, s in sums.items()}
