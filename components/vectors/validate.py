"""Validating a built table before its version may go live: one row per stored image, every class
present, probe images embedded afresh finding their own rows, and the ANN search's recall floor;
and verifying, before any alias move, that a table (built any time ago) can still answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import lancedb
import numpy as np

from components.config import IndexParams
from components.data.catalog import Catalog, ImageRecord
from components.modeling.embedder import Embedder, embed_files
from components.vectors.ann import ann_recall
from components.vectors.search import finds_itself, probe_records, search_table, with_table_settings
from components.vectors.tables import (
    VECTOR,
    IndexBuildError,
    TableDamaged,
    check_readable,
    column,
    marked_seq,
    reading,
)
from components.workspace import Workspace


@dataclass(frozen=True)
class IndexValidation:
    """What a table holds against what it should hold; `ok` is the verdict, `problems` the reasons."""

    table: str
    rows: int
    expected_rows: int
    classes: int
    missing_classes: tuple[str, ...]
    probes: int
    probes_found: int  # probe images whose own row came back as their nearest neighbour
    ann_recall: float | None  # recall@10 of the ANN search against exact search; None: exact search
    min_recall: float

    @property
    def problems(self) -> list[str]:
        found = []
        if self.rows != self.expected_rows:
            found.append(f"{self.rows} rows, expected {self.expected_rows} (one per stored image)")
        if self.missing_classes:
            shown = ", ".join(self.missing_classes[:5]) + (", ..." if len(self.missing_classes) > 5 else "")
            found.append(f"{len(self.missing_classes)} class(es) missing: {shown}")
        if self.probes_found != self.probes:
            found.append(
                f"{self.probes - self.probes_found} of {self.probes} probe images did not find themselves "
                "(model and stored vectors disagree)"
            )
        if self.ann_recall is not None and self.ann_recall < self.min_recall:
            found.append(
                f"ANN recall@10 {self.ann_recall:.3f} against exact search, under the floor {self.min_recall} "
                "(index.ann_min_recall; the build tried ef up to index.ann_max_ef: raise it, or ann_nprobes)"
            )
        return found

    @property
    def ok(self) -> bool:
        return not self.problems


class IndexValidationError(IndexBuildError):
    """A freshly built table does not hold what it should; it must not go live."""

    def __init__(self, validation: IndexValidation) -> None:
        super().__init__(f"table {validation.table} failed validation: {'; '.join(validation.problems)}")
        self.validation = validation


def validate_table(
    ws: Workspace,
    tbl: lancedb.table.Table,
    model: Embedder,
    records: Sequence[ImageRecord],
    params: IndexParams,
    *,
    measured_recall: float | None = None,
    probes_from: Sequence[ImageRecord] | None = None,
    check_recall: bool = True,
) -> IndexValidation:
    """Row count equals the images stored, every class is present, probe images (`probes_from`, by
    default any of `records`: the rows `model` embedded), embedded afresh by `model` from their
    files, find their own rows through the live search path, and the ANN search keeps its recall
    floor (`measured_recall`: what tune_ef just measured, not measured again; not checked without
    `check_recall`: an index and vectors shared with a table whose build measured it)."""
    classes = set(column(tbl, "class"))
    rows = tbl.count_rows()
    probes = probe_records(records if probes_from is None else probes_from, params.probes)
    vectors = embed_files(model, [ws.classes_dir / r.id for r in probes], batch_size=params.batch_size)
    readers = with_table_settings(tbl.schema, params)  # as readers will search it
    hits = search_table(tbl, vectors, min(5, max(rows, 1)), readers) if rows else [[] for _ in probes]
    if measured_recall is None and rows and check_recall:
        measured_recall = ann_recall(tbl, params)  # None without an index: exact search
    return IndexValidation(
        table=tbl.name,
        rows=rows,
        expected_rows=len(records),
        classes=len(classes),
        missing_classes=tuple(sorted({r.cls for r in records} - classes)),
        probes=len(probes),
        probes_found=sum(finds_itself(r.id, h) for r, h in zip(probes, hits)),
        ann_recall=measured_recall,
        min_recall=params.ann_min_recall,
    )


def verify_table(ws: Workspace, tbl: lancedb.table.Table, params: IndexParams) -> int:
    """Prove `tbl` can answer, before an alias moves to it (forced or not); returns its row count.

    Every data file reads; the table holds at least the rows its completeness mark promises (one
    per image the catalog recorded up to it); every stored vector is read and finite; and
    `params.probes` rows, spread over the table, find themselves when their own stored vectors are
    searched as readers search (or, where the ANN index's approximation ranks another row first,
    by exact search: the index's recall is checked when it is built). No model is loaded: the store is under test, not the embedder
    (validate_table and the smoke test are). Raises TableDamaged naming the table and what is wrong.
    """
    rows = check_readable(tbl)
    with reading(tbl.name):
        promised = _promised_rows(ws, tbl)
        if promised is not None and rows < promised:
            raise TableDamaged(
                tbl.name,
                f"is incomplete: {rows} rows, but its completeness mark promises {promised} "
                "(one per image stored up to it); rebuild it with `mnemo reindex`",
            )
        ids, vectors, read, bad = _probe_rows(tbl, rows, params.probes)
        if read != rows:
            raise TableDamaged(tbl.name, f"cannot be read whole: {read} of its {rows} rows came back")
        if bad:
            raise TableDamaged(tbl.name, f"holds {bad} non-finite vector(s)")
        hits = search_table(tbl, vectors, min(5, rows), with_table_settings(tbl.schema, params)) if ids else []
        missed = [j for j, (i, h) in enumerate(zip(ids, hits)) if not finds_itself(i, h)]
        if len(missed) > len(ids) // 2:  # beyond what an approximate index misses: it cannot answer
            raise TableDamaged(
                tbl.name, f"cannot answer: its ANN index finds {len(ids) - len(missed)} of {len(ids)} probe rows"
            )
        if missed:  # an ANN index approximates (quantised distances, recall checked at build): ask exactly
            exact = search_table(tbl, vectors[missed], min(5, rows), params, exact=True)
            for j, h in zip(missed, exact):
                hits[j] = h
    lost = [i for i, h in zip(ids, hits) if not finds_itself(i, h)]
    if lost:
        raise TableDamaged(
            tbl.name,
            f"cannot answer: {len(lost)} of {len(ids)} probe rows did not find themselves ({', '.join(lost[:3])})",
        )
    return rows


def _promised_rows(ws: Workspace, tbl: lancedb.table.Table) -> int | None:
    """The images the catalog recorded up to the table's completeness mark; None without a mark it knows."""
    catalog = Catalog.load(ws.catalog)
    seq = marked_seq(tbl, catalog)
    return None if seq is None else len(catalog.images) - len(catalog.records_since(seq))


def _probe_rows(tbl: lancedb.table.Table, rows: int, count: int) -> tuple[list[str], np.ndarray, int, int]:
    """One pass over every stored vector (in batches: memory stays flat): the ids and vectors of
    `count` rows spread evenly over the table, the rows read, and how many vectors are not finite."""
    wanted = {rows * i // count for i in range(min(count, rows))}
    ids: list[str] = []
    picked: list[np.ndarray] = []
    bad = offset = 0
    for batch in tbl.search().select(["id", VECTOR]).limit(None).to_batches(8192):
        flat = batch.column(VECTOR).flatten().to_numpy(zero_copy_only=False)
        matrix = np.asarray(flat, dtype=np.float32).reshape(len(batch), -1)
        bad += int((~np.isfinite(matrix).all(axis=1)).sum())
        for i in sorted(w - offset for w in wanted if offset <= w < offset + len(batch)):
            ids.append(batch.column("id")[i].as_py())
            picked.append(matrix[i])
        offset += len(batch)
    return ids, np.asarray(picked, dtype=np.float32), offset, bad
