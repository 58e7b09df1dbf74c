"""One continual step: the training loop over an arrival, with the saved replay memory, distillation
and, when asked, backward compatibility with the previous model (compat.py).

What one step saves (ContinualResult.save_state) is what the next one restores: the replay
memory with its images, and the loss state (class order, proxies); with `compat.mode: transform`
also the learned old -> new map (transform.pt), which moves the previous model's table into the
new model's space.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.config import CompatParams, DistillParams, ModelParams, Params, ReplayParams, TrainParams
from components.data.catalog import ImageRecord
from components.modeling.embedder import Embedder, embed_files
from components.training.checkpoints import load_loss_state, save_loss_state
from components.training.compat import TRANSFORM_FILE, Influence, Transform, fit_transform, old_prototypes
from components.training.distill import Distillation
from components.training.loop import TrainResult, train_embedder
from components.training.ranks import SINGLE, Ranks
from components.training.replay import ReplayMemory

REPLAY_DIR = "replay"


@dataclass(frozen=True)
class Recipe:
    """The params sections one continual step reads: how to train, the network, the memory, the
    distillation, the compatibility with the previous model."""

    train: TrainParams
    model: ModelParams
    replay: ReplayParams
    distill: DistillParams
    compat: CompatParams

    @classmethod
    def of(cls, params: Params) -> Recipe:
        return cls(params.train, params.model, params.replay, params.distill, params.compat)


@dataclass
class ContinualResult:
    train: TrainResult
    memory: ReplayMemory
    transform: Transform | None = None  # compat.mode transform: the previous model's vectors -> this one's space
    transform_fit: float | None = None  # its mean cosine similarity to this model's vectors on the images it saw

    def save_state(self, directory: Path) -> Path:
        """The state the next retrain restores: replay memory (with its images) and loss state; the transform."""
        self.memory.save(directory / REPLAY_DIR)
        save_loss_state(self.train.loss_state, directory)
        if self.transform is not None:
            self.transform.save(directory / TRANSFORM_FILE)
        return directory

    def metrics(self) -> dict[str, float]:
        return {} if self.transform_fit is None else {"compat_transform_fit": self.transform_fit}


def read_memory(state: Path | None, params: ReplayParams) -> ReplayMemory:
    """The replay memory saved in a version's state (see ContinualResult.save_state); empty without one."""
    if state and (state / REPLAY_DIR).is_dir():
        return ReplayMemory.load(state / REPLAY_DIR, params)
    return ReplayMemory(params)


def classes_to_learn(new: Sequence[ImageRecord], state: Path | None, params: ReplayParams) -> list[str]:
    """Every class one step trains on: the new images' and the saved memory's."""
    return sorted({r.cls for r in new} | {e.cls for e in read_memory(state, params).exemplars()})


def train_continual(
    new: Sequence[ImageRecord],
    classes_dir: Path,
    recipe: Recipe,
    *,
    init: Embedder | None = None,
    state: Path | None = None,
    checkpoint_dir: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    ranks: Ranks = SINGLE,
    prototypes: Mapping[str, np.ndarray] | None = None,
) -> ContinualResult:
    """One continual step: learn the new arrivals' training images, replaying the saved memory
    and distilling from `init` (the previous champion), then add the new classes to the memory.

    `state` is the previous version's saved state (see ContinualResult.save_state); without
    it the memory starts empty. Old arrivals are never read: only the memory's own images.
    Across `ranks`, every rank reads the same saved memory (checked: rank 0's digest), and the
    memory for the next step is selected by rank 0 alone: only its result is saved.
    With `compat.mode` bct, `prototypes` are the previous model's class means its table holds
    (the rest come from its embeddings of the training images); with transform, the old -> new
    map is fitted on the memory and the new images once the model is trained (rank 0).
    """
    memory = read_memory(state, recipe.replay)
    ranks.agree("the replay memory read", memory.digest)
    distillation = Distillation(init, recipe.distill) if init is not None else None
    paths = [classes_dir / r.id for r in new] + [e.path for e in memory.exemplars()]
    names = [r.cls for r in new] + [e.cls for e in memory.exemplars()]
    influence = None
    if recipe.compat.mode == "bct" and init is not None:
        influence = Influence(old_prototypes(init, paths, names, prototypes), recipe.compat)
    result = train_embedder(
        [classes_dir / r.id for r in new],
        [r.cls for r in new],
        recipe.train,
        recipe.model,
        init=init,
        memory=memory,
        distill=distillation if distillation is not None and distillation.active else None,
        compat=influence,
        loss_state=load_loss_state(state) if state else None,
        checkpoint_dir=checkpoint_dir,
        on_epoch=on_epoch,
        ranks=ranks,
    )
    if not ranks.main:
        return ContinualResult(train=result, memory=memory)  # the memory read: rank 0 selects what is written
    by_class: dict[str, list[tuple[str, Path]]] = {}
    for r in new:
        by_class.setdefault(r.cls, []).append((r.id, classes_dir / r.id))
    memory.add_classes(by_class, featurize=lambda paths: embed_files(result.model, paths))
    if recipe.compat.mode == "transform" and init is not None:
        old, fresh = embed_files(init, paths), embed_files(result.model, paths)  # the images both models embedded
        transform, fit = fit_transform(old, fresh, recipe.compat, seed=recipe.train.seed)
        return ContinualResult(train=result, memory=memory, transform=transform, transform_fit=fit)
    return ContinualResult(train=result, memory=memory)
