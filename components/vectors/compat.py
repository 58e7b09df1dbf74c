"""A compatible version's table: started from its predecessor's vectors instead of re-embedding
every stored image, so the version goes live in what its arrival costs (README "Compatible upgrades").

The gate declares a candidate compatible with the champion when the candidate's queries find the
champion's vectors better than the champion's own queries do (evaluation/compat.py). Its table then
starts as the champion's:
- bct (and any compatible model used as it is): a Lance shallow clone of the champion's table: its
  manifest only; the data files and the ANN index stay shared, nothing is read or copied, so the
  cost does not grow with the rows;
- transform: the champion's vectors mapped into the new space by the learned transform
  (training/compat.py), written as a new table and indexed: vector work only, no image is read
  and no network runs.
The EMBEDDED_BY column says per row whose model embedded it (null: carried over from the
predecessor the table's COMPAT_FROM mark names); rows the catch-up appends are the new model's.
The probe images are re-embedded by the new model first, so the table is validated as any build
(probes embedded afresh must find their own rows: the model and the table's own rows agree), and
so is the logged model's smoke test; the gate has already measured how the new model's queries
fare among the carried-over vectors. The backfill (backfill.py) then re-embeds those rows in the
background. The predecessor's
table is never written: a rollback finds it as it was, and the clean-up keeps it while the clone
still reads its files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Sequence
from datetime import timedelta

import lancedb
import numpy as np
import pyarrow as pa

from components.config import IndexParams
from components.data.catalog import ImageRecord
from components.data.inbox import inbox_lock
from components.modeling.embedder import Embedder
from components.training.compat import Transform
from components.vectors.ann import ensure_ann_index, tune_ef
from components.vectors.backfill import embed_batch
from components.vectors.build import (
    IndexBuild,
    check_writable,
    cleanup_tables,
    commit_fragments,
    dataset_uri,
    mark_validated,
)
from components.vectors.catch_up import catch_up
from components.vectors.search import probe_records
from components.vectors.tables import (
    ANN_EF,
    ANN_TRAINED_ROWS,
    BACKFILL_LEFT,
    CATALOG_SEQ,
    COMPAT_FROM,
    EMBEDDED_BY,
    MODEL_VERSION,
    VECTOR,
    IndexBuildError,
    connect,
    drop_old_versions,
    ensure_id_index,
    has_embedded_by,
    is_validated,
    list_tables,
    older_rows,
    open_table,
    rebuild_id_index,
    set_vector_metadata,
    table_name,
)
from components.vectors.validate import IndexValidationError, validate_table
from components.workspace import Workspace

CARRIED_MARKS = (CATALOG_SEQ, ANN_EF, ANN_TRAINED_ROWS)  # the predecessor's marks that still hold for the copy


class NotCompatible(IndexBuildError):
    """The champion's table cannot be the start of the candidate's (it holds rows of an older model
    still, or another dimension): the candidate takes the full re-index instead."""


def compat_obstacle(tbl: lancedb.table.Table, version: str, dim: int) -> str | None:
    """Why the champion `version`'s table cannot seed a compatible successor of embedding size `dim`
    (None when it can): every row must be the champion's own (a backfill still running would chain
    two compatibility steps the gate never checked together) and of the successor's size."""
    left = older_rows(tbl, version)
    if left:
        return f"table {tbl.name} still holds {left} rows of an older model (its backfill has not finished)"
    own = tbl.schema.field(VECTOR).type.list_size
    if own != dim:
        return f"table {tbl.name} holds {own}-d vectors, the candidate embeds {dim}-d"
    return None


def start_compatible_table(
    ws: Workspace,
    params: IndexParams,
    version: str,
    model: Embedder,
    predecessor: tuple[str, str],
    records: Sequence[ImageRecord],
    *,
    transform: Transform | None = None,
    keep: Collection[str] = (),
) -> IndexBuild:
    """The version's table, started from the predecessor's (`(version, table)`: the champion), caught
    up, validated and marked; raises NotCompatible when the predecessor's table cannot seed it,
    IndexValidationError when the result does not answer. `transform` maps the predecessor's vectors
    into the new space (compat.mode transform); without it the vectors are used as they are (bct).

    A validated table of this version already there (a retrain started again) is caught up and
    checked, not rebuilt; an unvalidated one is a dead start's orphan and is replaced.
    """
    start = time.perf_counter()
    old_version, old_table = predecessor
    name = table_name(params.table_prefix, version)
    check_writable(ws)
    db = connect(ws)
    source = open_table(db, ws, old_table)
    problem = compat_obstacle(source, old_version, model.embedding_dim)
    if problem is not None:
        raise NotCompatible(problem)
    if name in list_tables(db):
        if not is_validated(db.open_table(name)):
            db.drop_table(name)
    mode = "transform" if transform is not None else "shared"
    if name not in list_tables(db):
        if transform is not None:
            tbl = _transformed_copy(ws, params, source, name, transform)
        else:
            tbl = _clone(ws, source, name)
        _mark_successor(tbl, source, version, {"version": old_version, "table": old_table, "mode": mode})
    tbl = db.open_table(name)
    caught = catch_up(ws, params, tbl, version, lambda: model)  # stored since the predecessor's last catch-up
    known = {r.id for r in records}
    everything = [*records, *(r for r in caught.appended if r.id not in known)]
    if has_embedded_by(tbl.schema):  # the probes the validation and the smoke test embed: the new model's rows
        probes = probe_records(everything, params.probes)
        with inbox_lock(ws):  # as every write of rows: never beside a catch-up
            tbl.merge_insert("id").when_matched_update_all().execute(embed_batch(ws, model, probes, params, version))
    left = older_rows(tbl, version)  # what the backfill starts from; nothing below rewrites rows
    set_vector_metadata(tbl, BACKFILL_LEFT, str(left))
    tuned = tune_ef(tbl, params) if transform is not None else None  # a shared index keeps its tuned ef
    validation = validate_table(
        ws,
        tbl,
        model,
        everything,
        params,
        measured_recall=tuned[1] if tuned else None,
        probes_from=own_records(tbl, version, everything),
        check_recall=transform is not None,  # a clone searches the predecessor's index over its vectors
    )
    if not validation.ok:
        raise IndexValidationError(validation)  # left unvalidated: the next build or start removes it
    if not is_validated(tbl):
        mark_validated(tbl, version)
    removed = cleanup_tables(ws, params, keep={*keep, name, old_table})
    return IndexBuild.of(
        validation,
        tbl,
        version,
        params,
        caught,
        start,
        removed=removed,
        compatible_from=str(old_version),
        older_rows=left,
    )


def own_records(tbl: lancedb.table.Table, version: str, records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """The records whose rows `version`'s model embedded (all of them in a table that says nothing per row)."""
    if not has_embedded_by(tbl.schema):
        return list(records)
    rows = tbl.search().where(f"{EMBEDDED_BY} = '{int(version)}'").select(["id"]).limit(None).to_arrow()
    own = set(rows["id"].to_pylist())
    return [r for r in records if r.id in own]


def _clone(ws: Workspace, source: lancedb.table.Table, name: str) -> lancedb.table.Table:
    """A shallow clone of the source's current version: a new manifest naming the source's files.

    Its id index is built anew in its own files (ids only: seconds at a million rows): Lance 13
    cannot merge new rows into a scalar index a clone inherited. The ANN index stays inherited
    until the backfill ends (catch_up.settle leaves it alone meanwhile, for the same reason).
    """
    lance_source = source.to_lance()
    lance_source.shallow_clone(dataset_uri(ws, name), lance_source.version)
    tbl = connect(ws).open_table(name)
    if not has_embedded_by(tbl.schema):
        tbl.add_columns(pa.field(EMBEDDED_BY, pa.string()))  # all null: carried over; metadata only
    rebuild_id_index(tbl)
    return tbl


def _transformed_copy(
    ws: Workspace, params: IndexParams, source: lancedb.table.Table, name: str, transform: Transform
) -> lancedb.table.Table:
    """The source's rows with their vectors mapped by `transform`, as a new table in one commit,
    then indexed as a build indexes (the id index; the ANN index from ann_min_rows rows)."""
    from lance.fragment import write_fragments

    fragments = []
    schema: pa.Schema | None = None
    for batch in source.search().limit(None).to_batches(65536):
        flat = np.asarray(batch.column(VECTOR).flatten(), dtype=np.float32).reshape(len(batch), -1)
        mapped = transform.to_new(flat)
        carried = batch.column(EMBEDDED_BY) if EMBEDDED_BY in batch.schema.names else pa.nulls(len(batch), pa.string())
        rows = pa.table(
            {
                **{c: batch.column(c) for c in ("id", "class", "arrival", "role")},
                VECTOR: pa.FixedSizeListArray.from_arrays(pa.array(mapped.ravel()), mapped.shape[1]),
                EMBEDDED_BY: carried,
            }
        )
        schema = rows.schema
        fragments += write_fragments(rows, dataset_uri(ws, name), schema=rows.schema)
    if schema is None:
        raise NotCompatible(f"table {source.name} is empty: nothing to start from")
    commit_fragments(ws, name, schema, [json.dumps(f.to_json()) for f in fragments])
    tbl = connect(ws).open_table(name)
    drop_old_versions(tbl, timedelta(0))  # nobody reads it yet
    ensure_id_index(tbl)
    ensure_ann_index(tbl, params)
    return tbl


def _mark_successor(tbl: lancedb.table.Table, source: lancedb.table.Table, version: str, origin: dict) -> None:
    """The copy's marks: its own model version and origin, the source's completeness and ANN marks
    (same rows), and no validation mark until it passes its own validation."""
    inherited = source.schema.field(VECTOR).metadata or {}
    marks = {k.decode(): v.decode() for k, v in inherited.items() if k.decode() in CARRIED_MARKS}
    marks |= {MODEL_VERSION: str(version), COMPAT_FROM: json.dumps(origin)}
    tbl.update_field_metadata({"path": VECTOR, "metadata": marks, "replace": True})
