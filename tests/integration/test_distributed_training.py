"""Training on 2 gloo ranks (CPU) under torchrun, as the retrain flow and a PyTorchJob run it.

The retrain flow with `train.devices: 2` in one workspace: a 2-rank retrain that is promoted (gate
metrics within noise of the one-process run on the same stream, in a second workspace); a retrain
whose rank 1 is SIGKILLed mid training (failpoint `train-epoch-rank1`), which fails naming the rank,
registers nothing and leaves the live pair answering; and the next retrain, which completes.

One continual step (train_continual_on_devices, the flow's train task's call) on 2 ranks: every rank
reads the same memory; killed after an epoch and run again, every rank resumes from rank 0's
checkpoint and the step ends as the uninterrupted one; on 2 nodes of 1 rank (node 1 running the
PyTorchJob worker's command) it trains as on 1 node of 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from components.config import with_overrides
from components.data.catalog import Catalog, ImageRecord
from components.data.demo import discover_fonts, stream_classes, write_arrival
from components.data.transforms import open_rgb
from components.modeling.embedder import Embedder, build_embedder
from components.ops.failpoints import ENV as FAILPOINT
from components.registry.mlflow_registry import ModelRegistry
from components.serving.live import LiveIndex
from components.training.continual import REPLAY_DIR, ContinualResult, Recipe
from components.training.distributed import TRAIN_JOB, train_continual_on_devices
from components.training.replay import ReplayMemory
from components.workspace import resolve_workspace
from flows.retrain import retrain
from tests.conftest import REPO, TINY

# The gate's headline metrics of the first model. The two runs see the same batches but differ in
# batch-norm statistics (per rank of 8 images on CPU, not of the batch of 16: SyncBatchNorm needs
# GPUs) and in their augmentation draws. On this stream (12 unseen queries of 2 classes: one query is
# 0.083, chance R@1 about 0.45; one epoch of 3 steps from scratch) train seeds 0-3 gave (measured
# 2026-12-06, this machine): one process R@1 0.58-0.75, MAP@R 0.38-0.60; 2 ranks R@1 0.33-0.75,
# MAP@R 0.30-0.49; one process with batch norm over each half batch (what 2 CPU ranks compute) R@1
# 0.33-0.83, MAP@R 0.25-0.46, with the 2-rank losses to 0.03: the gap is batch norm's. The largest
# gap, same seed, 2 ranks against one process: 0.33 (R@1, seed 0), 0.18 (MAP@R). Allowed: 0.35. This
# bounds a broken run only; a wrong gradient (scaled by 2, or missing a rank's share) is caught by
# tests/unit/training/test_distributed_step.py to 1e-5, not here.
COMPARED = ("unseen_recall_at_1", "unseen_recall_at_5", "unseen_map_at_r")
NOISE = 0.35
# Resumed or on 2 nodes, the step must be the uninterrupted one-node step: same batches, same
# augmentation draws, the same gloo reductions.
TIGHT = 1e-6


@pytest.mark.long  # four retrains, two of them on 2 ranks: over a minute (make test-long, run by CI)
def test_two_rank_retrain_is_promoted_fails_by_rank_and_recovers(params, ws, tmp_path, monkeypatch):
    fonts = discover_fonts()
    arrivals = stream_classes(fonts, params.demo)
    two = with_overrides(params, {"train.devices": 2})
    alone = with_overrides(params, {"paths.workspace": str(tmp_path / "alone")})
    alone_ws = resolve_workspace(alone)
    for target in (ws, alone_ws):
        write_arrival(target.inbox, 0, arrivals[0], fonts, params.demo)

    first = retrain(two, str(ws.root))
    assert first.status == "promoted", first.reasons
    reference = retrain(alone, str(alone_ws.root))
    assert reference.status == "promoted", reference.reasons
    for key in COMPARED:
        assert abs(first.metrics[key] - reference.metrics[key]) <= NOISE, (key, first.metrics, reference.metrics)
    registry = ModelRegistry(ws, params.registry)
    assert registry.champion().version == "1"

    # Rank 1 dies after its first epoch: the step fails naming it; nothing is registered.
    write_arrival(ws.inbox, 1, arrivals[1], fonts, params.demo)
    lenient = with_overrides(two, {"gate.max_unseen_recall_at_1_drop": 1.0, "gate.max_slice_forgetting": 1.0})
    monkeypatch.setenv(FAILPOINT, "train-epoch-rank1")  # the ranks inherit it: only rank 1 stops there
    with pytest.raises(RuntimeError, match=r"training rank 1 of 2 died \(exit -9\): Signal 9"):
        retrain(lenient, str(ws.root))
    monkeypatch.delenv(FAILPOINT)
    assert registry.latest() is not None and registry.latest().version == "1"
    assert registry.champion().version == "1"
    record = Catalog.load(ws.catalog).records()[0]
    pair = LiveIndex(ws, params.registry, params.index, refresh_seconds=60).current()
    [hits] = pair.query([open_rgb(ws.classes_dir / record.id)], 1)
    assert pair.version == "1" and hits[0]["id"] == record.id  # the live pair keeps answering

    # The next retrain starts from what the failed one left (rank 0's checkpoint) and completes.
    second = retrain(lenient, str(ws.root))
    assert second.status == "promoted" and second.version == "2", second.reasons
    assert registry.champion().version == "2"
    memory = json.loads((registry.download_state("2", tmp_path / "state") / "replay" / "memory.json").read_text())
    assert sum(len(ids) for ids in memory["classes"].values()) > 0  # rank 0's selection came back


def _images(root: Path, classes: list[str], per_class: int, seed: int) -> list[tuple[str, str, Path]]:
    """(id, class, path) of small random images, one folder per class."""
    rng = np.random.default_rng(seed)
    out = []
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = root / c / f"{i}.png"
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(path)
            out.append((f"{c}/{i}.png", c, path))
    return out


@dataclass(frozen=True)
class Step:
    """One continual step's inputs (4 new classes, a saved memory of 2 old ones, a teacher), for any layout of ranks."""

    root: Path
    new: list[ImageRecord]
    recipe: Recipe
    init: Embedder
    state: Path

    def run(self, name: str, **layout: int) -> ContinualResult:
        """The step on `layout` (train.devices, train.nodes), its checkpoints in <name>/checkpoints."""
        recipe = dataclasses.replace(self.recipe, train=self.recipe.train.model_copy(update=layout))
        return train_continual_on_devices(
            self.new,
            self.root / "classes",
            recipe,
            init=self.init,  # the teacher runs on every rank
            state=self.state,
            checkpoint_dir=self.root / name / "checkpoints",
            job_dir=self.root / name / TRAIN_JOB,
        )

    def ranks(self, name: str) -> list[dict]:
        """What each rank reported of its training (rank-<r>.json in the job directory)."""
        return [json.loads(p.read_text()) for p in sorted((self.root / name / TRAIN_JOB).glob("rank-*.json"))]


@pytest.fixture(scope="module")
def step(repo_params, tmp_path_factory) -> Step:
    root = tmp_path_factory.mktemp("step")
    recipe = Recipe.of(with_overrides(repo_params, TINY | {"train.epochs": 2, "replay.budget": 8}))
    new = [ImageRecord(i, c, "a1", "train") for i, c, _ in _images(root / "classes", ["n0", "n1", "n2", "n3"], 4, 1)]
    memory = ReplayMemory(recipe.replay.model_copy(update={"selection": "random"}))
    old = _images(root / "old", ["o0", "o1"], 5, 2)
    memory.add_classes({c: [(i, p) for i, k, p in old if k == c] for c in ["o0", "o1"]})
    memory.save(root / "state" / REPLAY_DIR)
    return Step(root, new, recipe, build_embedder(recipe.model), root / "state")


@pytest.fixture(scope="module")
def uninterrupted(step) -> ContinualResult:
    """The step on 2 ranks of one node, from start to end."""
    return step.run("uninterrupted", devices=2, nodes=1)


def _same_training(result: ContinualResult, reference: ContinualResult) -> None:
    """Same weights (within TIGHT), the same per-epoch losses, the same memory selected."""
    for (name, value), expected in zip(
        result.train.model.state_dict().items(), reference.train.model.state_dict().values(), strict=True
    ):
        assert torch.allclose(value.float(), expected.float(), atol=TIGHT, rtol=0), name
    assert result.train.epoch_losses == pytest.approx(reference.train.epoch_losses, abs=TIGHT)
    assert [e.id for e in result.memory.exemplars()] == [e.id for e in reference.memory.exemplars()]


@pytest.mark.slow
def test_every_rank_trains_on_the_same_memory_and_rank_0_selects_the_next(step, uninterrupted):
    read = ReplayMemory.load(step.state / REPLAY_DIR, step.recipe.replay)
    assert [r["memory"] for r in step.ranks("uninterrupted")] == [read.digest()] * 2  # byte-identical on every rank
    assert uninterrupted.train.device == "2 x cpu" and len(uninterrupted.train.epoch_losses) == 2
    assert uninterrupted.memory.classes == ["n0", "n1", "n2", "n3", "o0", "o1"] and len(uninterrupted.memory) == 8
    assert (step.root / "uninterrupted" / "checkpoints" / "last.pt").is_file()  # written by rank 0


@pytest.mark.slow
def test_a_killed_rank_restarts_every_rank_from_rank_0s_checkpoint_and_ends_as_if_never_killed(
    step, uninterrupted, monkeypatch
):
    monkeypatch.setenv(FAILPOINT, "train-epoch-rank1")  # rank 1 dies once its first epoch is over
    with pytest.raises(RuntimeError, match=r"training rank 1 of 2 died \(exit -9\)"):
        step.run("killed", devices=2, nodes=1)
    checkpoint = torch.load(step.root / "killed" / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 0  # rank 0's, of the epoch rank 1 finished before it died

    monkeypatch.delenv(FAILPOINT)
    resumed = step.run("killed", devices=2, nodes=1)
    assert [r["resumed_from_epoch"] for r in step.ranks("killed")] == [1, 1]  # every rank, from that checkpoint
    assert resumed.train.resumed_from_epoch == 1
    _same_training(resumed, uninterrupted)


@pytest.mark.slow
def test_the_pytorchjob_worker_joins_the_flows_node_and_the_step_trains_as_on_one_node(
    step, uninterrupted, monkeypatch
):
    """Node 1 runs the PyTorchJob worker's command (infra/k8s/training/pytorchjob.yaml), its $(VARS) set
    as the training operator sets them; node 0 is train_continual_on_devices, as the master's flow runs it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    operator = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    # torchrun gives each of 2 processes on a node one thread, a lone one all: the same sums, in
    # another order. One thread each, as in the one-node run, keeps the comparison exact.
    operator |= {"OMP_NUM_THREADS": "1"}
    for name, value in (operator | {"PET_NODE_RANK": "0"}).items():
        monkeypatch.setenv(name, value)
    worker = _pytorchjob_container("Worker")
    env = os.environ | operator | {"PET_NODE_RANK": "1", "MNEMO_WORKSPACE": str(step.root / "nodes")}
    command = [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], arg) for arg in worker["command"] + worker["args"]]
    assert command[0] == "python"
    log = step.root / "node-1.log"
    with log.open("w") as out:
        node_1 = subprocess.Popen([sys.executable, *command[1:]], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            on_nodes = step.run("nodes", devices=1, nodes=2)
            node_1.wait(timeout=120)
        finally:
            node_1.kill()
    assert node_1.returncode == 0, log.read_text()[-3000:]
    assert [r["rank"] for r in step.ranks("nodes")] == [0, 1]  # rank 1 trained on node 1, on the same job
    assert on_nodes.train.device == "2 x cpu"
    _same_training(on_nodes, uninterrupted)


def _pytorchjob_container(replica: str) -> dict:
    job = yaml.safe_load((REPO / "infra" / "k8s" / "training" / "pytorchjob.yaml").read_text())
    [container] = job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"]
    return container
