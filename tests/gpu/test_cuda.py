"""The CUDA path against the CPU result, on the same images and weights.

Tolerances, stated once: inference runs in float32 on both devices, so vectors agree to
cuDNN's reordering of sums (cosine >= 0.9999 per image); training runs under bf16 autocast
on CUDA (float32 on the CPU), so after one epoch from the same weights the losses agree
within 5% and the two models' embeddings of the same images within cosine 0.99.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from components.data.catalog import Catalog
from components.modeling.embedder import build_embedder, embed_files
from components.modeling.pyfunc import EmbedderModel
from components.training.loop import seed_everything, train_embedder
from components.vectors.tables import VECTOR, connect, open_table
from tests.unit.modeling.test_model import shapes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="no CUDA device (torch.cuda.is_available() is False): the GPU suite needs one",
    ),
]
INFERENCE_COSINE = 0.9999
TRAINED_COSINE = 0.99
LOSS_RTOL = 0.05


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_one_training_epoch_on_cuda_matches_the_cpu(params, tmp_path):
    paths, labels = shapes(tmp_path, n_classes=4, per_class=8)
    runs = {}
    for device in ("cpu", "cuda"):
        seed_everything(params.train.seed)
        init = build_embedder(params.model)  # the same starting weights on both devices (same seed)
        p = params.train.model_copy(update={"epochs": 1, "device": device, "num_workers": 0})
        runs[device] = train_embedder(paths, labels, p, params.model, init=init)
    cpu, cuda = runs["cpu"], runs["cuda"]
    assert cuda.device.startswith("cuda") and cpu.device == "cpu"
    assert cuda.epoch_losses[-1] == pytest.approx(cpu.epoch_losses[-1], rel=LOSS_RTOL)
    a = embed_files(cpu.model.cpu(), paths)
    b = embed_files(cuda.model.cpu(), paths)
    assert cosines(a, b).min() >= TRAINED_COSINE


def test_the_pyfunc_on_cuda_embeds_as_on_the_cpu(params, tmp_path):
    paths, _ = shapes(tmp_path)
    model = build_embedder(params.model).eval()
    frame = pd.DataFrame({"image": [p.read_bytes() for p in paths]})
    on_cpu = EmbedderModel.around(copy.deepcopy(model)).predict(None, frame)
    on_cuda = EmbedderModel.around(copy.deepcopy(model).to("cuda")).predict(None, frame)
    assert on_cuda.dtype == np.float32 and on_cuda.shape == on_cpu.shape
    assert cosines(on_cpu, on_cuda).min() >= INFERENCE_COSINE


def test_a_reindex_on_cuda_writes_what_the_cpu_computes(live_ws, params):
    from components.registry.mlflow_registry import ModelRegistry
    from components.registry.promotion import Promoter

    registry = ModelRegistry(live_ws, params.registry)
    version = registry.challenger().version
    table = registry.get(version).table
    connect(live_ws).drop_table(table)  # the challenger's table, rebuilt on the GPU
    model = registry.load_embedder(version)
    built = Promoter(live_ws, params.registry, params.index).reindex(version, copy.deepcopy(model).to("cuda"))
    rows = open_table(connect(live_ws), live_ws, built.table).to_arrow().to_pylist()
    records = {r.id: r for r in Catalog.load(live_ws.catalog).records()}
    assert {row["id"] for row in rows} == set(records)
    ids = [row["id"] for row in rows]
    on_gpu = np.array([row[VECTOR] for row in rows], dtype=np.float32)
    on_cpu = embed_files(model.cpu(), [live_ws.classes_dir / i for i in ids])
    assert cosines(on_gpu, on_cpu).min() >= INFERENCE_COSINE
