"""`mnemo deploy --work-pool`: the three deployments on work pools instead of served, with the
schedules, concurrency limits and parameters of `mnemo deploy`, on Prefect's test server
(tests/integration/conftest.py). The Kubernetes pools use infra/k8s/work-pools' templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import ConcurrencyLimitStrategy
from prefect.client.schemas.responses import DeploymentResponse
from prefect.workers.process import ProcessWorker
from typer.testing import CliRunner

from components.config import with_overrides
from flows.cli import app
from flows.deploy import BACKFILL, INGEST, RETRAIN, ROLLBACK
from tests.conftest import REPO

TEMPLATES = REPO / "infra" / "k8s" / "work-pools"
IMAGE = "registry.example.com/mnemo:0.1.0"


def create_pool(name: str, kind: str, template: dict) -> None:
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=name, type=kind, base_job_template=template), overwrite=True)


def deployments() -> dict[str, DeploymentResponse]:
    with get_client(sync_client=True) as client:
        return {name: client.read_deployment_by_name(name) for name in (RETRAIN, INGEST, ROLLBACK, BACKFILL)}


def deploy(params_file: Path, *args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, ["deploy", "--params", str(params_file), *args], env=env)


def test_deployments_land_on_a_process_pool_with_their_schedules_and_limits(params, params_file):
    create_pool("mnemo-process", "process", ProcessWorker.get_default_base_job_template())
    # As in the image (infra/Dockerfile): MNEMO_WORKSPACE set in the environment is fine, and not baked in.
    result = deploy(params_file, "--work-pool", "mnemo-process", env={"MNEMO_WORKSPACE": "/workspace"})
    assert result.exit_code == 0, result.output
    retrain, ingest, rollback = (d := deployments())[RETRAIN], d[INGEST], d[ROLLBACK]
    assert {x.work_pool_name for x in d.values()} == {"mnemo-process"}
    assert retrain.schedules[0].schedule.cron == params.schedule.retrain_cron
    assert ingest.schedules[0].schedule.interval.total_seconds() == params.schedule.inbox_interval
    assert not rollback.schedules
    assert retrain.global_concurrency_limit.limit == 1
    assert retrain.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    assert ingest.global_concurrency_limit.limit == 1
    assert ingest.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
    assert rollback.global_concurrency_limit.limit == 1
    # The params travel with the deployment; the workspace is the worker's MNEMO_WORKSPACE, not a path from here.
    assert retrain.parameters == {"params": params.model_dump(mode="json")}
    # Module entrypoints, no code to pull: the worker imports the installed package.
    assert retrain.entrypoint == "flows.retrain.retrain" and not retrain.pull_steps
    assert "mnemo-process" in result.output


def test_retrain_goes_to_the_gpu_pool_with_a_gpu_per_device_and_jobs_run_the_image(params, tmp_path):
    create_pool("mnemo-cpu", "kubernetes", json.loads((TEMPLATES / "cpu.json").read_text()))
    create_pool("mnemo-gpu", "kubernetes", json.loads((TEMPLATES / "gpu.json").read_text()))
    params_file = tmp_path / "params-4.yaml"  # training on 4 GPUs of one node
    params_file.write_text(yaml.safe_dump(with_overrides(params, {"train.devices": 4}).model_dump(mode="json")))
    result = deploy(params_file, "--work-pool", "mnemo-cpu", "--retrain-pool", "mnemo-gpu", "--image", IMAGE)
    assert result.exit_code == 0, result.output
    d = deployments()
    assert {name: x.work_pool_name for name, x in d.items()} == {
        RETRAIN: "mnemo-gpu",
        INGEST: "mnemo-cpu",
        ROLLBACK: "mnemo-cpu",
        BACKFILL: "mnemo-gpu",  # it embeds images, as a retrain does
    }
    assert d[RETRAIN].job_variables == {"image": IMAGE, "gpus": 4}  # gpu.json's job asks for them
    assert d[INGEST].job_variables == d[ROLLBACK].job_variables == {"image": IMAGE}
    assert d[RETRAIN].global_concurrency_limit.limit == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--work-pool", "nowhere"], "no work pool 'nowhere' on the Prefect server: create it first"),
        (["--work-pool", "mnemo-cpu"], "runs each flow in a container: pass --image"),
        (["--work-pool", "mnemo-process", "--image", IMAGE], "takes no image: leave out --image"),
        (["--work-pool", "mnemo-process", "--workspace", "/somewhere"], "each run uses MNEMO_WORKSPACE of the worker"),
        (["--image", IMAGE], "--retrain-pool and --image go with --work-pool"),
    ],
)
def test_what_a_pool_cannot_take_is_refused_before_anything_is_registered(params_file, args, message):
    create_pool("mnemo-process", "process", ProcessWorker.get_default_base_job_template())
    create_pool("mnemo-cpu", "kubernetes", json.loads((TEMPLATES / "cpu.json").read_text()))
    before = {name: x.updated for name, x in deployments().items()} if _deployed() else None
    result = deploy(params_file, *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    if before is not None:
        assert {name: x.updated for name, x in deployments().items()} == before


def _deployed() -> bool:
    from prefect.exceptions import ObjectNotFound

    try:
        deployments()
    except ObjectNotFound:
        return False
    return True
