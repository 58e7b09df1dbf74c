"""Training across ranks is the one-process training on the global batch: the maths, on 2 gloo ranks.

Two processes (torch.multiprocessing, gloo, CPU) each take one optimiser step of the real loop
(`_Run.step`) on their half of a batch; the parameters after it must equal, within 1e-5, those
of one process stepping on the whole batch: same seed, same init, SGD (Adam's first step would
hide a wrongly scaled gradient). Also: the shares the sampler gives each rank, and the check
that every rank read the same replay memory.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from components.config import DistillParams, load_params
from components.training.distill import Distillation
from components.training.loop import _Run
from components.training.losses import MetricLoss
from components.training.ranks import SINGLE, Ranks
from components.training.sampler import MixedBatches
from tests.conftest import PARAMS_FILE

WORLD = 2
PER_RANK = 8
# (loss, miner): a miner over the gathered batch, and learned proxies (parameters outside DDP)
RECIPES = [("multi_similarity", "multi_similarity"), ("proxy_anchor", "none")]


class Tiny(nn.Module):
    embedding_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, self.embedding_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(WORLD * PER_RANK, 6, generator=g)
    y = torch.arange(4).repeat_interleave(2).repeat(WORLD)  # 4 classes, 2 images each per rank
    return x, y


def _step(loss: str, miner: str, ranks: Ranks, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """One step of the real loop on a tiny model; the parameters and gradients after it."""
    params = load_params(PARAMS_FILE).train.model_copy(update={"loss": loss, "miner": miner})
    torch.manual_seed(0)
    model, teacher = Tiny(), Tiny()
    metric_loss = MetricLoss(params, Tiny.embedding_dim)
    metric_loss.add_classes(["a", "b", "c", "d"])
    distill = Distillation(
        teacher,
        DistillParams(embedding_weight=1.0, embedding_distance="cosine", embedding_on="old", relational_weight=1.0),
    )
    optimizer = torch.optim.SGD([*model.parameters(), *metric_loss.parameters()], lr=0.5)
    run = _Run(
        model=model,  # type: ignore[arg-type]
        forward=ranks.replicate(model, torch.device("cpu")),
        metric_loss=metric_loss,
        distill=distill,
        sampler=None,  # type: ignore[arg-type]
        loader=None,  # type: ignore[arg-type]
        optimizer=optimizer,
        schedule=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        old_labels=torch.tensor([True, True, False, False]),
        device=torch.device("cpu"),
        ranks=ranks,
    )
    terms = run.step(x, y, epoch=0, batch=0)
    named = dict(model.named_parameters()) | {f"loss.{k}": v for k, v in metric_loss.named_parameters()}
    out = {k: v.detach().clone() for k, v in named.items()}
    out |= {f"grad.{k}": v.grad.detach().clone() for k, v in named.items() if v.grad is not None}
    return out | {f"term.{k}": torch.tensor(v) for k, v in terms.items()}


def _init(rank: int, store: Path) -> Ranks:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    return Ranks(rank=rank, world=WORLD, local=rank)


def _step_rank(rank: int, store: Path, out: Path) -> None:
    ranks = _init(rank, store)
    x, y = _batch()
    share = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    for loss, miner in RECIPES:
        torch.save(_step(loss, miner, ranks, x[share], y[share]), out / f"{loss}-rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_one_step_on_two_ranks_is_one_step_on_the_whole_batch(tmp_path):
    mp.spawn(_step_rank, args=(tmp_path / "store", tmp_path), nprocs=WORLD)
    x, y = _batch()
    for loss, _ in RECIPES:
        alone = _step(loss, _, SINGLE, x, y)
        for rank in range(WORLD):
            ranked = torch.load(tmp_path / f"{loss}-rank{rank}.pt")
            assert ranked.keys() == alone.keys()
            assert any(k.startswith("grad.loss.") for k in alone) == (loss == "proxy_anchor")
            for key, value in alone.items():
                assert torch.allclose(ranked[key], value, atol=1e-5, rtol=0), (loss, rank, key)
            # and the step really moved the parameters
            assert not torch.allclose(ranked["net.0.weight"], _initial_weight(), atol=1e-4)


def _initial_weight() -> torch.Tensor:
    torch.manual_seed(0)
    return Tiny().net[0].weight.detach()


def _agree_rank(rank: int, store: Path, out: Path) -> None:
    ranks = _init(rank, store)
    ranks.agree("the replay memory read", lambda: "same")
    try:
        ranks.agree("the replay memory read", lambda: f"digest-{min(rank, 1)}")
        outcome = "passed"
    except RuntimeError as exc:
        outcome = str(exc)
    (out / f"agree-{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_that_read_different_replay_memories_refuse_to_train(tmp_path):
    mp.spawn(_agree_rank, args=(tmp_path / "store", tmp_path), nprocs=WORLD)
    for rank in range(WORLD):
        assert (tmp_path / f"agree-{rank}.txt").read_text() == (
            "the replay memory read differs between ranks: rank 1 has digest-1, rank 0 digest-0"
        )


@pytest.mark.parametrize("epoch_length", ["groups", "cover"])
def test_each_rank_takes_a_disjoint_class_balanced_share_of_the_global_batch(epoch_length):
    new = [c for c in range(6) for _ in range(5)]
    memory = [c for c in range(6, 12) for _ in range(3)]
    kwargs = dict(batch_size=16, m=2, memory_ratio=0.5, seed=3, epoch_length=epoch_length)
    whole = MixedBatches(new, memory, **kwargs)  # type: ignore[arg-type]
    shares = [MixedBatches(new, memory, rank=r, world=WORLD, **kwargs) for r in range(WORLD)]  # type: ignore[arg-type]
    labels = new + memory
    assert all(len(s) == len(whole) and s.batch_size == whole.batch_size == 16 for s in shares)
    for batch, *parts in zip(whole, *shares):
        assert sorted(batch) == sorted(i for p in parts for i in p)  # the global batch, split
        for part in parts:
            assert len(part) == shares[0].rank_batch_size == 8
            assert sum(i < len(new) for i in part) == 4  # the same new/memory split on every rank
            assert all(n % 2 == 0 for n in collections.Counter(labels[i] for i in part).values())  # m per class


def test_groups_per_batch_round_to_the_world_size():
    # 3 new classes: 3 groups of m would not split over 2 ranks; each rank keeps whole groups
    sampler = MixedBatches([0, 0, 1, 1, 2, 2], [], batch_size=16, m=2, memory_ratio=0.0, seed=0, rank=1, world=WORLD)
    assert sampler.batch_size == 4 and all(len(b) == 2 for b in sampler)
