"""Re-index on a Dask cluster: a Prefect flow maps one embedding task per shard of the catalog
over Dask workers (prefect-dask's DaskTaskRunner), each embedding its shard and writing Lance
fragments; the driver commits them as the new table in one Lance commit, then indexes and
validates it as any build (components/index.build_table). A shard that fails (an exception, a
killed worker) fails the flow: nothing is committed, its fragment files are removed, and the
table never exists, so nothing half-built is visible and the live pair keeps answering.

The cluster: the Dask scheduler at MNEMO_DASK_ADDRESS (e.g. infra/'s, GPU workers on
Kubernetes), else a LocalCluster of `index.dask_workers` processes started for the build.
`index.engine` (params.yaml) says when this path is taken instead of the single process.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Sequence

import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner

from components.config import Device, IndexParams
from components.data.catalog import Catalog, ImageRecord
from components.modeling.embedder import Embedder, pick_device
from components.ops.failpoints import failpoint
from components.vectors.build import RowWriter, commit_shards, discard_uncommitted, write_shard
from components.workspace import Workspace, settings


def dask_address() -> str | None:
    """The Dask scheduler to re-index on (tcp://host:8786), from the environment; None: a LocalCluster."""
    return settings().dask_address


@task(name="embed-shard", cache_policy=NO_CACHE)
def embed_shard(
    ws: Workspace,
    name: str,
    model: Embedder,
    records: Sequence[ImageRecord],
    params: IndexParams,
    shard: int,
    one_thread: bool,
    device: Device,
) -> list[str]:
    """One shard's rows as Lance fragments of table `name` (uncommitted); their metadata as JSON."""
    failpoint(f"embed-shard-{shard}")  # tests kill the worker that runs this shard
    if one_thread and not torch.cuda.is_available():
        torch.set_num_threads(1)  # a LocalCluster: one worker process per core, the workers are the parallelism
    return write_shard(ws, name, model.to(pick_device(device)), records, params)


def shards(records: Sequence[ImageRecord], params: IndexParams, workers: int) -> list[Sequence[ImageRecord]]:
    """At most shard_images records each, and at least one shard per worker."""
    count = max(math.ceil(len(records) / params.shard_images), workers, 1)
    size = math.ceil(len(records) / count) or 1
    return [records[lo : lo + size] for lo in range(0, len(records), size)]


def task_runner(params: IndexParams, address: str | None) -> DaskTaskRunner:
    """The scheduler at `address`, else a LocalCluster of params.dask_workers processes."""
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": params.dask_workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
        },
    )


def wait_for_a_worker(address: str, seconds: float) -> None:
    """Fail now, naming the scheduler, when it does not answer or has no worker within `seconds`:
    the build's tasks would otherwise wait for a worker forever."""
    from distributed import Client

    try:
        with Client(address, timeout=seconds) as client:
            client.wait_for_workers(1, timeout=seconds)
    except (OSError, TimeoutError) as e:
        raise RuntimeError(
            f"no Dask worker at the scheduler {address} (MNEMO_DASK_ADDRESS) within {seconds:g} s "
            f"(index.dask_wait_seconds): {type(e).__name__}: {e}"
        ) from e


def api_for_workers() -> Callable[[], None]:
    """Name this process's Prefect API in the environment the LocalCluster's worker processes
    inherit; returns what puts the environment back. Without a server (PREFECT_API_URL unset)
    Prefect runs a temporary one per process: this process's is started now, so the workers
    report to it instead of each starting their own. A remote cluster's workers are configured
    with the server's address (infra/)."""
    from prefect.settings import PREFECT_API_URL

    before = os.environ.get("PREFECT_API_URL")
    url = PREFECT_API_URL.value()
    if not url:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start()
        url = server.api_url
    os.environ["PREFECT_API_URL"] = url

    def restore() -> None:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before

    return restore


def dask_writer(ws: Workspace, params: IndexParams, device: Device = "auto") -> RowWriter:
    """A RowWriter that embeds on the Dask cluster and commits the fragments in one Lance commit."""

    def write(name: str, model: Embedder, records: Sequence[ImageRecord]) -> None:
        if address := dask_address():
            wait_for_a_worker(address, params.dask_wait_seconds)
        model = copy.deepcopy(model).cpu().eval()  # shipped to each task; a GPU worker moves it to its device
        local = not address
        restore = api_for_workers() if local else None
        parts = shards(records, params, params.dask_workers if local else 1)

        @flow(name="reindex-shards", task_runner=task_runner(params, address), log_prints=True)  # type: ignore[arg-type]  # prefect-dask's futures are PrefectFutures
        def reindex_shards() -> list[list[str]]:
            futures = [
                embed_shard.submit(ws, name, model, part, params, i, local, device) for i, part in enumerate(parts)
            ]
            return [future.result() for future in futures]

        try:
            fragments = [f for shard in reindex_shards() for f in shard]
        except BaseException:
            discard_uncommitted(ws, name)
            raise
        finally:
            if restore is not None:
                restore()
        commit_shards(ws, name, model.embedding_dim, fragments)

    return write


def row_writer(ws: Workspace, params: IndexParams, device: Device = "auto") -> RowWriter | None:
    """The Dask writer when `index.engine` picks it (see params.yaml), else None (this process):
    auto takes Dask from dask_min_images stored images, on the scheduler in MNEMO_DASK_ADDRESS or
    a LocalCluster; a small catalog is embedded faster than a cluster starts."""
    if params.engine == "process":
        return None
    if params.engine == "dask":
        return dask_writer(ws, params, device)
    images = len(Catalog.load(ws.catalog).images)
    return dask_writer(ws, params, device) if images >= params.dask_min_images else None
