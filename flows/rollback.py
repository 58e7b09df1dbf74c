"""The rollback flow: move the live pair back to the previous champion (or a named version).

A deployment of it lets an operator, or an automation reacting to an alert, roll back
from the Prefect UI or API; `mnemo rollback` runs the same component directly.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from components.config import Params
from components.registry.promotion import ChampionMove, Promoter
from components.workspace import Workspace, resolve_workspace
from flows.retries import TRANSIENT_RETRIES
from flows.states import finished
from flows.writers import workspace_writer


@task(cache_policy=NO_CACHE, **TRANSIENT_RETRIES)  # a repeat is safe: moving the alias to where it is changes nothing
def move_champion_back(ws: Workspace, params: Params, to: str | None, reason: str, actor: str | None) -> ChampionMove:
    return Promoter(ws, params.registry, params.index, params.train.device).rollback(to, reason=reason, actor=actor)


@flow(name="rollback", log_prints=True)
def rollback(
    params: Params,
    workspace: str | None = None,
    to: str | None = None,
    reason: str = "",
    actor: str | None = "rollback-flow",
) -> ChampionMove:
    """Roll back, or fail saying why (nothing to go back to, the target's table missing or invalid)."""
    ws = resolve_workspace(params, workspace)
    with workspace_writer(ws, "rollback"):
        done = move_champion_back(ws, params, to, reason, actor)
    return finished(done)  # type: ignore[return-value]  # Prefect unwraps a returned State: callers get its data
