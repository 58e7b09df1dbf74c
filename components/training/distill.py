"""Distillation from the frozen previous model: keep new embeddings where the old model put them.

Two terms, weights in params.yaml `distill:`:
- embedding-level: 1 - cos(student, teacher) per image, or the squared L2 distance; on
  every image of the batch (`embedding_on: all`) or only on the replayed images of old
  classes (`embedding_on: old`), so the new classes, which the teacher never learned,
  are free to move where the metric loss puts them;
- relational: the batch's student similarity matrix against the teacher's (mean
  squared difference), which keeps the geometry between images rather than their
  positions (Park et al. 2019, "Relational Knowledge Distillation"); on every image.
Under torchrun the teacher runs on every rank's share and both terms are computed on the
global batch (see ranks.py), so they are the one-process terms.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from components.config import DistillParams
from components.training.ranks import SINGLE, Ranks


def embedding_distillation(student: torch.Tensor, teacher: torch.Tensor, distance: str) -> torch.Tensor:
    """Mean distance between each image's student and teacher embeddings."""
    if distance == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=1)).mean()
    return (student - teacher).pow(2).sum(dim=1).mean()


def relational_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the two batches' cosine-similarity matrices."""
    s = F.normalize(student, dim=1)
    t = F.normalize(teacher, dim=1)
    return (s @ s.T - t @ t.T).pow(2).mean()


class Distillation(nn.Module):
    """The frozen teacher and the weighted distillation terms, handed to the training loop."""

    def __init__(self, teacher: nn.Module, params: DistillParams) -> None:
        super().__init__()
        self.params = params
        self.teacher = copy.deepcopy(teacher).eval()
        self.teacher.requires_grad_(False)

    @property
    def active(self) -> bool:
        return self.params.embedding_weight > 0 or self.params.relational_weight > 0

    def train(self, mode: bool = True) -> Distillation:
        super().train(mode)
        self.teacher.eval()  # the teacher's batch-norm statistics stay frozen
        return self

    def forward(
        self, images: torch.Tensor, student: torch.Tensor, old: torch.Tensor | None = None, ranks: Ranks = SINGLE
    ) -> dict[str, torch.Tensor]:
        """The weighted terms for one batch, keyed by name (for per-epoch metrics).

        `old` marks the images of old (replayed) classes; with `embedding_on: old` only they
        carry the embedding term (zero when the batch has none). None counts every image old.
        Across ranks: the terms of the global batch, times the world size (for DDP's averaging).
        """
        with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.is_cuda):
            teacher = self.teacher(images).float()
        student = student.float()
        if ranks.distributed:
            student, teacher = ranks.global_batch(student), ranks.global_batch(teacher)
            old = ranks.global_batch(old) if old is not None else None
            return {name: term * ranks.world for name, term in self._terms(student, teacher, old).items()}
        return self._terms(student, teacher, old)

    def _terms(self, student: torch.Tensor, teacher: torch.Tensor, old: torch.Tensor | None) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        if self.params.embedding_weight > 0:
            keep = old if self.params.embedding_on == "old" and old is not None else None
            if keep is not None and not bool(keep.any()):
                terms["distill_embedding"] = student.new_zeros(())
            else:
                s, t = (student[keep], teacher[keep]) if keep is not None else (student, teacher)
                terms["distill_embedding"] = self.params.embedding_weight * embedding_distillation(
                    s, t, self.params.embedding_distance
                )
        if self.params.relational_weight > 0:
            terms["distill_relational"] = self.params.relational_weight * relational_distillation(student, teacher)
        return terms
