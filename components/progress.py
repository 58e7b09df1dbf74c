"""A retrain in progress, as people follow it: its stage (ingest, train epoch i of n with the loss so
far, evaluate, index, validate, promote), from the flow run's task states and the MLflow run's metrics.

Pure: flows/progress.py reads Prefect and MLflow and hands the plain records below to `retrain_progress`
(components/ never imports prefect); GET /progress and `mnemo status` show its answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel, Field

STAGES = ("ingest", "train", "evaluate", "index", "validate", "promote")
# The retrain flow's tasks (flows/retrain.py) by the stage each belongs to.
TASK_STAGES = {
    "ingest_pending": "ingest",
    "catch_up": "ingest",
    "load_models": "ingest",
    "train": "train",
    "evaluate": "evaluate",
    "register": "evaluate",
    "build_index": "index",
    "smoke_test": "validate",
    "publish_gate": "validate",
    "promote": "promote",
    "backfill": "promote",
}


@dataclass(frozen=True)
class TaskState:
    """One task run of the flow run: its task's name (without Prefect's run suffix) and state."""

    task: str
    state: str  # Prefect's state type: PENDING, RUNNING, COMPLETED, FAILED, ...
    start: datetime | None


@dataclass(frozen=True)
class FlowState:
    """The retrain flow run: its id and name, its state type and name, when it started and ended."""

    id: str
    name: str
    state: str
    state_name: str
    start: datetime | None
    end: datetime | None


class StageProgress(BaseModel):
    name: str
    state: str = Field(description="waiting | running | done | failed | skipped")


class RetrainProgress(BaseModel):
    """Where the newest retrain is: GET /progress's answer (running false, nothing else: none runs)."""

    running: bool
    flow_run: str | None = None
    flow_run_id: str | None = None
    state: str | None = Field(default=None, description="the flow run's state: RUNNING, COMPLETED, FAILED, ...")
    started: str | None = None
    ended: str | None = None
    stage: str | None = Field(default=None, description="the stage under way (the last one reached once it ended)")
    stages: list[StageProgress] = Field(default_factory=list)
    epoch: int | None = Field(default=None, description="epochs finished so far (train stage)")
    epochs: int | None = Field(default=None, description="epochs the training will run")
    loss: list[float] = Field(default_factory=list, description="the training loss per finished epoch")
    mlflow_run_id: str | None = None
    outcome: str | None = Field(default=None, description="once ended: what it did (promoted vN, rejected, failed)")

    def line(self) -> str:
        """One line for `mnemo status`."""
        if not self.running and self.state is None:
            return "none"
        where = self.stage or "starting"
        if self.stage == "train" and self.epochs:
            where += f" epoch {self.epoch or 0} of {self.epochs}"
            if self.loss:
                where += f" (loss {self.loss[-1]:.4f})"
        head = (
            f"{self.flow_run} {where}"
            if self.running
            else f"{self.flow_run} {self.state.lower() if self.state else ''}"
        )
        return head + (f": {self.outcome}" if self.outcome else "")


NOT_RUNNING = RetrainProgress(running=False)


def retrain_progress(
    flow: FlowState,
    tasks: Sequence[TaskState],
    *,
    epochs: int | None,
    loss: Sequence[float],
    mlflow_run_id: str | None,
    champion: str | None = None,
) -> RetrainProgress:
    """The flow run's progress: each stage waiting, running, done or failed from its tasks' states (a
    stage with no task once the flow ended was skipped), the epochs and loss the MLflow run logged;
    once it ended, what it did (`champion`: the version serving now)."""
    reached: dict[str, list[str]] = {}
    for t in sorted(tasks, key=lambda t: (t.start is None, t.start or datetime.min)):
        stage = TASK_STAGES.get(t.task)
        if stage is not None:
            reached.setdefault(stage, []).append(t.state)
    running = flow.state in ("RUNNING", "PENDING", "SCHEDULED")
    stages = []
    for name in STAGES:
        states = reached.get(name, [])
        if not states:
            state = "waiting" if running else "skipped"
        elif any(s in ("FAILED", "CRASHED") for s in states):
            state = "failed"
        elif any(s not in ("COMPLETED", "CACHED") for s in states):
            state = "running"
        else:
            state = "done"
        stages.append(StageProgress(name=name, state=state))
    under_way = [s.name for s in stages if s.state in ("running", "failed")]
    done = [s.name for s in stages if s.state == "done"]
    stage = under_way[-1] if under_way else (done[-1] if done else None)
    if running and stage is not None and not under_way:  # between tasks: the next stage is being set up
        later = [s.name for s in stages if s.state == "waiting" and STAGES.index(s.name) > STAGES.index(stage)]
        stage = later[0] if later else stage
    outcome = None
    if not running:
        promoted = any(s.name == "promote" and s.state == "done" for s in stages)
        if flow.state != "COMPLETED":
            outcome = f"{flow.state_name.lower()} during {stage or 'start-up'}"
        elif promoted:
            outcome = f"promoted v{champion}"
        else:
            outcome = "nothing promoted" if "train" in reached else "nothing to train"
    return RetrainProgress(
        running=running,
        flow_run=flow.name,
        flow_run_id=flow.id,
        state=flow.state,
        started=flow.start.isoformat(timespec="seconds") if flow.start else None,
        ended=flow.end.isoformat(timespec="seconds") if flow.end else None,
        stage=stage,
        stages=stages,
        epoch=len(loss) if epochs or stage == "train" else None,  # 0 while its MLflow run is being opened
        epochs=epochs,
        loss=list(loss),
        mlflow_run_id=mlflow_run_id,
        outcome=outcome,
    )
