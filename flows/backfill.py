"""The backfill flow: a compatible version's table re-embedded by its own model in the background
(components/vectors/backfill.py), while it answers queries.

Batches are embedded in this process, or as Prefect tasks on a Dask cluster when `index.engine`
picks one (as the re-index does: flows/reindex.py), and committed here one at a time, in the
order they come back. The retrain flow runs it once it has promoted a version on its
predecessor's vectors; `mnemo backfill` runs it by hand, e.g. after a kill: the table records
which rows are done, so it carries on. One backfill per workspace (its own lock): it writes rows
of one table as catch-ups do, so retrains, promotions and rollbacks go on beside it; it stops,
leaving a consistent table, once its version is no longer the champion.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pyarrow as pa
import torch
from mlflow.exceptions import MlflowException
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from components.config import Device, IndexParams, Params
from components.data.catalog import ImageRecord
from components.modeling.embedder import Embedder, pick_device
from components.ops.failpoints import failpoint
from components.ops.writer_lock import BACKFILL_LOCK_FILE, writer_lock
from components.registry.mlflow_registry import CHAMPION, ModelRegistry
from components.vectors.backfill import BackfillProgress, embed_batch, run_backfill
from components.vectors.tables import connect, open_table
from components.workspace import Workspace, resolve_workspace
from flows.reindex import api_for_workers, dask_address, task_runner, wait_for_a_worker
from flows.states import finished


@task(name="embed-backfill-batch", cache_policy=NO_CACHE)
def embed_rows(
    ws: Workspace,
    model: Embedder,
    records: list[ImageRecord],
    params: IndexParams,
    version: str,
    one_thread: bool,
    device: Device,
) -> pa.Table:
    """One batch's rows as the table's model embeds them (on a Dask worker, or in this process)."""
    failpoint("backfill-embed")  # tests kill the backfill here, between its commits
    if one_thread and not torch.cuda.is_available():
        torch.set_num_threads(1)  # a LocalCluster: one worker process per core, the workers are the parallelism
    return embed_batch(ws, model.to(pick_device(device)), records, params, version)


def _embedder(
    ws: Workspace, params: Params, model: Embedder, version: str, one_thread: bool
) -> Callable[[list[list[ImageRecord]]], Iterator[pa.Table]]:
    def embed(batches: list[list[ImageRecord]]) -> Iterator[pa.Table]:
        futures = [
            embed_rows.submit(ws, model, b, params.index, version, one_thread, params.train.device) for b in batches
        ]
        for future in futures:  # committed in plan order, each as soon as it is back
            yield future.result()

    return embed


@flow(name="backfill-batches", log_prints=True)
def backfill_batches(
    ws: Workspace, params: Params, version: str, champion_target: bool, workers: int
) -> BackfillProgress:
    """The backfill's loop (run_backfill), its batches embedded by this flow's task runner."""
    registry = ModelRegistry(ws, params.registry)
    tbl = open_table(connect(ws), ws, registry.get(version, with_metrics=False).table or "")
    model = registry.load_embedder(version).cpu().eval()

    def stop() -> str | None:
        if not champion_target:
            return None
        now = registry.aliases().get(CHAMPION)
        return None if now == version else f"v{version} is no longer the champion (v{now} is)"

    return run_backfill(
        ws,
        params.index,
        tbl,
        version,
        rows=params.compat.backfill_rows,
        parallel=workers,
        embed=_embedder(ws, params, model, version, one_thread=workers > 1 and not dask_address()),
        stop=stop,
        report=lambda p: registry.log_backfill(version, p.rows, p.remaining),
    )


@flow(name="backfill", log_prints=True)
def backfill(params: Params, workspace: str | None = None, version: str | None = None) -> BackfillProgress:
    """Re-embed the rows of `version`'s table (default: the champion's) that an older model embedded."""
    ws = resolve_workspace(params, workspace)
    registry = ModelRegistry(ws, params.registry)
    try:
        target = registry.get(version) if version is not None else registry.champion()
    except MlflowException:
        raise LookupError(f"{registry.name} has no version {version!r}") from None
    if target is None or not target.table:
        raise LookupError("no champion with a table to backfill" if version is None else f"v{version} has no table")
    with writer_lock(ws, f"backfill v{target.version}", lock_file=BACKFILL_LOCK_FILE):
        rows = open_table(connect(ws), ws, target.table).count_rows()
        use_dask = params.index.engine == "dask" or (
            params.index.engine == "auto" and rows >= params.index.dask_min_images
        )
        champion_target = registry.aliases().get(CHAMPION) == target.version
        if not use_dask:  # one batch at a time, in this process
            done = backfill_batches(ws, params, target.version, champion_target, 1)
        else:
            address = dask_address()
            if address:
                wait_for_a_worker(address, params.index.dask_wait_seconds)
            restore = None if address else api_for_workers()
            try:
                workers = params.index.dask_workers if not address else 2 * params.index.dask_workers
                on_dask = backfill_batches.with_options(task_runner=task_runner(params.index, address))  # type: ignore[arg-type]  # prefect-dask's futures are PrefectFutures
                done = on_dask(ws, params, target.version, champion_target, workers)
            finally:
                if restore is not None:
                    restore()
    return finished(done)  # type: ignore[return-value]  # Prefect unwraps a returned State: callers get its data
