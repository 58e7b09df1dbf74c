"""The continual parts of the training loop: mixed batches, distillation maths, growing proxies,
checkpoint/resume, and one continual step that restores and extends its saved state."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import DistillParams, with_overrides
from components.data.catalog import ImageRecord
from components.modeling.embedder import build_embedder
from components.training.continual import Recipe, train_continual
from components.training.distill import Distillation, embedding_distillation, relational_distillation
from components.training.loop import train_embedder
from components.training.losses import MetricLoss
from components.training.sampler import MixedBatches
from components.training.selfsup import turned
from tests.unit.modeling.test_model import shapes


def test_mixed_batches_hold_m_per_class_and_the_memory_share():
    new = [i // 5 for i in range(40)]  # 8 classes x 5
    memory = [100 + i // 3 for i in range(30)]  # 10 classes x 3
    sampler = MixedBatches(new, memory, batch_size=16, m=4, memory_ratio=0.5, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 40 // 8
    labels = new + memory
    for batch in batches:
        from_memory = [i for i in batch if i >= len(new)]
        assert len(batch) == 16 and len(from_memory) == 8
        assert set(Counter(labels[i] for i in batch).values()) == {4}
    sampler.set_epoch(1)
    again = MixedBatches(new, memory, batch_size=16, m=4, memory_ratio=0.5, seed=0)
    again.set_epoch(1)
    assert list(sampler) == list(again) != batches  # per-epoch seeded: resumable, and epochs differ


def test_distillation_terms_match_brute_force():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    t = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.6, 0.8]])
    assert embedding_distillation(s, t, "cosine").item() == pytest.approx((1 + 0 + 0) / 3)
    assert embedding_distillation(s, t, "l2").item() == pytest.approx((2 + 0 + 0) / 3)
    sim_s = [[1, 0, 0.6], [0, 1, 0.8], [0.6, 0.8, 1]]
    sim_t = [[1, 1, 0.8], [1, 1, 0.8], [0.8, 0.8, 1]]
    expected = sum((a - b) ** 2 for ra, rb in zip(sim_s, sim_t) for a, b in zip(ra, rb)) / 9
    assert relational_distillation(s, t).item() == pytest.approx(expected)


def test_distillation_from_an_identical_teacher_is_zero_and_the_teacher_stays_frozen(params):
    model = build_embedder(params.model).eval()
    distill = Distillation(
        model,
        DistillParams(embedding_weight=1.0, embedding_distance="cosine", embedding_on="all", relational_weight=1.0),
    )
    x = torch.rand(6, 3, 32, 32)
    terms = distill(x, model(x))
    assert set(terms) == {"distill_embedding", "distill_relational"}
    assert all(v.item() == pytest.approx(0.0, abs=1e-5) for v in terms.values())
    assert not any(p.requires_grad for p in distill.teacher.parameters())
    distill.train()
    assert not distill.teacher.training


def test_proxies_grow_with_new_classes_and_keep_the_old_ones(params):
    p = params.train.model_copy(update={"loss": "proxy_anchor", "miner": "none"})
    loss = MetricLoss(p, 16)
    loss.add_classes(["a", "b"])
    old = loss.loss.proxies.detach().clone()
    restored = MetricLoss(p, 16)
    restored.restore(loss.state())
    restored.add_classes(["b", "c", "d"], class_means=lambda names: torch.eye(16)[: len(names)])
    assert restored.classes == ["a", "b", "c", "d"] and restored.labels(["c", "a"]) == [2, 0]
    assert torch.equal(restored.loss.proxies[:2], old)
    assert torch.equal(restored.loss.proxies[2:], torch.eye(16)[:2])


def crashed_and_resumed(params, train, paths, labels, tmp_path, *, crash_after: int):
    """An unbroken run, and the same run crashed after epoch `crash_after` then started again on its checkpoints."""
    init = build_embedder(params.model)
    unbroken = train_embedder(paths, labels, train, params.model, init=init)

    class Crash(Exception):
        pass

    def crash(epoch, _metrics):
        if epoch == crash_after:
            raise Crash

    with pytest.raises(Crash):
        train_embedder(paths, labels, train, params.model, init=init, checkpoint_dir=tmp_path / "ckpt", on_epoch=crash)
    resumed = train_embedder(paths, labels, train, params.model, init=init, checkpoint_dir=tmp_path / "ckpt")
    return init, unbroken, resumed


def test_a_crashed_run_resumes_from_its_last_epoch_and_ends_where_an_unbroken_one_does(params, tmp_path):
    paths, labels = shapes(tmp_path)
    p = params.train.model_copy(update={"epochs": 3, "batch_size": 8, "m_per_class": 2})
    init, unbroken, resumed = crashed_and_resumed(params, p, paths, labels, tmp_path, crash_after=1)
    assert resumed.resumed_from_epoch == 2
    assert resumed.epoch_losses == pytest.approx(unbroken.epoch_losses)
    for a, b in zip(resumed.model.state_dict().values(), unbroken.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    # A different job (other params) does not pick up that checkpoint.
    other = train_embedder(
        paths, labels, p.model_copy(update={"lr": 0.01}), params.model, init=init, checkpoint_dir=tmp_path / "ckpt"
    )
    assert other.resumed_from_epoch == 0


def test_continual_steps_carry_the_memory_and_proxies_through_saved_state(params, tmp_path):
    paths, labels = shapes(tmp_path, n_classes=4, per_class=6)
    records = [
        ImageRecord(id=path.name, cls=c, arrival=f"a{int(c[-1]) // 2}", role="train") for path, c in zip(paths, labels)
    ]
    p = with_overrides(
        params, {"train.loss": "proxy_anchor", "train.miner": "none", "replay.budget": 5, "replay.selection": "herding"}
    )
    first = train_continual([r for r in records if r.arrival == "a0"], tmp_path, Recipe.of(p))
    assert first.memory.per_class() == {"class0": 3, "class1": 2}
    state = first.save_state(tmp_path / "state")
    second = train_continual(
        [r for r in records if r.arrival == "a1"],
        tmp_path,
        Recipe.of(p),
        init=first.train.model,
        state=state,
    )
    # The second step trained on two new classes plus the two remembered ones.
    assert second.train.classes == 4
    assert sorted(second.memory.per_class()) == ["class0", "class1", "class2", "class3"] and len(second.memory) == 5
    assert second.train.loss_state["classes"] == ["class0", "class1", "class2", "class3"]
    assert "distill_embedding" in second.train.epoch_metrics and "distill_embedding" not in first.train.epoch_metrics


@pytest.mark.parametrize("sizes", [(5,) * 8, (1, 2, 3, 4, 5, 6, 7, 9), (6, 6)])
def test_covering_epochs_draw_every_new_image_and_keep_m_per_class(sizes):
    new = [c for c, n in enumerate(sizes) for _ in range(n)]
    memory = [100 + i // 3 for i in range(30)]
    sampler = MixedBatches(new, memory, batch_size=16, m=4, memory_ratio=0.5, seed=0, epoch_length="cover")
    groups = sum(-(-n // 4) for n in sizes)
    per_batch = min(2, len(sizes))
    assert len(sampler) == -(-groups // per_batch)
    labels = new + memory
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert set().union(*map(set, batches)) >= set(range(len(new)))  # every new image, every epoch
        for batch in batches:
            assert sum(i >= len(new) for i in batch) == 8
            assert set(Counter(labels[i] for i in batch).values()) == {4}
    again = MixedBatches(new, memory, batch_size=16, m=4, memory_ratio=0.5, seed=0, epoch_length="cover")
    again.set_epoch(2)
    assert list(again) == batches  # per-epoch seeded: a resumed run sees the same batches


def test_covering_an_arrival_of_small_classes_takes_more_steps_than_whole_groups():
    new = [c for c in range(12) for _ in range(5)]  # m + 1 images per class: groups drop a third of the steps
    groups = MixedBatches(new, [], batch_size=16, m=4, memory_ratio=0.0, seed=0)
    cover = MixedBatches(new, [], batch_size=16, m=4, memory_ratio=0.0, seed=0, epoch_length="cover")
    assert (len(groups), len(cover)) == (60 // 16, 6)


def test_embedding_distillation_on_old_classes_only_ignores_the_new_images(params):
    model = build_embedder(params.model).eval()
    other = build_embedder(params.model).eval()
    x = torch.rand(4, 3, 32, 32)
    old = torch.tensor([True, False, True, False])
    only_old = Distillation(
        model,
        DistillParams(embedding_weight=2.0, embedding_distance="cosine", embedding_on="old", relational_weight=0.0),
    )
    student = other(x)
    with torch.no_grad():
        teacher = model(x)
    expected = 2.0 * embedding_distillation(student[old], teacher[old], "cosine")
    assert only_old(x, student, old=old)["distill_embedding"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert only_old(x, student, old=torch.zeros(4, dtype=torch.bool))["distill_embedding"].item() == 0.0
    everywhere = Distillation(model, only_old.params.model_copy(update={"embedding_on": "all"}))
    assert everywhere(x, student, old=old)["distill_embedding"].item() == pytest.approx(
        2.0 * embedding_distillation(student, teacher, "cosine").item(), rel=1e-5
    )


def test_cosine_schedule_ends_near_zero_and_resumes_exactly(params, tmp_path):
    paths, labels = shapes(tmp_path)
    p = params.train.model_copy(update={"epochs": 3, "batch_size": 8, "m_per_class": 2, "lr_schedule": "cosine"})
    _, unbroken, resumed = crashed_and_resumed(params, p, paths, labels, tmp_path, crash_after=0)
    # Stepped per batch, cosine from lr to 0: after epoch e of E the lr is lr * (1 + cos(pi * e / E)) / 2.
    expected = [p.lr * (1 + math.cos(math.pi * e / p.epochs)) / 2 for e in range(1, p.epochs + 1)]
    assert unbroken.epoch_metrics["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert unbroken.epoch_metrics["lr"][-1] < 1e-12 * p.lr
    assert resumed.resumed_from_epoch == 1
    assert resumed.epoch_metrics["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    for a, b in zip(resumed.model.state_dict().values(), unbroken.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_each_image_is_turned_by_its_own_quarter_turns():
    x = torch.arange(4 * 1 * 3 * 3, dtype=torch.float32).reshape(4, 1, 3, 3)
    turns = torch.tensor([0, 1, 2, 3])
    out = turned(x, turns)
    for image, k in zip(range(4), turns.tolist()):
        assert torch.equal(out[image], torch.rot90(x[image], k, dims=(1, 2)))
    assert torch.equal(turned(turned(x, turns), (4 - turns) % 4), x)  # turned back, every image is itself


def upright_glyphs(tmp_path, n_classes=4, per_class=4):
    """Images whose turn can be told: a bar along the top edge, and a class-sized square under it."""
    paths, labels = [], []
    for c in range(n_classes):
        for i in range(per_class):
            img = np.full((32, 32, 3), 20 + i * 5, dtype=np.uint8)
            img[1:5, :] = 230
            img[12 : 16 + 3 * c, 10 : 14 + 3 * c] = 200
            paths.append(tmp_path / f"glyph{c}-{i}.png")
            Image.fromarray(img).save(paths[-1])
            labels.append(f"class{c}")
    return paths, labels


def test_rotation_prediction_is_learned_and_resumes_exactly(params, tmp_path):
    paths, labels = upright_glyphs(tmp_path)
    p = params.train.model_copy(
        update={"epochs": 20, "batch_size": 16, "m_per_class": 4, "lr": 0.003, "rotation_weight": 1.0}
    )
    _, unbroken, resumed = crashed_and_resumed(params, p, paths, labels, tmp_path, crash_after=9)
    turn_loss = unbroken.epoch_metrics["rotation_loss"]
    assert turn_loss[0] > 0.9 * math.log(4)  # chance among 4 turns at first
    assert sum(turn_loss[-5:]) / 5 < 0.75 * math.log(4)  # then the turns are told apart (one batch an epoch: noisy)
    assert resumed.resumed_from_epoch == 10  # the turn head's state came back from the checkpoint
    assert resumed.epoch_metrics["rotation_loss"] == pytest.approx(turn_loss)
    for a, b in zip(resumed.model.state_dict().values(), unbroken.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    # what is served is the embedder alone: no turn classifier in its state, nothing listening to its head
    assert unbroken.model.state_dict().keys() == build_embedder(params.model).state_dict().keys()
    assert not unbroken.model.head._forward_pre_hooks
