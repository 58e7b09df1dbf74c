"""The page's views of change, through the service: history, embedding map, champion against challenger,
and the (absent) retrain in progress, on the live workspace (v1 champion, v2 with its own table)."""

from __future__ import annotations

import numpy as np
from fastapi.testclient import TestClient

from components.registry.mlflow_registry import VERDICT_TAG, ModelRegistry
from components.registry.promotion import Promoter
from components.serving.app import create_app
from components.serving.live import LiveIndex
from components.vectors.tables import connect
from tests.integration.live_workspace import register_random


def client_for(ws, params, **kwargs) -> TestClient:
    live = LiveIndex(ws, params.registry, params.index, refresh_seconds=params.serve.refresh_seconds)
    return TestClient(create_app(live, params.serve, params.ingest, refresh_in_background=False, **kwargs))


def test_history_marks_promotions_rollbacks_and_rejections_and_is_cached(live_ws, params):
    promoter = Promoter(live_ws, params.registry, params.index)
    promoter.promote("2", reason="test: v2 is better")
    promoter.rollback(reason="test: v2 misbehaves")
    registry = ModelRegistry(live_ws, params.registry)
    rejected = register_random(live_ws, params, seed=3, gated=False)  # registered; the gate has not ruled yet
    with client_for(live_ws, params) as client:
        first = client.get("/history")
        assert first.status_code == 200 and first.headers["x-cache"] == "miss"
        assert first.json()["versions"][-1]["verdict"] is None
        assert client.get("/history").headers["x-cache"] == "hit"  # nothing moved: not read again
        registry.set_tag(rejected, VERDICT_TAG, "reject")  # the gate rules: the history is read again
        ruled = client.get("/history")
        assert ruled.headers["x-cache"] == "miss"
        body = ruled.json()
        versions = {v["version"]: v for v in body["versions"]}
        assert list(versions) == ["1", "2", rejected]
        assert versions["2"]["promoted"] and not versions["2"]["champion"]
        assert versions["1"]["rolled_back_to"] and versions["1"]["champion"]
        assert versions[rejected]["verdict"] == "reject" and not versions[rejected]["promoted"]
        assert [(e["kind"], e["to_version"]) for e in body["events"]] == [("promote", "2"), ("rollback", "1")]
        Promoter(live_ws, params.registry, params.index).promote("2", reason="test: again")
        again = client.get("/history")
        assert again.headers["x-cache"] == "miss"
        assert {v["version"]: v for v in again.json()["versions"]}["2"]["champion"]


def test_the_map_projects_the_same_images_for_champion_and_challenger_once_per_table_version(live_ws, params):
    with client_for(live_ws, params) as client:
        first = client.get("/map")
        assert first.status_code == 200, first.text
        body = first.json()
        assert not body["cached"] and body["challenger_version"] == "2"
        champion, challenger = body["champion"], body["challenger"]
        assert champion["table"] == "embeddings_v1" and challenger["table"] == "embeddings_v2"
        assert len(champion["points"]) == champion["rows"] == 60  # a sample of at most 2,000: all of them here
        assert [p["id"] for p in challenger["points"]] == [p["id"] for p in champion["points"]]
        assert {p["class"] for p in champion["points"]} == {f"c{i}" for i in range(6)}
        assert champion["method"] == "pca" and 0 < sum(champion["explained"]) <= 1.0
        # Two models place the same images differently.
        a = np.array([[p["x"], p["y"]] for p in champion["points"]])
        b = np.array([[p["x"], p["y"]] for p in challenger["points"]])
        assert not np.allclose(a, b)
        second = client.get("/map")
        assert second.json()["cached"] and second.json()["champion"] == champion


def test_champion_against_challenger_marks_what_a_promotion_would_change(live_ws, params):
    with client_for(live_ws, params) as client:
        r = client.get("/compare/random", params={"k": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["champion"]["version"] == "1" and body["challenger"]["version"] == "2"
        query = body["query"]["id"]
        # What each table says, read directly: the marks must agree with it.
        tables = {v: connect(live_ws).open_table(f"embeddings_v{v}").to_arrow() for v in ("1", "2")}
        vectors = {
            v: dict(zip(t["id"].to_pylist(), np.asarray(t["vector"].to_pylist(), dtype=np.float32)))
            for v, t in tables.items()
        }
        expected = {}
        for v in ("1", "2"):
            ids = [i for i in vectors[v] if i != query]
            d = [1 - float(vectors[v][query] @ vectors[v][i]) for i in ids]
            expected[v] = [ids[j] for j in np.argsort(d, kind="stable")[:5]]
        assert [h["id"] for h in body["champion"]["hits"]] == expected["1"]
        assert [h["id"] for h in body["challenger"]["hits"]] == expected["2"]
        for h in body["challenger"]["hits"]:
            assert h["mark"] == ("entered" if h["id"] not in expected["1"] else h["mark"])
        for h in body["champion"]["hits"]:
            assert (h["mark"] == "left") == (h["id"] not in expected["2"])
        churn = body["churn"]
        assert churn["probes"] == 60 and churn["k"] == 5 and 0 < churn["changed_share"] <= 1
        assert body["verdict"] == "promote"


def test_without_a_challenger_compare_says_so_and_progress_shows_nothing(live_ws, params):
    registry = ModelRegistry(live_ws, params.registry)
    registry.client.delete_model_version_tag(registry.name, "2", "index_table")
    with client_for(live_ws, params) as client:
        r = client.get("/compare/random")
        assert r.status_code == 404 and "no challenger" in r.json()["detail"]
        m = client.get("/map").json()
        assert m["challenger"] is None and "no challenger" in m["note"]
        assert client.get("/progress").json()["running"] is False


def test_history_map_and_progress_take_nothing_from_the_client(live_ws, params):
    """Nothing a client sends can become a path: these endpoints take no parameter and no body."""
    openapi = client_for(live_ws, params).app.openapi()
    for path in ("/history", "/map", "/progress"):
        operation = openapi["paths"][path]["get"]
        assert not operation.get("parameters") and "requestBody" not in operation
        assert "application/json" in operation["responses"]["200"]["content"]


def test_an_uploaded_image_is_searched_by_each_model_in_its_own_table(live_ws, params):
    from components.data.catalog import Catalog

    record = Catalog.load(live_ws.catalog).records()[7]
    data = (live_ws.classes_dir / record.id).read_bytes()
    with client_for(live_ws, params) as client:
        r = client.post("/compare", files=[("image", ("mine.png", data))], data={"k": "4"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["query"] == {"upload": "mine.png"} and body["k"] == 4
        # Each model embeds the upload and finds the stored image itself first, in its own table.
        for side, version in (("champion", "1"), ("challenger", "2")):
            assert body[side]["table"] == f"embeddings_v{version}"
            assert body[side]["hits"][0]["id"] == record.id and body[side]["hits"][0]["distance"] < 1e-3
        assert body["champion"]["hits"][0]["mark"] == "same"
        bad = client.post("/compare", files=[("image", ("x.png", b"not an image"))])
        assert bad.status_code == 400 and "x.png" in bad.json()["detail"]
