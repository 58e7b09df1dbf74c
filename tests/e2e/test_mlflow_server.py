"""The retrain flow, promote and rollback through a real `mlflow server` (PostgreSQL backend store,
local artifact root), selected by MLFLOW_TRACKING_URI alone."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient
from prefect.testing.utilities import prefect_test_harness
from typer.testing import CliRunner

from components.config import with_overrides
from components.data.demo import discover_fonts, stream_classes, write_arrival
from components.registry.mlflow_registry import CHAMPION, ModelRegistry
from components.workspace import resolve_workspace
from flows.cli import app
from flows.retrain import retrain
from flows.rollback import rollback
from tests.e2e.conftest import mlflow_server

pytestmark = pytest.mark.e2e


def test_retrain_promote_and_rollback_through_an_mlflow_server(params, params_file, tmp_path, monkeypatch):
    fonts = discover_fonts()
    arrivals = stream_classes(fonts, params.demo)
    # tiny data, one epoch: the second model may score below the first; the gate is not under test here
    lenient = with_overrides(params, {"gate.max_unseen_recall_at_1_drop": 1.0, "gate.max_slice_forgetting": 1.0})

    with mlflow_server(tmp_path) as url, prefect_test_harness(server_startup_timeout=180):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        ws = resolve_workspace(lenient)
        assert ws.tracking_uri == url

        write_arrival(ws.inbox, 0, arrivals[0], fonts, lenient.demo)
        first = retrain(lenient, str(ws.root))
        assert (first.status, first.version) == ("promoted", "1"), first.reasons
        write_arrival(ws.inbox, 1, arrivals[1], fonts, lenient.demo)
        second = retrain(lenient, str(ws.root))
        assert (second.status, second.version) == ("promoted", "2"), second.reasons

        server = MlflowClient(tracking_uri=url, registry_uri=url)  # what any other client of the server sees
        assert server.get_model_version_by_alias(lenient.registry.model_name, CHAMPION).version == "2"
        assert not (ws.root / "mlflow.db").exists() and any((tmp_path / "artifacts").rglob("MLmodel"))

        state = rollback(lenient, str(ws.root), reason="v2 answers badly", return_state=True)
        assert state.name == "Rolled back" and state.message == "rolled back: champion v2 -> v1 (table embeddings_v1)"
        assert server.get_model_version_by_alias(lenient.registry.model_name, CHAMPION).version == "1"

        promoted = CliRunner().invoke(
            app,
            ["promote", "2", "--reason", "fixed", "--json", "--workspace", str(ws.root), "--params", str(params_file)],
            catch_exceptions=False,
        )
        assert promoted.exit_code == 0, promoted.output
        assert json.loads(promoted.stdout)["champion"] == "2"
        assert server.get_model_version_by_alias(lenient.registry.model_name, CHAMPION).version == "2"
        log = ModelRegistry(ws, lenient.registry).log.entries()
        assert [(e.kind, e.from_version, e.to_version) for e in log] == [
            ("promote", None, "1"),
            ("promote", "1", "2"),
            ("rollback", "2", "1"),
            ("promote", "1", "2"),
        ]
