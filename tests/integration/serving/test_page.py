"""The web page's read-only endpoints and the API key: real LanceDB and MLflow in tmp_path,
the ASGI app through FastAPI's test client (the page in a browser: tests/browser)."""

from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from components.data.catalog import Catalog
from components.registry.promotion import Promoter
from components.serving.app import create_app
from components.serving.live import LiveIndex


def make_app(ws, params, api_key=None):
    live = LiveIndex(ws, params.registry, params.index, refresh_seconds=params.serve.refresh_seconds)
    return create_app(live, params.serve, params.ingest, api_key=api_key)


def test_thumbnails_are_served_only_for_ids_in_the_live_table(live_ws, params):
    record = Catalog.load(live_ws.catalog).records()[0]
    secret = live_ws.root / "secret.png"  # a real image outside the class folder
    Image.new("RGB", (8, 8)).save(secret)
    with TestClient(make_app(live_ws, params)) as client:
        r = client.get(f"/images/{record.id}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size[0] > 0

        for probe in (
            "../secret.png",
            f"{record.cls}/../../secret.png",
            str(secret),  # absolute
            "%2e%2e/secret.png",
            "../../../../etc/passwd",
            "c0/nothing.png",
            "x' OR '1'='1",
        ):
            r = client.get(f"/images/{probe}")
            assert r.status_code == 404 and r.headers["content-type"] == "application/json", (probe, r.status_code)


def test_an_image_on_disk_but_not_in_the_live_table_is_not_served(live_ws, params):
    record = Catalog.load(live_ws.catalog).records()[0]
    extra = (live_ws.classes_dir / record.cls / "not-indexed.png").resolve()
    Image.new("RGB", (8, 8)).save(extra)
    with TestClient(make_app(live_ws, params)) as client:
        assert client.get(f"/images/{record.cls}/not-indexed.png").status_code == 404


def test_status_classes_and_random_query(live_ws, params):
    Promoter(live_ws, params.registry, params.index).promote("2", reason="page test")
    with TestClient(make_app(live_ws, params)) as client:
        status = client.get("/status").json()
        assert status["champion"]["version"] == "2" and status["champion"]["table_rows"] == 60
        assert [(e["to"], e["reason"]) for e in status["promotions"]] == [("2", "page test")]

        classes = client.get("/classes").json()
        assert [c["class"] for c in classes] == [f"c{i}" for i in range(6)]
        assert all(c["images"] == 10 and c["role"] in ("train", "unseen") for c in classes)
        one = client.get("/classes/c3").json()
        assert one["class"] == "c3" and 0 < len(one["sample"]) <= 12
        assert all(s["id"].startswith("c3/") for s in one["sample"])
        assert client.get("/classes/nope").status_code == 404

        r = client.get("/random", params={"k": 4})
        body = r.json()
        assert r.status_code == 200 and body["model_version"] == "2" and len(body["results"]) == 4
        assert body["query"]["id"] not in [h["id"] for h in body["results"]]  # its neighbours, not itself
        assert client.get("/status/heatmap.png").status_code == 404  # promoted by hand: no gate report

        page = client.get("/")
        assert page.status_code == 200 and "<title>mnemo" in page.text


@pytest.mark.parametrize("path", ["/query", "/live", "/status", "/classes", "/random", "/images/c0/x.png", "/docs"])
def test_with_an_api_key_every_endpoint_but_health_needs_it(live_ws, params, path):
    key = "s3cret-key"
    with TestClient(make_app(live_ws, params, api_key=key)) as client:
        method = client.post if path == "/query" else client.get
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {key}"}):
            r = method(path, headers=headers)
            assert r.status_code == 401, (path, headers, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer" and key not in r.text
        assert client.get("/health").status_code == 200  # probes need no key
        assert client.get("/").status_code == 200  # the page's HTML holds no data; it asks for the key
        good = method(path, headers={"Authorization": f"Bearer {key}"})
        assert good.status_code != 401
