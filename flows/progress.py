"""Where the newest retrain of a workspace is: Prefect's flow-run and task-run states, and the epochs its
MLflow run has logged so far, read here (the application's side: it may import prefect) and turned
into a RetrainProgress by components/progress.py. GET /progress and `mnemo status` call it."""

from __future__ import annotations

import logging
import os
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort

from components.ops.writer_lock import holder
from components.progress import NOT_RUNNING, FlowState, RetrainProgress, TaskState, retrain_progress
from components.registry.mlflow_registry import CHAMPION, ModelRegistry
from components.workspace import Workspace

log = logging.getLogger(__name__)

RECENT = timedelta(minutes=2)  # a retrain that ended this recently is still shown, with how it ended
LOOKED_AT = 10  # newest retrain runs looked through for this workspace's


def _ours(parameters: dict, ws: Workspace) -> bool:
    """Whether a retrain flow run was for this workspace (its `workspace` argument, else its params')."""
    where = parameters.get("workspace") or (parameters.get("params") or {}).get("paths", {}).get("workspace")
    try:
        return where is not None and Path(where).resolve() == ws.root.resolve()
    except (OSError, TypeError):
        return False


def may_be_retraining(ws: Workspace) -> bool:
    """Whether a retrain may be under way: the workspace's writer lock was last taken by a retrain whose
    process is alive (or runs on another machine). Read from the lock's holder note, never by taking the
    lock; it spares asking Prefect (whose first call in a process without a Prefect server starts a
    temporary one, ~20 s) while no retrain runs."""
    found = holder(ws) or {}
    if found.get("what") != "retrain":
        return False
    if found.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(found.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def current_retrain(ws: Workspace, registry: ModelRegistry, *, recent: timedelta = RECENT) -> RetrainProgress:
    """The workspace's running retrain (or one that ended within `recent` in a process still alive), or
    NOT_RUNNING. A Prefect API that cannot be reached answers NOT_RUNNING too, with a warning in the
    log: progress is an extra."""
    if not may_be_retraining(ws):
        return NOT_RUNNING
    try:
        with get_client(sync_client=True) as client:
            # Only the filters that apply: an empty work-pool (or deployment) filter keeps only runs that have one.
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain"])),
                sort=FlowRunSort.START_TIME_DESC,
                limit=LOOKED_AT,
            )
            run = next((r for r in runs if r.start_time is not None and _ours(r.parameters, ws)), None)
            if run is None or run.state is None:
                return NOT_RUNNING
            state = run.state.type.value
            ended = run.end_time
            if state not in ("RUNNING", "PENDING") and (ended is None or datetime.now(UTC) - ended > recent):
                return NOT_RUNNING
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                limit=200,
            )
    except Exception as exc:  # no Prefect API here (or it is away): nothing to show
        log.warning("retrain progress: Prefect cannot be read: %s", exc)
        return NOT_RUNNING
    training = registry.runs.of_flow_run(str(run.id))
    run_id, epochs, loss = training if training else (None, None, [])
    return retrain_progress(
        FlowState(
            id=str(run.id),
            name=run.name,
            state=state,
            state_name=run.state.name or state,
            start=run.start_time,
            end=ended,
        ),
        [
            TaskState(
                task=t.task_key.rsplit("-", 1)[0],
                state=t.state.type.value if t.state else "PENDING",
                start=t.start_time,
            )
            for t in tasks
        ],
        epochs=epochs,
        loss=loss,
        mlflow_run_id=run_id,
        champion=registry.aliases().get(CHAMPION),
    )
