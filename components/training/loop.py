"""The one training loop: metric learning with pytorch-metric-learning, CUDA when present.

Continual-learning techniques are objects handed to the loop, not copies of it:
- a ReplayMemory (components/training/replay.py) supplies exemplars of old classes, mixed into
  every batch at `replay.batch_ratio`;
- a Distillation (components/training/distill.py) adds terms that keep the new embeddings
  close to the frozen previous model's.
The loss (and, for proxy losses, one proxy per class name that grows as classes
arrive) is a MetricLoss. The loop checkpoints every epoch and resumes after a crash.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, Sampler

from components.config import DistillParams, ModelParams, ReplayParams, TrainParams
from components.data.catalog import ImageRecord
from components.data.datasets import ImageFiles
from components.data.transforms import train_transform
from components.modeling.embedder import Embedder, build_embedder, embed_files, pick_device
from components.ops.failpoints import failpoint
from components.training.distill import Distillation
from components.training.replay import ReplayMemory

CHECKPOINT_FILE = "last.pt"
REPLAY_DIR = "replay"
LOSS_STATE_FILE = "loss_state.pt"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run must not produce a model."""


class MetricLoss(nn.Module):
    """The loss and miner named in params, over labels that index `classes` (class names).

    Proxy-anchor keeps one learned proxy per class; `add_classes` grows them when
    classes arrive, keeping the old proxies and starting each new one at its class's
    mean embedding.
    """

    def __init__(self, params: TrainParams, embedding_dim: int) -> None:
        super().__init__()
        self.params = params
        self.embedding_dim = embedding_dim
        self.classes: list[str] = []
        self.loss = self._make_loss(0)
        self.miner = {
            "batch_hard": lambda: miners.BatchHardMiner(),
            "multi_similarity": lambda: miners.MultiSimilarityMiner(),
            "none": lambda: None,
        }[params.miner]()

    @property
    def has_proxies(self) -> bool:
        return self.params.loss == "proxy_anchor"

    def _make_loss(self, num_classes: int) -> losses.BaseMetricLossFunction:
        return {
            "triplet": lambda: losses.TripletMarginLoss(margin=self.params.margin),
            "multi_similarity": lambda: losses.MultiSimilarityLoss(),
            "supcon": lambda: losses.SupConLoss(temperature=self.params.temperature),
            "proxy_anchor": lambda: losses.ProxyAnchorLoss(max(num_classes, 1), self.embedding_dim),
        }[self.params.loss]()

    def add_classes(self, names: Sequence[str], class_means: Callable[[list[str]], torch.Tensor] | None = None) -> None:
        """Give every new class name a label (and a proxy); known classes keep theirs."""
        new = sorted(set(names) - set(self.classes))
        if not new:
            return
        old = self.loss.proxies.data[: len(self.classes)] if self.has_proxies else None
        self.classes += new
        if self.has_proxies:
            self.loss = self._make_loss(len(self.classes))
            with torch.no_grad():
                if old is not None and len(old):
                    self.loss.proxies[: len(old)] = old
                if class_means is not None:
                    self.loss.proxies[len(self.classes) - len(new) :] = class_means(new)

    def labels(self, names: Sequence[str]) -> list[int]:
        index = {c: i for i, c in enumerate(self.classes)}
        return [index[n] for n in names]

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pairs = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss(embeddings, labels, pairs)

    def state(self) -> dict:
        """What must survive to the next retrain: the class order and any proxies."""
        state: dict = {"loss": self.params.loss, "classes": list(self.classes)}
        if self.has_proxies:
            state["proxies"] = self.loss.proxies.detach().cpu().clone()
        return state

    def restore(self, state: dict) -> None:
        """Adopt a saved class order (and proxies); a different loss keeps only the class order."""
        self.classes = list(state["classes"])
        if self.has_proxies:
            self.loss = self._make_loss(len(self.classes))
            if state.get("loss") == "proxy_anchor" and "proxies" in state:
                with torch.no_grad():
                    self.loss.proxies.copy_(state["proxies"])


def make_loss(params: TrainParams, embedding_dim: int) -> MetricLoss:
    return MetricLoss(params, embedding_dim)


class MixedBatches(Sampler[list[int]]):
    """Batches of m images per class: `new_per_batch` from the new images, the rest from memory.

    Dataset indices [0, n_new) are new images, [n_new, n_new + n_memory) memory exemplars.
    One epoch is one pass over the new images, by one of two lengths (`epoch_length`):
    - "groups": len(new) // new-per-batch batches, each class's m images drawn at random, so
      an epoch may skip images (up to a third of an arrival's steps when classes hold
      m + 1 images);
    - "cover": each class's images are shuffled and cut into groups of m (the last group
      topped up from the same class), and batches are filled with the classes that have
      the most groups left, so every new image is drawn at least once per epoch and a
      batch still holds m images of each of its classes.
    Each epoch draws from its own seeded generator, so a resumed run sees exactly the
    batches an uninterrupted one would.
    """

    def __init__(
        self,
        new_labels: Sequence[int],
        memory_labels: Sequence[int],
        *,
        batch_size: int,
        m: int,
        memory_ratio: float,
        seed: int,
        epoch_length: str = "groups",
    ) -> None:
        if epoch_length not in ("groups", "cover"):
            raise ValueError(f"unknown epoch_length {epoch_length!r}; choose from groups, cover")
        self.m, self.seed, self.epoch, self.epoch_length = m, seed, 0, epoch_length
        self.pools = [self._by_class(new_labels, 0), self._by_class(memory_labels, len(new_labels))]
        memory_share = memory_ratio if memory_labels else 0.0
        mem = min(round(batch_size * memory_share / m) * m, m * len(self.pools[1]))
        self.per_batch = [min(batch_size - mem, m * len(self.pools[0])) // m * m, mem]
        if self.per_batch[0] == 0 and new_labels:
            self.per_batch[0] = m
        if not new_labels:
            self.batches = max(1, len(memory_labels) // max(mem, 1))
        elif epoch_length == "cover":
            groups = sum(-(-len(members) // m) for members in self.pools[0].values())
            self.batches = -(-groups // (self.per_batch[0] // m))
        else:
            self.batches = max(1, len(new_labels) // max(self.per_batch[0], 1))

    @staticmethod
    def _by_class(labels: Sequence[int], offset: int) -> dict[int, np.ndarray]:
        out: dict[int, list[int]] = {}
        for i, y in enumerate(labels):
            out.setdefault(y, []).append(offset + i)
        return {y: np.asarray(v) for y, v in sorted(out.items())}

    @property
    def batch_size(self) -> int:
        return sum(self.per_batch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        streams: list[Iterator[int | list[int]]] = [self._class_stream(pool, rng) for pool in self.pools]
        if self.epoch_length == "cover" and self.pools[0]:
            streams[0] = self._covering_groups(self.pools[0], self.per_batch[0] // self.m, rng)
        for _ in range(self.batches):
            batch: list[int] = []
            for pool, stream, size in zip(self.pools, streams, self.per_batch):
                for _ in range(size // self.m):
                    group = next(stream)
                    if isinstance(group, list):  # a covering group: m chosen images
                        batch += group
                        continue
                    members = pool[group]
                    batch += rng.choice(members, size=self.m, replace=len(members) < self.m).tolist()
            yield batch

    def _covering_groups(
        self, pool: dict[int, np.ndarray], per_batch: int, rng: np.random.Generator
    ) -> Iterator[list[int]]:
        """Groups of m images, `per_batch` distinct classes at a time, covering every image of the pool.

        Classes with the most groups left go first (ties in random order), so no class is left
        with groups it cannot place in a batch of distinct classes; once all are placed, further
        groups are m random images of a class, until the epoch's batches are full.
        """
        left: dict[int, list[list[int]]] = {}
        for y, members in pool.items():
            order = rng.permutation(members).tolist()
            short = -len(order) % self.m
            if short:  # top the last group up with other images of the class
                order += rng.choice(order, size=short, replace=short > len(order)).tolist()
            left[y] = [order[i : i + self.m] for i in range(0, len(order), self.m)]
        classes = list(pool)
        while True:
            tie = rng.permutation(len(classes))
            ranked = sorted(range(len(classes)), key=lambda i: (-len(left[classes[i]]), tie[i]))
            for i in ranked[:per_batch]:
                y = classes[i]
                if left[y]:
                    yield left[y].pop()
                else:
                    members = pool[y]
                    yield rng.choice(members, size=self.m, replace=len(members) < self.m).tolist()

    @staticmethod
    def _class_stream(pool: dict[int, np.ndarray], rng: np.random.Generator) -> Iterator[int]:
        """Classes in shuffled rounds, so every class appears before any repeats."""
        classes = list(pool)
        while classes:
            yield from rng.permutation(classes).tolist()


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


def _fingerprint(items: Sequence[tuple[str, str]], params: TrainParams, extra: dict, init: nn.Module | None) -> str:
    """Identifies one training job, so a checkpoint is only resumed by the same job."""
    h = hashlib.sha256(json.dumps([sorted(items), params.model_dump(mode="json"), extra], default=str).encode())
    if init is not None:
        for value in init.state_dict().values():
            h.update(value.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def _save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train_embedder(
    paths: Sequence[Path],
    class_names: Sequence[str],
    params: TrainParams,
    model_params: ModelParams,
    *,
    init: Embedder | None = None,
    memory: ReplayMemory | None = None,
    distill: Distillation | None = None,
    loss_state: dict | None = None,
    checkpoint_dir: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Fine-tune `init` (or a fresh embedder) on new images, replaying `memory`, distilling from `distill`.

    With `checkpoint_dir`, every epoch is checkpointed there and a run of the same
    job (same images, params and starting weights) resumes from the last epoch saved.
    """
    exemplars = memory.exemplars() if memory is not None else []
    new_items = [(str(p), c) for p, c in zip(paths, class_names)]
    all_names = list(class_names) + [e.cls for e in exemplars]
    if len(set(all_names)) < 2:
        raise ValueError(f"training needs at least 2 classes, got {len(set(all_names))}")
    seed_everything(params.seed)
    device = pick_device(params.device)
    on_gpu = device.type == "cuda"

    model = copy.deepcopy(init) if init is not None else build_embedder(model_params)
    fingerprint = _fingerprint(
        new_items + [(e.id, e.cls) for e in exemplars],
        params,
        {
            "model": model_params.model_dump(mode="json"),
            "loss_state": bool(loss_state),
            "distill": distill.params.model_dump() if distill else None,
            "ratio": memory.params.batch_ratio if memory else 0,
        },
        init,
    )
    model = model.to(device)
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if params.compile else model
    if distill is not None:
        distill = distill.to(device)

    metric_loss = MetricLoss(params, model.embedding_dim)
    if loss_state:
        metric_loss.restore(loss_state)
    metric_loss.add_classes(
        all_names, class_means=_class_means(model, list(paths) + [e.path for e in exemplars], all_names)
    )
    metric_loss = metric_loss.to(device)

    dataset = ImageFiles(
        list(paths) + [e.path for e in exemplars],
        metric_loss.labels(all_names),
        train_transform(model.image_size, params.augment, model.mean, model.std),
    )
    n_new = len(new_items)
    m = min(params.m_per_class, params.batch_size // 2)
    sampler = MixedBatches(
        dataset.labels[:n_new],
        dataset.labels[n_new:],
        batch_size=params.batch_size,
        m=m,
        memory_ratio=memory.params.batch_ratio if memory else 0.0,
        seed=params.seed,
        epoch_length=params.epoch_length,
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
    optimizer = torch.optim.AdamW(groups, lr=params.lr, weight_decay=params.weight_decay)
    total_steps = params.epochs * len(sampler)
    # Cosine: every group's lr falls to 0 over the run's batches (the proxies' too).
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            1.0
            if params.lr_schedule == "constant"
            else 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        ),
    )
    # Which labels are old classes (those the memory replays): where `embedding_on: old` distils.
    old_labels = torch.zeros(len(metric_loss.classes), dtype=torch.bool)
    old_labels[sorted(set(dataset.labels[n_new:]))] = True
    old_labels = old_labels.to(device)

    result = TrainResult(
        model=model,
        device=str(device),
        epochs=params.epochs,
        images=len(sampler) * sampler.batch_size,
        classes=len(set(all_names)),
        seconds=0.0,
    )
    first_epoch = 0
    checkpoint = checkpoint_dir / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=device, weights_only=True)
        if saved["fingerprint"] == fingerprint:
            model.load_state_dict(saved["model"])
            metric_loss.load_state_dict(saved["loss"])
            optimizer.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved["schedule"])
            result.epoch_metrics = {k: list(v) for k, v in saved["epoch_metrics"].items()}
            first_epoch = result.resumed_from_epoch = saved["epoch"] + 1

    start = time.perf_counter()
    with Progress(
        TextColumn("[bold]train[/] epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),  # stdout stays for the caller's answer (`mnemo retrain --json`)
    ) as progress:
        task = progress.add_task("train", total=len(loader), epoch=first_epoch, loss=float("nan"))
        for epoch in range(first_epoch, params.epochs):
            epoch_start = time.perf_counter()
            model.train()
            if distill is not None:
                distill.train()
            sampler.set_epoch(epoch)
            torch.manual_seed(params.seed * 100_003 + epoch)  # augmentations, per epoch: resumable
            progress.reset(task, total=len(loader), epoch=epoch + 1, loss=float("nan"))
            sums: dict[str, float] = {}
            batches = 0
            for x, y in loader:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if on_gpu:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
                    embeddings = forward(x)
                terms = {"metric_loss": metric_loss(embeddings.float(), y)}
                if distill is not None:
                    terms |= distill(x, embeddings, old=old_labels[y])
                loss = sum(terms.values())
                if not math.isfinite(loss.item()):
                    raise NonFiniteLossError(f"loss became {loss.item()} at epoch {epoch + 1}, batch {batches + 1}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                batches += 1
                for name, value in {"train_loss": loss, **terms}.items():
                    sums[name] = sums.get(name, 0.0) + value.item()
                progress.update(task, advance=1, loss=sums["train_loss"] / batches)
            seconds = time.perf_counter() - epoch_start
            epoch_metrics = {k: v / batches for k, v in sums.items()} | {
                "epoch_seconds": seconds,
                "epoch_images_per_second": batches * sampler.batch_size / seconds,
            }
            for key, value in epoch_metrics.items():
                result.epoch_metrics.setdefault(key, []).append(value)
            if checkpoint is not None:
                _save_checkpoint(
                    checkpoint,
                    {
                        "fingerprint": fingerprint,
                        "epoch": epoch,
                        "model": model.state_dict(),
                        "loss": metric_loss.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(),
                        "epoch_metrics": result.epoch_metrics,
                    },
                )
            failpoint("train-epoch")
            if on_epoch is not None:
                on_epoch(epoch, epoch_metrics)
    result.seconds = time.perf_counter() - start
    result.model = model.to("cpu", memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]  # Module.to takes memory_format at runtime; torch's stubs omit it
    result.loss_state = metric_loss.to("cpu").state()
    return result


def _class_means(model: Embedder, paths: Sequence[Path], names: Sequence[str]) -> Callable[[list[str]], torch.Tensor]:
    """Mean normalised embedding of each named class: where a new proxy starts."""

    def means(classes: list[str]) -> torch.Tensor:
        wanted = [(p, n) for p, n in zip(paths, names) if n in set(classes)]
        vectors = torch.from_numpy(embed_files(model, [p for p, _ in wanted]))
        rows = [vectors[[i for i, (_, n) in enumerate(wanted) if n == c]].mean(dim=0) for c in classes]
        return F.normalize(torch.stack(rows), dim=1)

    return means


def save_loss_state(state: dict, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / LOSS_STATE_FILE)


def load_loss_state(directory: Path) -> dict | None:
    path = directory / LOSS_STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def clear_checkpoints(checkpoint_dir: Path) -> None:
    shutil.rmtree(checkpoint_dir, ignore_errors=True)


@dataclass
class ContinualResult:
    train: TrainResult
    memory: ReplayMemory

    def save_state(self, directory: Path) -> Path:
        """The state the next retrain restores: replay memory (with its images) and loss state."""
        self.memory.save(directory / REPLAY_DIR)
        save_loss_state(self.train.loss_state, directory)
        return directory


def train_continual(
    new: Sequence[ImageRecord],
    classes_dir: Path,
    train: TrainParams,
    model: ModelParams,
    replay: ReplayParams,
    distill: DistillParams,
    *,
    init: Embedder | None = None,
    state: Path | None = None,
    checkpoint_dir: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> ContinualResult:
    """One continual step: learn the new arrivals' training images, replaying the saved memory
    and distilling from `init` (the previous champion), then add the new classes to the memory.

    `state` is the previous version's saved state (see ContinualResult.save_state); without
    it the memory starts empty. Old arrivals are never read: only the memory's own images.
    """
    memory = (
        ReplayMemory.load(state / REPLAY_DIR, replay)
        if state and (state / REPLAY_DIR).is_dir()
        else ReplayMemory(replay)
    )
    distillation = Distillation(init, distill) if init is not None else None
    result = train_embedder(
        [classes_dir / r.id for r in new],
        [r.cls for r in new],
        train,
        model,
        init=init,
        memory=memory,
        distill=distillation if distillation is not None and distillation.active else None,
        loss_state=load_loss_state(state) if state else None,
        checkpoint_dir=checkpoint_dir,
        on_epoch=on_epoch,
    )
    by_class: dict[str, list[tuple[str, Path]]] = {}
    for r in new:
        by_class.setdefault(r.cls, []).append((r.id, classes_dir / r.id))
    memory.add_classes(by_class, featurize=lambda paths: embed_files(result.model, paths))
    return ContinualResult(train=result, memory=memory)
