"""Deployments of the flows, served by `mnemo deploy` against the Prefect server in PREFECT_API_URL.

- retrain/scheduled: on params schedule.retrain_cron; at most one run at a time. A run
  triggered while another runs is queued (ENQUEUE), not cancelled: it starts when the
  slot frees and learns whatever landed in the meantime, or finishes at once with
  "nothing new" when the earlier run already learned it.
- ingest/inbox: every schedule.inbox_interval seconds; at most one at a time. An overlapping
  scan is cancelled (CANCEL_NEW): the running one, or the next tick, picks up the same inbox.
- rollback/operator: no schedule; triggered from the UI, the API or `prefect deployment run`.

The deployments carry the params read at `mnemo deploy` time as their default parameters,
so every run records the exact configuration it ran with.
"""

from __future__ import annotations

from datetime import timedelta

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.types.entrypoint import EntrypointType

from components.config import Params, Workspace
from flows.ingest import ingest
from flows.retrain import retrain
from flows.rollback import rollback

RETRAIN = "retrain/scheduled"
INGEST = "ingest/inbox"
ROLLBACK = "rollback/operator"
TAGS = ["mnemo"]


def build_deployments(params: Params, ws: Workspace) -> list[RunnerDeployment]:
    """The three deployments, schedules and concurrency limits from params, the workspace as a parameter."""
    defaults = {"params": params.model_dump(mode="json"), "workspace": str(ws.root)}
    # Module entrypoints: the runner imports flows.<name> from the installed package, whatever the cwd.
    common = {"tags": TAGS, "entrypoint_type": EntrypointType.MODULE_PATH, "parameters": defaults}
    return [
        retrain.to_deployment(
            RETRAIN.split("/")[1], cron=params.schedule.retrain_cron,
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
            description="Pending arrivals -> train -> evaluate -> gate -> register -> index -> promote.", **common),
        ingest.to_deployment(
            INGEST.split("/")[1], interval=timedelta(seconds=params.schedule.inbox_interval),
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
            description="Validate, store and hot-add every new inbox arrival.", **common),
        rollback.to_deployment(
            ROLLBACK.split("/")[1], concurrency_limit=1,
            description="Move the champion back to the previous one (or parameter `to`).", **common),
    ]


def serve_deployments(deployments: list[RunnerDeployment]) -> None:
    """Register the deployments and run their flow runs here until interrupted (schedules pause then)."""
    serve(*deployments)
