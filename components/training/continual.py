"""One continual step: the training loop over an arrival, with the saved replay memory and distillation.

What one step saves (ContinualResult.save_state) is what the next one restores: the replay
memory with its images, and the loss state (class order, proxies).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from components.config import DistillParams, ModelParams, Params, ReplayParams, TrainParams
from components.data.catalog import ImageRecord
from components.modeling.embedder import Embedder, embed_files
from components.training.checkpoints import load_loss_state, save_loss_state
from components.training.distill import Distillation
from components.training.loop import TrainResult, train_embedder
from components.training.ranks import SINGLE, Ranks
from components.training.replay import ReplayMemory

REPLAY_DIR = "replay"


@dataclass(frozen=True)
class Recipe:
    """The params sections one continual step reads: how to train, the network, the memory, the distillation."""

    train: TrainParams
    model: ModelParams
    replay: ReplayParams
    distill: DistillParams

    @classmethod
    def of(cls, params: Params) -> Recipe:
        return cls(params.train, params.model, params.replay, params.distill)


@dataclass
class ContinualResult:
    train: TrainResult
    memory: ReplayMemory

    def save_state(self, directory: Path) -> Path:
        """The state the next retrain restores: replay memory (with its images) and loss state."""
        self.memory.save(directory / REPLAY_DIR)
        save_loss_state(self.train.loss_state, directory)
        return directory


def read_memory(state: Path | None, params: ReplayParams) -> ReplayMemory:
    """The replay memory saved in a version's state (see ContinualResult.save_state); empty without one."""
    if state and (state / REPLAY_DIR).is_dir():
        return ReplayMemory.load(state / REPLAY_DIR, params)
    return ReplayMemory(params)


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
) -> ContinualResult:
    """One continual step: learn the new arrivals' training images, replaying the saved memory
    and distilling from `init` (the previous champion), then add the new classes to the memory.

    `state` is the previous version's saved state (see ContinualResult.save_state); without
    it the memory starts empty. Old arrivals are never read: only the memory's own images.
    Across `ranks`, every rank reads the same saved memory (checked: rank 0's digest), and the
    memory for the next step is selected by rank 0 alone: only its result is saved.
    """
    memory = read_memory(state, recipe.replay)
    ranks.agree("the replay memory read", memory.digest)
    distillation = Distillation(init, recipe.distill) if init is not None else None
    result = train_embedder(
        [classes_dir / r.id for r in new],
        [r.cls for r in new],
        recipe.train,
        recipe.model,
        init=init,
        memory=memory,
        distill=distillation if distillation is not None and distillation.active else None,
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
    return ContinualResult(train=result, memory=memory)
