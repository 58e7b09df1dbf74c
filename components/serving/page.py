"""The service's web page: what the model sees, for people. Read-only; same process, same live pair.

    GET /                    the page (static HTML + a little JavaScript, no data in it)
    GET /status              champion and challenger, the last gate verdict, the promotion log
    GET /status/heatmap.png  the forgetting heatmap of the champion's gate report
    GET /images/{id}         a thumbnail of a stored image: only ids present in the live table
    GET /classes             every class with the role its images take (train | unseen | pending), arrival and image count
    GET /classes/{name}      a sample of one class's stored images
    GET /random              a random stored image of the live table and its nearest neighbours
    GET /history             every version's headline metrics and forgetting, promotions, rollbacks, rejections
    GET /map                 the embedding map: a sample of the live table in 2-D, the challenger's beside it
    GET /progress            the running retrain's stage, epoch and loss (running: false when none runs)

A thumbnail is looked up by id in the live table first and read from the workspace's class
folder only then, so nothing a client sends ever becomes a path (../ and absolute ids find
no row and get a 404).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime.
import io
import random
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from components.config import IngestParams
from components.data.catalog import Catalog
from components.data.transforms import open_rgb
from components.evaluation.history import ModelHistory
from components.progress import NOT_RUNNING, RetrainProgress
from components.registry.version_history import history_stamp, version_history
from components.serving.live import LiveIndex, LivePair
from components.serving.stamped import StampedCache
from components.status import WorkspaceStatus, workspace_status
from components.vectors.projection import EmbeddingMap, embedding_map
from components.vectors.search import Hit

PAGE = Path(__file__).with_name("static") / "page.html"
THUMBNAIL_PIXELS = 160  # the longer side; the page shows them at 96 px (sharp on 1.5x screens)
SAMPLE = 12  # images shown per class


ERRORS = {
    400: "an upload is not an image mnemo accepts (the detail names the file and the reason)",
    413: "over a limit: body bytes, images per request, pixels per image or per request",
    404: "no such stored image, class, heatmap or challenger (the detail says which)",
    503: "no champion model yet, or the live pair is damaged (the detail names what): nothing to answer with",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error answers an endpoint gives: {"detail": "..."} (503 on /health: a status)."""
    detail = {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}
    health = {
        "type": "object",
        "properties": {"status": {"type": "string"}, "model_version": {"type": "null"}, "detail": {"type": "string"}},
    }
    return {
        code: {
            "description": ERRORS[code],
            "content": {"application/json": {"schema": {"anyOf": [detail, health]} if code == 503 else detail}},
        }
        for code in codes
    }


class MapPair(BaseModel):
    """GET /map: the champion's map and the challenger's for the same images (None: no challenger, `note` says why)."""

    champion: EmbeddingMap
    challenger: EmbeddingMap | None
    challenger_version: str | None
    note: str
    cached: bool = Field(description="both maps came from the cache (computed once per table version)")


def add_page(
    app: FastAPI,
    live: LiveIndex,
    current: Callable[[], LivePair],
    ingest: IngestParams,
    max_k: int,
    progress: Callable[[], RetrainProgress] | None = None,
) -> None:
    """The page and its read-only endpoints, on the service's app; `current` is the service's own
    "the pair to answer with, or a 503"; `progress` reads the running retrain (None: never shown)."""
    page = PAGE.read_text()
    histories: StampedCache[ModelHistory] = StampedCache()

    @app.get("/history", response_model=ModelHistory)
    def history() -> JSONResponse:
        """Every registered version, oldest first: unseen R@1, MAP@R, few-shot accuracy and the raw-pixel
        baseline, the gate's verdict, whether it was promoted or rolled back to, forgetting per arrival
        slice; and the promotion log. Read from MLflow once per change of the registry (cached)."""
        registry = live.registry
        value, hit = histories.get(history_stamp(registry), partial(version_history, registry))
        return JSONResponse(value.model_dump(mode="json"), headers={"X-Cache": "hit" if hit else "miss"})

    @app.get("/map", response_model=MapPair, responses=error_responses(503))
    def embedding_map_view() -> JSONResponse:
        """A fixed sample of the live table projected to 2-D (PCA), each point's id, class, arrival and
        role; the challenger's table's map of the same images beside it. Computed once per table version."""
        pair = current()
        own, hit = embedding_map(live.ws, pair.table_name)
        challenger, why = live.challenger_version()  # its table only: its model is not needed here
        other = None
        if challenger is not None and challenger.table:
            other, other_hit = embedding_map(live.ws, challenger.table, like=own)
            hit = hit and other_hit
        body = MapPair(
            champion=own,
            challenger=other,
            challenger_version=challenger.version if challenger else None,
            note=why,
            cached=hit,
        )
        return JSONResponse(body.model_dump(mode="json", by_alias=True), headers={"X-Cache": "hit" if hit else "miss"})

    asking = threading.Lock()

    @app.get("/progress", response_model=RetrainProgress)
    def retrain_progress() -> RetrainProgress:
        """The running retrain (or one that ended in the last two minutes): its stage, epoch i of n and
        the loss so far, from Prefect's flow-run state and the MLflow run's metrics; running false
        and nothing else when none runs."""
        if progress is None:
            return NOT_RUNNING
        with asking:  # one question at a time: without a Prefect server the first starts a temporary one
            return progress()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/status", response_model=WorkspaceStatus)
    def status() -> WorkspaceStatus:
        """Where things stand: champion and challenger (version, table, rows, what its table lacks or
        why it cannot answer, metrics), the last gate report (verdict and reasons), the promotion
        log (newest last), the catalog's counts."""
        return workspace_status(live.ws, live.registry, ingest)

    @app.get("/status/heatmap.png", responses={200: {"content": {"image/png": {}}}, **error_responses(404, 503)})
    def heatmap() -> Response:
        """The champion's forgetting heatmap (seen-class Recall@1 per arrival slice over versions)."""
        pair = current()
        png = live.registry.gate_heatmap(pair.version)
        if png is None:
            raise HTTPException(404, f"v{pair.version} has no forgetting heatmap (it was not promoted by a retrain)")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})

    @app.get("/images/{image_id:path}", responses={200: {"content": {"image/png": {}}}, **error_responses(404, 503)})
    def image(image_id: str) -> Response:
        """A PNG thumbnail of a stored image, by the id queries answer with."""
        pair = current()
        row = pair.row(image_id)
        root = live.ws.classes_dir.resolve()
        path = (root / row["id"]) if row else None
        # The id came from the table; still, only a regular file inside the class folder is read.
        if path is None or path.is_symlink() or not path.resolve().is_relative_to(root) or not path.is_file():
            raise HTTPException(404, f"no stored image {image_id!r} in the live table {pair.table_name}")
        thumb = open_rgb(path)
        thumb.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
        buf = io.BytesIO()
        thumb.save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/classes")
    def classes() -> JSONResponse:
        """Every class: the role its images take (train | unseen | pending), the arrival that brought it, its image count."""
        catalog = Catalog.load(live.ws.catalog)
        counts = catalog.class_counts()
        return JSONResponse(
            [
                {"class": name, "role": info["split"], "arrival": info["arrival"], "images": counts.get(name, 0)}
                for name, info in sorted(catalog.classes.items())
            ]
        )

    @app.get("/classes/{name:path}", responses=error_responses(404))
    def one_class(name: str) -> JSONResponse:
        """A sample of one class's stored images (evenly spread over them), with each image's role."""
        catalog = Catalog.load(live.ws.catalog)
        if name not in catalog.classes:
            raise HTTPException(404, f"no class {name!r} in the catalog")
        records = catalog.class_records(name)
        step = max(1, len(records) // SAMPLE)
        info = catalog.classes[name]
        return JSONResponse(
            {
                "class": name,
                "role": info["split"],
                "arrival": info["arrival"],
                "images": len(records),
                "sample": [{"id": r.id, "role": r.role} for r in records[::step][:SAMPLE]],
            }
        )

    @app.get("/random", responses=error_responses(404, 503))
    def random_query(k: Annotated[int, Query(ge=1, le=max_k)] = 8) -> JSONResponse:
        """A random stored image of the live table and its k nearest other images: the quickest look at quality."""
        pair = current()
        rows = pair.rows()
        if not rows:
            raise HTTPException(404, f"the live table {pair.table_name} is empty")
        row = pair.row_at(random.randrange(rows))
        [hits] = pair.nearest(np.asarray([row["vector"]], dtype=np.float32), k + 1)
        neighbours: list[Hit] = [h for h in hits if h["id"] != row["id"]][:k]
        return JSONResponse(
            {
                "model_version": pair.version,
                "table": pair.table_name,
                "query": {"id": row["id"], "class": row["class"]},
                "results": neighbours,
            },
            headers={"X-Model-Version": pair.version},
        )
