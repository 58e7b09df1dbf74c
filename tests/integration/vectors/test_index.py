"""Building, validating, retaining and catching up LanceDB tables: real LanceDB (and MLflow) in tmp_path."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from components.config import with_overrides
from components.data.catalog import Catalog, ImageRecord
from components.data.inbox import ingest_inbox
from components.modeling.embedder import Embedder, build_embedder
from components.registry.mlflow_registry import CHAMPION, TABLE_TAG, ModelRegistry
from components.registry.promotion import Promoter
from components.serving.live import LiveIndex, LivePairMismatch
from components.vectors.ann import ann_recall, ensure_ann_index, retune_ann_index, tune_ef
from components.vectors.build import build_table, cleanup_tables
from components.vectors.search import AsyncLoop, TableReader, search_table, with_table_settings
from components.vectors.tables import (
    ANN_EF,
    ANN_TRAINED_ROWS,
    CATALOG_SEQ,
    IndexBuildError,
    connect,
    is_validated,
    list_tables,
    table_name,
    table_schema,
    vector_indices,
    vector_metadata,
    written_by,
)
from components.vectors.validate import IndexValidation, IndexValidationError, validate_table
from flows.cli import app
from tests.integration.live_workspace import write_arrival

runner = CliRunner()


def random_model(params, seed: int) -> Embedder:
    torch.manual_seed(seed)
    return build_embedder(params.model).eval()


class Jittery(Embedder):
    """A model that never embeds the same image twice the same way: its table cannot validate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x + torch.randn_like(x))


def test_build_writes_validates_and_marks_the_version_table(live_ws, params):
    records = Catalog.load(live_ws.catalog).records()
    built = build_table(live_ws, params.index, "7", random_model(params, 7), records)

    assert (built.table, built.version, built.rows, built.classes) == ("embeddings_v7", "7", 60, 6)
    assert built.probes_ok and built.probes == params.index.probes and built.ann_index is None and not built.reused
    tbl = connect(live_ws).open_table("embeddings_v7")
    assert is_validated(tbl) and written_by(tbl) == "7"
    assert len(tbl.list_versions()) == 1  # the chunked writes' versions are gone: one validated version

    # Building a validated table again checks it and leaves it as it is: it may be live.
    again = build_table(live_ws, params.index, "7", random_model(params, 7), records)
    assert again.reused and again.rows == 60 and tbl.version == connect(live_ws).open_table("embeddings_v7").version


def test_a_table_that_fails_validation_is_never_marked_and_the_next_build_removes_it(live_ws, params):
    records = Catalog.load(live_ws.catalog).records()
    torch.manual_seed(0)
    jittery = Jittery(params.model.backbone, params.model.embedding_dim, params.model.image_size)
    with pytest.raises(IndexValidationError, match="probe images did not find themselves") as failed:
        build_table(live_ws, params.index, "8", jittery, records)
    assert not failed.value.validation.ok and failed.value.validation.rows == 60
    db = connect(live_ws)
    assert not is_validated(db.open_table("embeddings_v8"))

    build_table(live_ws, params.index, "9", random_model(params, 9), records[:12], keep={"embeddings_v1"})
    assert "embeddings_v8" not in list_tables(db)


def test_validation_reports_missing_rows_classes_and_a_foreign_model(live_ws, params):
    records = Catalog.load(live_ws.catalog).records()
    tbl = connect(live_ws).open_table("embeddings_v1")
    model_v1 = ModelRegistry(live_ws, params.registry).load_embedder("1")
    assert validate_table(live_ws, tbl, model_v1, records, params.index).ok

    foreign = validate_table(live_ws, tbl, random_model(params, 99), records, params.index)
    assert foreign.probes_found < foreign.probes and "did not find themselves" in " ".join(foreign.problems)

    # An image stored after the table was built, of a class the table has never seen.
    (live_ws.classes_dir / "c9").mkdir()
    (live_ws.classes_dir / "c9" / "x.png").write_bytes((live_ws.classes_dir / records[0].id).read_bytes())
    later = [*records, ImageRecord(id="c9/x.png", cls="c9", arrival="a9", role="train")]
    behind = validate_table(live_ws, tbl, model_v1, later, params.index)
    assert behind.missing_classes == ("c9",) and (behind.rows, behind.expected_rows) == (60, 61) and not behind.ok


def test_clean_up_keeps_the_champions_table_and_the_newest_validated_ones(live_ws, params):
    records = Catalog.load(live_ws.catalog).records()[:12]
    index = params.index.model_copy(update={"keep_tables": 2})
    for version in ("3", "4", "5"):
        build_table(live_ws, index, version, random_model(params, int(version)), records, keep={"embeddings_v1"})
    assert sorted(list_tables(connect(live_ws))) == ["embeddings_v1", "embeddings_v4", "embeddings_v5"]
    # Without protection the champion's table would be the oldest, and go: keep is what saves it.
    assert cleanup_tables(live_ws, index, keep=()) == ("embeddings_v1",)


def test_build_catches_up_images_ingested_while_it_ran(live_ws, params):
    records = Catalog.load(live_ws.catalog).records()
    built = build_table(live_ws, params.index, "6", random_model(params, 6), records[:-5])  # 5 stored meanwhile
    assert built.caught_up == 5 and built.rows == 60 and built.probes_ok


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((32, dim)).astype(np.float32)
    x = centres[rng.integers(0, 32, n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def vector_rows(vectors: np.ndarray, offset: int = 0) -> pa.Table:
    dim = vectors.shape[1]
    ids = [f"i{i}" for i in range(offset, offset + len(vectors))]
    return pa.table(
        {
            "id": ids,
            "class": ids,
            "arrival": ids,
            "role": ids,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
        },
        schema=table_schema(dim),
    )


def exact_recall(tbl, index, queries: np.ndarray, vectors: np.ndarray) -> float:
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    found = search_table(tbl, queries, 10, index)
    return float(
        np.mean([len({h["id"] for h in hits} & {f"i{j}" for j in truth}) / 10 for hits, truth in zip(found, exact)])
    )


ANN = {"index.ann_min_rows": 2000, "index.ann_partitions": 4, "index.ann_sub_vectors": 4, "index.ann_nprobes": 4}


@pytest.mark.parametrize("ann_type", ["IVF_PQ", "IVF_HNSW_SQ"])
def test_ann_index_from_the_row_threshold_keeps_recall(ws, params, ann_type):
    refine = 10 if ann_type == "IVF_PQ" else None  # PQ codes re-ranked exactly, as params.yaml says for IVF_PQ
    index = with_overrides(
        params, ANN | {"index.ann_type": ann_type, "index.recall_probes": 50, "index.ann_refine_factor": refine}
    ).index
    vectors = clustered(2000, 16, seed=0)
    rows = vector_rows(vectors)
    tbl = connect(ws).create_table("t", rows.slice(0, 1999), schema=rows.schema)
    assert ensure_ann_index(tbl, index) is None  # one row short: exact search
    assert ann_recall(tbl, index) is None  # nothing approximate to measure
    tbl.add(rows.slice(1999))
    assert ensure_ann_index(tbl, index) == ann_type and vector_indices(tbl)
    assert vector_metadata(tbl, ANN_TRAINED_ROWS) == "2000"

    assert exact_recall(tbl, index, clustered(20, 16, seed=1), vectors) >= 0.9
    # The build's own check, on stored vectors, agrees with brute force on the same probes.
    probes = vectors[[i * 2000 // 50 for i in range(50)]]
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    assert ann_recall(tbl, index) == pytest.approx(exact_recall(tbl, index, probes, vectors))


def test_an_index_under_its_recall_floor_fails_validation(ws, params):
    """An index tuned too coarsely (one of 16 partitions searched, 2 PQ codes, no refine) answers
    fast and wrong: the build's recall check measures it, and validation refuses the table."""
    coarse = with_overrides(
        params,
        {
            "index.ann_min_rows": 256,
            "index.ann_type": "IVF_PQ",
            "index.ann_partitions": 16,
            "index.ann_sub_vectors": 2,
            "index.ann_nprobes": 1,
            "index.ann_refine_factor": None,
            "index.ann_min_recall": 0.99,
        },
    ).index
    vectors = clustered(3000, 32, seed=3)
    tbl = connect(ws).create_table("coarse", vector_rows(vectors), schema=table_schema(32))
    assert ensure_ann_index(tbl, coarse) == "IVF_PQ"
    recall = ann_recall(tbl, coarse)
    assert recall is not None and recall < 0.9

    validation = IndexValidation("coarse", 3000, 3000, 3000, (), 1, 1, ann_recall=recall, min_recall=0.99)
    assert not validation.ok and validation.problems == [
        f"ANN recall@10 {recall:.3f} against exact search, under the floor 0.99 "
        "(index.ann_min_recall; the build tried ef up to index.ann_max_ef: raise it, or ann_nprobes)"
    ]


def test_catch_ups_train_the_index_past_the_threshold_and_retrain_it_as_the_table_grows(ws, params):
    index = with_overrides(params, ANN | {"index.ann_type": "IVF_HNSW_SQ", "index.ann_retrain_growth": 2.0}).index
    vectors = clustered(5000, 16, seed=4)
    tbl = connect(ws).create_table("grow", vector_rows(vectors[:1500]), schema=table_schema(16))
    assert not retune_ann_index(tbl, index) and not vector_indices(tbl)  # small: exact search

    tbl.add(vector_rows(vectors[1500:2500], offset=1500))  # crossed ann_min_rows: trained now
    assert retune_ann_index(tbl, index) and vector_metadata(tbl, ANN_TRAINED_ROWS) == "2500"
    tbl.add(vector_rows(vectors[2500:4000], offset=2500))  # 1.6x: optimize folds these in, no retrain
    assert not retune_ann_index(tbl, index) and vector_metadata(tbl, ANN_TRAINED_ROWS) == "2500"
    tbl.add(vector_rows(vectors[4000:], offset=4000))  # 2x the trained rows: retrained for the new size
    assert retune_ann_index(tbl, index) and vector_metadata(tbl, ANN_TRAINED_ROWS) == "5000"
    assert exact_recall(tbl, index, clustered(20, 16, seed=5), vectors) >= 0.9


def test_a_catch_up_makes_a_new_class_queryable_at_once(live_ws, params, params_file):
    common = ["--workspace", str(live_ws.root), "--params", str(params_file)]
    arrival = write_arrival(live_ws.root / "drop", "a1", ["fresh"], 5, seed=11)
    result = runner.invoke(app, ["ingest", str(arrival), "--json", *common], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    added = json.loads(result.stdout)["hot_add"]
    assert added["added"] == 5 and added["table"] == "embeddings_v1" and added["version"] == "1"

    fresh = next(r for r in Catalog.load(live_ws.catalog).records() if r.cls == "fresh")
    result = runner.invoke(app, ["query", str(live_ws.classes_dir / fresh.id), "--k", "1", "--json", *common])
    answer = json.loads(result.stdout)
    assert answer["model_version"] == "1" and answer["table"] == "embeddings_v1"
    assert answer["results"][0][0]["id"] == fresh.id and answer["results"][0][0]["class"] == "fresh"

    again = Promoter(live_ws, params.registry, params.index).catch_up()  # idempotent: nothing is missing any more
    assert again.added == 0 and connect(live_ws).open_table("embeddings_v1").count_rows() == 65


def test_a_champion_pointing_at_another_versions_table_is_refused(live_ws, params):
    registry = ModelRegistry(live_ws, params.registry)
    registry.set_tag("2", TABLE_TAG, table_name(params.index.table_prefix, 1))  # wrong table for v2
    registry.client.set_registered_model_alias(registry.name, CHAMPION, "2")
    live = LiveIndex(live_ws, params.registry, params.index, refresh_seconds=60)
    with pytest.raises(LivePairMismatch, match="written by model version 1"):
        live.refresh()


def test_a_table_without_a_model_version_mark_is_refused_everywhere(live_ws, params):
    """The (model, table) promise rests on the mark: a table that lacks it is never served,
    appended to, reused by a build, or promoted to."""
    db = connect(live_ws)
    rows = db.open_table("embeddings_v1").to_arrow()
    db.create_table(
        "embeddings_v1", rows.cast(table_schema(rows.schema.field("vector").type.list_size)), mode="overwrite"
    )
    assert written_by(db.open_table("embeddings_v1")) is None

    with pytest.raises(LivePairMismatch, match="carries no model-version mark"):
        LiveIndex(live_ws, params.registry, params.index, refresh_seconds=60).refresh()
    with pytest.raises(IndexBuildError, match="carries no model-version mark"):
        Promoter(live_ws, params.registry, params.index).catch_up()
    model_v1 = ModelRegistry(live_ws, params.registry).load_embedder("1")
    with pytest.raises(IndexBuildError, match="carries no model-version mark"):
        build_table(live_ws, params.index, "1", model_v1, Catalog.load(live_ws.catalog).records(), live="embeddings_v1")


@pytest.mark.parametrize("ann", [False, True])
def test_the_service_searches_many_vectors_in_one_query_with_the_same_answers_as_one_by_one(ws, params, ann):
    index = with_overrides(params, ANN | {"index.ann_type": "IVF_HNSW_SQ"}).index
    vectors = clustered(2000, 16, seed=6)
    tbl = connect(ws).create_table("many", vector_rows(vectors), schema=table_schema(16))
    if ann:
        ensure_ann_index(tbl, index)
    queries = clustered(7, 16, seed=7)
    loop = AsyncLoop()
    try:
        together = TableReader.open(ws, "many", loop, index).search(queries, 5)
    finally:
        loop.close()
    one_by_one = search_table(tbl, queries, 5, index)
    assert [[h["id"] for h in hits] for hits in together] == [[h["id"] for h in hits] for hits in one_by_one]
    assert np.allclose(
        [[h["distance"] for h in hits] for hits in together], [[h["distance"] for h in hits] for hits in one_by_one]
    )


def test_the_build_widens_the_hnsw_search_up_to_ann_max_ef_and_readers_use_the_ef_it_chose(ws, params):
    """tune_ef keeps the starting ef when it meets the recall floor, doubles it up to ann_max_ef when
    not (at a million crowded rows ef decides recall: bench/query.py), and records its choice on the
    table, where every reader takes it from. Here 8-bit scalar quantisation, not ef, caps recall on
    uniform vectors (0.98 at any ef), so a 0.999 floor is unreachable and the largest ef is kept."""
    index = with_overrides(
        params,
        ANN
        | {
            "index.ann_type": "IVF_HNSW_SQ",
            "index.ann_partitions": 1,
            "index.ann_ef": 10,
            "index.ann_max_ef": 80,
            "index.ann_min_recall": 0.9,
            "index.recall_probes": 100,
        },
    ).index
    rng = np.random.default_rng(8)
    vectors = rng.standard_normal((4000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    tbl = connect(ws).create_table("crowded", vector_rows(vectors), schema=table_schema(32))
    ensure_ann_index(tbl, index)

    ef, recall = tune_ef(tbl, index)
    assert ef == 10 and recall >= 0.9 and vector_metadata(tbl, ANN_EF) == "10"  # met at the start: kept

    strict = index.model_copy(update={"ann_min_recall": 0.999})
    ef, recall = tune_ef(tbl, strict)
    assert ef == 80 and recall < 0.999 and vector_metadata(tbl, ANN_EF) == "80"  # 10, 20, 40, 80: the cap
    assert ann_recall(tbl, index) == pytest.approx(recall)  # measured at the recorded ef
    loop = AsyncLoop()
    try:
        assert TableReader.open(ws, "crowded", loop, index).params.ann_ef == 80  # readers search as wide
    finally:
        loop.close()
    assert exact_recall(tbl, with_table_settings(tbl.schema, index), vectors[:20], vectors) >= 0.9


def test_a_catch_up_checks_only_the_images_past_the_tables_mark(live_ws, params):
    """The table records the catalog position it is complete up to; a catch-up compares only the
    images recorded since (what an arrival costs, not the history), then moves the mark. A table
    whose mark the catalog does not recognise is compared with the whole catalog once, then marked."""
    promoter = Promoter(live_ws, params.registry, params.index)
    tbl = connect(live_ws).open_table("embeddings_v1")
    catalog = Catalog.load(live_ws.catalog)
    assert vector_metadata(tbl, CATALOG_SEQ) == catalog.mark(60) and catalog.last_seq() == 60

    write_arrival(live_ws.inbox, "a1", ["n0"], 4, seed=9)
    ingest_inbox(live_ws, params.ingest)
    first = promoter.catch_up()
    assert (first.added, first.checked) == (4, 4)  # the 4 new images, not the 64 in the catalog
    tbl = connect(live_ws).open_table("embeddings_v1")
    assert vector_metadata(tbl, CATALOG_SEQ).startswith("64:") and tbl.count_rows() == 64
    nothing = promoter.catch_up()
    assert (nothing.added, nothing.checked) == (0, 0)

    # a mark this catalog does not recognise (other data was checked out since): compared whole once
    tbl.update_field_metadata({"path": "vector", "metadata": {CATALOG_SEQ: "64:0123456789abcdef"}})
    write_arrival(live_ws.inbox, "a2", ["n1"], 3, seed=10)
    ingest_inbox(live_ws, params.ingest)
    whole = promoter.catch_up()
    assert (whole.added, whole.checked) == (3, 67)
    assert vector_metadata(connect(live_ws).open_table("embeddings_v1"), CATALOG_SEQ).startswith("67:")
