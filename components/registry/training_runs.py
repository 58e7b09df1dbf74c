"""The MLflow run of a retrain while it trains: opened as training starts, one metric row per finished
epoch, FAILED when the retrain fails before registering; and found again by the Prefect flow run that
trains it (what the page's and `mnemo status`'s progress follow). ModelRegistry.log_candidate carries
the run on once the model is registered; the registry holds one of these as `runs`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mlflow import MlflowClient
from mlflow.entities import Metric

FLOW_RUN_TAG = "mnemo.flow_run_id"  # run tag: the Prefect flow run that trains it (what progress follows)
EPOCHS_TAG = "mnemo.epochs"  # run tag: the epochs its training will run


class TrainingRuns:
    """The retrain runs of one experiment (`experiment_id()`: created when missing)."""

    def __init__(self, client: MlflowClient, experiment_id: Callable[[], str]) -> None:
        self.client = client
        self._experiment_id = experiment_id

    def start(self, *, run_name: str | None, flow_run_id: str | None, epochs: int) -> str:
        """A run opened as training starts, so its epochs can be followed while it trains (log_epoch). Its id."""
        tags = {EPOCHS_TAG: str(epochs), **({FLOW_RUN_TAG: flow_run_id} if flow_run_id else {})}
        run = self.client.create_run(self._experiment_id(), run_name=run_name, tags=tags)
        return run.info.run_id

    def log_epoch(self, run_id: str, epoch: int, metrics: dict[str, float]) -> None:
        """One finished epoch's metrics (train_loss, ...) on the training run, stepped by the epoch."""
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])

    def fail(self, run_id: str) -> None:
        """A training run whose retrain failed before it was registered: FAILED, as the MLflow UI shows it."""
        if self.client.get_run(run_id).info.status == "RUNNING":
            self.client.set_terminated(run_id, "FAILED")

    def of_flow_run(self, flow_run_id: str) -> tuple[str, int | None, list[float]] | None:
        """(run id, epochs it will train, training loss per finished epoch) of the run the flow run
        `flow_run_id` trains; None before it has one."""
        found = self.client.search_runs(
            [self._experiment_id()], filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'", max_results=1
        )
        if not found:
            return None
        run = found[0]
        history = sorted(self.client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)
        epochs = run.data.tags.get(EPOCHS_TAG)
        return run.info.run_id, int(epochs) if epochs and epochs.isdigit() else None, [m.value for m in history]
