"""How a flow run ends: a Completed state named after its outcome, saying why, carrying the outcome."""

from __future__ import annotations

from typing import Protocol

from prefect import get_run_logger
from prefect.states import Completed, State


class Outcome(Protocol):
    """What a flow returns: a state name for the UI (`Promoted`, `Nothing new`, ...) and one line saying why."""

    @property
    def state_name(self) -> str: ...

    @property
    def message(self) -> str: ...


def finished(outcome: Outcome) -> State:
    """The run's final state, logged: Completed, named after the outcome, its message saying why;
    the outcome is its result (Prefect unwraps a returned State: callers get the outcome)."""
    get_run_logger().info(outcome.message)
    return Completed(name=outcome.state_name, message=outcome.message, data=outcome)
