"""The backfill: a compatible version's table (compat.py) re-embedded by its own model, in the
background, while it answers queries.

The rows carried over from the predecessor are re-embedded from their images in batches of
`compat.backfill_rows`, newest arrivals first: the newest classes are the ones the predecessor
learned last or never (they were hot-added, embedded by a model that had not trained on them;
forward transfer measures how weak that is), so their rows gain the most. Each batch replaces its
rows in one Lance commit (merge on id), taken under the ingest lock as catch-ups take it, so it
never interleaves with an append or with a promotion's catch-up and alias move. Readers see each
batch as it lands; every row is at all times a vector of the table's model or of the predecessor
the gate declared compatible with it. The table itself records the progress (its EMBEDDED_BY
column): a killed run loses at most the batch in flight, and the next one carries on. Once no row
is left, the table is compacted and its ANN index trained afresh on the new vectors, after which
it reads none of the predecessor's files.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta

import lancedb
import pyarrow as pa

from components.config import IndexParams
from components.data.catalog import Catalog, ImageRecord
from components.data.inbox import inbox_lock
from components.modeling.embedder import Embedder
from components.ops.failpoints import failpoint
from components.vectors.ann import retrain_ann_index
from components.vectors.catch_up import settle
from components.vectors.rows import embedded_rows
from components.vectors.tables import (
    BACKFILL_LEFT,
    drop_old_versions,
    older_rows,
    older_rows_filter,
    references_base,
    set_vector_metadata,
    sql_strings,
)
from components.workspace import Workspace

ROW_COLUMNS = ["id", "class", "arrival", "role"]


@dataclass(frozen=True)
class BackfillProgress:
    """Where a compatible table's backfill stands: rows in the table, rows still of the older model."""

    version: str
    table: str
    rows: int
    remaining: int
    done: int = 0  # rows this run re-embedded
    seconds: float = 0.0
    stopped: str | None = None  # why this run stopped before the end (the champion moved, ...)

    @property
    def finished(self) -> bool:
        return self.remaining == 0

    @property
    def state_name(self) -> str:
        """The name a backfill flow run ends in."""
        if self.stopped is not None:
            return "Backfill stopped"
        return "Backfilled" if self.done else "Nothing to backfill"

    @property
    def message(self) -> str:
        head = f"table {self.table}: {self.done} row(s) re-embedded by v{self.version} in {self.seconds:.1f} s"
        if self.stopped is not None:
            return f"{head}; stopped ({self.stopped}), {self.remaining} of {self.rows} rows still of the older model"
        if not self.done:
            return f"table {self.table} holds only v{self.version}'s rows: nothing to backfill"
        return f"{head}; every one of its {self.rows} rows is v{self.version}'s now"

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "table": self.table,
            "rows": self.rows,
            "remaining": self.remaining,
            "done": self.done,
            "seconds": round(self.seconds, 3),
            "finished": self.finished,
            "stopped": self.stopped,
        }


def newest_first(catalog: Catalog) -> list[str]:
    """The catalog's arrivals, the latest ingested first (ties by name)."""
    return sorted(catalog.arrivals, key=lambda a: (catalog.arrivals[a].get("ingested_at", ""), a), reverse=True)


def pending_batches(
    tbl: lancedb.table.Table, version: str, arrivals: Sequence[str], rows: int, batches: int
) -> list[list[ImageRecord]]:
    """Up to `batches` batches of `rows` rows the table's model (`version`) has not embedded yet,
    newest arrival first (`arrivals` in that order; rows of an arrival the catalog no longer names last)."""
    wanted = rows * batches
    found: list[ImageRecord] = []
    for where in _arrival_filters(arrivals):
        if len(found) >= wanted:
            break
        query = tbl.search().where(f"({older_rows_filter(version)}) AND {where}").select(ROW_COLUMNS)
        table = query.limit(wanted - len(found)).to_arrow()
        found += [
            ImageRecord(id=r["id"], cls=r["class"], arrival=r["arrival"], role=r["role"]) for r in table.to_pylist()
        ]
    return [found[lo : lo + rows] for lo in range(0, len(found), rows)]


def _arrival_filters(arrivals: Sequence[str]) -> Iterator[str]:
    yield from (f"arrival = {sql_strings([a])}" for a in arrivals)
    yield f"arrival NOT IN ({sql_strings(arrivals)})" if arrivals else "TRUE"


def embed_batch(
    ws: Workspace, model: Embedder, records: Sequence[ImageRecord], params: IndexParams, version: str
) -> pa.Table:
    """The batch's rows as the table's model embeds them, marked as its (`version`)."""
    return embedded_rows(ws, model, records, params.batch_size, embedded_by=str(version))


def commit_batch(ws: Workspace, tbl: lancedb.table.Table, rows: pa.Table, params: IndexParams, version: str) -> int:
    """Replace the batch's rows in one commit, under the ingest lock; returns the rows still left."""
    with inbox_lock(ws):
        tbl.merge_insert("id").when_matched_update_all().execute(rows)
        failpoint("backfill-batch-committed")
        left = older_rows(tbl, version)
        set_vector_metadata(tbl, BACKFILL_LEFT, str(left))  # what the serving graph watches
    settle(tbl, params)  # new rows are searched exactly beside the index until a share is reached
    return left


def finish(tbl: lancedb.table.Table, params: IndexParams) -> None:
    """After the last batch: train the ANN index afresh on the new vectors (its partitions were the
    predecessor's, its files too), then compact and drop superseded versions past the grace. The
    table then reads none of the predecessor's files, and the clean-up may drop that table in its turn."""
    retrain_ann_index(tbl, params)
    drop_old_versions(tbl, timedelta(seconds=params.old_versions_seconds))


def progress(tbl: lancedb.table.Table, version: str) -> BackfillProgress:
    """The table's backfill as it stands (nothing left for a table without older rows)."""
    return BackfillProgress(
        version=str(version), table=tbl.name, rows=tbl.count_rows(), remaining=older_rows(tbl, version)
    )


def run_backfill(
    ws: Workspace,
    params: IndexParams,
    tbl: lancedb.table.Table,
    version: str,
    *,
    rows: int,
    parallel: int,
    embed: Callable[[list[list[ImageRecord]]], Iterable[pa.Table]],
    stop: Callable[[], str | None],
    report: Callable[[BackfillProgress], None],
) -> BackfillProgress:
    """Re-embed every row of `tbl` its model (`version`) has not embedded, `rows` at a time, newest
    arrivals first, until none is left or `stop` gives a reason (the champion moved on).

    Each round plans `parallel` batches and hands them to `embed` (this process, or Dask tasks),
    committing each batch as it comes back (commit_batch) and telling `report` where things stand.
    The last batch is followed by `finish`.
    """
    start, done = time.perf_counter(), 0
    state = progress(tbl, version)
    arrivals = newest_first(Catalog.load(ws.catalog))
    while state.remaining:
        why = stop()
        if why is not None:
            return replace(state, done=done, seconds=time.perf_counter() - start, stopped=why)
        batches = pending_batches(tbl, version, arrivals, rows, parallel)
        if not batches:
            break
        for embedded in embed(batches):
            left = commit_batch(ws, tbl, embedded, params, version)
            done += embedded.num_rows
            state = replace(state, remaining=left, done=done, seconds=time.perf_counter() - start)
            report(state)
    if state.remaining == 0 and (done or references_base(tbl)):  # a clone whose last batch landed before a kill
        finish(tbl, params)
    return replace(state, rows=tbl.count_rows(), done=done, seconds=time.perf_counter() - start)
