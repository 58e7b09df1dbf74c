"""`mnemo deploy` against a real `prefect server start`, on SQLite and on PostgreSQL: the inbox scan
ingests a dropped arrival, the cron retrain promotes, and overlapping retrains queue, never overlap."""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    TaskRunFilter,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from components.config import with_overrides
from components.data.catalog import Catalog
from components.data.demo import arrival_id, discover_fonts, stream_classes, write_arrival
from components.registry.mlflow_registry import ModelRegistry
from components.workspace import resolve_workspace
from flows.deploy import INGEST, RETRAIN, ROLLBACK
from tests.e2e.conftest import BIN, clean_env, prefect_server, process, tail

pytestmark = pytest.mark.e2e


def flow_runs(flow: str) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
            limit=200,
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
        )


def wait_for(what: str, check: Callable[[], object], timeout: float, log: Path) -> object:
    """Poll `check` every 2 s until it returns something truthy; fail naming `what` with the deploy log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n--- mnemo deploy log ---\n{tail(log, 8000)}")


def drop_arrival(ws_inbox: Path, staging: Path, step: int, classes: list[str], fonts, demo) -> None:
    """Render an arrival outside the inbox, then move it in at once: the scan never sees half of one."""
    write_arrival(staging, step, classes, fonts, demo)
    ws_inbox.mkdir(parents=True, exist_ok=True)
    os.rename(staging / arrival_id(step), ws_inbox / arrival_id(step))


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_deployed_flows_ingest_retrain_on_schedule_and_never_overlap(database, params, tmp_path):
    fonts = discover_fonts()
    arrivals = stream_classes(fonts, params.demo)
    # One scheduled retrain, at a minute boundary far enough ahead for the inbox scan to go first
    # (server and `mnemo deploy` start-up plus one scan took ~110 s on a busy 2-core machine).
    at = (datetime.now(UTC) + timedelta(seconds=150)).replace(second=0, microsecond=0) + timedelta(minutes=1)
    p = with_overrides(
        params,
        {
            "schedule.retrain_cron": f"{at.minute} {at.hour} * * *",
            "schedule.inbox_interval": 30,
            # tiny data, one epoch: the second model may score below the first; the gate is not under test
            "gate.max_unseen_recall_at_1_drop": 1.0,
            "gate.max_slice_forgetting": 1.0,
        },
    )
    ws = resolve_workspace(p)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(p.model_dump(mode="json")))
    log = tmp_path / "deploy.log"

    # An arrival waits in the inbox: the first scheduled scan (at start-up) ingests it.
    drop_arrival(ws.inbox, tmp_path / "staging", 0, arrivals[0], fonts, p.demo)

    with prefect_server(database, tmp_path) as api, temporary_settings({PREFECT_API_URL: api}):
        env = clean_env(
            PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "client-home"), PREFECT_RUNNER_POLL_FREQUENCY="2"
        )
        deploy = [str(BIN / "mnemo"), "deploy", "--workspace", str(ws.root), "--params", str(params_file)]
        with process(deploy, env, log) as proc:

            def deployed() -> bool:
                assert proc.poll() is None, f"mnemo deploy exited with {proc.returncode}:\n{tail(log)}"
                with get_client(sync_client=True) as client:
                    try:
                        return all(client.read_deployment_by_name(name) for name in (RETRAIN, INGEST, ROLLBACK))
                    except Exception:  # not registered yet
                        return False

            wait_for("the three deployments", deployed, 120, log)
            with get_client(sync_client=True) as client:
                retrain_deployment = client.read_deployment_by_name(RETRAIN)
            assert retrain_deployment.schedules[0].schedule.cron == f"{at.minute} {at.hour} * * *"
            assert retrain_deployment.global_concurrency_limit.limit == 1

            # The arrival is ingested by the scheduled scan (the cron retrain is still minutes away).
            wait_for(
                "an ingest run that stored demo-000",
                lambda: [r for r in flow_runs("ingest") if r.state and r.state.name == "Ingested"],
                150,
                log,
            )
            # What the run did, read from the stores it wrote (not from the wording of its message):
            # every image of the arrival stored and recorded with its classes, nothing quarantined.
            catalog = Catalog.load(ws.catalog)
            assert "demo-000" in catalog.arrivals and not (ws.inbox / "demo-000").exists()
            assert sum(catalog.class_counts().values()) == 48 and len(catalog.class_counts()) == 8
            assert not (ws.quarantine / "demo-000").exists()

            # The cron fires once: that scheduled run trains, gates, indexes and promotes v1.
            def scheduled_retrain_done() -> list[FlowRun]:
                return [r for r in flow_runs("retrain") if r.auto_scheduled and r.state and r.state.is_final()]

            [scheduled] = wait_for(
                "the scheduled retrain", scheduled_retrain_done, (at - datetime.now(UTC)).total_seconds() + 420, log
            )
            assert scheduled.state.name == "Promoted", scheduled.state.message
            champion = ModelRegistry(ws, p.registry).champion()
            assert champion is not None and champion.version == "1" and champion.table == "embeddings_v1"
            with get_client(sync_client=True) as client:
                artifacts = client.read_artifacts(  # empty run filters: the sync client sends null otherwise (422)
                    artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[scheduled.id])),
                    flow_run_filter=FlowRunFilter(),
                    task_run_filter=TaskRunFilter(),
                    limit=50,
                    offset=0,
                    sort=ArtifactSort.ID_DESC,
                )
            assert {a.key for a in artifacts} == {"gate-report", "retrain-metrics"}
            [table] = [a for a in artifacts if a.key == "retrain-metrics"]
            assert "unseen_recall_at_1" in json.dumps(table.data)

            # A new arrival and two retrains triggered at once: one learns it, the other queues, then finds nothing new.
            drop_arrival(ws.inbox, tmp_path / "staging", 1, arrivals[1], fonts, p.demo)
            triggered = [run_deployment(RETRAIN, timeout=0) for _ in range(2)]
            ids = {r.id for r in triggered}

            def both_final() -> list[FlowRun]:
                runs = [r for r in flow_runs("retrain") if r.id in ids]
                return runs if len(runs) == 2 and all(r.state and r.state.is_final() for r in runs) else []

            first, second = sorted(
                wait_for("both triggered retrains", both_final, 600, log), key=lambda r: r.start_time
            )
            with get_client(sync_client=True) as client:
                second_states = [st.name for st in client.read_flow_run_states(second.id)]

    assert first.state.name in {"Promoted", "Rejected"}, first.state.message
    latest = ModelRegistry(ws, p.registry).latest()
    assert latest is not None and latest.version == "2"  # the queued one registered nothing
    # The overlapping trigger was queued (ENQUEUE), not cancelled: it waited for the slot, then ran.
    assert "AwaitingConcurrencySlot" in second_states, second_states
    assert second.state.name == "Nothing new"
    # No two retrain runs were ever running at the same time.
    for a, b in itertools.combinations([scheduled, first, second], 2):
        assert a.end_time <= b.start_time or b.end_time <= a.start_time, f"retrains overlapped: {a.name} and {b.name}"
