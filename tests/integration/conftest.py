from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """One ephemeral Prefect server (with its own database) for the whole test session; no
    telemetry (offline it only prints errors), as `mnemo` turns it off for its own runs."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def params_file(params, tmp_path: Path) -> Path:
    """The shrunk params written out, for the CLI (which reads params.yaml at its edge)."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return path


@pytest.fixture(scope="session")
def live_template(repo_params, tmp_path_factory) -> Path:
    """A workspace with 60 stored images, v1 and v2 registered with validated tables, champion v1
    (tests/integration/live_workspace.py); built once, copied by `live_ws`."""
    from components.config import with_overrides
    from components.workspace import resolve_workspace
    from tests.conftest import TINY
    from tests.integration.live_workspace import build_template

    root = tmp_path_factory.mktemp("live-template")
    params = with_overrides(repo_params, TINY | {"paths.workspace": str(root)})
    build_template(resolve_workspace(params), params)
    return root


@pytest.fixture()
def live_ws(live_template, ws):
    """This test's copy of the live template, at the `ws` fixture's root."""
    from tests.integration.live_workspace import copy_workspace

    copy_workspace(live_template, ws.root)
    return ws
