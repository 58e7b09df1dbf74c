"""Backward-compatible training: a new model whose embeddings can be searched among the previous
model's, so a promotion need not re-embed the gallery first (`compat` in params.yaml).

Two ways, both handed to the one training loop's step (continual.py), as replay and distillation are:
- bct (Shen et al., CVPR 2020, "Towards Backward-Compatible Representation Learning"): an
  influence loss beside the metric loss. The old model's classifier is frozen and applied to the
  new embeddings; mnemo's embedder has no classifier, so the old model's class prototypes stand in
  for it: each class's mean embedding by the old model (from the old model's own table where the
  caller has it, else from its embeddings of the class's training images), a cosine classifier
  over every class of the batch's training set, softmax cross-entropy at `temperature`. New
  embeddings of a class are drawn towards where the old model put that class, so a new query
  finds old vectors of its class.
- transform (Ramanujan et al., CVPR 2022, "Forward Compatible Training"): the new model trains
  freely; afterwards a small MLP learns old vector -> new vector on the images both models
  embedded (the replay memory and the new arrival), so an old table moves into the new space
  from its vectors alone, without reading an image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.config import CompatParams
from components.evaluation.metrics import unit_rows
from components.modeling.embedder import Embedder, embed_files
from components.training.ranks import SINGLE, Ranks

TRANSFORM_FILE = "transform.pt"


def class_prototypes(vectors: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Each class's mean vector, unit length: where a model put the class."""
    names_array = np.asarray(names, dtype=object)
    return {c: unit_rows(vectors[names_array == c].mean(axis=0, keepdims=True))[0] for c in sorted(set(names))}


def old_prototypes(
    old: Embedder,
    paths: Sequence[Path],
    names: Sequence[str],
    known: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The old model's prototype of every class in `names`: `known` ones as given (its table's class
    means), the rest the mean of its embeddings of the class's images in `paths`."""
    known = dict(known or {})
    missing = [i for i, n in enumerate(names) if n not in known]
    if missing:
        vectors = embed_files(old, [paths[i] for i in missing])
        known |= class_prototypes(vectors, [names[i] for i in missing])
    return {c: np.asarray(known[c], dtype=np.float32) for c in sorted(set(names))}


class Influence(nn.Module):
    """BCT's influence loss: the batch's new embeddings classified by the old model's frozen prototypes.

    `order(classes)` lays the prototypes out in the training loop's label order (its MetricLoss's
    classes); a class without a prototype is left out of the loss, as a label and as a candidate.
    """

    def __init__(self, prototypes: Mapping[str, np.ndarray], params: CompatParams) -> None:
        super().__init__()
        self.params = params
        self._by_class = {c: np.asarray(v, dtype=np.float32) for c, v in prototypes.items()}
        dim = len(next(iter(self._by_class.values()))) if self._by_class else 1
        self.prototypes: torch.Tensor
        self.has_prototype: torch.Tensor
        self.register_buffer("prototypes", torch.zeros(0, dim))
        self.register_buffer("has_prototype", torch.zeros(0, dtype=torch.bool))

    def order(self, classes: Sequence[str]) -> Influence:
        dim = self.prototypes.shape[1]
        rows = [torch.from_numpy(self._by_class[c]) if c in self._by_class else torch.zeros(dim) for c in classes]
        self.prototypes = F.normalize(torch.stack(rows), dim=1).to(self.prototypes.device)
        self.has_prototype = torch.tensor([c in self._by_class for c in classes], device=self.prototypes.device)
        return self

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, ranks: Ranks = SINGLE) -> dict[str, torch.Tensor]:
        """The weighted term for one batch; across ranks, the global batch's times the world size (as distill.py)."""
        if ranks.distributed:
            embeddings, labels = ranks.global_batch(embeddings), ranks.global_batch(labels)
        keep = self.has_prototype[labels]
        if not bool(keep.any()):
            return {"compat_influence": embeddings.new_zeros(())}
        logits = F.normalize(embeddings[keep].float(), dim=1) @ self.prototypes.T / self.params.temperature
        logits = logits.masked_fill(~self.has_prototype, float("-inf"))  # a class the old model never placed
        loss = self.params.influence_weight * F.cross_entropy(logits, labels[keep])
        return {"compat_influence": loss * ranks.world if ranks.distributed else loss}


class Transform(nn.Module):
    """A map from the old model's vectors into the new model's space: a two-layer MLP, plus the
    identity where the two spaces have the same size (a residual, so it starts near "no change"),
    output unit length."""

    def __init__(self, old_dim: int, new_dim: int, hidden: int) -> None:
        super().__init__()
        self.old_dim, self.new_dim, self.hidden = old_dim, new_dim, hidden
        self.net = nn.Sequential(nn.Linear(old_dim, hidden), nn.ReLU(), nn.Linear(hidden, new_dim))

    def forward(self, old: torch.Tensor) -> torch.Tensor:
        out = self.net(old)
        if self.old_dim == self.new_dim:
            out = out + old
        return F.normalize(out, dim=1)

    @torch.inference_mode()
    def to_new(self, vectors: np.ndarray, batch: int = 65536) -> np.ndarray:
        """Old vectors (N x old_dim) in the new space (N x new_dim, unit rows), float32."""
        self.eval()
        chunks = [
            self(torch.from_numpy(np.array(vectors[lo : lo + batch], dtype=np.float32))).numpy()
            for lo in range(0, len(vectors), batch)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.new_dim), dtype=np.float32)

    def save(self, path: Path) -> Path:
        spec = {"old_dim": self.old_dim, "new_dim": self.new_dim, "hidden": self.hidden}
        torch.save({"spec": spec, "state_dict": self.state_dict()}, path)
        return path

    @classmethod
    def load(cls, path: Path) -> Transform:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        transform = cls(**saved["spec"])
        transform.load_state_dict(saved["state_dict"])
        return transform.eval()


def fit_transform(old: np.ndarray, new: np.ndarray, params: CompatParams, seed: int = 0) -> tuple[Transform, float]:
    """The old -> new map fitted on the same images' vectors by both models (row for row), and its
    mean cosine similarity to the new vectors on them: 1 - cos, full-batch Adam, `transform_epochs` steps."""
    torch.manual_seed(seed)
    x, y = torch.from_numpy(np.asarray(old, dtype=np.float32)), torch.from_numpy(np.asarray(new, dtype=np.float32))
    transform = Transform(x.shape[1], y.shape[1], params.transform_hidden)
    optimizer = torch.optim.Adam(transform.parameters(), lr=params.transform_lr)
    for _ in range(params.transform_epochs):
        loss = (1 - F.cosine_similarity(transform(x), y, dim=1)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        fit = float(F.cosine_similarity(transform(x), y, dim=1).mean())
    return transform.eval(), fit
