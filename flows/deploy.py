"""Deployments of the flows, against the Prefect server in PREFECT_API_URL: served by `mnemo deploy`
in its own process, or registered to work pools by `mnemo deploy --work-pool` for workers to run.

- retrain/scheduled: on params schedule.retrain_cron; at most one run at a time. A run
  triggered while another runs is queued (ENQUEUE), not cancelled: it starts when the
  slot frees and learns whatever landed in the meantime, or finishes at once with
  "nothing new" when the earlier run already learned it.
- ingest/inbox: every schedule.inbox_interval seconds; at most one at a time. An overlapping
  scan is cancelled (CANCEL_NEW): the running one, or the next tick, picks up the same inbox.
- rollback/operator: no schedule; triggered from the UI, the API or `prefect deployment run`.
- backfill/compat: no schedule; the retrain flow runs the backfill itself after a compatible
  promotion, this deployment carries one on (e.g. after a killed run) from the UI or the API.
  At most one at a time; a second is cancelled (the running one finishes the table).

The deployments carry the params read at `mnemo deploy` time as their default parameters,
so every run records the exact configuration it ran with. Served deployments also carry the
workspace; work-pool deployments do not: each run takes MNEMO_WORKSPACE (and the MLflow,
LanceDB and S3 settings) from the environment of the worker or job that runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast
from uuid import UUID

from prefect import serve
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy, WorkPool
from prefect.deployments.runner import RunnerDeployment
from prefect.exceptions import ObjectNotFound
from prefect.types.entrypoint import EntrypointType

from components.config import Params
from components.workspace import Workspace
from flows.backfill import backfill
from flows.ingest import ingest
from flows.retrain import retrain
from flows.rollback import rollback

RETRAIN = "retrain/scheduled"
INGEST = "ingest/inbox"
ROLLBACK = "rollback/operator"
BACKFILL = "backfill/compat"
EMBEDDING = (RETRAIN, BACKFILL)  # the deployments whose runs embed images: the GPU pool's, when there is one
TAGS = ["mnemo"]


def build_deployments(params: Params, ws: Workspace | None) -> list[RunnerDeployment]:
    """The four deployments, schedules and concurrency limits from params; the workspace as a
    parameter, or (ws None) left to each run's MNEMO_WORKSPACE, for runs on other machines."""
    defaults: dict[str, object] = {"params": params.model_dump(mode="json")}
    if ws is not None:
        defaults["workspace"] = str(ws.root)
    # Module entrypoints: the runner imports flows.<name> from the installed package, whatever the cwd.
    common: dict[str, Any] = {"tags": TAGS, "entrypoint_type": EntrypointType.MODULE_PATH, "parameters": defaults}
    # to_deployment is sync-compatible: called from sync code it returns the deployment, not a coroutine.
    return cast(
        list[RunnerDeployment],
        [
            retrain.to_deployment(
                RETRAIN.split("/")[1],
                cron=params.schedule.retrain_cron,
                concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
                description="Pending arrivals -> train -> evaluate -> gate -> register -> index -> promote.",
                **common,
            ),
            ingest.to_deployment(
                INGEST.split("/")[1],
                interval=timedelta(seconds=params.schedule.inbox_interval),
                concurrency_limit=ConcurrencyLimitConfig(
                    limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
                ),
                description="Validate, store and hot-add every new inbox arrival.",
                **common,
            ),
            rollback.to_deployment(
                ROLLBACK.split("/")[1],
                concurrency_limit=1,
                description="Move the champion back to the previous one (or parameter `to`).",
                **common,
            ),
            backfill.to_deployment(
                BACKFILL.split("/")[1],
                concurrency_limit=ConcurrencyLimitConfig(
                    limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
                ),
                description="Re-embed the champion's rows an older compatible model embedded (or parameter `version`).",
                **common,
            ),
        ],
    )


def serve_deployments(deployments: list[RunnerDeployment]) -> None:
    """Register the deployments and run their flow runs here until interrupted (schedules pause then)."""
    serve(*deployments)


class WorkPoolError(ValueError):
    """A work pool named on `mnemo deploy --work-pool` is missing or cannot take these deployments."""


@dataclass(frozen=True)
class Registered:
    """One deployment registered to a work pool."""

    name: str  # flow/deployment
    work_pool: str
    deployment_id: UUID


def register_deployments(
    deployments: list[RunnerDeployment], work_pool: str, *, retrain_pool: str | None = None, image: str | None = None
) -> list[Registered]:
    """Register the deployments to work pools instead of serving them: retrain and backfill (they embed
    images) to `retrain_pool` (a GPU pool) when given, the others to `work_pool`. Every pool is checked first, so nothing
    is registered when one is missing or cannot run the image. Where the retrain's pool offers a
    `gpus` job variable (infra/k8s/work-pools/gpu.json), its jobs ask for train.devices GPUs."""
    pools = {work_pool, retrain_pool or work_pool}
    with get_client(sync_client=True) as client:
        found = {name: _read_pool(client, name) for name in sorted(pools)}
    for found_pool in found.values():
        _check_image(found_pool, image)
    registered = []
    for deployment in deployments:
        pool = retrain_pool if retrain_pool and deployment.full_name in EMBEDDING else work_pool
        if deployment.full_name == RETRAIN and "gpus" in _variables(found[pool]):
            # One GPU per training process: the job asks for train.devices of the params it carries.
            deployment.job_variables["gpus"] = deployment.parameters["params"]["train"]["devices"]
        deployment_id = cast(UUID, deployment.apply(work_pool_name=pool, image=image))  # sync: not awaited here
        registered.append(Registered(deployment.full_name, pool, deployment_id))
    return registered


def _read_pool(client: SyncPrefectClient, name: str) -> WorkPool:
    try:
        return client.read_work_pool(name)
    except ObjectNotFound:
        raise WorkPoolError(
            f"no work pool {name!r} on the Prefect server: create it first, e.g. "
            f"`prefect work-pool create {name} --type process` (flows run in the worker's environment) or "
            f"`prefect work-pool create {name} --type kubernetes --base-job-template infra/k8s/work-pools/<cpu|gpu>.json`"
        ) from None


def _variables(pool: WorkPool) -> dict[str, Any]:
    """The job variables a pool's base job template offers (`image`, `gpus`, ...)."""
    return cast(dict[str, Any], pool.base_job_template.get("variables", {}).get("properties", {}))


def _check_image(pool: WorkPool, image: str | None) -> None:
    """An image only for pools that run containers (their base job template has an `image` variable,
    process pools have none); such a pool needs one unless its template names a default."""
    variables = _variables(pool)
    if image and "image" not in variables:
        raise WorkPoolError(
            f"work pool {pool.name!r} ({pool.type}) runs flows in the worker's own environment and "
            "takes no image: leave out --image (the worker must have mnemo installed)"
        )
    if not image and "image" in variables and not variables["image"].get("default"):
        raise WorkPoolError(
            f"work pool {pool.name!r} ({pool.type}) runs each flow in a container: pass --image, "
            "the mnemo image built from infra/Dockerfile (e.g. registry.example.com/mnemo:0.1.0)"
        )
