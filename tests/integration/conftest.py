from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """One ephemeral Prefect server (with its own database) for the whole test session."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def params_file(params, tmp_path: Path) -> Path:
    """The shrunk params written out, for the CLI (which reads params.yaml at its edge)."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return path
