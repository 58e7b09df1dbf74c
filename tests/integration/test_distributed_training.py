"""The retrain flow with `train.devices: 2`: the one loop under torchrun (2 gloo ranks on CPU).

One workspace lives through: a 2-rank retrain that is promoted (gate metrics within noise of
the one-process run on the same stream, in a second workspace); a retrain whose rank 1 is
SIGKILLed mid training (failpoint `train-epoch-rank1`), which fails naming the rank, registers
nothing and leaves the live pair answering; and the next retrain, which completes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.config import with_overrides
from components.data.catalog import Catalog, ImageRecord
from components.data.demo import discover_fonts, stream_classes, write_arrival
from components.data.transforms import open_rgb
from components.modeling.embedder import build_embedder
from components.ops.failpoints import ENV as FAILPOINT
from components.registry.mlflow_registry import ModelRegistry
from components.serving.live import LiveIndex
from components.training.continual import REPLAY_DIR, Recipe
from components.training.distributed import train_continual_on_devices
from components.training.replay import ReplayMemory
from components.workspace import resolve_workspace
from flows.retrain import retrain

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


@pytest.mark.slow
def test_every_rank_trains_on_the_same_memory_and_rank_0_selects_the_next(params, tmp_path):
    recipe = Recipe.of(with_overrides(params, {"train.devices": 2, "replay.budget": 8}))
    classes_dir = tmp_path / "classes"
    new = [ImageRecord(i, c, "a1", "train") for i, c, _ in _images(classes_dir, ["n0", "n1", "n2", "n3"], 4, 1)]
    memory = ReplayMemory(recipe.replay.model_copy(update={"selection": "random"}))
    old = _images(tmp_path / "old", ["o0", "o1"], 5, 2)
    memory.add_classes({c: [(i, p) for i, k, p in old if k == c] for c in ["o0", "o1"]})
    state = tmp_path / "state"
    memory.save(state / REPLAY_DIR)
    read = ReplayMemory.load(state / REPLAY_DIR, recipe.replay)

    step = train_continual_on_devices(
        new,
        classes_dir,
        recipe,
        init=build_embedder(recipe.model),  # the teacher runs on every rank
        state=state,
        checkpoint_dir=tmp_path / "checkpoints",
        job_dir=tmp_path / "job",
    )
    ranks = [json.loads((tmp_path / "job" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["memory"] for r in ranks] == [read.digest()] * 2  # byte-identical on every rank
    assert step.train.device == "2 x cpu" and len(step.train.epoch_losses) == recipe.train.epochs
    assert step.memory.classes == ["n0", "n1", "n2", "n3", "o0", "o1"] and len(step.memory) == 8
    assert (tmp_path / "checkpoints" / "last.pt").is_file()  # written by rank 0
