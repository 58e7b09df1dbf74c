"""The re-index on a real Dask LocalCluster (two worker processes) through Prefect's Dask task
runner: the same table as the single-process build, and a killed worker fails the build with
nothing half-visible while the live pair keeps answering."""

from __future__ import annotations

import dask
import numpy as np
import pytest

from components.config import with_overrides
from components.data.catalog import Catalog
from components.data.transforms import open_rgb
from components.ops.failpoints import ENV as FAILPOINT
from components.registry.promotion import Promoter
from components.serving.live import LiveIndex
from components.vectors.build import dataset_uri
from components.vectors.tables import connect, is_validated, list_tables
from flows.reindex import dask_writer, row_writer
from tests.integration.live_workspace import register_random


def rows_by_id(ws, table: str) -> tuple[list[str], np.ndarray]:
    data = connect(ws).open_table(table).to_arrow().sort_by("id")
    return data["id"].to_pylist(), np.asarray(data["vector"].to_pylist(), dtype=np.float32)


@pytest.fixture()
def dask_params(params):
    # 60 images in shards of 16: four tasks over two workers
    return with_overrides(params, {"index.engine": "dask", "index.dask_workers": 2, "index.shard_images": 16})


def test_a_two_worker_dask_reindex_builds_the_same_table_as_one_process(live_ws, dask_params):
    promoter = Promoter(live_ws, dask_params.registry, dask_params.index)
    alone = register_random(live_ws, dask_params, seed=5)
    sharded = register_random(live_ws, dask_params, seed=5)  # the same weights, another version
    one = promoter.reindex(alone)
    many = promoter.reindex(sharded, write=dask_writer(live_ws, dask_params.index))

    assert (many.rows, many.probes_found, many.probes) == (one.rows, one.probes, one.probes) == (60, 16, 16)
    assert is_validated(connect(live_ws).open_table(many.table))
    ids, vectors = rows_by_id(live_ws, one.table)
    sharded_ids, sharded_vectors = rows_by_id(live_ws, many.table)
    assert sharded_ids == ids and np.abs(sharded_vectors - vectors).max() <= 1e-6


def test_a_killed_worker_fails_the_build_cleanly_and_the_live_pair_keeps_answering(live_ws, dask_params, monkeypatch):
    live = LiveIndex(live_ws, dask_params.registry, dask_params.index, refresh_seconds=60)
    records = Catalog.load(live_ws.catalog).records()
    image = open_rgb(live_ws.classes_dir / records[0].id)
    assert live.current().query([image], 1)[0][0]["id"] == records[0].id

    version = register_random(live_ws, dask_params, seed=6)
    monkeypatch.setenv(FAILPOINT, "embed-shard-1")  # the worker processes inherit it: shard 1 kills its worker
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), pytest.raises(Exception, match="(?i)killed"):
        Promoter(live_ws, dask_params.registry, dask_params.index).reindex(
            version, write=dask_writer(live_ws, dask_params.index)
        )
    name = f"embeddings_v{version}"
    assert name not in list_tables(connect(live_ws))  # nothing committed, nothing visible
    assert not (live_ws.root / "lancedb" / f"{name}.lance").exists(), dataset_uri(live_ws, name)
    pair = live.refresh()
    assert pair is not None and pair.version == "1"
    assert pair.query([image], 1)[0][0]["id"] == records[0].id


def test_the_engine_setting_picks_the_writer(live_ws, params, monkeypatch):
    monkeypatch.delenv("MNEMO_DASK_ADDRESS", raising=False)
    assert row_writer(live_ws, with_overrides(params, {"index.engine": "process"}).index) is None
    assert row_writer(live_ws, with_overrides(params, {"index.engine": "dask"}).index) is not None
    auto = {"index.engine": "auto", "index.dask_min_images": 61}
    assert row_writer(live_ws, with_overrides(params, auto).index) is None  # 60 images: one process
    assert row_writer(live_ws, with_overrides(params, auto | {"index.dask_min_images": 60}).index) is not None
    monkeypatch.setenv("MNEMO_DASK_ADDRESS", "tcp://127.0.0.1:8786")  # where, not whether
    assert row_writer(live_ws, with_overrides(params, auto).index) is None


@pytest.mark.parametrize("scheduler", ["without-workers", "absent"])
def test_a_remote_cluster_without_a_worker_fails_the_build_naming_the_scheduler(
    live_ws, dask_params, monkeypatch, scheduler
):
    from distributed import LocalCluster

    version = register_random(live_ws, dask_params, seed=7)
    index = with_overrides(dask_params, {"index.dask_wait_seconds": 2}).index
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        address = cluster.scheduler_address if scheduler == "without-workers" else "tcp://127.0.0.1:9"  # nothing on 9
        monkeypatch.setenv("MNEMO_DASK_ADDRESS", address)
        with pytest.raises(RuntimeError, match=f"no Dask worker at the scheduler {address} .* within 2 s"):
            Promoter(live_ws, dask_params.registry, index).reindex(version, write=dask_writer(live_ws, index))
    assert f"embeddings_v{version}" not in list_tables(connect(live_ws))
