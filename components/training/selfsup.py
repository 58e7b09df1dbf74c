"""Self-supervised rotation prediction beside the metric loss (`train.rotation_weight`).

Every image of a batch is also shown turned by a random quarter turn (0, 90, 180 or 270
degrees) and a linear classifier on the backbone's pooled features (the projection head's
input) learns which turn it was. The task asks the network for the shape of the whole image
rather than the few strokes or textures that tell the trained classes apart, which is what
classes it never saw need: it raised few-shot transfer in Gidaris et al. 2019 ("Boosting
Few-Shot Visual Learning with Self-Supervision") and most where the labelled classes are few
and alike (Su et al. 2020, "When Does Self-Supervision Improve Few-Shot Learning?"). Nothing
in it is specific to characters. As there, the classifier reads the features, not the
embedding: asked of the embedding itself, the turn crowds out the classes (measured in
bench/results/README.md, 2026-12-06).

The turned copies share the batch's one forward pass (so DDP sees one forward per step);
only the upright images carry the metric loss and distillation. The classifier is dropped
after training: the served model is the embedder alone. It costs one more image per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.training.ranks import SINGLE, Ranks

TURNS = 4


def turned(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Each image of the (square) batch rotated by its number of quarter turns, counter-clockwise."""
    out = x.clone()
    for k in range(1, TURNS):
        chosen = turns == k
        if bool(chosen.any()):
            out[chosen] = torch.rot90(x[chosen], k, dims=(2, 3))
    return out


class RotationTask(nn.Module):
    """The turn classifier on the features `projection` (the embedder's head) receives, and its weighted loss.

    It listens to every forward of the model until `close()`; the training loop closes it when done.
    """

    def __init__(self, projection: nn.Linear, weight: float) -> None:
        super().__init__()
        self.weight = weight
        self.classifier = nn.Linear(projection.in_features, TURNS)
        self._features: torch.Tensor | None = None
        self._listening = projection.register_forward_pre_hook(self._keep)

    def _keep(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._features = args[0]

    def close(self) -> None:
        self._listening.remove()
        self._features = None

    def inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch followed by its turned copy, and the turn of each copy (drawn from torch's RNG)."""
        turns = torch.randint(0, TURNS, (x.shape[0],), device=x.device)
        return torch.cat([x, turned(x, turns)]), turns

    def forward(self, turns: torch.Tensor, ranks: Ranks = SINGLE) -> dict[str, torch.Tensor]:
        """The weighted cross-entropy of the turned copies' predicted turns, from the last forward's features
        (the batch that `inputs` made: the copies are its second half).

        Across ranks: the global batch's term times the world size (see ranks.py), like every term.
        """
        if self._features is None:
            raise RuntimeError("the rotation task saw no forward pass of the model")
        logits = self.classifier(self._features[-len(turns) :].float())
        self._features = None
        if ranks.distributed:
            logits, turns = ranks.global_batch(logits), ranks.global_batch(turns)
            return {"rotation_loss": self.weight * F.cross_entropy(logits, turns) * ranks.world}
        return {"rotation_loss": self.weight * F.cross_entropy(logits, turns)}
