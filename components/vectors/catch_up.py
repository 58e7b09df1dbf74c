"""Catching a table up with the catalog: the one way stored images are appended to a table.

Every stored image a table lacks is embedded by the table's own model (the version its mark
names; a table without the mark is refused) and appended. Ingest catches the live table up
(new classes are queryable before the next retrain, and whatever stopped an earlier ingest,
the next one brings the table level); a build catches its new table up with images ingested
while it ran; a promotion catches the table up before the alias moves to it.

The table records the catalog position it is complete up to (its CATALOG_SEQ mark), so a
catch-up with nothing missing reads the mark and the catalog's newer images, not the table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import lancedb

from components.config import IndexParams
from components.data.catalog import Catalog, ImageRecord
from components.modeling.embedder import Embedder
from components.ops.failpoints import failpoint
from components.vectors.ann import retune_ann_index
from components.vectors.rows import embedded_rows, in_chunks
from components.vectors.tables import (
    CATALOG_SEQ,
    IndexBuildError,
    authorship_problem,
    column,
    drop_old_versions,
    ensure_id_index,
    has_embedded_by,
    ids_present,
    marked_seq,
    older_rows,
    references_base,
    set_vector_metadata,
    vector_metadata,
)
from components.workspace import Workspace


@dataclass(frozen=True)
class CatchUp:
    """The stored images a catch-up appended to a table (version and table None: no champion to catch up)."""

    version: str | None
    table: str | None
    appended: tuple[ImageRecord, ...]
    seconds: float
    # catalog entries compared with the table: those recorded since its mark (what an arrival
    # costs), or the whole catalog once for a table whose mark the catalog does not recognise
    checked: int = 0
    # rows of a compatible table still its predecessor's (a backfill has them to do; one cut short
    # by a kill is resumed by the next retrain)
    older_rows: int = 0

    @property
    def added(self) -> int:
        return len(self.appended)

    def to_dict(self) -> dict:
        """What `mnemo ingest --json` prints under "hot_add": version, table, added, checked, seconds, older_rows."""
        return {k: getattr(self, k) for k in ("version", "table", "added", "checked", "seconds", "older_rows")}


def catch_up(
    ws: Workspace, params: IndexParams, tbl: lancedb.table.Table, version: str, model: Callable[[], Embedder]
) -> CatchUp:
    """Append every stored image `tbl` lacks, embedded by `version`'s model, and mark the table complete.

    `model` is called only when something is missing. Rows are merged on their id, so two
    catch-ups racing on one table never duplicate a row; raises IndexBuildError for a table
    that `version`'s model did not write.
    """
    start = time.perf_counter()
    problem = authorship_problem(tbl.name, tbl.schema, version)
    if problem is not None:
        raise IndexBuildError(problem)
    ensure_id_index(tbl)  # tables built before it had none: built once, then every catch-up uses it
    missing, checked, reached = _missing(tbl, Catalog.load(ws.catalog))
    if missing:
        _append(tbl, ws, model(), missing, params, str(version) if has_embedded_by(tbl.schema) else None)
        retune_ann_index(tbl, params)  # the index follows the table's size (params.yaml: ann_*)
    if reached is not None and vector_metadata(tbl, CATALOG_SEQ) != reached:  # a write is a new Lance version
        set_vector_metadata(tbl, CATALOG_SEQ, reached)
    if missing:  # readers mid-query keep their version's files
        settle(tbl, params)
    seconds = time.perf_counter() - start
    return CatchUp(
        version=str(version),
        table=tbl.name,
        appended=tuple(missing),
        seconds=seconds,
        checked=checked,
        older_rows=older_rows(tbl, str(version)),
    )


def _missing(tbl: lancedb.table.Table, catalog: Catalog) -> tuple[list[ImageRecord], int, str | None]:
    """The catalog's images the table lacks, how many catalog entries were compared, and the mark
    of the catalog position the table reaches once they are appended. A table whose mark the catalog recognises is asked only about the images
    recorded since (what an arrival costs); any other (new, or marked before other data was
    checked out) has its id column compared with the whole catalog once."""
    last = catalog.last_seq()  # first: images recorded while this runs belong to the next call
    seq = marked_seq(tbl, catalog)
    if seq is not None:
        candidates = [r for r in catalog.records_since(seq) if r.seq <= last]
        present = ids_present(tbl, [r.id for r in candidates])
    else:
        candidates = [r for r in catalog.records() if r.seq <= last]
        present = set(column(tbl, "id"))
    return [r for r in candidates if r.id not in present], len(candidates), catalog.mark(last)


def _append(
    tbl: lancedb.table.Table,
    ws: Workspace,
    model: Embedder,
    records: Sequence[ImageRecord],
    params: IndexParams,
    embedded_by: str | None,
) -> None:
    """Insert rows whose id the table lacks; merge on `id`, so two racing writers never duplicate one."""
    for chunk in in_chunks(records, params.write_rows):
        rows = embedded_rows(ws, model, chunk, params.batch_size, embedded_by)
        tbl.merge_insert("id").when_not_matched_insert_all().execute(rows)
        failpoint("catch-up-chunk-written")


def settle(tbl: lancedb.table.Table, params: IndexParams) -> bool:
    """After appends: compact and fold the new rows into the indices (drop_old_versions, which
    rewrites the table's last fragment and its indices: time and memory that grow with the table)
    only once the rows no index covers yet reach `optimize_fraction` of the table, so the rewrite
    is paid once per that much growth, not per arrival. Until then readers scan those few rows
    exactly beside the indices, and only superseded versions past the grace are removed.
    A compatible table still reading its predecessor's files (compat.py) is never optimized: Lance
    13 cannot merge rows into an index a shallow clone inherited (and a failed attempt leaves the
    table unsearchable); its new rows are searched exactly until its backfill ends and trains its
    own index. Returns whether it optimized."""
    grace = timedelta(seconds=params.old_versions_seconds)
    if references_base(tbl):
        tbl.cleanup_old_versions(grace)
        return False
    unindexed = max(
        ((stats.num_unindexed_rows if (stats := tbl.index_stats(i.name)) else 0) for i in tbl.list_indices()),
        default=0,
    )
    if unindexed >= params.optimize_fraction * tbl.count_rows():
        drop_old_versions(tbl, grace)
        return True
    tbl.cleanup_old_versions(grace)
    return False
