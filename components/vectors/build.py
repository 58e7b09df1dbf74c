"""Building a version's LanceDB table: write, index and validate it before the version may
become champion (DESIGN.md, "Registry and the live pair"); only then does it carry the
`validated` mark. A table of the prefix without the mark is the orphan of a build that
died, and the next build removes it. After validation a table is only ever appended to
(hot add), never rewritten, so a reader holding it always sees a consistent Lance version.

One builder at a time (the retrain flow's concurrency limit): a build removes every
unmarked table of the prefix but its own. Reading is search.py's job; moving the alias
to a table is promotion.py's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import IvfHnswSq, IvfPq
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from components.config import IndexParams
from components.data.catalog import Catalog, ImageRecord
from components.modeling.embedder import Embedder, embed_files, pick_device
from components.ops.failpoints import failpoint
from components.vectors.search import finds_itself, probe_records, search_table, with_table_settings
from components.vectors.tables import (
    ANN_EF,
    ANN_TRAINED_ROWS,
    CATALOG_SEQ,
    MODEL_VERSION,
    VALIDATED,
    VECTOR,
    column,
    connect,
    ensure_id_index,
    ids_present,
    is_validated,
    list_tables,
    set_vector_metadata,
    table_name,
    table_schema,
    table_version,
    vector_indices,
    vector_metadata,
    written_by,
)
from components.workspace import Workspace


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
    ann_recall: float | None  # its recall@10 against exact search on stored vectors
    caught_up: int  # images ingested while the build ran, appended before validation
    removed: tuple[str, ...]  # orphans and tables beyond keep_tables, dropped after the build
    reused: bool  # the version's validated table already existed and was checked, not rewritten
    seconds: float

    @property
    def probes_ok(self) -> bool:
        return self.probes_found == self.probes


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
        raise IndexBuildError(
            f"LanceDB directory {path} is not writable ({exc.strerror}); "
            "nothing was built and the live pair is unchanged"
        ) from None


def _progress(label: str) -> Progress:
    # stderr: stdout stays clean for --json output
    return Progress(
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def _rows(ws: Workspace, model: Embedder, records: Sequence[ImageRecord], batch_size: int) -> pa.Table:
    vectors = embed_files(model, [ws.classes_dir / r.id for r in records], batch_size=batch_size)
    return pa.table(
        {
            "id": [r.id for r in records],
            "class": [r.cls for r in records],
            "arrival": [r.arrival for r in records],
            "split": [r.role for r in records],
            VECTOR: pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), model.embedding_dim),
        },
        schema=table_schema(model.embedding_dim),
    )


def _chunks(records: Sequence[ImageRecord], size: int) -> Iterable[Sequence[ImageRecord]]:
    for lo in range(0, len(records), size):
        yield records[lo : lo + size]


def _write(
    tbl: lancedb.table.Table,
    ws: Workspace,
    model: Embedder,
    records: Sequence[ImageRecord],
    params: IndexParams,
    label: str,
) -> None:
    """Embed and append records, one LanceDB write per `write_rows` (each write is one Lance version)."""
    with _progress(label) as progress:
        task = progress.add_task(label, total=len(records))
        for chunk in _chunks(records, params.write_rows):
            tbl.add(_rows(ws, model, chunk, params.batch_size))
            failpoint("index-chunk-written")
            progress.advance(task, len(chunk))


# Writes the rows of every record into a new table of that name, in one commit (index.build_table
# calls it instead of writing itself; flows/reindex.py's Dask writer is one).
RowWriter = Callable[[str, Embedder, Sequence[ImageRecord]], None]


def dataset_uri(ws: Workspace, name: str) -> str:
    """Where LanceDB keeps a table's Lance dataset (a local folder or an object-store prefix)."""
    return f"{ws.lancedb_uri.rstrip('/')}/{name}.lance"


def write_shard(
    ws: Workspace, name: str, model: Embedder, records: Sequence[ImageRecord], params: IndexParams
) -> list[str]:
    """Embed a shard's records and write them as Lance fragments of the (not yet committed) table:
    files nobody reads until commit_shards names them. Returns the fragments' metadata as JSON."""
    from lance.fragment import write_fragments

    fragments = []
    for chunk in _chunks(records, params.write_rows):
        rows = _rows(ws, model, chunk, params.batch_size)
        fragments += write_fragments(rows, dataset_uri(ws, name), schema=rows.schema)
        failpoint("index-chunk-written")
    return [json.dumps(f.to_json()) for f in fragments]


def commit_shards(ws: Workspace, name: str, dim: int, fragments: Sequence[str]) -> None:
    """Make the shards' fragments the table `name`, all at once: one Lance commit (version 1)."""
    import lance
    from lance.fragment import FragmentMetadata

    operation = lance.LanceOperation.Overwrite(table_schema(dim), [FragmentMetadata.from_json(f) for f in fragments])
    lance.LanceDataset.commit(dataset_uri(ws, name), operation)


def discard_uncommitted(ws: Workspace, name: str) -> None:
    """Remove the fragment files of a table that was never committed (a failed sharded build)."""
    folder = Path(dataset_uri(ws, name))
    if "://" not in ws.lancedb_uri and folder.is_dir() and not (folder / "_versions").exists():
        shutil.rmtree(folder, ignore_errors=True)


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
    """After hot adds: train the ANN index once the table crosses `ann_min_rows`, and retrain it
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


@dataclass(frozen=True)
class RecallProbes:
    """Stored vectors spread over a table and their exact k nearest ids: what ANN recall is measured on."""

    vectors: np.ndarray
    truth: np.ndarray  # ids, one row of k per probe

    def recall(self, tbl: lancedb.table.Table, params: IndexParams) -> float:
        k = self.truth.shape[1]
        found = search_table(tbl, self.vectors, k, params)
        return float(np.mean([len({h["id"] for h in hits} & set(t)) / k for hits, t in zip(found, self.truth)]))


def recall_probes(tbl: lancedb.table.Table, count: int, k: int = 10) -> RecallProbes:
    """`count` stored vectors spread over the table, with their exact neighbours from one streamed
    pass over the vectors (numpy, bounded memory): seconds at a million rows, not a scan per probe."""
    rows = tbl.count_rows()
    count = min(count, rows)
    picks = np.array(sorted({i * rows // count for i in range(count)}))
    queries = np.concatenate([_unit(b.column(VECTOR))[_inside(picks, b.num_rows, o)] for b, o in _batches(tbl)])
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)  # cosine similarity of the top k so far
    best_ids = np.full((len(queries), k), "", dtype=object)
    for batch, _ in _batches(tbl):
        batch_ids = np.asarray(batch.column("id").to_pylist(), dtype=object)
        sims = np.concatenate([best, queries @ _unit(batch.column(VECTOR)).T], axis=1)
        ids = np.concatenate([best_ids, np.broadcast_to(batch_ids, (len(queries), len(batch_ids)))], axis=1)
        keep = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        best, best_ids = np.take_along_axis(sims, keep, axis=1), np.take_along_axis(ids, keep, axis=1)
    return RecallProbes(queries, best_ids)


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
    ef = params.ann_ef
    while True:
        recall = probes.recall(tbl, params.model_copy(update={"ann_ef": ef}))
        if recall >= params.ann_min_recall or ef >= params.ann_max_ef:
            set_vector_metadata(tbl, ANN_EF, str(ef))
            return ef, recall
        ef = min(ef * 2, params.ann_max_ef)


def _batches(tbl: lancedb.table.Table) -> Iterable[tuple[pa.RecordBatch, int]]:
    """The table's ids and vectors in storage order, a batch at a time, with each batch's first row number."""
    offset = 0
    for batch in tbl.search().select(["id", VECTOR]).limit(None).to_batches(65536):
        yield batch, offset
        offset += batch.num_rows


def _inside(picks: np.ndarray, rows: int, offset: int) -> np.ndarray:
    return picks[(picks >= offset) & (picks < offset + rows)] - offset


def _unit(column: pa.Array) -> np.ndarray:
    vectors = np.asarray(column.flatten(), dtype=np.float32).reshape(len(column), -1)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def validate_table(
    ws: Workspace,
    tbl: lancedb.table.Table,
    model: Embedder,
    records: Sequence[ImageRecord],
    params: IndexParams,
    *,
    measured_recall: float | None = None,
) -> IndexValidation:
    """Row count equals the images stored, every class is present, probe images, embedded afresh
    by `model` from their files, find their own rows through the live search path, and the ANN
    search keeps its recall floor (`measured_recall`: what tune_ef just measured, not measured again)."""
    classes = set(column(tbl, "class"))
    rows = tbl.count_rows()
    probes = probe_records(records, params.probes)
    vectors = embed_files(model, [ws.classes_dir / r.id for r in probes], batch_size=params.batch_size)
    readers = with_table_settings(tbl.schema, params)  # as readers will search it
    hits = search_table(tbl, vectors, min(5, max(rows, 1)), readers) if rows else [[] for _ in probes]
    if measured_recall is None and rows:
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


def _mark_complete_up_to(ws: Workspace, tbl: lancedb.table.Table, records: Sequence[ImageRecord]) -> None:
    """Record the catalog position these records (the whole catalog when read) reach, where they come from it."""
    if records and all(r.seq for r in records):
        mark = Catalog.load(ws.catalog).mark(max(r.seq for r in records))
        if mark is not None and vector_metadata(tbl, CATALOG_SEQ) != mark:  # a write is a new Lance version
            set_vector_metadata(tbl, CATALOG_SEQ, mark)


def missing_rows(tbl: lancedb.table.Table, catalog: Catalog) -> tuple[list[ImageRecord], str | None]:
    """The catalog's images the table lacks, and the mark of the catalog position the table reaches
    once they are appended. A table whose mark the catalog recognises is asked only about the images
    recorded since (what an arrival costs); any other (built before marks, or before other data was
    checked out) has its id column compared with the whole catalog once."""
    last = catalog.last_seq()  # first: images recorded while this runs belong to the next call
    mark = vector_metadata(tbl, CATALOG_SEQ) or ""
    seq = mark.partition(":")[0]
    if seq.isdigit() and catalog.mark(int(seq)) == mark:
        candidates = [r for r in catalog.records_since(int(seq)) if r.seq <= last]
        present = ids_present(tbl, [r.id for r in candidates])
    else:
        candidates = [r for r in catalog.records() if r.seq <= last]
        present = set(column(tbl, "id"))
    return [r for r in candidates if r.id not in present], catalog.mark(last)


def _mark_validated(tbl: lancedb.table.Table, version: str) -> None:
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    tbl.update_field_metadata({"path": VECTOR, "metadata": {VALIDATED: stamp, MODEL_VERSION: str(version)}})


def drop_old_versions(tbl: lancedb.table.Table, older_than: timedelta) -> None:
    """Compact small fragments, fold unindexed rows into the ANN index, and remove Lance
    versions older than the grace."""
    with warnings.catch_warnings():
        # LanceDB warns that a zero grace breaks concurrent readers; callers pass zero only for
        # a table nobody reads yet.
        warnings.filterwarnings("ignore", message=r".*cleanup_older_than=0")
        tbl.optimize(cleanup_older_than=older_than)


def settle_appends(tbl: lancedb.table.Table, params: IndexParams) -> bool:
    """After a hot add: compact and fold the new rows into the indices (drop_old_versions, which
    rewrites the table's last fragment and its indices: time and memory that grow with the table)
    only once the rows no index covers yet reach `optimize_fraction` of the table, so the rewrite
    is paid once per that much growth, not per arrival. Until then readers scan those few rows
    exactly beside the indices, and only superseded versions past the grace are removed.
    Returns whether it optimized."""
    grace = timedelta(seconds=params.old_versions_seconds)
    unindexed = max(
        ((stats.num_unindexed_rows if (stats := tbl.index_stats(i.name)) else 0) for i in tbl.list_indices()),
        default=0,
    )
    if unindexed >= params.optimize_fraction * tbl.count_rows():
        drop_old_versions(tbl, grace)
        return True
    tbl.cleanup_old_versions(grace)
    return False


def cleanup_tables(
    ws: Workspace, params: IndexParams, *, keep: Collection[str], orphans_only: bool = False
) -> tuple[str, ...]:
    """Drop orphans (unmarked tables of the prefix) and validated tables beyond the newest
    `keep_tables`; a table named in `keep` (the champion's, the one just built) always stays."""
    db = connect(ws)
    ours = {n: v for n in list_tables(db) if (v := table_version(params.table_prefix, n)) is not None}
    validated = [n for n in ours if is_validated(db.open_table(n))]
    newest = validated if orphans_only else sorted(validated, key=ours.__getitem__, reverse=True)[: params.keep_tables]
    retained = set(keep) | set(newest)
    doomed = sorted(n for n in ours if n not in retained)
    for name in doomed:
        db.drop_table(name, ignore_missing=True)  # type: ignore[call-arg]  # LanceDB's local connection takes it; the base class stub does not
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
    write: RowWriter | None = None,
) -> IndexBuild:
    """Write, index and validate the version's table, then mark it validated; only then may it go live.

    `records` is the catalog when the build starts; `catch_up`, called once the rows are
    written, returns the catalog again so images ingested meanwhile are appended before
    validation. `write` writes the rows instead of this process (a Dask cluster, flows/reindex.py).
    `keep` names tables that must survive the clean-up (the aliased ones);
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

    if write is None:
        tbl = db.create_table(name, schema=table_schema(model.embedding_dim))
        _write(tbl, ws, model, records, params, f"index {name}")
    else:
        write(name, model, records)  # every row in one commit: no reader sees part of them
        tbl = db.open_table(name)
    caught_up: list[ImageRecord] = []
    if catch_up is not None:
        known = {r.id for r in records}
        caught_up = [r for r in catch_up() if r.id not in known]
        if caught_up:
            _write(tbl, ws, model, caught_up, params, f"catch up {name}")
    drop_old_versions(tbl, timedelta(0))  # compacts the chunks; nobody reads this table yet
    ensure_id_index(tbl)  # hot adds ask which of an arrival's ids the table holds
    ann = ensure_ann_index(tbl, params)
    tuned = tune_ef(tbl, params)  # the data decides how wide an HNSW search must be to meet the recall floor
    validation = validate_table(
        ws, tbl, model, [*records, *caught_up], params, measured_recall=tuned[1] if tuned else None
    )
    if not validation.ok:
        raise IndexValidationError(validation)  # left unmarked: the next build removes it
    _mark_complete_up_to(ws, tbl, [*records, *caught_up])
    _mark_validated(tbl, version)
    drop_old_versions(tbl, timedelta(0))  # one Lance version left: the validated one
    removed = cleanup_tables(ws, params, keep={*keep, name})
    return IndexBuild(
        table=name,
        version=str(version),
        rows=validation.rows,
        classes=validation.classes,
        probes=validation.probes,
        probes_found=validation.probes_found,
        ann_index=ann,
        ann_recall=validation.ann_recall,
        caught_up=len(caught_up),
        removed=removed,
        reused=False,
        seconds=time.perf_counter() - start,
    )


def _reuse(
    ws: Workspace,
    params: IndexParams,
    version: str,
    model: Embedder,
    tbl: lancedb.table.Table,
    records: Sequence[ImageRecord],
    start: float,
) -> IndexBuild:
    """A validated (or aliased) table may be live or a rollback target: it is checked, never dropped."""
    if written_by(tbl) not in (None, str(version)):
        raise IndexBuildError(f"table {tbl.name} was written by model version {written_by(tbl)}, not {version}")
    known = set(column(tbl, "id"))
    missing = [r for r in records if r.id not in known]
    if missing:  # ingested since it was built and not hot-added yet: same model, so appending is safe
        append_missing(tbl, ws, model, missing, params)
    _mark_complete_up_to(ws, tbl, records)
    validation = validate_table(ws, tbl, model, records, params)
    if not validation.ok:
        raise IndexValidationError(validation)
    if not is_validated(tbl):
        _mark_validated(tbl, version)
    indices = vector_indices(tbl)
    return IndexBuild(
        table=tbl.name,
        version=str(version),
        rows=validation.rows,
        classes=validation.classes,
        probes=validation.probes,
        probes_found=validation.probes_found,
        ann_index=params.ann_type if indices else None,
        ann_recall=validation.ann_recall,
        caught_up=len(missing),
        removed=(),
        reused=True,
        seconds=time.perf_counter() - start,
    )


def append_missing(
    tbl: lancedb.table.Table, ws: Workspace, model: Embedder, records: Sequence[ImageRecord], params: IndexParams
) -> None:
    """Insert rows whose id the table lacks; merge on `id`, so two racing writers never duplicate one."""
    for chunk in _chunks(records, params.write_rows):
        tbl.merge_insert("id").when_not_matched_insert_all().execute(_rows(ws, model, chunk, params.batch_size))
        failpoint("catch-up-chunk-written")
