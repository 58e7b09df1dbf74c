"""serve.runtime: the model exported to ONNX gives the PyTorch module's vectors, and a version
whose export fails or differs is served by PyTorch instead."""

import copy
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from components.modeling import runtime
from components.modeling.embedder import build_embedder, embed_images
from components.modeling.runtime import EXPORT_TOLERANCE, OnnxForward, TorchForward, make_forward


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + i, 36, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture()
def model(params):
    torch.manual_seed(0)
    return build_embedder(params.model).eval()


def test_onnx_runtime_embeds_as_the_module_does(model):
    forward = make_forward(model, "onnxruntime", version="1")
    assert isinstance(forward, OnnxForward) and forward.model is model
    for batch in (images(1), images(5)):
        got, expected = forward(batch), embed_images(model, batch)
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert np.abs(got - expected).max() <= EXPORT_TOLERANCE
    got, expected = forward(images(5)), embed_images(model, images(5))
    assert (np.argmax(got @ expected.T, axis=1) == np.arange(5)).all()  # each image nearest its own vector
    assert forward([]).shape == (0, model.embedding_dim)


def test_a_differing_export_is_refused_and_pytorch_serves(model, monkeypatch, caplog):
    original = copy.deepcopy(model)
    monkeypatch.setattr(runtime, "export_error", lambda *_: 0.5)
    with caplog.at_level(logging.WARNING, logger="components.modeling.runtime"):
        forward = make_forward(model, "onnxruntime", version="7")
    assert isinstance(forward, TorchForward)
    assert "model v7: the ONNX export differs from the module by 0.5" in caplog.text
    assert np.allclose(forward(images(2)), embed_images(original, images(2)), atol=1e-5)


def test_a_model_off_the_cpu_stays_in_pytorch(model, caplog):
    model = model.to("meta")  # stands in for a GPU: ONNX Runtime runs on the CPU only here
    with caplog.at_level(logging.INFO, logger="components.modeling.runtime"):
        forward = make_forward(model, "onnxruntime", version="2")
    assert isinstance(forward, TorchForward) and "model v2 is on meta: served by PyTorch there" in caplog.text


def test_a_failed_export_is_named_and_pytorch_serves(model, monkeypatch, caplog):
    def broken(_):
        raise RuntimeError("Unsupported: ONNX export of operator foo")

    monkeypatch.setattr(runtime, "export_onnx", broken)
    with caplog.at_level(logging.WARNING, logger="components.modeling.runtime"):
        forward = make_forward(model, "onnxruntime", version="3")
    assert isinstance(forward, TorchForward)
    assert "model v3: ONNX export failed (Unsupported: ONNX export of operator foo)" in caplog.text


@pytest.mark.parametrize("name", ["torch", "torch_channels_last"])
def test_pytorch_runtimes_are_the_module(model, name):
    original = copy.deepcopy(model)  # channels_last converts the module it is given
    forward = make_forward(model, name)
    assert isinstance(forward, TorchForward) and forward.runtime == name
    assert np.allclose(forward(images(3)), embed_images(original, images(3)), atol=1e-5)
