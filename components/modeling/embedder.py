"""The embedder: a torchvision backbone whose classifier becomes a projection head,
with L2-normalised output.

Starting weights (`model.weights`) are a local state_dict file, or a torchvision weights
name (`DEFAULT`, `IMAGENET1K_V1`, ...) read from torchvision's cache under TORCH_HOME:
downloaded once where the network allows, a clear error naming the cache file where it does
not. Pretrained weights bring their own normalisation (mean, std), which the embedder keeps
in its spec, so training, indexing, the logged model and the service all use it.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from components.config import ModelParams, is_weights_name
from components.data.transforms import MEAN, STD, eval_transform, open_rgb

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

T = TypeVar("T")


STEMS = ("imagenet", "small")


def use_small_stem(net: nn.Module) -> None:
    """Replace a ResNet-style stem (7x7 stride-2 conv + max-pool) by a 3x3 stride-1 conv, no pool.

    The ImageNet stem divides the input by 4 before the first block: a 48 px character is
    12 px there. The CIFAR-style stem keeps full resolution (and costs ~16x the FLOPs).
    """
    conv = getattr(net, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(net, "maxpool"):
        raise ValueError(f"stem 'small' needs a ResNet-style backbone (conv1 + maxpool), not {type(net).__name__}")
    net.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()


class WeightsUnavailable(RuntimeError):
    """Named pretrained weights are neither in torchvision's cache nor downloadable here."""


class Embedder(nn.Module):
    def __init__(
        self,
        backbone: str,
        embedding_dim: int,
        image_size: int,
        stem: str = "imagenet",
        mean: Sequence[float] = MEAN,
        std: Sequence[float] = STD,
        centred: bool = False,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose from {', '.join(STEMS)}")
        self.backbone_name = backbone
        self.embedding_dim = embedding_dim
        self.image_size = image_size
        self.stem = stem
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        # num_classes sizes the backbone's own last layer, which is the projection head.
        self.net = torchvision.models.get_model(backbone, weights=None, num_classes=embedding_dim)
        if stem == "small":
            use_small_stem(self.net)
        # SimpleShot's centring (model.centre): the mean output over the trained gallery, subtracted
        # before normalising (fit_centre sets it after each training).
        self.centred = centred
        self.centre: torch.Tensor
        if centred:  # a buffer only where there is one: older checkpoints' state dicts stay loadable
            self.register_buffer("centre", torch.zeros(embedding_dim))
        self._raw = False  # fit_centre reads the head's outputs as they are

    @property
    def head(self) -> nn.Linear:
        """The projection head: the backbone's last Linear layer; its input is the pooled features."""
        return [m for m in self.net.modules() if isinstance(m, nn.Linear)][-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x).float()
        if self._raw:
            return z
        return F.normalize(z - self.centre if self.centred else z, dim=1)

    def spec(self) -> dict:
        # A checkpoint saved before `stem` existed has no such key: Embedder's default rebuilds it.
        return {
            "backbone": self.backbone_name,
            "embedding_dim": self.embedding_dim,
            "image_size": self.image_size,
            "stem": self.stem,
            "mean": list(self.mean),  # absent from older checkpoints: the defaults (0.5) rebuild them
            "std": list(self.std),
            "centred": self.centred,  # absent from older checkpoints: not centred
        }


@torch.inference_mode()
def fit_centre(model: Embedder, paths: Sequence[Path]) -> None:
    """Centre a centred model on `paths` (the images it was trained on): the mean of its head's outputs
    there is subtracted before normalising from now on (Wang et al. 2019, SimpleShot)."""
    model._raw = True
    try:
        mean = embed_files(model, paths).mean(axis=0)
    finally:
        model._raw = False
    model.centre.copy_(torch.from_numpy(mean).to(model.centre.device))


def build_embedder(params: ModelParams) -> Embedder:
    if params.weights is not None and is_weights_name(params.weights):
        weights = torchvision_weights(params.backbone, params.weights)
        preprocessing = weights.transforms()
        model = Embedder(
            params.backbone,
            params.embedding_dim,
            params.image_size,
            params.stem,
            mean=preprocessing.mean,
            std=preprocessing.std,
            centred=params.centre,
        )
        _load_matching(
            model, cached_state(weights, params.backbone, params.weights), f"{params.backbone} {params.weights}"
        )
        return model
    model = Embedder(params.backbone, params.embedding_dim, params.image_size, params.stem, centred=params.centre)
    if params.weights is not None:
        load_backbone_weights(model, Path(params.weights))
    return model


def torchvision_weights(backbone: str, name: str) -> WeightsEnum:
    """The backbone's weights enum member by name (`DEFAULT` is the best torchvision offers)."""
    members = torchvision.models.get_model_weights(backbone)
    return members.DEFAULT if name == "DEFAULT" else members[name]


def weights_cache_file(weights: WeightsEnum) -> Path:
    """Where torchvision keeps these weights: <TORCH_HOME>/hub/checkpoints/<file name of the URL>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def cached_state(weights: WeightsEnum, backbone: str, name: str) -> dict[str, torch.Tensor]:
    """The weights' state_dict from torchvision's cache, downloaded once when missing and allowed."""
    try:
        return weights.get_state_dict(progress=False)  # torch.hub: the cache first, weights_only loading
    except (OSError, ValueError) as exc:  # URLError is an OSError: no network, a proxy, a refused host
        raise WeightsUnavailable(
            f"{backbone} weights {name} are not in torchvision's cache ({weights_cache_file(weights)}) and could not "
            f"be downloaded here ({exc}); put the file there (TORCH_HOME sets the cache) or name a local file in "
            "model.weights"
        ) from None


def load_backbone_weights(model: Embedder, path: Path) -> None:
    """Load a torchvision state_dict file; layers whose shape differs (the classifier) keep their init."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{path}: cannot load backbone weights ({exc})") from None
    _load_matching(model, state, str(path))


def _load_matching(model: Embedder, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"{source}: no tensor matches backbone {model.backbone_name}")
    model.net.load_state_dict(usable, strict=False)


def save_embedder(model: Embedder, path: Path) -> None:
    torch.save({"spec": model.spec(), "state_dict": model.state_dict()}, path)


def load_embedder(path: Path) -> Embedder:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = Embedder(**checkpoint["spec"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


@torch.inference_mode()
def _forward(model: Embedder, tensors: list[torch.Tensor], device: torch.device, channels_last: bool) -> np.ndarray:
    x = torch.stack(tensors).to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return model(x).float().cpu().numpy()


def _stacked(model: Embedder, chunks: list[np.ndarray]) -> np.ndarray:
    if not chunks:
        return np.zeros((0, model.embedding_dim), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


def embed_images(
    model: Embedder,
    images: Iterable[Image.Image],
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
    on_batch: Callable[[int], None] | None = None,
    channels_last: bool = False,
) -> np.ndarray:
    """N x D float32 L2-normalised embeddings of RGB PIL images, in order.

    channels_last: NHWC inputs, for a model already moved to that memory format (the service's option).
    """
    device = device or next(model.parameters()).device
    model.eval()
    transform = eval_transform(model.image_size, model.mean, model.std)
    chunks: list[np.ndarray] = []
    for batch in _batches(images, batch_size):
        chunks.append(_forward(model, [transform(img) for img in batch], device, channels_last))
        if on_batch is not None:
            on_batch(len(batch))
    return _stacked(model, chunks)


def decode_workers() -> int:
    """Threads that decode and resize images beside the forward: one per core, at most 8."""
    return min(8, os.cpu_count() or 1)


def embed_files(
    model: Embedder,
    paths: Sequence[Path],
    *,
    batch_size: int = 256,
    workers: int | None = None,
    device: torch.device | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """embed_images of image files, decoded and resized by a thread pool one batch ahead of the
    forward (PIL and the resize release the GIL), so decoding is not bound to one core; memory
    stays at two batches of model-sized tensors."""
    device = device or next(model.parameters()).device
    model.eval()
    transform = eval_transform(model.image_size, model.mean, model.std)

    def load(path: Path) -> torch.Tensor:
        return transform(open_rgb(path))

    chunks: list[np.ndarray] = []
    with ThreadPoolExecutor(workers or decode_workers(), thread_name_prefix="mnemo-decode") as pool:
        ahead: list[Future[torch.Tensor]] | None = None
        for batch in [*_batches(paths, batch_size), []]:
            submitted = [pool.submit(load, p) for p in batch]
            if ahead:
                chunks.append(_forward(model, [f.result() for f in ahead], device, False))
                if on_batch is not None:
                    on_batch(len(ahead))
            ahead = submitted
    return _stacked(model, chunks)
