"""Ranks: where one training process stands among those of a run, and what the loop does differently there.

One device is `SINGLE` (rank 0 of 1): the loop does exactly what it always did. Under torchrun
(see distributed.py) every process runs the same loop on its share of each global batch, and:
- the model is wrapped in DistributedDataParallel, so gradients are averaged over ranks;
- every loss term is computed on the global batch (pytorch-metric-learning's gather: the rank's
  own embeddings with their gradient, the others' without) and multiplied by the world size,
  which after DDP's averaging is exactly the gradient of the one-process loss on the global batch;
- only rank 0 checkpoints, selects the next memory and writes the result.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from pytorch_metric_learning.utils.distributed import gather
from torch import nn


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local: int = 0  # the rank on its node: which GPU it drives

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Ranks:
        """What torchrun tells each process it starts (RANK, WORLD_SIZE, LOCAL_RANK)."""
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))

    def device(self, wanted: torch.device) -> torch.device:
        """One GPU per rank on its node; CPU ranks share the CPU."""
        if self.distributed and wanted.type == "cuda":
            torch.cuda.set_device(self.local)
            return torch.device("cuda", self.local)
        return wanted

    def replicate(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model whose forward the loop calls: itself, or a DDP replica (synced batch norm on GPUs).

        On CPU (gloo) batch norm keeps per-rank statistics: torch's SyncBatchNorm needs a GPU.
        """
        if not self.distributed:
            return model
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            return nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
        return nn.parallel.DistributedDataParallel(model)

    def global_batch(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's rows (with their gradient) followed by every other rank's (without)."""
        if not self.distributed:
            return local
        # gloo gathers no bool tensors: gather as bytes
        rows, _, _ = gather(local.to(torch.uint8) if local.dtype == torch.bool else local, None)
        return rows.bool() if local.dtype == torch.bool else rows

    def average_replicated_grads(self, params: Iterable[nn.Parameter]) -> None:
        """Gradients of parameters outside DDP (the loss's proxies), as the one-process run has them.

        Every rank saw the whole global batch, so each holds world x the gradient (the loss is
        scaled for DDP's averaging of the model's); averaging over ranks keeps replicas identical.
        """
        if not self.distributed:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world * self.world

    def broadcast_params(self, module: nn.Module) -> None:
        """Rank 0's values of parameters outside DDP (proxies started from class means)."""
        if self.distributed:
            for p in module.parameters():
                dist.broadcast(p.data, src=0)

    def agree(self, what: str, digest: Callable[[], str]) -> None:
        """Raise unless every rank's digest of `what` is rank 0's: each rank must train on the same thing."""
        if not self.distributed:
            return
        mine = digest()
        digests: list[str | None] = [None] * self.world
        dist.all_gather_object(digests, mine)
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise RuntimeError(
                f"{what} differs between ranks: rank {differ[0]} has {digests[differ[0]]}, rank 0 {digests[0]}"
            )

    def failpoints(self, name: str) -> list[str]:
        """The failpoint names this rank passes at `name`: the shared one, and one for this rank alone."""
        return [name, f"{name}-rank{self.rank}"] if self.distributed else [name]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


SINGLE = Ranks()
