"""Scheduling and retry settings users rely on: the schedule section, which errors are retried."""

from __future__ import annotations

import errno

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

from components.config import ConfigError, with_overrides
from components.ops.transient import is_transient
from components.workspace import resolve_workspace


def test_the_deployments_run_on_the_schedule_params_give(repo_params, tmp_path):
    from flows.deploy import INGEST, RETRAIN, build_deployments

    p = with_overrides(repo_params, {"schedule.retrain_cron": "17 4 * * 1", "schedule.inbox_interval": 45})
    by_name = {d.flow_name + "/" + d.name: d for d in build_deployments(p, resolve_workspace(p, tmp_path))}
    [retrain] = by_name[RETRAIN].schedules
    [scan] = by_name[INGEST].schedules
    assert retrain.schedule.cron == "17 4 * * 1"
    assert scan.schedule.interval.total_seconds() == 45
    # what each run gets: the params read at deploy time, and this workspace
    assert by_name[RETRAIN].parameters["params"]["schedule"]["retrain_cron"] == "17 4 * * 1"
    assert by_name[RETRAIN].parameters["workspace"] == str(tmp_path.resolve())
    with pytest.raises(ConfigError, match=r"schedule\.retrain_cron: .*'0 3 \* \*' is not a five-field cron"):
        with_overrides(repo_params, {"schedule.retrain_cron": "0 3 * *"})


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        TimeoutError("read timed out"),
        OSError(errno.EIO, "LanceError(IO): generic I/O error"),
        MlflowException(
            "API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/get failed with exception "
            "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded"
        ),
        MlflowException("try later", error_code=TEMPORARILY_UNAVAILABLE),
        MlflowException("(sqlite3.OperationalError) database is locked"),
    ],
)
def test_network_and_io_hiccups_are_retried(exc):
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        FileNotFoundError(errno.ENOENT, "No such file or directory"),
        PermissionError(errno.EACCES, "Permission denied"),
        MlflowException("Registered Model with name=mnemo-embedder not found", error_code=RESOURCE_DOES_NOT_EXIST),
        ValueError("arrival folder does not exist"),
        RuntimeError("index validation failed: 3 probes did not find themselves"),
    ],
)
def test_wrong_inputs_and_failed_checks_fail_at_once(exc):
    assert not is_transient(exc)


def test_deployments_take_schedules_and_concurrency_from_params(params, ws):
    from datetime import timedelta

    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    from flows.deploy import build_deployments

    retrain, ingest, rollback, backfill = build_deployments(params, ws)
    assert [d.name for d in (retrain, ingest, rollback, backfill)] == ["scheduled", "inbox", "operator", "compat"]
    assert not backfill.schedules  # the retrain flow starts the backfill; the deployment carries one on
    assert backfill.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
    assert retrain.schedules[0].schedule.cron == params.schedule.retrain_cron
    assert ingest.schedules[0].schedule.interval == timedelta(seconds=params.schedule.inbox_interval)
    assert not rollback.schedules  # triggered by people, never by the clock
    assert (
        retrain.concurrency_limit == 1
        and retrain.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    )
    assert (
        ingest.concurrency_limit == 1
        and ingest.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
    )
    assert retrain.parameters == {"params": params.model_dump(mode="json"), "workspace": str(ws.root)}


def test_deploy_without_a_prefect_server_says_what_to_start(params, tmp_path):
    import yaml
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from typer.testing import CliRunner

    from flows.cli import app

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = CliRunner().invoke(app, ["deploy", "--params", str(params_file)])
    assert result.exit_code == 2
    assert "schedules need a Prefect server: run `prefect server start` and set PREFECT_API_URL" in result.output
