"""A tiny live workspace for the index, service and reliability tests: one arrival of noise
images, two registered versions with their validated tables, champion v1.

Built once per test session (registering a model costs seconds) and copied per test.
"""

from __future__ import annotations

import io
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image

from components.config import Params
from components.data.ingest import ingest_arrival
from components.data.transforms import open_rgb
from components.modeling.embedder import build_embedder, embed_images
from components.registry.mlflow_registry import CHAMPION, SMOKE_TAG, TABLE_TAG, VERDICT_TAG, ModelRegistry
from components.registry.promotion import Promoter
from components.vectors.search import Hit
from components.vectors.tables import connect
from components.workspace import Workspace

CLASSES = [f"c{i}" for i in range(6)]
PER_CLASS = 10


def noise_png(rng: np.random.Generator, size: int = 32) -> bytes:
    """A distinct random RGB image: every stored image is its own nearest neighbour."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_arrival(inbox: Path, name: str, classes: list[str], per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for cls in classes:
        (inbox / name / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (inbox / name / cls / f"{i}.png").write_bytes(noise_png(rng))
    return inbox / name


def register_random(ws: Workspace, params: Params, seed: int, *, gated: bool = True) -> str:
    """A registered version whose (untrained) model differs from every other seed's; `gated`:
    with the passed gate verdict and smoke test the retrain flow records on a candidate it promotes."""
    torch.manual_seed(seed)
    model = build_embedder(params.model)
    tags = {VERDICT_TAG: "promote", SMOKE_TAG: "passed"} if gated else {}
    info = ModelRegistry(ws, params.registry).log_candidate(
        model, params={"seed": seed}, metrics={}, epoch_metrics={}, arrivals=["a0"], tags=tags
    )
    return info.version


def build_template(ws: Workspace, params: Params) -> None:
    ingest_arrival(write_arrival(ws.root / "arrivals", "a0", CLASSES, PER_CLASS, seed=0), ws, params.ingest)
    registry = ModelRegistry(ws, params.registry)
    for seed in (1, 2):
        version = register_random(ws, params, seed)
        built = Promoter(ws, params.registry, params.index).reindex(version)
        registry.set_tag(version, TABLE_TAG, built.table)
        if version == "1":  # the first champion, set directly: the promotion log is not under test here
            registry.client.set_registered_model_alias(registry.name, CHAMPION, version)


def reference(
    ws: Workspace, params: Params, version: str, images: list[bytes]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A version's stored vectors by id, and its model's embeddings of the query images."""
    table = connect(ws).open_table(f"embeddings_v{version}").to_arrow()
    vectors = dict(zip(table["id"].to_pylist(), np.asarray(table["vector"].to_pylist(), dtype=np.float32)))
    model = ModelRegistry(ws, params.registry).load_embedder(version)
    return vectors, embed_images(model, [open_rgb(data) for data in images])


def assert_one_version(
    version: str,
    table: str,
    hits: list[Hit],
    query: int,
    query_id: str,
    expected: dict[str, tuple[dict[str, np.ndarray], np.ndarray]],
) -> None:
    """An answer to query image `query` (stored as `query_id`) came wholly from the version it names.

    Every distance must be that version's model against that version's table (`reference`); a
    mixed pair (one version's model, the other's table) gives other numbers.
    """
    assert table == f"embeddings_v{version}"
    vectors, queries = expected[version]
    assert hits[0]["id"] == query_id
    for hit in hits:
        assert abs(hit["distance"] - (1.0 - float(queries[query] @ vectors[hit["id"]]))) < 1e-4


def copy_workspace(template: Path, root: Path) -> None:
    """The template's state under a new root; model artifacts stay in the template, linked in (a
    copy per test would cost ~90 MB): mnemo rebases the copied store onto <root>/mlartifacts."""
    shutil.copytree(template, root, ignore=shutil.ignore_patterns("mlartifacts"))
    (root / "mlartifacts").symlink_to(template / "mlartifacts", target_is_directory=True)


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """The app behind a real uvicorn server on a free 127.0.0.1 port; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
