"""The ANN index of a table: trained once the table is large enough, retrained as it grows, and its
search width (HNSW ef) chosen so recall@10 against exact search meets the floor in params.yaml.

Recall is measured on stored vectors (`recall_probes`), against exact search over every row.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import faiss
import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import IvfHnswSq, IvfPq

from components.config import IndexParams
from components.evaluation.metrics import exact_top_k
from components.vectors.rows import unit_vectors
from components.vectors.search import search_table, with_table_settings
from components.vectors.tables import (
    ANN_EF,
    ANN_TRAINED_ROWS,
    VECTOR,
    set_vector_metadata,
    vector_indices,
    vector_metadata,
)


def ensure_ann_index(tbl: lancedb.table.Table, params: IndexParams) -> str | None:
    """Build the cosine ANN index once the table has `ann_min_rows` rows; returns its type or None."""
    rows = tbl.count_rows()
    if rows < params.ann_min_rows:
        return None
    _train_ann_index(tbl, params, rows)
    return params.ann_type


def _train_ann_index(tbl: lancedb.table.Table, params: IndexParams, rows: int) -> None:
    """(Re)train the index over every row; partitions follow the row count unless params fix them."""
    if params.ann_type == "IVF_PQ":
        config: IvfPq | IvfHnswSq = IvfPq(
            distance_type="cosine", num_partitions=params.ann_partitions, num_sub_vectors=params.ann_sub_vectors
        )
    else:
        config = IvfHnswSq(distance_type="cosine", num_partitions=params.ann_partitions)
    tbl.create_index(VECTOR, config=config, replace=True)
    set_vector_metadata(tbl, ANN_TRAINED_ROWS, str(rows))


def retune_ann_index(tbl: lancedb.table.Table, params: IndexParams) -> bool:
    """After appends: train the ANN index once the table crosses `ann_min_rows`, and retrain it
    (partitions re-chosen for the new size) once it has grown `ann_retrain_growth` times past the
    rows it was trained on. Rows added in between are folded into the existing index by optimize.
    Returns whether it trained; readers keep the previous Lance version until it is done."""
    rows = tbl.count_rows()
    if rows < params.ann_min_rows:
        return False
    trained = vector_metadata(tbl, ANN_TRAINED_ROWS)
    if vector_indices(tbl):
        if trained is None:  # indexed before the mark existed: count from here
            set_vector_metadata(tbl, ANN_TRAINED_ROWS, str(rows))
            return False
        if rows < params.ann_retrain_growth * int(trained):
            return False
    _train_ann_index(tbl, params, rows)
    tune_ef(tbl, params)
    return True


def retrain_ann_index(tbl: lancedb.table.Table, params: IndexParams) -> bool:
    """Train the ANN index afresh on the rows as they are now (a backfill replaced its vectors), and
    tune its ef; False for a table too small for one (exact search)."""
    rows = tbl.count_rows()
    if rows < params.ann_min_rows:
        return False
    _train_ann_index(tbl, params, rows)
    tune_ef(tbl, params)
    return True


def overlap_recall(found: Iterable[Collection], truth: Iterable[Collection]) -> float:
    """Recall@k: the mean share of each query's exact k nearest (a row of `truth`) that its search found."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def smallest_ef(start: int, max_ef: int, min_recall: float, recall_at: Callable[[int], float]) -> tuple[int, float]:
    """The smallest ef (start, doubled up to max_ef) whose `recall_at(ef)` meets min_recall, with that
    recall; the largest tried, and its recall, when none does."""
    ef = start
    while True:
        recall = recall_at(ef)
        if recall >= min_recall or ef >= max_ef:
            return ef, recall
        ef = min(ef * 2, max_ef)


@dataclass(frozen=True)
class RecallProbes:
    """Stored vectors spread over a table and their exact k nearest ids: what ANN recall is measured on."""

    vectors: np.ndarray
    truth: np.ndarray  # ids, one row of k per probe

    def recall(self, tbl: lancedb.table.Table, params: IndexParams) -> float:
        found = search_table(tbl, self.vectors, self.truth.shape[1], params)
        return overlap_recall(({h["id"] for h in hits} for hits in found), self.truth)


def recall_probes(tbl: lancedb.table.Table, count: int, k: int = 10) -> RecallProbes:
    """`count` stored vectors spread over the table, with their exact neighbours from one streamed
    pass over the vectors (each batch's exact top k merged into a heap, bounded memory): seconds
    at a million rows, not a scan per probe."""
    rows = tbl.count_rows()
    count = min(count, rows)
    picks = np.array(sorted({i * rows // count for i in range(count)}))
    queries = np.concatenate([unit_vectors(b)[_inside(picks, b.num_rows, o)] for b, o in _batches(tbl)])
    k = min(k, rows)
    best = faiss.ResultHeap(len(queries), k, keep_max=True)
    candidates: list[str] = []  # the ids of every batch's top k; the heap holds their positions here
    for batch, _ in _batches(tbl):
        sims, found = exact_top_k(queries, unit_vectors(batch), k)
        batch_ids = np.asarray(batch.column("id").to_pylist(), dtype=object)
        best.add_result(sims, len(candidates) + np.arange(found.size).reshape(found.shape))
        candidates += batch_ids[found].ravel().tolist()
    best.finalize()
    return RecallProbes(queries, np.asarray(candidates, dtype=object)[best.I])


def ann_recall(tbl: lancedb.table.Table, params: IndexParams, k: int = 10) -> float | None:
    """Recall@k of the search path (with the table's own ef) against exact cosine search, for
    `recall_probes` stored vectors; None when the table has no ANN index (its search is exact)."""
    if not vector_indices(tbl):
        return None
    return recall_probes(tbl, params.recall_probes, k).recall(tbl, with_table_settings(tbl.schema, params))


def tune_ef(tbl: lancedb.table.Table, params: IndexParams) -> tuple[int, float] | None:
    """The smallest ef (ann_ef, doubled up to ann_max_ef) whose recall@10 on stored vectors meets
    ann_min_recall, recorded on the table for its readers; the largest tried when none does (the
    validation then refuses the table). None for an IVF_PQ index or no index: nothing to tune."""
    if params.ann_type != "IVF_HNSW_SQ" or not vector_indices(tbl):
        return None
    probes = recall_probes(tbl, params.recall_probes)
    ef, recall = smallest_ef(
        params.ann_ef,
        params.ann_max_ef,
        params.ann_min_recall,
        lambda ef: probes.recall(tbl, params.model_copy(update={"ann_ef": ef})),
    )
    set_vector_metadata(tbl, ANN_EF, str(ef))
    return ef, recall


def _batches(tbl: lancedb.table.Table) -> Iterable[tuple[pa.RecordBatch, int]]:
    """The table's ids and vectors in storage order, a batch at a time, with each batch's first row number."""
    offset = 0
    for batch in tbl.search().select(["id", VECTOR]).limit(None).to_batches(65536):
        yield batch, offset
        offset += batch.num_rows


def _inside(picks: np.ndarray, rows: int, offset: int) -> np.ndarray:
    return picks[(picks >= offset) & (picks < offset + rows)] - offset
