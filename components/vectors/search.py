"""The read path: nearest stored images in a version's table, from sync code or through one
private asyncio loop (the live service), and the checks that probe a table as readers do.

A probe is a stored image embedded afresh from its file; it must find its own row. The
table build validates with its in-memory network (validate.validate_table), and the smoke
test with the model as users load it; both pick probes and judge them here.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, TypeVar, cast

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.query import AsyncVectorQuery, LanceVectorQueryBuilder

from components.config import IndexParams
from components.data.catalog import ImageRecord
from components.vectors.tables import (
    ANN_EF,
    READ_ERRORS,
    VECTOR,
    TableDamaged,
    connect,
    has_embedded_by,
    lance_reason,
    missing_table,
    older_rows_filter,
    open_table,
    reading,
)
from components.workspace import Workspace

if TYPE_CHECKING:
    import pandas as pd

Hit = TypedDict("Hit", {"class": str, "distance": float, "id": str})
HIT_COLUMNS = ["id", "class", "_distance"]
T = TypeVar("T")
QueryT = TypeVar("QueryT", LanceVectorQueryBuilder, AsyncVectorQuery)  # sync or async: the same builder methods
# An image stored twice (same bytes under two classes) ties with itself at this distance:
# either row counts as "itself".
SELF_MATCH_TOLERANCE = 1e-4


def _tuned(query: QueryT, k: int, params: IndexParams | None) -> QueryT:
    """Cosine distance, params' nprobes, ef and refine_factor (used only when an ANN index exists), k rows."""
    query = query.distance_type("cosine")
    if params is not None:
        query = query.nprobes(params.ann_nprobes)
        if params.ann_type == "IVF_HNSW_SQ":
            query = query.ef(params.ann_ef)
        if params.ann_refine_factor:
            query = query.refine_factor(params.ann_refine_factor)
    return query.limit(k).select(HIT_COLUMNS)  # only what a Hit holds: each column is read per result row


def with_table_settings(schema: pa.Schema, params: IndexParams) -> IndexParams:
    """params with the ef the table's build tuned (ann.tune_ef), where it recorded one: what readers use."""
    ef = (schema.field(VECTOR).metadata or {}).get(ANN_EF.encode())
    return params if ef is None else params.model_copy(update={"ann_ef": int(ef)})


def _hits(rows: list[dict[str, Any]]) -> list[Hit]:
    return [{"class": r["class"], "distance": float(r["_distance"]), "id": r["id"]} for r in rows]


def search_table(
    tbl: lancedb.table.Table, vectors: np.ndarray, k: int, params: IndexParams | None = None, exact: bool = False
) -> list[list[Hit]]:
    """The k nearest rows (cosine distance) for each query vector, nearest first.

    With an ANN index, params' nprobes and refine_factor apply; rows appended since the index
    was built are searched exactly alongside it, so caught-up images are found at once.
    `exact`: every row compared, the ANN index bypassed (what the store holds, not what the index finds).
    """
    found = []
    for v in np.asarray(vectors, dtype=np.float32):
        # A vector makes search() a vector query builder; its declared type is the base class.
        query = _tuned(cast(LanceVectorQueryBuilder, tbl.search(v, vector_column_name=VECTOR)), k, params)
        found.append(_hits((query.bypass_vector_index() if exact else query).to_list()))
    return found


class AsyncLoop:
    """A private asyncio loop on a daemon thread, for LanceDB's async API from sync code.

    LanceDB's sync API hops to its own loop thread about six times per search; one
    coroutine per search hops once, which on a busy 2-core machine takes a few ms off
    every query (bench/index.py).
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="mnemo-lancedb", daemon=True).start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def run_async(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro` on this loop from another running loop (the service's) without blocking it."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)


@dataclass(frozen=True)
class TableReader:
    """One table opened for queries: the same search as search_table, one thread hop per call.

    The connection re-reads the table's latest Lance version at most every refresh_seconds,
    so rows other processes append (catch-ups) show up; each search reads one consistent version.
    Every read goes through `_read`: a data file missing or cut short raises TableDamaged naming
    the table, not Lance's own error.
    """

    name: str
    table: lancedb.table.AsyncTable
    loop: AsyncLoop
    params: IndexParams | None

    @classmethod
    def open(
        cls,
        ws: Workspace,
        name: str,
        loop: AsyncLoop,
        params: IndexParams | None,
        *,
        refresh_seconds: float | None = None,
    ) -> TableReader:
        async def opened() -> lancedb.table.AsyncTable:
            interval = None if refresh_seconds is None else timedelta(seconds=refresh_seconds)
            db = await lancedb.connect_async(ws.lancedb_uri, read_consistency_interval=interval)
            try:
                return await db.open_table(name)
            except (ValueError, FileNotFoundError):
                raise missing_table(ws, name) from None
            except READ_ERRORS as exc:  # a manifest cut short or garbled
                raise TableDamaged(name, f"cannot be opened: {lance_reason(exc)}") from exc

        table = loop.run(opened())  # a missing table: FileNotFoundError (missing_table)
        reader = cls(name=name, table=table, loop=loop, params=params)
        if params is not None:  # the ef this table's build chose
            reader = cls(name=name, table=table, loop=loop, params=with_table_settings(reader.schema(), params))
        return reader

    async def _read(self, coro: Coroutine[Any, Any, T]) -> T:
        with reading(self.name):
            return await coro

    async def _searched(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """All vectors in one LanceDB query (a multi-vector search: one plan, not one per vector)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(vectors) <= 1:
            return [
                _hits((await _tuned(self.table.vector_search(v), k, self.params).to_arrow()).to_pylist())
                for v in vectors
            ]
        rows = (await _tuned(self.table.vector_search(list(vectors)), k, self.params).to_arrow()).to_pylist()
        per_query: list[list[dict[str, Any]]] = [[] for _ in vectors]
        for row in rows:  # tagged with the position of the vector it answers
            per_query[row["query_index"]].append(row)
        return [_hits(sorted(found, key=lambda r: r["_distance"])) for found in per_query]

    def search(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        return self.loop.run(self._read(self._searched(vectors, k)))

    async def search_async(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        return await self.loop.run_async(self._read(self._searched(vectors, k)))

    def count_rows(self) -> int:
        return self.loop.run(self._read(self.table.count_rows()))

    def older_rows(self, version: str) -> int:
        """Rows not embedded by `version`'s model (tables.older_rows): 0 for a table that says nothing per row."""
        if not has_embedded_by(self.schema()):
            return 0
        return self.loop.run(self._read(self.table.count_rows(older_rows_filter(version))))

    def row(self, image_id: str) -> dict[str, Any] | None:
        """The stored row of one image id (id, class, arrival, split, vector); None when the table lacks it."""
        quoted = image_id.replace("'", "''")  # a SQL string literal: the id can never end it

        async def found() -> list[dict[str, Any]]:
            return (await self.table.query().where(f"id = '{quoted}'").limit(1).to_arrow()).to_pylist()

        rows = self.loop.run(self._read(found()))
        return rows[0] if rows and rows[0]["id"] == image_id else None

    def row_at(self, offset: int) -> dict[str, Any]:
        """The row at a position in storage order (0 <= offset < count_rows())."""

        async def found() -> list[dict[str, Any]]:
            return (await self.table.query().offset(offset).limit(1).to_arrow()).to_pylist()

        return self.loop.run(self._read(found()))[0]

    def schema(self) -> pa.Schema:
        """The table's schema, its marks included (which model version wrote the rows)."""
        return self.loop.run(self._read(self.table.schema()))


def search(
    ws: Workspace, table: str, vectors: np.ndarray, k: int, params: IndexParams | None = None
) -> list[list[Hit]]:
    """The k nearest rows of a table by name, with the settings its build chose (see search_table)."""
    tbl = open_table(connect(ws), ws, table)
    return search_table(tbl, vectors, k, None if params is None else with_table_settings(tbl.schema, params))


def table_rows(ws: Workspace, table: str) -> int | None:
    """Rows in a table, or None when it does not exist or cannot be opened (a live pair that lost its index)."""
    try:
        return open_table(connect(ws), ws, table).count_rows()
    except (FileNotFoundError, TableDamaged):
        return None


# --- probes ---------------------------------------------------------------------------------


def probe_records(records: Sequence[ImageRecord], count: int) -> list[ImageRecord]:
    """`count` records spread evenly over the catalog sorted by id (deterministic whatever its order)."""
    ordered = sorted(records, key=lambda r: r.id)
    if len(ordered) <= count:
        return ordered
    return [ordered[i * len(ordered) // count] for i in range(count)]


def finds_itself(image_id: str, hits: Sequence[Hit]) -> bool:
    """Whether a probe's own row is (or ties with) its nearest neighbour."""
    return bool(hits) and any(
        h["id"] == image_id and h["distance"] - hits[0]["distance"] <= SELF_MATCH_TOLERANCE for h in hits
    )


# --- index smoke test ----------------------------------------------------------------------


class Predictor(Protocol):
    """What the smoke test needs of a loaded model: mlflow.pyfunc's predict on a DataFrame of image bytes."""

    def predict(self, data: pd.DataFrame) -> np.ndarray: ...


@dataclass(frozen=True)
class SmokeTest:
    passed: bool
    probes: int
    detail: str


def index_smoke_test(
    ws: Workspace, table: str, model: Predictor, records: Sequence[ImageRecord], params: IndexParams
) -> SmokeTest:
    """Embed `params.probes` stored images with the model as users load it (image bytes in, through
    its signature) and query the new table the way readers do: each must find itself. `records`
    are the images whose rows the model embedded (a compatible table's others are an older model's).

    The table build validates with the in-memory network; this catches a logged model that
    differs from it (weights, preprocessing, packaging) before the pair can go live.
    """
    import pandas as pd

    picked = probe_records(records, params.probes)
    if not picked:
        return SmokeTest(False, 0, "no stored images to probe the table with")
    vectors = np.asarray(model.predict(pd.DataFrame({"image": [(ws.classes_dir / r.id).read_bytes() for r in picked]})))
    if not np.isfinite(vectors).all():
        return SmokeTest(False, len(picked), "the loaded model returns non-finite embeddings")
    try:
        results = search(ws, table, vectors, 3, params)
    except (FileNotFoundError, TableDamaged) as exc:
        return SmokeTest(False, len(picked), str(exc))
    lost = [
        f"{record.id} -> {hits[0]['id'] if hits else 'nothing'}"
        for record, hits in zip(picked, results)
        if not finds_itself(record.id, hits)
    ]
    if lost:
        return SmokeTest(
            False,
            len(picked),
            f"{len(lost)} of {len(picked)} probes did not find themselves in {table}: " + ", ".join(lost[:3]),
        )
    return SmokeTest(True, len(picked), f"all {len(picked)} probes found themselves in {table}")
