"""Distillation from the frozen previous model: keep new embeddings where the old model put them.

Two terms, weights in params.yaml `distill:`, both on every image of the batch (new
and replayed):
- embedding-level: 1 - cos(student, teacher) per image, or the squared L2 distance;
- relational: the batch's student similarity matrix against the teacher's (mean
  squared difference), which keeps the geometry between images rather than their
  positions (Park et al. 2019, "Relational Knowledge Distillation").
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from components.config import DistillParams


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

    def forward(self, images: torch.Tensor, student: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted terms for one batch, keyed by name (for per-epoch metrics)."""
        with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.is_cuda):
            teacher = self.teacher(images).float()
        student = student.float()
        terms: dict[str, torch.Tensor] = {}
        if self.params.embedding_weight > 0:
            terms["distill_embedding"] = self.params.embedding_weight * embedding_distillation(
                student, teacher, self.params.embedding_distance
            )
        if self.params.relational_weight > 0:
            terms["distill_relational"] = self.params.relational_weight * relational_distillation(student, teacher)
        return terms
