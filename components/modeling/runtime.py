"""How the query service runs its model's forward (`serve.runtime`).

    onnxruntime          the embedder exported to ONNX once per loaded version and run by ONNX
                         Runtime on the CPU: resnet18 at 48 px, one image, 1.9 ms against
                         PyTorch's 4.3 (NHWC) and 5.9 (NCHW) in one run on 2 cores (bench/query.py)
    torch_channels_last  the PyTorch module in NHWC memory format
    torch                the PyTorch module as trained

An exported model must give the module's vectors: before it serves, both embed a seeded probe
batch and the export is refused when any coordinate differs by more than EXPORT_TOLERANCE
(an operator the exporter does not translate faithfully). A refused or failed export serves
that version with PyTorch and says why in the log, so a query never gets a vector the
table's model would not give it. ONNX Runtime runs here on the CPU only: a model the registry
loaded onto a GPU stays in PyTorch there.

Memory: a session holds its own copy of the weights beside the module (resnet18: about 45 MB
per cached version).

Preprocessing (resize, the embedder's mean and std) is the one eval_transform that training,
indexing and the logged model use, whatever the runtime.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from components.config import Runtime
from components.data.transforms import eval_transform
from components.modeling.embedder import Embedder, embed_images

log = logging.getLogger(__name__)

EXPORT_TOLERANCE = 1e-4  # unit vectors: a coordinate this far off moves a cosine distance by about as much
INPUT, OUTPUT = "images", "embeddings"


class Forward(Protocol):
    """Images in, N x D float32 unit vectors out, as embed_images gives them."""

    runtime: str
    model: Embedder  # the module itself, whatever runs the forward

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray: ...


class TorchForward:
    """The PyTorch module itself (in NHWC memory format with channels_last)."""

    def __init__(self, model: Embedder, *, channels_last: bool = False) -> None:
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.channels_last = channels_last
        self.runtime = "torch_channels_last" if channels_last else "torch"

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        return embed_images(self.model, images, channels_last=self.channels_last)


class OnnxForward:
    """The module exported to ONNX, run by an ONNX Runtime session on the CPU."""

    runtime = "onnxruntime"

    def __init__(self, model: Embedder) -> None:
        import onnxruntime as ort

        self.model = model
        self.transform = eval_transform(model.image_size, model.mean, model.std)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as many as PyTorch would use
        options.inter_op_num_threads = 1
        # Idle threads sleep instead of spinning: the event loop, the graph search and the other
        # requests share these cores (bench/results/README.md: more requests/s with 4 clients).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: its optimiser's notes are not the operator's business
        self.session = ort.InferenceSession(export_onnx(model), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.model.embedding_dim), dtype=np.float32)
        batch = torch.stack([self.transform(image) for image in images]).numpy()
        return self.run(batch)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The embeddings of an already preprocessed N x 3 x H x W float32 batch."""
        return np.asarray(self.session.run([OUTPUT], {INPUT: batch})[0], dtype=np.float32)


def export_onnx(model: Embedder) -> bytes:
    """The eval-mode module as an ONNX graph with a variable batch size."""
    model = model.eval()
    example = torch.zeros(1, 3, model.image_size, model.image_size)
    with tempfile.TemporaryDirectory(prefix="mnemo-onnx-") as tmp, warnings.catch_warnings():
        # The TorchScript exporter announces its deprecation on every export, i.e. on every model a
        # replica loads. Silenced for the export only: importing this module changes no filter.
        # (Filters are process-wide in 3.11; a warning another thread raises meanwhile from
        # torch.onnx is the only other one this hides.)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript", category=DeprecationWarning)
        path = Path(tmp) / "embedder.onnx"
        torch.onnx.export(
            model,
            (example,),
            path,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            # The TorchScript exporter: needs no onnxscript. Should a torch release drop it, the export
            # fails, every version is served by PyTorch and the log says why (tests/unit/modeling/test_runtime.py fails).
            dynamo=False,
        )
        return path.read_bytes()


def export_error(model: Embedder, forward: OnnxForward, seed: int = 0) -> float:
    """The largest coordinate difference between the module and its export on a seeded probe batch."""
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randn(4, 3, model.image_size, model.image_size, generator=generator)
    with torch.inference_mode():
        expected = model.eval()(probe).numpy()
    return float(np.abs(forward.run(probe.numpy()) - expected).max())


def make_forward(model: Embedder, runtime: Runtime, *, version: str = "?") -> Forward:
    """The forward `runtime` names for a loaded model; PyTorch where the ONNX export fails or differs,
    and for a model on a GPU."""
    if runtime != "onnxruntime":
        return TorchForward(model, channels_last=runtime == "torch_channels_last")
    device = next(model.parameters()).device
    if device.type != "cpu":
        log.info("model v%s is on %s: served by PyTorch there", version, device)
        return TorchForward(model, channels_last=True)
    try:
        forward = OnnxForward(model)
        error = export_error(model, forward)
    except Exception as exc:  # an operator without an ONNX translation, a runtime that cannot load it
        log.warning("model v%s: ONNX export failed (%s); serving it with PyTorch", version, exc)
        return TorchForward(model, channels_last=True)
    if error > EXPORT_TOLERANCE:
        log.warning(
            "model v%s: the ONNX export differs from the module by %.2g (over %g); serving it with PyTorch",
            version,
            error,
            EXPORT_TOLERANCE,
        )
        return TorchForward(model, channels_last=True)
    return forward
