"""The query service over the live pair: the ASGI app through FastAPI's test client, and one
real uvicorn server on 127.0.0.1; real LanceDB and MLflow in tmp_path."""

from __future__ import annotations

import io
from datetime import datetime

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from components.config import with_overrides
from components.data.catalog import Catalog
from components.registry.mlflow_registry import CHAMPION, ModelRegistry
from components.serving.app import create_app
from components.serving.live import LiveIndex
from tests.integration.live_workspace import noise_png, serving

LIMITS = {
    "serve.max_upload_bytes": 100_000,
    "serve.max_upload_pixels": 1_000_000,
    "serve.max_images": 4,
    "serve.max_k": 20,
}


@pytest.fixture()
def small(params):
    return with_overrides(params, LIMITS)


def make_app(ws, params):
    live = LiveIndex(
        ws, params.registry, params.index, refresh_seconds=params.serve.refresh_seconds, runtime=params.serve.runtime
    )
    return create_app(live, params.serve, params.ingest)


def stored(ws, n: int) -> list:
    return Catalog.load(ws.catalog).records()[:n]


def upload(*payloads: bytes) -> list:
    return [("image", (f"q{i}.png", data, "image/png")) for i, data in enumerate(payloads)]


def png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 255).save(buf, format="PNG")
    return buf.getvalue()


def test_every_answer_names_the_model_version_that_produced_it(live_ws, small):
    first, second = stored(live_ws, 2)
    with TestClient(make_app(live_ws, small)) as client:
        r = client.post(
            "/query",
            files=upload(*((live_ws.classes_dir / x.id).read_bytes() for x in (first, second))),
            data={"k": "3"},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == "1" and body["table"] == "embeddings_v1" and r.headers["X-Model-Version"] == "1"
        assert [hits[0]["id"] for hits in body["results"]] == [first.id, second.id]
        assert all(len(hits) == 3 for hits in body["results"]), body

        health = client.get("/health")
        assert health.status_code == 200 and health.json() == {
            "status": "ok",
            "model_version": "1",
            "table": "embeddings_v1",
        }
        live = client.get("/live").json()
        assert (live["model_version"], live["table"], live["rows"]) == ("1", "embeddings_v1", 60)
        assert datetime.fromisoformat(live["since"]).tzinfo is not None
        assert live["runtime"] == small.serve.runtime == "onnxruntime"  # the shipped runtime, not a fallback


def test_bad_uploads_get_a_clear_4xx_and_the_service_keeps_answering(live_ws, small):
    good = (live_ws.classes_dir / stored(live_ws, 1)[0].id).read_bytes()
    with TestClient(make_app(live_ws, small)) as client:

        def status(files: list, **data: str) -> tuple[int, str]:
            r = client.post("/query", files=files, data=data)
            return r.status_code, str(r.json()["detail"])

        code, detail = status(upload(b"GIF89a? certainly not"))
        assert code == 400 and "q0.png" in detail and "not an image" in detail
        code, detail = status(upload(good[: len(good) // 2]))
        assert code == 400 and "truncated" in detail
        code, detail = status(upload(b""))
        assert code == 400 and "empty" in detail
        code, detail = status(upload(png((2000, 1000))))  # a few kB of PNG, 2 megapixels
        assert code == 413 and "pixel limit" in detail
        code, detail = status(upload(noise_png(np.random.default_rng(0), size=200)))  # ~120 kB of noise
        assert code == 413 and "byte limit" in detail
        code, detail = status(upload(*[good] * 5))
        assert code == 413 and "over the limit of 4" in detail
        assert status(upload(good), k="0")[0] == 422
        assert status(upload(good), k="21")[0] == 422
        assert status(upload(good), k="many")[0] == 422
        assert client.post("/query", data={"k": "3"}).status_code == 422  # no image at all

        assert client.get("/health").status_code == 200
        assert client.post("/query", files=upload(good)).json()["model_version"] == "1"


def test_a_request_over_the_total_pixel_budget_is_refused_before_anything_is_decoded(live_ws, small):
    params = with_overrides(small, {"serve.max_request_pixels": 1_500_000})
    with TestClient(make_app(live_ws, params)) as client:
        # Each image is under the per-image limit (1 M pixels); together they are 1.6 M.
        r = client.post("/query", files=upload(png((1000, 800)), png((1000, 800))))
        assert r.status_code == 413
        assert r.json()["detail"].startswith("1600000 pixels in one request, over the 1500000-pixel budget")
        assert client.post("/query", files=upload(png((1000, 800)))).status_code == 200  # one alone fits


def test_each_upload_is_decoded_once(live_ws, small, monkeypatch):
    from PIL import Image as PILImage

    decoders = []
    real = PILImage._getdecoder  # called once per decoded tile: a PNG is one tile

    def counted(*args, **kwargs):
        decoders.append(args[0])
        return real(*args, **kwargs)

    good = (live_ws.classes_dir / stored(live_ws, 1)[0].id).read_bytes()
    with TestClient(make_app(live_ws, small)) as client:
        client.post("/query", files=upload(good))  # the pair is resolved and warm
        monkeypatch.setattr(PILImage, "_getdecoder", counted)
        assert client.post("/query", files=upload(good, good)).status_code == 200
    assert len(decoders) == 2


def test_no_champion_is_a_503_not_a_crash(ws, small):
    with TestClient(make_app(ws, small)) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "no_champion", "model_version": None}
        r = client.post("/query", files=upload(noise_png(np.random.default_rng(1))))
        assert r.status_code == 503 and "no champion" in r.json()["detail"]


def test_real_http_follows_a_promotion_and_refuses_a_chunked_oversized_body(live_ws, small):
    query = live_ws.classes_dir / stored(live_ws, 1)[0].id
    with serving(make_app(live_ws, small)) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/query", files=upload(query.read_bytes())).json()["model_version"] == "1"

        registry = ModelRegistry(live_ws, small.registry)
        registry.client.set_registered_model_alias(registry.name, CHAMPION, "2")
        assert client.post("/live/refresh").json()["model_version"] == "2"  # on demand, not waiting for the interval
        r = client.post("/query", files=upload(query.read_bytes()))
        assert (r.json()["model_version"], r.json()["table"], r.headers["X-Model-Version"]) == (
            "2",
            "embeddings_v2",
            "2",
        )

        def chunked():  # no Content-Length: the limit must count what arrives
            yield b'--xx\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n\r\n'
            for _ in range(20):
                yield b"\0" * 10_000
            yield b"\r\n--xx--\r\n"

        r = client.post("/query", content=chunked(), headers={"content-type": "multipart/form-data; boundary=xx"})
        assert r.status_code == 413 and "byte limit" in r.json()["detail"]
        assert client.get("/health").json()["status"] == "ok"
