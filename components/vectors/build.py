"""Building a version's LanceDB table: write, index, catch up and validate it before the version
may become champion (DESIGN.md, "Registry and the live pair"); only then does it carry the
`validated` mark. A table of the prefix without the mark is the orphan of a build that
died, and the next build removes it. After validation a table is only ever appended to
(catch_up.py), never rewritten, so a reader holding it always sees a consistent Lance version.

One builder at a time (the retrain flow's concurrency limit): a build removes every
unmarked table of the prefix but its own. The ANN index is ann.py's, the checks validate.py's;
reading is search.py's job; moving the alias to a table is promotion.py's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import lancedb
import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from components.config import Device, IndexParams
from components.data.catalog import ImageRecord
from components.modeling.embedder import Embedder, pick_device
from components.ops.failpoints import failpoint
from components.vectors.ann import ensure_ann_index, tune_ef
from components.vectors.catch_up import CatchUp, catch_up
from components.vectors.rows import embedded_rows, in_chunks
from components.vectors.tables import (
    MODEL_VERSION,
    VALIDATED,
    VECTOR,
    IndexBuildError,
    compat_from,
    connect,
    drop_old_versions,
    ensure_id_index,
    is_validated,
    list_tables,
    references_base,
    set_vector_metadata,
    table_name,
    table_schema,
    table_version,
    vector_indices,
)
from components.vectors.validate import IndexValidation, IndexValidationError, validate_table
from components.workspace import Workspace


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
    caught_up: int  # images stored while the build ran (or since the reused table was last caught up)
    removed: tuple[str, ...]  # orphans and tables beyond keep_tables, dropped after the build
    reused: bool  # the version's validated table already existed and was checked, not rewritten
    seconds: float
    compatible_from: str | None = None  # started from this version's vectors (compat.py), not re-embedded
    older_rows: int = 0  # rows still embedded by that version's model: what the backfill re-embeds

    @property
    def probes_ok(self) -> bool:
        return self.probes_found == self.probes

    @classmethod
    def of(
        cls,
        validation: IndexValidation,
        tbl: lancedb.table.Table,
        version: str,
        params: IndexParams,
        caught: CatchUp,
        start: float,
        **how: Any,
    ) -> IndexBuild:
        """What a validated table holds, from its validation; `how`: removed, reused, compatible_from, older_rows."""
        return cls(
            table=tbl.name,
            version=str(version),
            rows=validation.rows,
            classes=validation.classes,
            probes=validation.probes,
            probes_found=validation.probes_found,
            ann_index=params.ann_type if vector_indices(tbl) else None,  # a catch-up may have crossed ann_min_rows
            ann_recall=validation.ann_recall,
            caught_up=caught.added,
            removed=how.pop("removed", ()),
            reused=how.pop("reused", False),
            seconds=time.perf_counter() - start,
            **how,
        )


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
        for chunk in in_chunks(records, params.write_rows):
            tbl.add(embedded_rows(ws, model, chunk, params.batch_size))
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
    for chunk in in_chunks(records, params.write_rows):
        rows = embedded_rows(ws, model, chunk, params.batch_size)
        fragments += write_fragments(rows, dataset_uri(ws, name), schema=rows.schema)
        failpoint("index-chunk-written")
    return [json.dumps(f.to_json()) for f in fragments]


def commit_shards(ws: Workspace, name: str, dim: int, fragments: Sequence[str]) -> None:
    """Make the shards' fragments the table `name`, all at once: one Lance commit (version 1)."""
    commit_fragments(ws, name, table_schema(dim), fragments)


def commit_fragments(ws: Workspace, name: str, schema: pa.Schema, fragments: Sequence[str]) -> None:
    """Make written Lance fragments (their metadata as JSON) the table `name` in one commit."""
    import lance
    from lance.fragment import FragmentMetadata

    operation = lance.LanceOperation.Overwrite(schema, [FragmentMetadata.from_json(f) for f in fragments])
    lance.LanceDataset.commit(dataset_uri(ws, name), operation)


def discard_uncommitted(ws: Workspace, name: str) -> None:
    """Remove the fragment files of a table that was never committed (a failed sharded build)."""
    folder = Path(dataset_uri(ws, name))
    if "://" not in ws.lancedb_uri and folder.is_dir() and not (folder / "_versions").exists():
        shutil.rmtree(folder, ignore_errors=True)


def mark_validated(tbl: lancedb.table.Table, version: str) -> None:
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    tbl.update_field_metadata({"path": VECTOR, "metadata": {VALIDATED: stamp, MODEL_VERSION: str(version)}})


def cleanup_tables(
    ws: Workspace, params: IndexParams, *, keep: Collection[str], orphans_only: bool = False
) -> tuple[str, ...]:
    """Drop orphans (unmarked tables of the prefix) and validated tables beyond the newest
    `keep_tables`; a table named in `keep` (the champion's, the one just built) always stays, and
    so does every table a retained one was shallow-cloned from while it still reads its files."""
    db = connect(ws)
    ours = {n: v for n in list_tables(db) if (v := table_version(params.table_prefix, n)) is not None}
    validated = [n for n in ours if is_validated(db.open_table(n))]
    newest = validated if orphans_only else sorted(validated, key=ours.__getitem__, reverse=True)[: params.keep_tables]
    retained = _with_bases(db, (set(keep) | set(newest)) & set(ours))
    doomed = sorted(n for n in ours if n not in retained)
    for name in doomed:
        db.drop_table(name, ignore_missing=True)  # type: ignore[call-arg]  # LanceDB's local connection takes it; the base class stub does not
    return tuple(doomed)


def _with_bases(db: lancedb.DBConnection, tables: set[str]) -> set[str]:
    """`tables` and, transitively, the tables any of them still reads files of (compat.py's clones)."""
    found, todo = set(tables), list(tables)
    while todo:
        tbl = db.open_table(todo.pop())
        origin = compat_from(tbl.schema)
        if origin and origin["table"] not in found and references_base(tbl):
            found.add(origin["table"])
            todo.append(origin["table"])
    return found


def build_table(
    ws: Workspace,
    params: IndexParams,
    version: str,
    model: Embedder,
    records: Sequence[ImageRecord],
    *,
    keep: Collection[str] = (),
    live: str | None = None,
    write: RowWriter | None = None,
    device: Device = "auto",
) -> IndexBuild:
    """Write, index, catch up and validate the version's table, then mark it validated; only then may it go live.

    `records` is the catalog when the build starts: written first (by `write` instead of this
    process where given: a Dask cluster, flows/reindex.py); the table is then caught up with
    the catalog, so images stored meanwhile are in it before validation.
    `device` is train.device (where the network runs; auto: CUDA when present).
    `keep` names tables that must survive the clean-up (the aliased ones); `live` is the
    champion's. A validated table of this version, or the live one, is never rewritten: it is
    caught up, checked and returned (refused when its model-version mark is not this version).
    Any other unvalidated table of this name is a dead build's orphan and is replaced.
    """
    start = time.perf_counter()
    name = table_name(params.table_prefix, version)
    check_writable(ws)
    db = connect(ws)
    model = model.to(pick_device(device)).eval()
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
    set_vector_metadata(tbl, MODEL_VERSION, str(version))  # whose model wrote the rows: what catch_up checks
    drop_old_versions(tbl, timedelta(0))  # compacts the chunks; nobody reads this table yet
    ensure_id_index(tbl)  # catch-ups ask which of an arrival's ids the table holds
    ensure_ann_index(tbl, params)
    caught = catch_up(ws, params, tbl, version, lambda: model)  # images stored while the rows were written
    tuned = tune_ef(tbl, params)  # the data decides how wide an HNSW search must be to meet the recall floor
    validation = validate_table(
        ws, tbl, model, [*records, *caught.appended], params, measured_recall=tuned[1] if tuned else None
    )
    if not validation.ok:
        raise IndexValidationError(validation)  # left unvalidated: the next build removes it
    mark_validated(tbl, version)
    drop_old_versions(tbl, timedelta(0))  # one Lance version left: the validated one
    removed = cleanup_tables(ws, params, keep={*keep, name})
    return IndexBuild.of(validation, tbl, version, params, caught, start, removed=removed)


def _reuse(
    ws: Workspace,
    params: IndexParams,
    version: str,
    model: Embedder,
    tbl: lancedb.table.Table,
    records: Sequence[ImageRecord],
    start: float,
) -> IndexBuild:
    """A validated (or aliased) table may be live or a rollback target: it is caught up and checked, never dropped."""
    caught = catch_up(ws, params, tbl, version, lambda: model)  # refuses a table another model wrote
    known = {r.id for r in records}
    validation = validate_table(ws, tbl, model, [*records, *(r for r in caught.appended if r.id not in known)], params)
    if not validation.ok:
        raise IndexValidationError(validation)
    if not is_validated(tbl):
        mark_validated(tbl, version)
    return IndexBuild.of(validation, tbl, version, params, caught, start, reused=True)
