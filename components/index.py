"""LanceDB: one table per model version, holding every stored image's embedding.

A version's table is written, indexed and validated before the version may become
champion (DESIGN.md, "Registry and the live pair"); only then does it carry the
`validated` mark. A table of the prefix without the mark is the orphan of a build that
died, and the next build removes it. After validation a table is only ever appended to
(hot add), never rewritten, so a reader holding it always sees a consistent Lance version.

One builder at a time (the retrain flow's concurrency limit): a build removes every
unmarked table of the prefix but its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Collection, Coroutine, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypedDict, TypeVar

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import IvfHnswSq, IvfPq
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from components.config import ConfigError, IndexParams, Params, Workspace, load_params, resolve_workspace
from components.data.class_registry import ClassRegistry, ImageRecord
from components.data.transforms import open_rgb
from components.modeling.embedder import Embedder, embed_images, pick_device

COLUMNS = ["id", "class", "arrival", "split"]  # split: the image's role, train | query | unseen
VECTOR = "vector"
VALIDATED = "mnemo:validated"  # vector-field metadata: when the table passed validation (UTC)
MODEL_VERSION = "mnemo:model_version"  # vector-field metadata: the version whose model wrote the rows

Hit = TypedDict("Hit", {"class": str, "distance": float, "id": str})
T = TypeVar("T")
QueryT = TypeVar("QueryT")  # a sync or an async LanceDB vector query: the same builder methods


class IndexBuildError(RuntimeError):
    """A table could not be built; nothing moved, the live pair is untouched."""


class IndexValidationError(IndexBuildError):
    """A freshly built table does not hold what it should; it must not go live."""

    def __init__(self, validation: IndexValidation) -> None:
        super().__init__(f"table {validation.table} failed validation: {'; '.join(validation.problems)}")
        self.validation = validation


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

    @property
    def problems(self) -> list[str]:
        found = []
        if self.rows != self.expected_rows:
            found.append(f"{self.rows} rows, expected {self.expected_rows} (one per stored image)")
        if self.missing_classes:
            shown = ", ".join(self.missing_classes[:5]) + (", ..." if len(self.missing_classes) > 5 else "")
            found.append(f"{len(self.missing_classes)} class(es) missing: {shown}")
        if self.probes_found != self.probes:
            found.append(f"{self.probes - self.probes_found} of {self.probes} probe images did not find themselves "
                         "(model and stored vectors disagree)")
        return found

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class IndexBuild:
    """A built and validated table: what the gate and the promotion log can quote."""

    table: str
    version: str
    rows: int
    classes: int
    probes: int
    probes_found: int
    ann_index: str | None  # the ANN index type, None when the table is small enough for exact search
    caught_up: int  # images ingested while the build ran, appended before validation
    removed: tuple[str, ...]  # orphans and tables beyond keep_tables, dropped after the build
    reused: bool  # the version's validated table already existed and was checked, not rewritten
    seconds: float

    @property
    def probes_ok(self) -> bool:
        return self.probes_found == self.probes


@dataclass(frozen=True)
class HotAdd:
    """Images appended to the live table right after ingest (none when there is no champion yet)."""

    version: str | None
    table: str | None
    added: int
    seconds: float


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
    try:
        return db.open_table(table)
    except (ValueError, FileNotFoundError):  # lancedb says ValueError for a missing table
        raise FileNotFoundError(f"index table {table} is missing from {ws.lancedb_uri}") from None


def is_validated(tbl: lancedb.table.Table) -> bool:
    return VALIDATED.encode() in (tbl.schema.field(VECTOR).metadata or {})


def written_by(tbl: lancedb.table.Table) -> str | None:
    """The model version recorded on a validated table (None for a table built before marks existed)."""
    return _written_by(tbl.schema)


def _written_by(schema: pa.Schema) -> str | None:
    value = (schema.field(VECTOR).metadata or {}).get(MODEL_VERSION.encode())
    return value.decode() if value is not None else None


def list_tables(db: lancedb.DBConnection) -> list[str]:
    names: list[str] = []
    token = None
    while True:
        page = db.list_tables(page_token=token)
        names += page.tables
        token = page.page_token
        if not token:
            return names


def check_writable(ws: Workspace) -> None:
    """Fail before any work when a local LanceDB directory cannot be written (object stores answer at the write)."""
    uri = ws.lancedb_uri
    if "://" in uri and not uri.startswith("file://"):
        return
    path = Path(uri.removeprefix("file://"))
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".mnemo-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise IndexBuildError(f"LanceDB directory {path} is not writable ({exc.strerror}); "
                              "nothing was built and the live pair is unchanged") from None


def _column(tbl: lancedb.table.Table, name: str) -> list[str]:
    return tbl.search().select([name]).limit(None).to_arrow()[name].to_pylist()


def _progress(label: str) -> Progress:
    # stderr: stdout stays clean for --json output
    return Progress(TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True))


def _rows(ws: Workspace, model: Embedder, records: Sequence[ImageRecord], batch_size: int) -> pa.Table:
    vectors = embed_images(model, (open_rgb(ws.classes_dir / r.id) for r in records), batch_size=batch_size)
    return pa.table(
        {"id": [r.id for r in records], "class": [r.cls for r in records], "arrival": [r.arrival for r in records],
         "split": [r.role for r in records],
         VECTOR: pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), model.embedding_dim)},
        schema=table_schema(model.embedding_dim),
    )


def _chunks(records: Sequence[ImageRecord], size: int) -> Iterable[Sequence[ImageRecord]]:
    for lo in range(0, len(records), size):
        yield records[lo : lo + size]


def _write(tbl: lancedb.table.Table, ws: Workspace, model: Embedder, records: Sequence[ImageRecord],
           params: IndexParams, label: str) -> None:
    """Embed and append records, one LanceDB write per `write_rows` (each write is one Lance version)."""
    with _progress(label) as progress:
        task = progress.add_task(label, total=len(records))
        for chunk in _chunks(records, params.write_rows):
            tbl.add(_rows(ws, model, chunk, params.batch_size))
            progress.advance(task, len(chunk))


def ensure_ann_index(tbl: lancedb.table.Table, params: IndexParams) -> str | None:
    """Build the cosine ANN index once the table has `ann_min_rows` rows; returns its type or None."""
    if tbl.count_rows() < params.ann_min_rows:
        return None
    if params.ann_type == "IVF_PQ":
        config: IvfPq | IvfHnswSq = IvfPq(distance_type="cosine", num_partitions=params.ann_partitions,
                                          num_sub_vectors=params.ann_sub_vectors)
    else:
        config = IvfHnswSq(distance_type="cosine", num_partitions=params.ann_partitions)
    tbl.create_index(VECTOR, config=config)
    return params.ann_type


def _tuned(query: QueryT, k: int, params: IndexParams | None) -> QueryT:
    """Cosine distance, params' nprobes and refine_factor (used only when an ANN index exists), k rows."""
    query = query.distance_type("cosine")
    if params is not None:
        query = query.nprobes(params.ann_nprobes)
        if params.ann_refine_factor:
            query = query.refine_factor(params.ann_refine_factor)
    return query.limit(k).select([*COLUMNS, "_distance"])


def _hits(rows: list[dict[str, Any]]) -> list[Hit]:
    return [{"class": r["class"], "distance": float(r["_distance"]), "id": r["id"]} for r in rows]


def search_table(tbl: lancedb.table.Table, vectors: np.ndarray, k: int, params: IndexParams | None = None) -> list[list[Hit]]:
    """The k nearest rows (cosine distance) for each query vector, nearest first.

    With an ANN index, params' nprobes and refine_factor apply; rows appended since the index
    was built are searched exactly alongside it, so hot-added images are found at once.
    """
    return [_hits(_tuned(tbl.search(v, vector_column_name=VECTOR), k, params).to_list())
            for v in np.asarray(vectors, dtype=np.float32)]


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

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)


@dataclass(frozen=True)
class TableReader:
    """One table opened for queries: the same search as search_table, one thread hop per call.

    The connection re-reads the table's latest Lance version at most every refresh_seconds,
    so rows hot-added by other processes show up; each search reads one consistent version.
    """

    name: str
    table: lancedb.table.AsyncTable
    loop: AsyncLoop
    params: IndexParams | None

    @classmethod
    def open(cls, ws: Workspace, name: str, loop: AsyncLoop, params: IndexParams | None,
             *, refresh_seconds: float | None = None) -> TableReader:
        async def opened() -> lancedb.table.AsyncTable:
            interval = None if refresh_seconds is None else timedelta(seconds=refresh_seconds)
            db = await lancedb.connect_async(ws.lancedb_uri, read_consistency_interval=interval)
            try:
                return await db.open_table(name)
            except (ValueError, FileNotFoundError):
                raise FileNotFoundError(f"index table {name} is missing from {ws.lancedb_uri}") from None

        return cls(name=name, table=loop.run(opened()), loop=loop, params=params)

    def search(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        async def searched() -> list[list[Hit]]:
            return [_hits((await _tuned(self.table.vector_search(v), k, self.params).to_arrow()).to_pylist())
                    for v in np.asarray(vectors, dtype=np.float32)]

        return self.loop.run(searched())

    def count_rows(self) -> int:
        return self.loop.run(self.table.count_rows())

    def written_by(self) -> str | None:
        return _written_by(self.loop.run(self.table.schema()))


def _probe_records(records: Sequence[ImageRecord], n: int) -> list[ImageRecord]:
    """n records spread evenly over the (sorted, so deterministic) catalog."""
    ordered = sorted(records, key=lambda r: r.id)
    if len(ordered) <= n:
        return ordered
    return [ordered[i * len(ordered) // n] for i in range(n)]


def _finds_itself(image_id: str, hits: list[Hit]) -> bool:
    # An identical image stored under two classes ties at the same distance: either may come first.
    return bool(hits) and any(h["id"] == image_id and h["distance"] - hits[0]["distance"] <= 1e-6 for h in hits)


def validate_table(ws: Workspace, tbl: lancedb.table.Table, model: Embedder, records: Sequence[ImageRecord],
                   params: IndexParams) -> IndexValidation:
    """Row count equals the images stored, every class is present, and probe images, embedded
    afresh by `model` from their files, find their own rows through the live search path."""
    classes = set(_column(tbl, "class"))
    rows = tbl.count_rows()
    probes = _probe_records(records, params.probes)
    vectors = embed_images(model, (open_rgb(ws.classes_dir / r.id) for r in probes), batch_size=params.batch_size)
    hits = search_table(tbl, vectors, min(5, max(rows, 1)), params) if rows else [[] for _ in probes]
    return IndexValidation(
        table=tbl.name, rows=rows, expected_rows=len(records), classes=len(classes),
        missing_classes=tuple(sorted({r.cls for r in records} - classes)),
        probes=len(probes), probes_found=sum(_finds_itself(r.id, h) for r, h in zip(probes, hits)),
    )


def _mark_validated(tbl: lancedb.table.Table, version: str) -> None:
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tbl.update_field_metadata({"path": VECTOR, "metadata": {VALIDATED: stamp, MODEL_VERSION: str(version)}})


def _drop_old_versions(tbl: lancedb.table.Table, older_than: timedelta) -> None:
    """Compact small fragments, fold unindexed rows into the ANN index, and remove Lance
    versions older than the grace."""
    with warnings.catch_warnings():
        # LanceDB warns that a zero grace breaks concurrent readers; callers pass zero only for
        # a table nobody reads yet.
        warnings.filterwarnings("ignore", message=r".*cleanup_older_than=0")
        tbl.optimize(cleanup_older_than=older_than)


def cleanup_tables(ws: Workspace, params: IndexParams, *, keep: Collection[str], orphans_only: bool = False) -> tuple[str, ...]:
    """Drop orphans (unmarked tables of the prefix) and validated tables beyond the newest
    `keep_tables`; a table named in `keep` (the champion's, the one just built) always stays."""
    db = connect(ws)
    ours = {n: v for n in list_tables(db) if (v := table_version(params.table_prefix, n)) is not None}
    validated = [n for n in ours if is_validated(db.open_table(n))]
    newest = validated if orphans_only else sorted(validated, key=ours.__getitem__, reverse=True)[: params.keep_tables]
    retained = set(keep) | set(newest)
    doomed = sorted(n for n in ours if n not in retained)
    for name in doomed:
        db.drop_table(name, ignore_missing=True)
    return tuple(doomed)


def build_table(
    ws: Workspace,
    params: IndexParams,
    version: str,
    model: Embedder,
    records: Sequence[ImageRecord],
    *,
    keep: Collection[str] = (),
    live: str | None = None,
    catch_up: Callable[[], Sequence[ImageRecord]] | None = None,
) -> IndexBuild:
    """Write, index and validate the version's table, then mark it validated; only then may it go live.

    `records` is the catalog when the build starts; `catch_up`, called once the rows are
    written, returns the catalog again so images ingested meanwhile are appended before
    validation. `keep` names tables that must survive the clean-up (the aliased ones);
    `live` is the champion's. A validated table of this version, or the live one even
    unmarked (built before marks existed), is never rewritten: it is checked and returned.
    Any other unmarked table of this name is a dead build's orphan and is replaced.
    """
    start = time.perf_counter()
    name = table_name(params.table_prefix, version)
    check_writable(ws)
    db = connect(ws)
    model = model.to(pick_device("auto")).eval()  # GPU when present, as in training
    if name in list_tables(db):
        existing = db.open_table(name)
        if is_validated(existing) or name == live:
            return _reuse(ws, params, version, model, existing, records, start)
        db.drop_table(name)  # the orphan of a build that died: it never went live
    cleanup_tables(ws, params, keep=keep, orphans_only=True)  # other dead builds' space is needed now

    tbl = db.create_table(name, schema=table_schema(model.embedding_dim))
    _write(tbl, ws, model, records, params, f"index {name}")
    caught_up: list[ImageRecord] = []
    if catch_up is not None:
        known = {r.id for r in records}
        caught_up = [r for r in catch_up() if r.id not in known]
        if caught_up:
            _write(tbl, ws, model, caught_up, params, f"catch up {name}")
    _drop_old_versions(tbl, timedelta(0))  # compacts the chunks; nobody reads this table yet
    ann = ensure_ann_index(tbl, params)
    validation = validate_table(ws, tbl, model, [*records, *caught_up], params)
    if not validation.ok:
        raise IndexValidationError(validation)  # left unmarked: the next build removes it
    _mark_validated(tbl, version)
    _drop_old_versions(tbl, timedelta(0))  # one Lance version left: the validated one
    removed = cleanup_tables(ws, params, keep={*keep, name})
    return IndexBuild(table=name, version=str(version), rows=validation.rows, classes=validation.classes,
                      probes=validation.probes, probes_found=validation.probes_found, ann_index=ann,
                      caught_up=len(caught_up), removed=removed, reused=False, seconds=time.perf_counter() - start)


def _reuse(ws: Workspace, params: IndexParams, version: str, model: Embedder, tbl: lancedb.table.Table,
           records: Sequence[ImageRecord], start: float) -> IndexBuild:
    """A validated (or aliased) table may be live or a rollback target: it is checked, never dropped."""
    if written_by(tbl) not in (None, str(version)):
        raise IndexBuildError(f"table {tbl.name} was written by model version {written_by(tbl)}, not {version}")
    known = set(_column(tbl, "id"))
    missing = [r for r in records if r.id not in known]
    if missing:  # ingested since it was built and not hot-added yet: same model, so appending is safe
        _append(tbl, ws, model, missing, params)
    validation = validate_table(ws, tbl, model, records, params)
    if not validation.ok:
        raise IndexValidationError(validation)
    if not is_validated(tbl):
        _mark_validated(tbl, version)
    indices = list(tbl.list_indices())
    return IndexBuild(table=tbl.name, version=str(version), rows=validation.rows, classes=validation.classes,
                      probes=validation.probes, probes_found=validation.probes_found,
                      ann_index=params.ann_type if indices else None, caught_up=len(missing), removed=(),
                      reused=True, seconds=time.perf_counter() - start)


def _append(tbl: lancedb.table.Table, ws: Workspace, model: Embedder, records: Sequence[ImageRecord],
            params: IndexParams) -> None:
    """Insert rows whose id the table lacks; merge on `id`, so two racing writers never duplicate one."""
    for chunk in _chunks(records, params.write_rows):
        tbl.merge_insert("id").when_not_matched_insert_all().execute(_rows(ws, model, chunk, params.batch_size))


def reindex(ws: Workspace, params: Params, version: str, model: Embedder | None = None) -> IndexBuild:
    """Build and validate the table of a registered version over the whole catalog (the alias does not move).

    Tables that an alias (champion, challenger) points at are protected from the clean-up;
    the model is loaded from the registry when not given, exactly as readers will load it.
    """
    from components.registry import CHAMPION, ModelRegistry  # MLflow only when a version is resolved

    check_writable(ws)  # before the model is loaded: a read-only store fails in a second
    registry = ModelRegistry(ws, params.registry)
    # Every table an alias points at survives the clean-up: the champion's above all.
    aliases = registry.client.get_registered_model(registry.name).aliases
    tables = {alias: registry.get(v).table for alias, v in aliases.items()}
    keep = {table for table in tables.values() if table}
    model = model if model is not None else registry.load_embedder(version)

    def catalog() -> list[ImageRecord]:
        return ClassRegistry.load(ws.class_registry).records()

    return build_table(ws, params.index, version, model, catalog(), keep=keep, live=tables.get(CHAMPION),
                       catch_up=catalog)


def hot_add(ws: Workspace, params: Params) -> HotAdd:
    """Embed stored images the live table lacks with the champion's model and append them.

    Called after every ingest, so new classes are queryable before the next retrain. It
    appends whatever is missing, not only the last arrival's images: an image ingested while
    a retrain was building the next table (after its catch-up, before promotion) lands in
    the new live table at the next call.
    """
    from components.registry import ModelRegistry

    start = time.perf_counter()
    registry = ModelRegistry(ws, params.registry)
    champion = registry.champion()
    if champion is None or not champion.table:
        return HotAdd(version=None, table=None, added=0, seconds=time.perf_counter() - start)
    db = connect(ws)
    tbl = open_table(db, ws, champion.table)
    if written_by(tbl) not in (None, champion.version):
        raise IndexBuildError(f"live table {champion.table} was written by model version {written_by(tbl)}, "
                              f"not by champion v{champion.version}; refusing to mix embeddings")
    known = set(_column(tbl, "id"))
    missing = [r for r in ClassRegistry.load(ws.class_registry).records() if r.id not in known]
    if missing:
        model = registry.load_embedder(champion.version)
        _append(tbl, ws, model, missing, params.index)
        # Folds the new rows into the ANN index and compacts; readers mid-query keep their version's files.
        _drop_old_versions(tbl, timedelta(seconds=params.index.old_versions_seconds))
    return HotAdd(version=champion.version, table=champion.table, added=len(missing),
                  seconds=time.perf_counter() - start)


def search(ws: Workspace, table: str, vectors: np.ndarray, k: int, params: IndexParams | None = None) -> list[list[Hit]]:
    """The k nearest rows of a table by name (see search_table)."""
    return search_table(open_table(connect(ws), ws, table), vectors, k, params)


def table_rows(ws: Workspace, table: str) -> int | None:
    """Rows in a table, or None when it does not exist (a live pair that lost its index)."""
    try:
        return open_table(connect(ws), ws, table).count_rows()
    except FileNotFoundError:
        return None


def main(argv: list[str] | None = None) -> None:
    """Re-index one registered version: build and validate its table; the champion alias does not move."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--version", required=True, help="registered model version to index")
    ap.add_argument("--params", default="params.yaml", help="params file (default: ./params.yaml)")
    ap.add_argument("--workspace", default=None, help="workspace (default: MNEMO_WORKSPACE, then params)")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params)
        built = reindex(resolve_workspace(params, args.workspace), params, args.version)
    except (ConfigError, IndexBuildError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
    print(json.dumps(asdict(built)))


if __name__ == "__main__":
    main()
