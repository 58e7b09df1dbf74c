"""The serving graph (serve.search: graph): the same answers as the table, hot adds found after a
refresh, nothing lost on a rollback, and a table rewritten under it re-read whole. Real LanceDB
and MLflow (SQLite) in tmp_path."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from components.config import with_overrides
from components.data.catalog import Catalog
from components.data.inbox import ingest_inbox
from components.data.transforms import open_rgb
from components.registry.promotion import Promoter
from components.serving.live import LiveIndex
from components.vectors.graph import ServingGraph
from components.vectors.search import search_table
from components.vectors.tables import connect, table_schema
from tests.integration.live_workspace import write_arrival


def unit_rows(n: int, dim: int, seed: int, offset: int = 0) -> tuple[np.ndarray, pa.Table]:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"r{offset + i}" for i in range(n)]
    rows = pa.table(
        {
            "id": ids,
            "class": [f"c{(offset + i) % 7}" for i in range(n)],
            "arrival": ["a"] * n,
            "role": ["train"] * n,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
        },
        schema=table_schema(dim),
    )
    return vectors, rows


def graph_live(ws, params) -> LiveIndex:
    return LiveIndex(
        ws, params.registry, params.index, refresh_seconds=60, runtime=params.serve.runtime, graph=params.serve
    )


def test_the_graph_answers_like_the_exact_table_search(ws, params):
    vectors, rows = unit_rows(3000, 16, seed=1)
    tbl = connect(ws).create_table("t", rows, schema=table_schema(16))
    graph = ServingGraph.build(ws, "t", params.serve, params.index)
    queries = vectors[::100] + 0.01  # near stored rows, not on them
    exact = search_table(tbl, queries, 10)  # no ANN index under ann_min_rows: exact
    found = graph.search(queries, 10)
    assert graph.rows == 3000 and graph.stats.recall_at_10 >= params.index.ann_min_recall
    assert [[h["id"] for h in hits] for hits in found] == [[h["id"] for h in hits] for hits in exact]
    assert np.allclose(
        [[h["distance"] for h in hits] for hits in found], [[h["distance"] for h in hits] for hits in exact], atol=1e-5
    )
    assert {h["class"] for hits in found for h in hits} <= {f"c{i}" for i in range(7)}


def test_the_build_raises_ef_until_the_recall_floor_is_met(ws, params):
    """Uniform 32-d vectors are hard for a graph: ef 1 misses most neighbours, the tuning widens it."""
    _, rows = unit_rows(5000, 32, seed=2)
    connect(ws).create_table("t", rows, schema=table_schema(32))
    serve = params.serve.model_copy(update={"graph_ef": 1, "graph_m": 4})
    graph = ServingGraph.build(ws, "t", serve, params.index)
    assert graph.stats.ef > 1 and graph.stats.recall_at_10 >= params.index.ann_min_recall


def test_rows_appended_to_the_table_join_the_graph_and_a_rewritten_table_is_reread(ws, params):
    db = connect(ws)
    _, rows = unit_rows(500, 16, seed=3)
    tbl = db.create_table("t", rows, schema=table_schema(16))
    graph = ServingGraph.build(ws, "t", params.serve, params.index)
    more, extra = unit_rows(40, 16, seed=4, offset=500)
    tbl.add(extra)
    assert graph.search(more[:1], 1)[0][0]["id"] != "r500"  # not before a catch-up
    assert graph.catch_up() == 40 and graph.catch_up() == 0
    assert [hits[0]["id"] for hits in graph.search(more, 1)] == [f"r{500 + i}" for i in range(40)]

    other, rewritten = unit_rows(300, 16, seed=5, offset=9000)  # same name, other rows
    db.create_table("t", rewritten, schema=table_schema(16), mode="overwrite")
    graph.catch_up()
    assert graph.rows == 300 and graph.search(other[:1], 1)[0][0]["id"] == "r9000"


def test_a_hot_add_is_found_after_a_refresh_and_a_rollback_hides_nothing(live_ws, params):
    params = with_overrides(params, {"serve.search": "graph"})
    live = graph_live(live_ws, params)
    promoter = Promoter(live_ws, params.registry, params.index)
    promoter.promote("2", reason="test")
    pair = live.refresh()
    assert pair is not None and pair.version == "2" and pair.graph is not None
    assert pair.graph.table == pair.table_name == "embeddings_v2"  # one version's table per answer

    write_arrival(live_ws.inbox, "a1", ["n0", "n1"], 6, seed=9)
    ingest_inbox(live_ws, params.ingest)
    assert promoter.catch_up().added == 12
    live.refresh()  # what the background refresh does every refresh_seconds
    records = Catalog.load(live_ws.catalog).records()
    images = [open_rgb(live_ws.classes_dir / r.id) for r in records]
    assert [h[0]["id"] for h in live.current().query(images, 1)] == [r.id for r in records]

    promoter.rollback(reason="v2 answers badly")
    pair = live.refresh()
    assert pair is not None and (pair.version, pair.table_name) == ("1", "embeddings_v1")
    assert pair.graph is not None and pair.graph.rows == pair.rows() == len(records)
    assert [h[0]["id"] for h in pair.query(images, 1)] == [r.id for r in records]


def test_the_graph_follows_a_backfill_each_tenth_of_its_rows_and_at_its_end(live_ws, params):
    import copy

    import torch

    from components.registry.mlflow_registry import ModelRegistry
    from components.vectors import backfill
    from components.vectors.compat import start_compatible_table

    ws, records = live_ws, Catalog.load(live_ws.catalog).records()
    registry = ModelRegistry(ws, params.registry)
    new = copy.deepcopy(registry.load_embedder("1"))
    with torch.no_grad():  # another model near v1: its own vectors of every image differ from v1's
        for p in new.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    version = registry.log_candidate(new, params={}, metrics={}, epoch_metrics={}, arrivals=["a0"]).version
    built = start_compatible_table(ws, params.index, version, new, ("1", "embeddings_v1"), records)
    tbl = connect(ws).open_table(built.table)
    graph = ServingGraph.build(ws, built.table, params.serve, params.index)
    [first, second] = backfill.pending_batches(tbl, version, [], rows=3, batches=2)  # 3 rows: 5% of 60

    def own_distance(record) -> float:
        [vector] = backfill.embed_batch(ws, new, [record], params.index, version)["vector"].to_numpy(
            zero_copy_only=False
        )
        [hits] = graph.search(np.asarray([vector], dtype=np.float32), 1)
        return hits[0]["distance"] if hits[0]["id"] == record.id else float("inf")

    backfill.commit_batch(ws, tbl, backfill.embed_batch(ws, new, first, params.index, version), params.index, version)
    assert graph.catch_up() == 0 and own_distance(first[0]) > 1e-4  # under a tenth: the graph keeps what it read
    for batch in [second, *backfill.pending_batches(tbl, version, [], rows=60, batches=1)]:
        backfill.commit_batch(
            ws, tbl, backfill.embed_batch(ws, new, batch, params.index, version), params.index, version
        )
    assert graph.catch_up() == len(records)  # the end: read again whole
    assert all(own_distance(r) < 1e-4 for r in (*first, *second))  # every row now the new model's own vector
