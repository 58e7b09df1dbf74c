"""Shared fixtures: the real params.yaml, shrunk for tests; a temp workspace; tiny images."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import pytest
from PIL import Image

# Prefect reads its home at import: give the whole test session a private one.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="mnemo-prefect-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from components.config import Params, load_params, with_overrides
from components.workspace import resolve_workspace

REPO = Path(__file__).resolve().parents[1]
PARAMS_FILE = REPO / "params.yaml"
OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot" / "images_background_small1.zip"

TINY = {
    "demo.base_classes": 8,
    "demo.classes_per_arrival": 4,
    "demo.images_per_class": 6,
    "demo.image_size": 32,
    "demo.arrivals": 1,
    "model.image_size": 32,
    "model.embedding_dim": 16,
    "train.epochs": 1,
    "train.batch_size": 16,
    "train.m_per_class": 2,
    "train.device": "cpu",
    "evaluate.batch_size": 32,
    # One epoch on six images per class need not beat raw pixels: these tests are about the pipeline;
    # the pixel check has its own (tests/unit/evaluation/test_evaluate.py, test_gate_never_promotes_a_model_that_loses_to_raw_pixels).
    "gate.min_margin_over_pixels": -1.0,
}


@pytest.fixture(autouse=True)
def isolated_mlflow(monkeypatch):
    """No test sees another's MLflow URIs (mlflow.set_tracking_uri exports them to os.environ)."""
    import mlflow

    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MNEMO_WORKSPACE", "MNEMO_LANCEDB_URI"):
        monkeypatch.delenv(key, raising=False)
    yield
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


@pytest.fixture(scope="session")
def repo_params() -> Params:
    return load_params(PARAMS_FILE)


@pytest.fixture()
def params(repo_params: Params, tmp_path: Path) -> Params:
    """The repository's params.yaml, shrunk to tiny data and one CPU epoch, in tmp_path."""
    return with_overrides(repo_params, TINY | {"paths.workspace": str(tmp_path / "ws")})


@pytest.fixture()
def ws(params: Params):
    return resolve_workspace(params)


def png_bytes(size: tuple[int, int] = (24, 24), color: int = 128, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()
