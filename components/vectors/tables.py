"""LanceDB tables: one per model version, holding every stored image's embedding.

What the build (build.py), the catch-up (catch_up.py) and the read path (search.py) share:
the table's name and schema, the connection, and the marks a table carries in its vector
field's metadata (which model version wrote its rows, when it passed validation).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING

import lancedb
import pyarrow as pa
from lancedb.index import BTree

from components.workspace import Workspace

if TYPE_CHECKING:
    from components.data.catalog import Catalog

COLUMNS = ["id", "class", "arrival", "role"]  # role: the image's, train | query | unseen | pending
VECTOR = "vector"
# A compatible version's table only (compat.py): the model version that embedded the row; null for a
# row carried over from the predecessor its COMPAT_FROM mark names. A table without this column holds
# only rows of the model its MODEL_VERSION mark names.
EMBEDDED_BY = "embedded_by"
VALIDATED = "mnemo:validated"  # vector-field metadata: when the table passed validation (UTC)
MODEL_VERSION = "mnemo:model_version"  # vector-field metadata: the version whose model wrote the rows
ANN_TRAINED_ROWS = "mnemo:ann_trained_rows"  # vector-field metadata: rows when the ANN index was last trained
ANN_EF = "mnemo:ann_ef"  # vector-field metadata: the HNSW ef the build found to meet the recall floor
# vector-field metadata: the catalog position the table is complete up to ("seq:hash", Catalog.mark:
# every image recorded at or before it has its row), so a catch-up reads only the catalog's newer images
CATALOG_SEQ = "mnemo:catalog_seq"
# vector-field metadata of a compatible version's table: JSON {"version", "table", "mode"} of the
# predecessor whose vectors it started from (compat.py), which the gate declared compatible with it
COMPAT_FROM = "mnemo:compat_from"
# vector-field metadata of a compatible table under backfill: rows still of the older model after the
# last batch (the serving graph re-reads the table as it falls)
BACKFILL_LEFT = "mnemo:backfill_left"


# What Lance raises for a data file that is missing, cut short or corrupt: lancedb says
# RuntimeError ("lance error: LanceError(IO) ..."), pylance ArrowInvalid (a ValueError), the disk OSError.
READ_ERRORS = (OSError, RuntimeError, ValueError)


class IndexBuildError(RuntimeError):
    """A table could not be built or written; nothing moved, the live pair is untouched."""


class TableDamaged(RuntimeError):
    """A table that cannot answer: a data file unreadable, or rows its completeness mark promises
    absent. The message names the table and what is wrong; nothing may go live on it."""

    def __init__(self, table: str, problem: str) -> None:
        super().__init__(f"table {table} {problem}")
        self.table = table


@contextmanager
def reading(table: str) -> Iterator[None]:
    """Lance's errors for a damaged data file, raised inside, as one TableDamaged naming the table."""
    try:
        yield
    except TableDamaged:
        raise
    except READ_ERRORS as exc:
        raise TableDamaged(table, f"cannot be read: {lance_reason(exc)}") from exc


def lance_reason(exc: BaseException) -> str:
    """An error's first line without the Rust source location Lance appends to it."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r",\s*/\S+\.rs:\d+:\d+$", "", text)  # /rustc/... or a crate's path: noise to a reader


def check_readable(tbl: lancedb.table.Table) -> int:
    """The table's row count; raises TableDamaged unless every data fragment of the table reads: its
    row count and the first row of each fragment (the data file's footer and first page), so the cost
    is the fragments', not the rows'. A file cut short or gone fails here; validate.verify_table
    reads every vector."""
    with reading(tbl.name):
        rows = tbl.count_rows()
        for fragment in tbl.to_lance().get_fragments():
            fragment.head(1)
        return rows


def table_name(prefix: str, version: str | int) -> str:
    return f"{prefix}_v{version}"


def table_version(prefix: str, name: str) -> int | None:
    """The model version a table name belongs to, None for a table that is not one of ours."""
    match = re.fullmatch(rf"{re.escape(prefix)}_v(\d+)", name)
    return int(match.group(1)) if match else None


def table_schema(dim: int) -> pa.Schema:
    """The columns of every version table: image id, class, arrival, split, and the embedding."""
    return pa.schema([*(pa.field(c, pa.string()) for c in COLUMNS), pa.field(VECTOR, pa.list_(pa.float32(), dim))])


def connect(ws: Workspace, *, refresh_seconds: float | None = None) -> lancedb.DBConnection:
    """The workspace's LanceDB; with refresh_seconds, open tables pick up other writers' versions that often."""
    interval = None if refresh_seconds is None else timedelta(seconds=refresh_seconds)
    return lancedb.connect(ws.lancedb_uri, read_consistency_interval=interval)


def open_table(db: lancedb.DBConnection, ws: Workspace, table: str) -> lancedb.table.Table:
    """The table; FileNotFoundError when it is not there, TableDamaged when its manifest cannot be read."""
    try:
        return db.open_table(table)
    except (ValueError, FileNotFoundError):  # lancedb says ValueError for a missing table
        raise missing_table(ws, table) from None
    except READ_ERRORS as exc:  # a manifest cut short or garbled
        raise TableDamaged(table, f"cannot be opened: {lance_reason(exc)}") from exc


def missing_table(ws: Workspace, table: str) -> FileNotFoundError:
    return FileNotFoundError(f"index table {table} is missing from {ws.lancedb_uri}")


def is_validated(tbl: lancedb.table.Table) -> bool:
    return VALIDATED.encode() in (tbl.schema.field(VECTOR).metadata or {})


def written_by(tbl: lancedb.table.Table) -> str | None:
    """The model version whose model wrote the table's rows (None: an unmarked table, never ours to use)."""
    return schema_written_by(tbl.schema)


def schema_written_by(schema: pa.Schema) -> str | None:
    value = (schema.field(VECTOR).metadata or {}).get(MODEL_VERSION.encode())
    return value.decode() if value is not None else None


def authorship_problem(table: str, schema: pa.Schema, version: str) -> str | None:
    """Why `table` may not be used as model version `version`'s (None when it may): every row of a
    table in use was embedded by the model its mark names, so a table without the mark is refused."""
    by = schema_written_by(schema)
    if by is None:
        return (
            f"index table {table} carries no model-version mark (nothing says which model embedded its rows); "
            f"refusing to use it as v{version}'s"
        )
    if by != str(version):
        return f"index table {table} was written by model version {by}, not v{version}; refusing to mix embeddings"
    return None


def marked_seq(tbl: lancedb.table.Table, catalog: Catalog) -> int | None:
    """The catalog position the table's completeness mark (CATALOG_SEQ) says it is complete up to;
    None for a table without one, or with one this catalog does not recognise."""
    mark = vector_metadata(tbl, CATALOG_SEQ) or ""
    seq = mark.partition(":")[0]
    return int(seq) if seq.isdigit() and catalog.mark(int(seq)) == mark else None


def has_embedded_by(schema: pa.Schema) -> bool:
    """Whether the table says per row which model embedded it (a compatible version's table)."""
    return EMBEDDED_BY in schema.names


def older_rows_filter(version: str) -> str:
    """The rows of a compatible table that its own model (`version`) did not embed yet."""
    return f"{EMBEDDED_BY} IS NULL OR {EMBEDDED_BY} != '{int(version)}'"


def older_rows(tbl: lancedb.table.Table, version: str) -> int:
    """Rows of the table not embedded by `version`'s model: those a backfill has still to re-embed
    (0 for a table without the EMBEDDED_BY column: all its rows are its own model's)."""
    if not has_embedded_by(tbl.schema):
        return 0
    return tbl.count_rows(older_rows_filter(version))


def compat_from(schema: pa.Schema) -> dict | None:
    """The predecessor a compatible table started from ({"version", "table", "mode"}); None for any other."""
    value = (schema.field(VECTOR).metadata or {}).get(COMPAT_FROM.encode())
    return json.loads(value) if value else None


def references_base(tbl: lancedb.table.Table) -> bool:
    """Whether the table still reads data or index files of the table it was shallow-cloned from
    (compat.py): that table must then stay, whatever keep_tables says."""
    ds = tbl.to_lance()
    in_base = any(f.base_id is not None for fragment in ds.get_fragments() for f in fragment.metadata.files)
    with warnings.catch_warnings():  # its successor, describe_indices, does not say where an index's files are
        warnings.filterwarnings("ignore", message=".*list_indices.*deprecated", category=DeprecationWarning)
        return in_base or any(i.get("base_id") is not None for i in ds.list_indices())


def vector_metadata(tbl: lancedb.table.Table, key: str) -> str | None:
    value = (tbl.schema.field(VECTOR).metadata or {}).get(key.encode())
    return value.decode() if value is not None else None


def set_vector_metadata(tbl: lancedb.table.Table, key: str, value: str) -> None:
    """Merged into the vector field's metadata (the other marks stay)."""
    tbl.update_field_metadata({"path": VECTOR, "metadata": {key: value}})


def drop_old_versions(tbl: lancedb.table.Table, older_than: timedelta) -> None:
    """Compact small fragments, fold unindexed rows into the indices, and remove Lance versions
    older than the grace."""
    with warnings.catch_warnings():
        # LanceDB warns that a zero grace breaks concurrent readers; callers pass zero only for
        # a table nobody reads yet.
        warnings.filterwarnings("ignore", message=r".*cleanup_older_than=0")
        tbl.optimize(cleanup_older_than=older_than)


def vector_indices(tbl: lancedb.table.Table) -> list:
    """The table's ANN indices on the vector column (the id column's scalar index is not one)."""
    return [i for i in tbl.list_indices() if list(i.columns) == [VECTOR]]


def ensure_id_index(tbl: lancedb.table.Table) -> None:
    """A BTree index on the id column (what ids_present looks up), built once per table."""
    if not any(list(i.columns) == ["id"] for i in tbl.list_indices()):
        tbl.create_index("id", config=BTree())


def rebuild_id_index(tbl: lancedb.table.Table) -> None:
    """The id index built afresh, in the table's own files (a shallow clone's inherited one cannot grow)."""
    tbl.create_index("id", config=BTree(), replace=True)


def sql_strings(values: Sequence[str]) -> str:
    """Strings as a comma-separated list of SQL literals (a quote in one can never end it)."""
    return ",".join("'" + v.replace("'", "''") + "'" for v in values)


def ids_present(tbl: lancedb.table.Table, ids: list[str], chunk: int = 1000) -> set[str]:
    """Which of `ids` the table holds: a lookup in its scalar index on id (rows appended since the
    index was updated are scanned), not a read of the whole id column."""
    found: set[str] = set()
    for lo in range(0, len(ids), chunk):
        rows = tbl.search().where(f"id IN ({sql_strings(ids[lo : lo + chunk])})").select(["id"]).limit(None).to_arrow()
        found.update(rows["id"].to_pylist())
    return found


def list_tables(db: lancedb.DBConnection) -> list[str]:
    names: list[str] = []
    token = None
    while True:
        page = db.list_tables(page_token=token)
        names += page.tables
        token = page.page_token
        if not token:
            return names


def column(tbl: lancedb.table.Table, name: str) -> list[str]:
    """Every value of one string column (ids, classes), in storage order."""
    return tbl.search().select([name]).limit(None).to_arrow()[name].to_pylist()
