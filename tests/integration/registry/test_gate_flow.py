"""The retrain flow publishes its gate: report and heatmap on the MLflow run, a Prefect markdown
artifact, lineage tags, the challenger alias and the promotion log, all visible in `mnemo status`."""

from __future__ import annotations

import json

from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
)
from prefect.client.schemas.sorting import ArtifactSort
from typer.testing import CliRunner

from components.data.demo import discover_fonts, stream_classes, write_arrival
from components.registry.mlflow_registry import (
    DATA_VERSION_TAG,
    GATE_HEATMAP,
    GATE_MARKDOWN,
    GATE_REPORT,
    GIT_COMMIT_TAG,
    HISTORY_PLOT,
    MAP_PLOT,
)
from components.registry.training_runs import FLOW_RUN_TAG
from flows.cli import app
from flows.retrain import retrain


def test_retrain_publishes_the_gate_report_everywhere(params, ws, params_file):
    fonts = discover_fonts()
    write_arrival(ws.inbox, 0, stream_classes(fonts, params.demo)[0], fonts, params.demo)

    state = retrain(params, str(ws.root), return_state=True)
    summary = state.result()
    assert summary.status == "promoted", summary.reasons
    assert any(r.startswith("index smoke test: all") for r in summary.reasons)

    result = CliRunner().invoke(app, ["status", "--json", "--workspace", str(ws.root), "--params", str(params_file)])
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert status["champion"]["version"] == status["challenger"]["version"] == "1"
    assert status["challenger"]["verdict"] == "promote" and status["challenger"]["index_smoke_test"] == "passed"
    assert [(p["kind"], p["from"], p["to"], p["actor"]) for p in status["promotions"]] == [
        ("promote", None, "1", "retrain-flow")
    ]
    gate = status["gate"]
    assert gate["verdict"] == "promote" and gate["reasons"] == summary.reasons and gate["champion"] is None
    assert gate["metrics"]["unseen_recall_at_1"]["candidate"] == summary.metrics["unseen_recall_at_1"]

    client = MlflowClient(ws.tracking_uri)
    run = client.get_run(client.get_model_version("mnemo-embedder", "1").run_id)
    assert run.data.tags[DATA_VERSION_TAG].startswith("sha256:") and len(run.data.tags[GIT_COMMIT_TAG]) == 40
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "gate")}
    assert logged == {GATE_REPORT, GATE_MARKDOWN, GATE_HEATMAP}
    # The history and the embedding map, as the page shows them, for the MLflow UI.
    assert {f.path for f in client.list_artifacts(run.info.run_id, "history")} == {HISTORY_PLOT, MAP_PLOT}
    # One run, opened as training began (its epochs logged as they finished), finished once registered.
    assert run.info.status == "FINISHED" and run.data.tags[FLOW_RUN_TAG] == str(state.state_details.flow_run_id)
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in losses) == list(range(params.train.epochs))

    with get_client(sync_client=True) as prefect:
        # Every filter spelled out: prefect 3.8's sync client sends null for those left out, which the API refuses.
        [artifact] = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["gate-report"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])),
            task_run_filter=TaskRunFilter(),
            limit=10,
            offset=0,
            sort=ArtifactSort.CREATED_DESC,
        )
    assert artifact.type == "markdown" and "# Gate: v1 — **PROMOTE**" in artifact.data
