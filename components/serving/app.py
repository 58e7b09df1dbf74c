"""The query service: FastAPI over the live pair, hot-swapped when the champion alias moves.

    POST /query         multipart: one or more `image` files, form field `k` -> neighbours per image
    GET  /health        200 with the model version once a champion is live, 503 before (or while it is damaged)
    GET  /live          the live pair: model version, table, rows, since when, what runs the model
    POST /live/refresh  re-resolve the champion alias now (e.g. right after `mnemo promote`)
    GET  /              the web page (search, status, browse; page.py has its endpoints)

With MNEMO_API_KEY set (`mnemo serve` passes it as api_key), every endpoint but /health
needs `Authorization: Bearer <key>`.

Every answer names the model version that produced it (body and X-Model-Version header),
from the one pair the request took. A damaged live pair (live.DamagedPair: its table missing
or cut short, its model's artifacts gone) is a 503 naming what is damaged, on every endpoint
that needs the pair. Bad uploads get a 4xx that says why; the limits
(bytes per request, pixels per image) are checked before an image is decoded.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at
# runtime, and they close over create_app's limits.
import asyncio
import hmac
import io
import json
import logging
import random
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError

from components.config import IngestParams, ServeParams
from components.data.validation import decode_image
from components.progress import RetrainProgress
from components.registry.mlflow_registry import VERDICT_TAG
from components.serving.batching import QueryBatcher
from components.serving.compare import Churn, Comparison, churn, compare, without
from components.serving.live import DamagedPair, LiveIndex, LivePair, NoChampionError
from components.serving.page import add_page, error_responses
from components.serving.stamped import StampedCache
from components.vectors.search import Hit

log = logging.getLogger(__name__)

VERSION_HEADER = "X-Model-Version"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Answers 413 once a request body passes `limit` bytes, counting what arrives (chunked
    uploads included), so an oversized upload is never buffered whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        received = 0
        over = False

        async def counted() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    over = True
                    raise _BodyTooLarge
            return message

        async def guarded(message: Message) -> None:
            if not over:  # the app's own reply to a body cut short is replaced by the 413 below
                await send(message)

        try:
            await self.app(scope, counted, guarded)
        except _BodyTooLarge:
            pass
        if over:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        await _send_detail(send, 413, f"request body is over the {self.limit}-byte limit (serve.max_upload_bytes)")


async def _send_detail(send: Send, status: int, detail: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """A {"detail": ...} JSON answer sent from ASGI middleware, before the app has seen the request."""
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


INLINE_DECODE_PIXELS = 512 * 512  # a request's images up to this are decoded on the event loop itself
OPEN_PATHS = frozenset({"/health", "/"})  # the page itself is static HTML: it holds no data


class ApiKey:
    """With a key configured, every request but /health and the page's HTML needs
    `Authorization: Bearer <key>` (compared in constant time); others get a 401 before anything runs."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self._key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key):
            await self.app(scope, receive, send)
            return
        await _send_detail(
            send,
            401,
            "this service needs its API key: Authorization: Bearer <MNEMO_API_KEY>",
            ((b"www-authenticate", b"Bearer"),),
        )


def _pixels(data: bytes, name: str, limits: IngestParams) -> int:
    """width x height from the header alone (0 for what is no image), or a 413 when over the per-image limit."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:  # the header only: no pixels decoded yet
                width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise HTTPException(413, f"{name}: image dimensions are too large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        width = height = 0  # not an image at all: decode_image says so
    if width * height > limits.max_pixels:
        raise HTTPException(
            413,
            f"{name}: {width}x{height} = {width * height} pixels, over the "
            f"{limits.max_pixels}-pixel limit (serve.max_upload_pixels)",
        )
    return width * height


def _decode(data: bytes, name: str, limits: IngestParams) -> Image.Image:
    """An uploaded image as RGB, or an HTTPException that says what is wrong with it."""
    image, reason = decode_image(data, limits)  # ingest's own checks (format, mode, size) and the one decode
    if image is None:
        raise HTTPException(400, f"{name}: {reason}")
    return image


def _live_payload(pair: LivePair) -> dict[str, Any]:
    return {
        "model_version": pair.version,
        "table": pair.table_name,
        "rows": pair.rows(),
        "older_rows": pair.older_rows(),  # still the older compatible model's: what its backfill has left
        "since": pair.since.isoformat(timespec="seconds"),
        "runtime": pair.forward.runtime,  # what runs the model (serve.runtime; PyTorch where an export was refused)
    }


def _answer(pair: LivePair, payload: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(payload, status_code=status, headers={VERSION_HEADER: pair.version})


def create_app(
    live: LiveIndex,
    serve: ServeParams,
    ingest: IngestParams,
    *,
    refresh_in_background: bool = True,
    api_key: str | None = None,
    progress: Callable[[], RetrainProgress] | None = None,
) -> FastAPI:
    """The service over `live` and its web page; it resolves the pair at start-up and (by default)
    every refresh_seconds. With `api_key`, every endpoint but /health requires it."""
    limits = ingest.model_copy(update={"max_file_bytes": serve.max_upload_bytes, "max_pixels": serve.max_upload_pixels})

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            live.refresh()
        except DamagedPair as exc:  # /health and every answer say so; the refresher retries
            log.warning("no live pair at start-up: %s", live.ws.redact(str(exc)))
        except Exception:  # no registry yet: /health says so, the refresher retries
            log.exception("no live pair at start-up")
        if refresh_in_background:
            live.start()
        try:
            yield
        finally:
            await batcher.close()
            live.stop()

    batcher: QueryBatcher[LivePair] = QueryBatcher(
        LivePair.embed, LivePair.search, wait_ms=serve.batch_wait_ms, max_batch=serve.max_batch
    )
    app = FastAPI(title="mnemo query service", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=serve.max_upload_bytes)
    if api_key:
        app.add_middleware(ApiKey, key=api_key)  # added last: outermost, so a refused request is never read

    @app.exception_handler(DamagedPair)
    async def damaged(_: Request, exc: DamagedPair) -> JSONResponse:
        """The one answer to a damaged live pair, wherever it was found (opening it, or mid-read)."""
        return JSONResponse({"detail": live.ws.redact(str(exc))}, status_code=503)

    def current() -> LivePair:
        try:
            return live.current()
        except NoChampionError as exc:
            raise HTTPException(503, str(exc)) from None

    add_page(app, live, current, ingest, serve.max_k, progress)
    churns: StampedCache[Churn] = StampedCache()

    async def _read_and_decode(image: list[UploadFile]) -> list[Image.Image]:
        """The uploads as RGB images, checked against every limit before any pixel is decoded."""
        if len(image) > serve.max_images:
            raise HTTPException(413, f"{len(image)} images in one request, over the limit of {serve.max_images}")
        uploads = [(upload.filename or f"image {i}", await upload.read()) for i, upload in enumerate(image)]
        total = sum(_pixels(data, name, limits) for name, data in uploads)  # headers only: nothing decoded yet
        if total > serve.max_request_pixels:
            raise HTTPException(
                413,
                f"{total} pixels in one request, over the {serve.max_request_pixels}-pixel budget "
                "(serve.max_request_pixels); send fewer or smaller images",
            )
        decode = lambda: [_decode(data, name, limits) for name, data in uploads]  # noqa: E731
        # Small images decode in well under a millisecond: a thread hop would cost more than it saves.
        return decode() if total <= INLINE_DECODE_PIXELS else await asyncio.to_thread(decode)

    @app.post("/query", responses=error_responses(400, 413, 503))
    async def query(
        image: Annotated[list[UploadFile], File(min_length=1, description="one or more image files")],
        k: Annotated[int, Form(ge=1, le=serve.max_k, description="neighbours per image")] = 5,
    ) -> JSONResponse:
        """Nearest stored images for each uploaded image, from one (model, table) pair.

        The forward runs off the event loop (and so does decoding, but for small images); the forward
        and the search are shared with concurrent requests (serve.batch_wait_ms, serve.max_batch).
        """
        with batcher.coming():  # concurrent requests' batch may wait (batch_wait_ms) for this one
            decoded = await _read_and_decode(image)
            # Taken once: this request's model and table come from this one version.
            pair = live.pair
            if pair is None:  # before the first champion: resolving it calls the registry
                pair = await asyncio.to_thread(current)
        results = await batcher.query(pair, decoded, k)
        return _answer(pair, {"model_version": pair.version, "table": pair.table_name, "results": results})

    def challenger_of(pair: LivePair) -> LivePair:
        challenger, why = live.challenger()
        if challenger is None:
            raise HTTPException(404, why)
        return challenger

    def compared(
        pair: LivePair, challenger: LivePair, hits: tuple[list[Hit], list[Hit]], query: dict[str, str], k: int
    ) -> JSONResponse:
        stamp = (pair.table_name, pair.rows(), challenger.table_name, challenger.rows(), k)
        churned, _ = churns.get(stamp, lambda: churn(pair, challenger, k))
        info = live.registry.get(challenger.version, with_metrics=False)
        body = compare(
            pair,
            challenger,
            *hits,
            query,
            k,
            churned,
            live.registry.gate_report(challenger.version),
            info.tags.get(VERDICT_TAG),
        )
        return _answer(pair, body.model_dump(mode="json", by_alias=True))

    @app.post("/compare", response_model=Comparison, responses=error_responses(400, 404, 413, 503))
    async def compare_upload(
        image: Annotated[UploadFile, File(description="one image file")],
        k: Annotated[int, Form(ge=1, le=serve.max_k, description="neighbours per model")] = 8,
    ) -> JSONResponse:
        """The champion's and the challenger's top-k for one uploaded image, each model searching its own
        table, every hit marked same, moved, entered or left; the share of changed neighbours over a fixed
        probe set; the gate's verdict on the challenger."""
        [decoded] = await _read_and_decode([image])
        pair = await asyncio.to_thread(current)
        challenger = await asyncio.to_thread(challenger_of, pair)
        [a] = await asyncio.to_thread(pair.query, [decoded], k)
        [b] = await asyncio.to_thread(challenger.query, [decoded], k)
        name = image.filename or "upload"
        return await asyncio.to_thread(compared, pair, challenger, (a, b), {"upload": name}, k)

    @app.get("/compare/random", response_model=Comparison, responses=error_responses(404, 503))
    def compare_random(k: Annotated[int, Query(ge=1, le=serve.max_k)] = 8) -> JSONResponse:
        """The same for a random stored image, each model searching by the image's own vector in its own
        table (the image itself left out of both)."""
        pair = current()
        challenger = challenger_of(pair)
        rows = pair.rows()
        if not rows:
            raise HTTPException(404, f"the live table {pair.table_name} is empty")
        row = pair.row_at(random.randrange(rows))
        theirs = challenger.row(row["id"])
        if theirs is None:
            raise HTTPException(404, f"{row['id']} is not in the challenger's table {challenger.table_name} yet")
        [a] = pair.nearest(np.asarray([row["vector"]], dtype=np.float32), k + 1)
        [b] = challenger.nearest(np.asarray([theirs["vector"]], dtype=np.float32), k + 1)
        hits = (without(a, row["id"], k), without(b, row["id"], k))
        return compared(pair, challenger, hits, {"id": row["id"], "class": row["class"]}, k)

    @app.get("/health", responses=error_responses(503))
    def health() -> JSONResponse:
        pair = live.pair
        if pair is None and live.damage is not None:
            body = {"status": "damaged", "model_version": None, "detail": live.ws.redact(live.damage)}
            return JSONResponse(body, status_code=503)
        if pair is None:
            return JSONResponse({"status": "no_champion", "model_version": None}, status_code=503)
        return _answer(pair, {"status": "ok", "model_version": pair.version, "table": pair.table_name})

    @app.get("/live", responses=error_responses(503))
    def live_pair() -> JSONResponse:
        pair = current()
        return _answer(pair, _live_payload(pair))

    @app.post("/live/refresh", responses=error_responses(503))
    def refresh() -> JSONResponse:
        live.refresh()
        pair = current()
        return _answer(pair, _live_payload(pair))

    return app
