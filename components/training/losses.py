"""The metric loss: pytorch-metric-learning's loss and miner named in params, over labels that index class names.

For proxy losses it keeps one learned proxy per class name, growing them as classes arrive.
Under torchrun the loss and miner see the global batch through pytorch-metric-learning's
distributed wrappers (see ranks.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper
from torch import nn

from components.config import TrainParams
from components.modeling.embedder import Embedder, embed_files
from components.training.ranks import SINGLE, Ranks


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

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, ranks: Ranks = SINGLE) -> torch.Tensor:
        """The loss of the batch; across ranks, of the global batch times the world size (for DDP's averaging)."""
        loss: nn.Module = self.loss
        miner: nn.Module | None = self.miner
        if ranks.distributed:  # wrapped per call: add_classes may replace the loss (its proxies grow)
            loss = DistributedLossWrapper(loss)
            miner = DistributedMinerWrapper(miner) if miner is not None else None
        pairs = miner(embeddings, labels) if miner is not None else None
        return loss(embeddings, labels, pairs)

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


def class_means(model: Embedder, paths: Sequence[Path], names: Sequence[str]) -> Callable[[list[str]], torch.Tensor]:
    """Mean normalised embedding of each named class, by `model`: where a new proxy starts."""

    def means(classes: list[str]) -> torch.Tensor:
        wanted = [(p, n) for p, n in zip(paths, names) if n in set(classes)]
        vectors = torch.from_numpy(embed_files(model, [p for p, _ in wanted]))
        rows = [vectors[[i for i, (_, n) in enumerate(wanted) if n == c]].mean(dim=0) for c in classes]
        return F.normalize(torch.stack(rows), dim=1)

    return means
