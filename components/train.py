"""The training loop: metric learning with pytorch-metric-learning on the GPU when present.

Skeleton scope: a loss and miner chosen in params (triplet + batch-hard, or
multi-similarity + its miner) over MPerClassSampler batches, warm-started from the
previous champion when one is given.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pytorch_metric_learning import losses, miners, samplers
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from components.config import ModelParams, TrainParams, stage_setup
from components.data.class_registry import ClassRegistry
from components.data.datasets import ImageFiles, encode_labels
from components.data.transforms import train_transform
from components.modeling.embedder import Embedder, build_embedder, pick_device, save_embedder


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run must not produce a model."""


@dataclass
class TrainResult:
    model: Embedder
    device: str
    epochs: int
    images: int
    classes: int
    seconds: float
    epoch_losses: list[float] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.images * self.epochs / self.seconds if self.seconds else 0.0

    def params(self) -> dict[str, object]:
        return {"train.images": self.images, "train.classes": self.classes, "train.device_used": self.device}

    def metrics(self) -> dict[str, float]:
        return {"train_seconds": self.seconds, "train_images_per_second": self.images_per_second}


def make_loss(params: TrainParams) -> tuple[losses.BaseMetricLossFunction, miners.BaseMiner | None]:
    """The loss and miner named in params, from pytorch-metric-learning."""
    loss = {
        "triplet": lambda: losses.TripletMarginLoss(margin=params.margin),
        "multi_similarity": lambda: losses.MultiSimilarityLoss(),
    }[params.loss]()
    miner = {
        "batch_hard": lambda: miners.BatchHardMiner(),
        "multi_similarity": lambda: miners.MultiSimilarityMiner(),
        "none": lambda: None,
    }[params.miner]()
    return loss, miner


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # MPerClassSampler draws from numpy's global generator
    torch.manual_seed(seed)


def train_embedder(
    paths: Sequence[Path],
    class_names: Sequence[str],
    params: TrainParams,
    model_params: ModelParams,
    *,
    init: Embedder | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Fine-tune `init` (or a fresh embedder) on the given images; returns a new model."""
    labels, classes = encode_labels(class_names)
    if len(classes) < 2:
        raise ValueError(f"training needs at least 2 classes, got {len(classes)}")
    seed_everything(params.seed)
    device = pick_device(params.device)
    on_gpu = device.type == "cuda"

    model = copy.deepcopy(init) if init is not None else build_embedder(model_params)
    model = model.to(device)
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)

    dataset = ImageFiles(paths, labels, train_transform(model.image_size))
    # Every batch holds m images of each of batch/m classes; early on there are few classes.
    m = min(params.m_per_class, params.batch_size // 2)
    batch_size = min(params.batch_size, m * len(classes)) // m * m
    sampler = samplers.MPerClassSampler(labels, m=m, batch_size=batch_size, length_before_new_iter=max(len(dataset), batch_size))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=params.num_workers,
        pin_memory=on_gpu,
        drop_last=True,
        persistent_workers=params.num_workers > 0,
    )
    loss_fn, miner = make_loss(params)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)

    result = TrainResult(model=model, device=str(device), epochs=params.epochs, images=len(dataset), classes=len(classes), seconds=0.0)
    start = time.perf_counter()
    with Progress(
        TextColumn("[bold]train[/] epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
    ) as progress:
        task = progress.add_task("train", total=len(loader), epoch=0, loss=float("nan"))
        for epoch in range(params.epochs):
            model.train()
            progress.reset(task, total=len(loader), epoch=epoch + 1, loss=float("nan"))
            total, batches = 0.0, 0
            for x, y in loader:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if on_gpu:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
                    embeddings = model(x)
                loss = loss_fn(embeddings, y, miner(embeddings, y) if miner else None)
                if not math.isfinite(loss.item()):
                    raise NonFiniteLossError(f"loss became {loss.item()} at epoch {epoch + 1}, batch {batches + 1}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
                batches += 1
                progress.update(task, advance=1, loss=total / batches)
            epoch_loss = total / max(batches, 1)
            result.epoch_losses.append(epoch_loss)
            if on_epoch is not None:
                on_epoch(epoch, {"train_loss": epoch_loss})
    result.seconds = time.perf_counter() - start
    result.model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    return result


def main(argv: list[str] | None = None) -> None:
    """DVC stage: train an embedder from scratch on every trained class's training images."""
    params, ws = stage_setup(argv, main.__doc__)
    records = ClassRegistry.load(ws.class_registry).records("train")
    result = train_embedder([ws.classes_dir / r.id for r in records], [r.cls for r in records], params.train, params.model)
    ws.dvc_outputs.mkdir(parents=True, exist_ok=True)
    save_embedder(result.model, ws.dvc_outputs / "embedder.pt")
    summary = {"train_seconds": result.seconds, "train_images": result.images, "train_classes": result.classes,
               "train_loss": result.epoch_losses[-1], "device": result.device}
    (ws.dvc_outputs / "train.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
