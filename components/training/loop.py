"""The one training loop: metric learning with pytorch-metric-learning, CUDA (bf16, channels-last) when present.

Continual-learning techniques are objects handed to the loop, not copies of it:
- a ReplayMemory (replay.py) supplies exemplars of old classes, which MixedBatches
  (sampler.py) mixes into every batch at `replay.batch_ratio`;
- a Distillation (distill.py) adds terms that keep the new embeddings close to the frozen
  previous model's;
- an Influence (compat.py) adds BCT's term that keeps them searchable among the previous
  model's vectors (backward-compatible training);
- a RotationTask (selfsup.py, `train.rotation_weight`) adds self-supervised rotation
  prediction on a turned copy of every batch, for transfer to classes never trained on.
The loss (and, for proxy losses, one proxy per class name that grows as classes arrive)
is a MetricLoss (losses.py). The loop checkpoints every epoch and resumes after a crash
(checkpoints.py); one continual step around it is train_continual (continual.py).
On several devices the same loop runs in every torchrun process, told its place by a Ranks
(ranks.py); with one device (`SINGLE`) nothing about it changes.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler
from torch.utils.data import DataLoader

from components.config import ModelParams, TrainParams
from components.data.datasets import ImageFiles
from components.data.transforms import train_transform
from components.modeling.embedder import Embedder, build_embedder, fit_centre, pick_device
from components.ops.failpoints import failpoint
from components.training.checkpoints import fingerprint, load_checkpoint, save_checkpoint
from components.training.compat import Influence
from components.training.distill import Distillation
from components.training.losses import MetricLoss, class_means
from components.training.ranks import SINGLE, Ranks
from components.training.replay import ReplayMemory
from components.training.sampler import MixedBatches
from components.training.selfsup import RotationTask


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run must not produce a model."""


@dataclass
class TrainResult:
    model: Embedder
    device: str
    epochs: int
    images: int  # images per epoch: the new ones plus the memory draws
    classes: int
    seconds: float
    loss_state: dict = field(default_factory=dict)
    epoch_metrics: dict[str, list[float]] = field(default_factory=dict)
    resumed_from_epoch: int = 0

    @property
    def epoch_losses(self) -> list[float]:
        return self.epoch_metrics.get("train_loss", [])

    @property
    def images_per_second(self) -> float:
        seconds = sum(self.epoch_metrics.get("epoch_seconds", [])) or self.seconds
        return self.images * len(self.epoch_metrics.get("epoch_seconds", [])) / seconds if seconds else 0.0

    def params(self) -> dict[str, object]:
        return {"train.images": self.images, "train.classes": self.classes, "train.device_used": self.device}

    def metrics(self) -> dict[str, float]:
        return {"train_seconds": self.seconds, "train_images_per_second": self.images_per_second}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_schedule(optimizer: torch.optim.Optimizer, params: TrainParams, total_steps: int) -> LRScheduler:
    """Stepped per batch. Cosine: every group's lr (the proxies' too) falls to 0 over the run's batches."""
    if params.lr_schedule == "cosine":
        return CosineAnnealingLR(optimizer, T_max=total_steps)
    return LambdaLR(optimizer, lambda _: 1.0)


@dataclass
class _Run:
    """One training job, built: what every step uses and what every checkpoint holds."""

    model: Embedder
    forward: Callable[[torch.Tensor], torch.Tensor]  # the model (a DDP replica across ranks), compiled when asked
    metric_loss: MetricLoss
    distill: Distillation | None
    sampler: MixedBatches
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    schedule: LRScheduler
    old_labels: (
        torch.Tensor
    )  # which labels are old classes (those the memory replays): where `embedding_on: old` distils
    device: torch.device
    ranks: Ranks = SINGLE
    compat: Influence | None = None  # BCT's influence term (compat.py); None: not trained for compatibility
    rotation: RotationTask | None = None  # self-supervised turn prediction (selfsup.py); None: off

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def state(self) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "loss": self.metric_loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
        }
        if self.rotation is not None:
            state["rotation"] = self.rotation.state_dict()
        return state

    def restore(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        self.metric_loss.load_state_dict(saved["loss"])
        if self.rotation is not None:
            self.rotation.load_state_dict(saved["rotation"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.schedule.load_state_dict(saved["schedule"])

    def step(self, x: torch.Tensor, y: torch.Tensor, *, epoch: int, batch: int) -> dict[str, float]:
        """One optimiser step on one batch; returns the loss and each of its terms."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        images, turns = (x, None) if self.rotation is None else self.rotation.inputs(x)  # upright + turned copy
        if self.on_gpu:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.on_gpu):
            embeddings = self.forward(images)
        embeddings = embeddings[: len(x)]  # the turned copies' part is read by the rotation task (its features)
        # Across ranks every term is the global batch's times the world size (see ranks.py).
        terms = {"metric_loss": self.metric_loss(embeddings.float(), y, ranks=self.ranks)}
        if self.distill is not None:
            terms |= self.distill(x, embeddings, old=self.old_labels[y], ranks=self.ranks)
        if self.compat is not None:
            terms |= self.compat(embeddings, y, ranks=self.ranks)
        if self.rotation is not None and turns is not None:
            terms |= self.rotation(turns, ranks=self.ranks)
        loss = sum(terms.values())
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(f"loss became {loss.item()} at epoch {epoch + 1}, batch {batch + 1}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.ranks.average_replicated_grads(self.metric_loss.parameters())
        if self.rotation is not None:
            self.ranks.average_replicated_grads(self.rotation.parameters())
        self.optimizer.step()
        self.schedule.step()
        return {name: value.item() / self.ranks.world for name, value in {"train_loss": loss, **terms}.items()}


def _build_run(
    model: Embedder,
    paths: list[Path],
    names: list[str],
    n_new: int,
    params: TrainParams,
    device: torch.device,
    *,
    memory_ratio: float,
    distill: Distillation | None,
    compat: Influence | None,
    loss_state: dict | None,
    ranks: Ranks = SINGLE,
) -> _Run:
    """The model on its device, a label (and proxy) for every class, the batches, optimiser and schedule.

    paths[:n_new] are the new images, the rest memory exemplars; `names` their classes.
    """
    on_gpu = device.type == "cuda"
    model = model.to(device)
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
    replica = ranks.replicate(model, device)
    forward = torch.compile(replica) if params.compile else replica
    metric_loss = MetricLoss(params, model.embedding_dim)
    if loss_state:
        metric_loss.restore(loss_state)
    metric_loss.add_classes(names, class_means=class_means(model, paths, names))
    metric_loss = metric_loss.to(device)
    ranks.broadcast_params(metric_loss)
    rotation = RotationTask(model.head, params.rotation_weight).to(device) if params.rotation_weight else None
    if rotation is not None:
        ranks.broadcast_params(rotation)

    dataset = ImageFiles(
        paths,
        metric_loss.labels(names),
        train_transform(model.image_size, params.augment, model.mean, model.std, params.augment_strength, params.erase),
    )
    sampler = MixedBatches(
        dataset.labels[:n_new],
        dataset.labels[n_new:],
        batch_size=params.batch_size,
        m=min(params.m_per_class, params.batch_size // 2),
        memory_ratio=memory_ratio,
        seed=params.seed,
        epoch_length=params.epoch_length,
        rank=ranks.rank,
        world=ranks.world,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=params.num_workers,
        pin_memory=on_gpu,
        persistent_workers=params.num_workers > 0,
    )
    groups: list[dict[str, Any]] = [{"params": model.parameters()}]
    if any(True for _ in metric_loss.parameters()):
        groups.append({"params": metric_loss.parameters(), "lr": params.proxy_lr, "weight_decay": 0.0})
    if rotation is not None:
        groups.append({"params": rotation.parameters()})
    optimizer = torch.optim.AdamW(groups, lr=params.lr, weight_decay=params.weight_decay)
    old_labels = torch.zeros(len(metric_loss.classes), dtype=torch.bool)
    old_labels[sorted(set(dataset.labels[n_new:]))] = True
    return _Run(
        model=model,
        forward=forward,
        metric_loss=metric_loss,
        distill=distill.to(device) if distill is not None else None,
        compat=compat.order(metric_loss.classes).to(device) if compat is not None else None,
        rotation=rotation,
        sampler=sampler,
        loader=loader,
        optimizer=optimizer,
        schedule=lr_schedule(optimizer, params, params.epochs * len(sampler)),
        old_labels=old_labels.to(device),
        device=device,
        ranks=ranks,
    )


def _resume(run: _Run, result: TrainResult, checkpoint_dir: Path | None, job: str) -> int:
    """Continue from the job's last checkpoint, if there is one; returns the first epoch still to train."""
    saved = load_checkpoint(checkpoint_dir, job, run.device) if checkpoint_dir is not None else None
    if saved is None:
        return 0
    run.restore(saved)
    result.epoch_metrics = {k: list(v) for k, v in saved["epoch_metrics"].items()}
    result.resumed_from_epoch = saved["epoch"] + 1
    return result.resumed_from_epoch


def _train_epoch(run: _Run, epoch: int, seed: int, advance: Callable[[float], None]) -> dict[str, float]:
    """One pass over the epoch's batches; returns its mean loss terms, speed and the lr it ended at."""
    start = time.perf_counter()
    run.model.train()
    if run.distill is not None:
        run.distill.train()
    run.sampler.set_epoch(epoch)
    # augmentations, per epoch (resumable) and per rank (each its own draws)
    torch.manual_seed((seed * 100_003 + epoch) * run.ranks.world + run.ranks.rank)
    sums: dict[str, float] = {}
    batches = 0
    for x, y in run.loader:
        for name, value in run.step(x, y, epoch=epoch, batch=batches).items():
            sums[name] = sums.get(name, 0.0) + value
        batches += 1
        advance(sums["train_loss"] / batches)
    seconds = time.perf_counter() - start
    return {k: v / batches for k, v in sums.items()} | {
        "epoch_seconds": seconds,
        "epoch_images_per_second": batches * run.sampler.batch_size / seconds,
        "lr": float(run.schedule.get_last_lr()[0]),  # the model's lr after the epoch's last step
    }


def _progress(show: bool) -> Progress:
    return Progress(
        TextColumn("[bold]train[/] epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),  # stdout stays for the caller's answer (`mnemo retrain --json`)
        disable=not show,
    )


def train_embedder(
    paths: Sequence[Path],
    class_names: Sequence[str],
    params: TrainParams,
    model_params: ModelParams,
    *,
    init: Embedder | None = None,
    memory: ReplayMemory | None = None,
    distill: Distillation | None = None,
    compat: Influence | None = None,
    loss_state: dict | None = None,
    checkpoint_dir: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    ranks: Ranks = SINGLE,
) -> TrainResult:
    """Fine-tune `init` (or a fresh embedder) on new images, replaying `memory`, distilling from `distill`,
    kept searchable among the previous model's vectors by `compat` (BCT's influence loss).

    With `checkpoint_dir`, every epoch is checkpointed there and a run of the same
    job (same images, params and starting weights) resumes from the last epoch saved.
    Across `ranks`, rank 0 alone writes the checkpoints, and every rank resumes from them.
    """
    exemplars = memory.exemplars() if memory is not None else []
    new_items = [(str(p), c) for p, c in zip(paths, class_names)]
    all_names = list(class_names) + [e.cls for e in exemplars]
    if len(set(all_names)) < 2:
        raise ValueError(f"training needs at least 2 classes, got {len(set(all_names))}")
    seed_everything(params.seed)
    model = copy.deepcopy(init) if init is not None else build_embedder(model_params)
    job = fingerprint(
        new_items + [(e.id, e.cls) for e in exemplars],
        params,
        {
            "model": model_params.model_dump(mode="json"),
            "loss_state": bool(loss_state),
            "distill": distill.params.model_dump() if distill else None,
            "ratio": memory.params.batch_ratio if memory else 0,
            "compat": compat.params.model_dump() if compat else None,
        },
        init,
    )
    run = _build_run(
        model,
        list(paths) + [e.path for e in exemplars],
        all_names,
        len(new_items),
        params,
        ranks.device(pick_device(params.device)),
        memory_ratio=memory.params.batch_ratio if memory else 0.0,
        distill=distill,
        compat=compat,
        loss_state=loss_state,
        ranks=ranks,
    )
    result = TrainResult(
        model=run.model,
        device=str(run.device),
        epochs=params.epochs,
        images=len(run.sampler) * run.sampler.batch_size,
        classes=len(set(all_names)),
        seconds=0.0,
    )
    first_epoch = _resume(run, result, checkpoint_dir, job)
    start = time.perf_counter()
    try:
        with _progress(show=ranks.main) as progress:
            task = progress.add_task("train", total=len(run.loader), epoch=first_epoch, loss=float("nan"))
            for epoch in range(first_epoch, params.epochs):
                progress.reset(task, total=len(run.loader), epoch=epoch + 1, loss=float("nan"))
                metrics = _train_epoch(
                    run, epoch, params.seed, lambda loss: progress.update(task, advance=1, loss=loss)
                )
                for key, value in metrics.items():
                    result.epoch_metrics.setdefault(key, []).append(value)
                if checkpoint_dir is not None:
                    if ranks.main:
                        save_checkpoint(
                            checkpoint_dir, job, epoch, run.state() | {"epoch_metrics": result.epoch_metrics}
                        )
                    ranks.barrier()  # no rank goes past an epoch before its checkpoint is on disk: a rank killed later resumes from it
                for name in ranks.failpoints("train-epoch"):
                    failpoint(name)
                if on_epoch is not None:
                    on_epoch(epoch, metrics)
    finally:
        if run.rotation is not None:
            run.rotation.close()  # the served model keeps no listener
    result.seconds = time.perf_counter() - start
    result.model = run.model.to("cpu", memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]  # Module.to takes memory_format at runtime; torch's stubs omit it
    if result.model.centred and ranks.main:  # centred on what it trained on (model.centre)
        fit_centre(result.model, list(paths) + [e.path for e in exemplars])
    result.loss_state = run.metric_loss.to("cpu").state()
    return result
