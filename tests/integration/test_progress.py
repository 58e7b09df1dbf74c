"""A retrain in progress, followed from outside as the page and `mnemo status` follow it: Prefect's
flow-run and task-run states for the stage, the MLflow run's metrics for the epochs and the loss."""

from __future__ import annotations

import json
import threading
import time

from typer.testing import CliRunner

from components.config import with_overrides
from components.data.demo import discover_fonts, stream_classes, write_arrival
from components.progress import STAGES
from components.registry.mlflow_registry import ModelRegistry
from flows.cli import app
from flows.progress import current_retrain
from flows.retrain import retrain


def test_progress_follows_a_real_retrain_from_start_to_promoted(params, ws, params_file):
    registry = ModelRegistry(ws, params.registry)
    assert current_retrain(ws, registry).running is False  # nothing shown when none runs
    before = CliRunner().invoke(app, ["status", "--workspace", str(ws.root), "--params", str(params_file)])
    assert before.exit_code == 0 and "│ retrain " not in before.stdout
    params = with_overrides(params, {"train.epochs": 3})
    fonts = discover_fonts()
    write_arrival(ws.inbox, 0, stream_classes(fonts, params.demo)[0], fonts, params.demo)

    outcome: list[object] = []
    worker = threading.Thread(target=lambda: outcome.append(retrain(params, str(ws.root))), daemon=True)
    worker.start()
    seen = []
    while worker.is_alive():
        p = current_retrain(ws, registry)
        if p.running:
            seen.append((p.stage, p.epoch, p.epochs, len(p.loss)))
        time.sleep(0.05)
    worker.join()
    assert outcome and outcome[0].status == "promoted"

    stages = [s for s, *_ in seen]
    assert "train" in stages and stages.index("train") < len(stages) - 1
    # Stages only move forward.
    order = [STAGES.index(s) for s in stages if s is not None]
    assert order == sorted(order), stages
    epochs = [e for s, e, n, _ in seen if s == "train" and n == 3]
    assert epochs and epochs == sorted(epochs) and max(epochs) >= 1, seen
    assert all(e == losses for s, e, _, losses in seen if s == "train")  # one loss per finished epoch

    ended = current_retrain(ws, registry)  # ended just now: still shown, with how it ended
    assert not ended.running and ended.state == "COMPLETED" and ended.outcome == "promoted v1"
    assert [s.state for s in ended.stages] == ["done"] * len(STAGES)
    assert ended.epoch == ended.epochs == 3 and len(ended.loss) == 3

    result = CliRunner().invoke(app, ["status", "--json", "--workspace", str(ws.root), "--params", str(params_file)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["retrain"]["outcome"] == "promoted v1"
    table = CliRunner().invoke(app, ["status", "--workspace", str(ws.root), "--params", str(params_file)])
    assert "promoted v1" in table.stdout
