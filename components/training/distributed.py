"""One continual step on several devices: the one training loop under torchrun, one process per device.

The calling process (the retrain flow's) writes a job directory, <workspace>/train-job, runs

    python -m torch.distributed.run --standalone --nproc-per-node N -m components.training.distributed <job>

and reads rank 0's result back from the same directory. Nothing else crosses: the caller
alone logs to MLflow and registers. The job directory holds

    job.json       what to learn: the new images, the recipe, the saved state and checkpoint dirs
    init.pt        the starting model (the champion), when there is one
    prototypes.npz the champion's class means from its table (compat.mode bct), when given
    rank-<r>.json  what rank r trained on: the digest of the replay memory it read, the epoch it resumed at
    model.pt, result.pt, state/   rank 0's model, TrainResult numbers and state for the next step

On `train.nodes` > 1 the caller is node 0 of a Kubeflow PyTorchJob (infra/k8s/training/): its
torchrun meets the other nodes' at the master's address instead of `--standalone`, and they run
this same module on the same job directory, which every node mounts (the workspace volume).

Every rank reads the saved memory and the last checkpoint from the same directories; the
memory for the next step is selected by rank 0 (herding, as on one device). A rank that
dies fails the step with a RuntimeError naming it; the caller then has no result to register.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from components.config import CompatParams, DistillParams, ModelParams, ReplayParams, TrainParams
from components.data.catalog import ImageRecord
from components.modeling.embedder import Embedder, load_embedder, pick_device, save_embedder
from components.training.compat import TRANSFORM_FILE, Transform
from components.training.continual import REPLAY_DIR, ContinualResult, Recipe, read_memory, train_continual
from components.training.loop import NonFiniteLossError, TrainResult
from components.training.ranks import Ranks
from components.training.replay import ReplayMemory

TRAIN_JOB = "train-job"  # under the workspace: the job directory every rank of every node reads
JOB_FILE = "job.json"
INIT_FILE = "init.pt"
PROTOTYPES_FILE = "prototypes.npz"
COMPAT_FILE = "compat.json"
MODEL_FILE = "model.pt"
RESULT_FILE = "result.pt"
STATE_DIR = "state"
OUTPUT_LINES = 400  # of torchrun's output, kept to explain a failure


@dataclass(frozen=True)
class Job:
    """What one continual step learns: train_continual's arguments, as files every rank can read."""

    new: list[ImageRecord]
    classes_dir: Path
    recipe: Recipe
    state: Path | None
    checkpoint_dir: Path | None
    prototypes: dict[str, np.ndarray] | None = None

    def write(self, directory: Path, init: Embedder | None) -> Path:
        """The job as files, in a directory emptied first: nothing of the last job's result survives."""
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        if init is not None:
            save_embedder(init, directory / INIT_FILE)
        if self.prototypes:
            np.savez(
                directory / PROTOTYPES_FILE,
                names=np.array(list(self.prototypes)),
                vectors=np.stack(list(self.prototypes.values())),
            )
        spec = {
            "new": [dataclasses.asdict(r) for r in self.new],
            "classes_dir": str(self.classes_dir),
            "recipe": {
                f.name: getattr(self.recipe, f.name).model_dump(mode="json") for f in dataclasses.fields(Recipe)
            },
            "state": str(self.state) if self.state else None,
            "checkpoint_dir": str(self.checkpoint_dir) if self.checkpoint_dir else None,
        }
        (directory / JOB_FILE).write_text(json.dumps(spec, indent=1) + "\n")
        return directory

    @classmethod
    def read(cls, directory: Path) -> tuple[Job, Embedder | None]:
        spec = json.loads((directory / JOB_FILE).read_text())
        recipe = spec["recipe"]
        prototypes = None
        if (directory / PROTOTYPES_FILE).is_file():
            with np.load(directory / PROTOTYPES_FILE) as saved:
                prototypes = dict(zip(saved["names"].tolist(), saved["vectors"]))
        job = cls(
            new=[ImageRecord(**r) for r in spec["new"]],
            classes_dir=Path(spec["classes_dir"]),
            recipe=Recipe(
                TrainParams.model_validate(recipe["train"]),
                ModelParams.model_validate(recipe["model"]),
                ReplayParams.model_validate(recipe["replay"]),
                DistillParams.model_validate(recipe["distill"]),
                CompatParams.model_validate(recipe["compat"]),
            ),
            state=Path(spec["state"]) if spec["state"] else None,
            checkpoint_dir=Path(spec["checkpoint_dir"]) if spec["checkpoint_dir"] else None,
            prototypes=prototypes,
        )
        init = load_embedder(directory / INIT_FILE) if (directory / INIT_FILE).is_file() else None
        return job, init


def backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@record  # a rank's exception reaches torchrun's failure summary
def run_rank(job_dir: Path) -> None:
    """One rank of the step (what torchrun starts): train, then rank 0 writes the result."""
    ranks = Ranks.from_env()
    job, init = Job.read(job_dir)
    device = ranks.device(pick_device(job.recipe.train.device))
    dist.init_process_group(backend(device))
    try:
        read = read_memory(job.state, job.recipe.replay)
        step = train_continual(
            job.new,
            job.classes_dir,
            job.recipe,
            init=init,
            state=job.state,
            checkpoint_dir=job.checkpoint_dir,
            ranks=ranks,
            prototypes=job.prototypes,
        )
        trained = {"memory": read.digest(), "resumed_from_epoch": step.train.resumed_from_epoch}
        (job_dir / f"rank-{ranks.rank}.json").write_text(
            json.dumps({"rank": ranks.rank, "world": ranks.world} | trained) + "\n"
        )
        if ranks.main:
            _write_result(job_dir, step, ranks)
        ranks.barrier()  # no rank leaves while rank 0 still selects and writes
    finally:
        dist.destroy_process_group()


def _write_result(job_dir: Path, step: ContinualResult, ranks: Ranks) -> None:
    step.save_state(job_dir / STATE_DIR)
    save_embedder(step.train.model, job_dir / MODEL_FILE)
    numbers = {f.name: getattr(step.train, f.name) for f in dataclasses.fields(step.train) if f.name != "model"}
    numbers["device"] = f"{ranks.world} x {step.train.device}"
    (job_dir / COMPAT_FILE).write_text(json.dumps({"transform_fit": step.transform_fit}) + "\n")
    torch.save(numbers, job_dir / RESULT_FILE)  # last: its presence means the rest is there


def read_result(job_dir: Path, recipe: Recipe) -> ContinualResult:
    """Rank 0's result: the trained model, its numbers, and the memory it selected for the next step."""
    numbers = torch.load(job_dir / RESULT_FILE, map_location="cpu", weights_only=True)
    train = TrainResult(model=load_embedder(job_dir / MODEL_FILE), **numbers)
    transform = job_dir / STATE_DIR / TRANSFORM_FILE
    return ContinualResult(
        train=train,
        memory=ReplayMemory.load(job_dir / STATE_DIR / REPLAY_DIR, recipe.replay),
        transform=Transform.load(transform) if transform.is_file() else None,
        transform_fit=json.loads((job_dir / COMPAT_FILE).read_text())["transform_fit"],
    )


@dataclass(frozen=True)
class Rendezvous:
    """Where the flow's node (node 0) meets the other nodes' torchrun: the PyTorchJob master's address.

    The Kubeflow training operator gives every pod of a PyTorchJob MASTER_ADDR and MASTER_PORT
    (the master pod's Service), and PET_NNODES, PET_NPROC_PER_NODE and PET_NODE_RANK, which the
    other nodes' torchrun reads; the flow runs on the master and must agree with them.
    """

    nodes: int
    addr: str
    port: int

    @classmethod
    def from_env(cls, train: TrainParams) -> Rendezvous | None:
        """Node 0's rendezvous for `train.nodes` > 1, None for one node; raises where the job and the params disagree."""
        env = os.environ
        for name, setting, wanted in (
            ("PET_NNODES", "train.nodes", train.nodes),
            ("PET_NPROC_PER_NODE", "train.devices", train.devices),
            ("PET_NODE_RANK", "the flow's node rank", 0),
        ):
            if env.get(name, str(wanted)) != str(wanted):
                raise ValueError(f"{setting} is {wanted}, but the PyTorchJob says {name}={env[name]}: make them agree")
        if train.nodes == 1:
            return None
        if not env.get("MASTER_ADDR") or not env.get("MASTER_PORT"):
            raise ValueError(
                f"train.nodes is {train.nodes}: a step on several nodes runs on the master of a PyTorchJob "
                "(infra/k8s/training/), which sets MASTER_ADDR and MASTER_PORT; they are not set here"
            )
        return cls(train.nodes, env["MASTER_ADDR"], int(env["MASTER_PORT"]))


def torchrun_command(job_dir: Path, devices: int, rendezvous: Rendezvous | None = None) -> list[str]:
    """This node's torchrun: one process per device, all nodes' ranks at the rendezvous (none: this node alone)."""
    where = (
        ["--standalone"]  # one node: a local rendezvous
        if rendezvous is None
        else [
            f"--nnodes={rendezvous.nodes}",
            "--node-rank=0",  # the flow's node: rank 0 writes the result the flow reads
            f"--master-addr={rendezvous.addr}",
            f"--master-port={rendezvous.port}",
        ]
    )
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *where,
        f"--nproc-per-node={devices}",
        "-m",
        "components.training.distributed",
        str(job_dir),
    ]


def launch(job_dir: Path, train: TrainParams, rendezvous: Rendezvous | None) -> None:
    """Run this node's ranks of the job under torchrun; its output goes to stderr; raises naming the rank that failed."""
    process = subprocess.Popen(
        torchrun_command(job_dir, train.devices, rendezvous),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)
    for line in process.stdout:
        sys.stderr.write(line)  # stdout stays for the caller's answer (`mnemo retrain --json`)
        tail.append(line)
    if process.wait() != 0:
        message = failure_message("".join(tail), process.returncode, train.world_size)
        raise NonFiniteLossError(message) if "NonFiniteLossError" in message else RuntimeError(message)


_FAILURE = re.compile(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)[^\n]*\n(?:[^\n]*\n)*?\s*traceback\s*:\s*(.*)")


def failure_message(output: str, returncode: int, world: int) -> str:
    """Which rank failed and how, from torchrun's failure summary: one killed by a signal, else one that raised.

    torchrun lists every failed rank; the others usually failed because that one vanished
    ("Connection closed by peer") or were stopped by torchrun (SIGTERM).
    """
    failures = [(int(r), int(code), why.strip()) for r, code, why in _FAILURE.findall(output)]
    if not failures:
        last = next((line for line in reversed(output.splitlines()) if line.strip()), "no output")
        return f"training under torchrun failed (exit {returncode}): {last.strip()}"
    stopped = [f for f in failures if f[1] == -15]  # SIGTERM: by torchrun, once another rank had failed
    killed = [f for f in failures if f[1] < 0 and f not in stopped]
    raised = [f for f in failures if f[1] > 0]
    rank, code, why = (killed or raised or failures)[0]
    if not why or why.startswith(("To enable traceback", "Traceback")):
        errors = re.findall(rf"^\[rank{rank}\]:\s*(\w+(?:Error|Exception)\b.*)$", output, re.M)
        why = errors[-1] if errors else why
    return f"training rank {rank} of {world} {'died' if code < 0 else 'failed'} (exit {code}): {why}"


def train_continual_on_devices(
    new: list[ImageRecord],
    classes_dir: Path,
    recipe: Recipe,
    *,
    init: Embedder | None,
    state: Path | None,
    checkpoint_dir: Path | None,
    job_dir: Path,
    prototypes: dict[str, np.ndarray] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> ContinualResult:
    """One continual step on `train.devices` x `train.nodes` devices: in this process for one (no torchrun),
    else under torchrun, this process's node being node 0 (see Rendezvous). `prototypes`: the champion's
    class means from its table (compat.mode bct). `on_epoch` is called after each epoch in this process
    (one device only: under torchrun the epochs are logged once the ranks are done).

    `job_dir` must be where the other nodes' ranks look (<workspace>/train-job, TRAIN_JOB), and
    `classes_dir`, `state` and `checkpoint_dir` on a volume they mount at the same path.
    """
    if recipe.train.world_size == 1:
        return train_continual(
            new,
            classes_dir,
            recipe,
            init=init,
            state=state,
            checkpoint_dir=checkpoint_dir,
            prototypes=prototypes,
            on_epoch=on_epoch,
        )
    rendezvous = Rendezvous.from_env(recipe.train)  # before anything is written: the params must fit the job
    Job(list(new), classes_dir, recipe, state, checkpoint_dir, prototypes).write(job_dir, init)
    launch(job_dir, recipe.train, rendezvous)
    return read_result(job_dir, recipe)


if __name__ == "__main__":
    run_rank(Path(sys.argv[1]))
