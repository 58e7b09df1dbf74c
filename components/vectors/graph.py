"""The serving graph: each service replica's in-memory HNSW graph (faiss) of the live table.

At 1M synthetic rows on 2 cores a flat-vector HNSW graph in memory answers at p99 about 2 ms
with recall@10 0.998, where LanceDB's IVF_HNSW_SQ needs 7-16 ms for 0.975 (bench/query.py); on
vectors calibrated to real embeddings both stay near recall 0.81 (bench/results/README.md).
The Lance table stays the source of truth: the graph is built
from it before the replica takes the pair (live.py), grows with the rows catch-ups append to
it, and goes with its pair on a swap, so every answer still comes from one version's model
and one version's table.

Rows are labelled by their position in the table's storage order. Tables only ever grow by
appends (catch-ups insert, nothing deletes), so the rows past the graph's count are the new
ones; a table whose rows moved anyway (its last known id is not where it was) is re-read whole.
A compatible table under backfill (backfill.py) has its rows replaced in batches: the graph is
re-read whole each time another REBUILD_SHARE of its rows was re-embedded, and once at the end,
so answers improve as the backfill goes without a rebuild per batch.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import cast

import faiss
import lancedb
import numpy as np

from components.config import IndexParams, ServeParams
from components.evaluation.metrics import exact_top_k, unit_rows
from components.vectors.ann import overlap_recall, smallest_ef
from components.vectors.rows import unit_vectors
from components.vectors.search import Hit
from components.vectors.tables import BACKFILL_LEFT, VECTOR, connect, open_table, vector_metadata
from components.workspace import Workspace

log = logging.getLogger(__name__)

COLUMNS = ["id", "class", VECTOR]
READ_ROWS = 65536  # rows per batch while reading the table
ADD_ROWS = 1024  # rows per insertion under the lock (tens of ms at a million rows): searches wait at most that
REBUILD_SHARE = 0.1  # of the rows, re-embedded by a backfill since the graph read them: read them again


@dataclass(frozen=True)
class GraphStats:
    rows: int
    ef: int
    recall_at_10: float | None  # on stored vectors against the graph's exact search; None when too few rows
    build_seconds: float


class ServingGraph:
    """One table's rows in a faiss IndexHNSWFlat (inner product on unit vectors = cosine).

    `search` and `catch_up` may run on different threads (the event loop, the refresh thread):
    faiss allows neither an add during a search nor two adds, so one lock guards the index.
    """

    def __init__(self, ws: Workspace, table: str, serve: ServeParams, index: IndexParams) -> None:
        self.table = table
        self._ws = ws
        self._serve = serve
        self._index_params = index
        self._lock = threading.Lock()
        self._tbl: lancedb.table.Table | None = None
        self._graph: faiss.IndexHNSWFlat | None = None
        self._ids: list[str] = []
        self._classes: list[str] = []
        self._ef = serve.graph_ef
        self._tuned_rows = 0
        self._backfill_left: int | None = None  # the table's BACKFILL_LEFT mark when the graph read it
        self.stats = GraphStats(rows=0, ef=self._ef, recall_at_10=None, build_seconds=0.0)

    @classmethod
    def build(cls, ws: Workspace, table: str, serve: ServeParams, index: IndexParams) -> ServingGraph:
        """Every row of the table in a new graph, its ef tuned to the recall floor."""
        graph = cls(ws, table, serve, index)
        start = time.perf_counter()
        graph.catch_up()
        graph.stats = GraphStats(
            rows=graph.rows,
            ef=graph._ef,
            recall_at_10=graph.stats.recall_at_10,
            build_seconds=time.perf_counter() - start,
        )
        log.info(
            "serving graph of %s: %d rows in %.1f s, ef %d, recall@10 %s",
            table,
            graph.rows,
            graph.stats.build_seconds,
            graph._ef,
            graph.stats.recall_at_10,
        )
        return graph

    @property
    def rows(self) -> int:
        return len(self._ids)

    def _open(self) -> lancedb.table.Table:
        """The table, opened once: every refresh asks it for its row count, and a connection that
        checks the latest version on each read sees other processes' appends without reopening."""
        if self._tbl is None:
            self._tbl = open_table(connect(self._ws, refresh_seconds=0), self._ws, self.table)
        return self._tbl

    def catch_up(self) -> int:
        """Add the rows appended to the table since the last call; how many were added (all of them
        when the table was re-read whole)."""
        tbl = self._open()
        total = tbl.count_rows()
        if total == self.rows and not self._backfilled_enough(tbl):
            return 0
        if total < self.rows or self._backfilled_enough(tbl) or not self._still_in_place(tbl):
            log.warning("rows of %s moved or went (%d -> %d): re-reading it whole", self.table, self.rows, total)
            fresh = ServingGraph.build(self._ws, self.table, self._serve, self._index_params)
            with self._lock:  # searches keep answering from the old graph until this swap
                self._graph, self._ids, self._classes = fresh._graph, fresh._ids, fresh._classes
                self._ef, self._tuned_rows, self.stats = fresh._ef, fresh._tuned_rows, fresh.stats
                self._backfill_left = fresh._backfill_left
            return fresh.rows
        added = 0
        if not self.rows:
            self._backfill_left = _backfill_left(tbl)
        query = tbl.search().select(COLUMNS).limit(None)
        for batch in (query.offset(self.rows) if self.rows else query).to_batches(READ_ROWS):
            vectors, ids, classes = (
                unit_vectors(batch),
                batch.column("id").to_pylist(),
                batch.column("class").to_pylist(),
            )
            for lo in range(0, len(ids), ADD_ROWS):  # the lock is let go between chunks: searches wait little
                with self._lock:
                    if self._graph is None:
                        self._graph = faiss.IndexHNSWFlat(
                            vectors.shape[1], self._serve.graph_m, faiss.METRIC_INNER_PRODUCT
                        )
                        self._graph.hnsw.efConstruction = self._serve.graph_ef_construction
                    self._graph.add(vectors[lo : lo + ADD_ROWS])
                    self._ids += ids[lo : lo + ADD_ROWS]
                    self._classes += classes[lo : lo + ADD_ROWS]
            added += batch.num_rows
        if self.rows >= self._tuned_rows * self._index_params.ann_retrain_growth:
            self._tune()
        return added

    def _backfilled_enough(self, tbl: lancedb.table.Table) -> bool:
        """Whether a backfill re-embedded REBUILD_SHARE of the rows since the graph read them, or finished."""
        left = _backfill_left(tbl)
        if left is None or self._backfill_left is None or left >= self._backfill_left:
            return False
        return left == 0 or self._backfill_left - left >= REBUILD_SHARE * max(self.rows, 1)

    def _still_in_place(self, tbl: lancedb.table.Table) -> bool:
        if not self._ids:
            return True
        [row] = tbl.search().select(["id"]).offset(self.rows - 1).limit(1).to_list()
        return bool(row["id"] == self._ids[-1])

    def _tune(self) -> None:
        """The smallest ef (serve.graph_ef doubled up to index.ann_max_ef) whose recall@10 on stored
        vectors, against the graph's own exact (flat) search, meets index.ann_min_recall."""
        params = self._index_params
        with self._lock:
            assert self._graph is not None
            rows, k = self._graph.ntotal, min(10, self._graph.ntotal)
            picks = np.unique(np.arange(min(params.recall_probes, rows)) * rows // min(params.recall_probes, rows))
            probes = self._graph.reconstruct_batch(picks)
            # the graph's vectors, flat: a view, not a copy
            storage = cast(faiss.IndexFlat, faiss.downcast_index(self._graph.storage))
            stored = faiss.rev_swig_ptr(storage.get_xb(), rows * storage.d).reshape(rows, storage.d)
            _, truth = exact_top_k(probes, stored, k)

        def recall_at(ef: int) -> float:
            with self._lock:
                _, found = self._search(probes, k, ef)
            return overlap_recall(found, truth)

        ef, recall = smallest_ef(self._serve.graph_ef, params.ann_max_ef, params.ann_min_recall, recall_at)
        if recall < params.ann_min_recall:
            log.warning(
                "serving graph of %s: recall@10 %.3f at ef %d, under %s", self.table, recall, ef, params.ann_min_recall
            )
        self._ef, self._tuned_rows = ef, rows
        self.stats = GraphStats(rows=rows, ef=ef, recall_at_10=recall, build_seconds=self.stats.build_seconds)

    def _search(self, vectors: np.ndarray, k: int, ef: int) -> tuple[np.ndarray, np.ndarray]:
        """(inner products, positions) of the k nearest rows; the caller holds the lock."""
        assert self._graph is not None
        self._graph.hnsw.efSearch = max(ef, k)
        return self._graph.search(vectors, min(k, self._graph.ntotal))

    def search(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """The k nearest rows (cosine distance, as LanceDB reports it) for each vector, nearest first."""
        vectors = unit_rows(np.asarray(vectors, dtype=np.float32))
        with self._lock:
            if self._graph is None:  # an empty table
                return [[] for _ in vectors]
            similarity, positions = self._search(vectors, k, self._ef)
            ids, classes = self._ids, self._classes  # the lists this graph's positions index
        return [
            [{"class": classes[p], "distance": float(1.0 - s), "id": ids[p]} for s, p in zip(sims, found) if p >= 0]
            for sims, found in zip(similarity, positions)
        ]


def _backfill_left(tbl: lancedb.table.Table) -> int | None:
    """The table's BACKFILL_LEFT mark: rows still of the older model after the backfill's last batch."""
    mark = vector_metadata(tbl, BACKFILL_LEFT)
    return int(mark) if mark is not None else None
