"""The flows' retry policy: a few tries with exponential backoff, for transient errors only."""

from __future__ import annotations

from typing import Any

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import exponential_backoff

from components.ops.transient import is_transient

RETRIES = 3
BACKOFF_SECONDS = 2.0  # waits 2, 4, 8 s: a restarting server or a busy SQLite file gets ~14 s to come back


def transient_only(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """retry_condition_fn: retry a failed task only when its error is transient (components.ops.transient)."""
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by result()
        return is_transient(exc)
    return False


# Spread into @task(...) of every idempotent step; never the register step (a repeat would register twice).
TRANSIENT_RETRIES: dict[str, Any] = {
    "retries": RETRIES,
    "retry_delay_seconds": exponential_backoff(backoff_factor=BACKOFF_SECONDS),
    "retry_condition_fn": transient_only,
}
