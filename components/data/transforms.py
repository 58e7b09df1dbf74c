"""Image preprocessing shared by training, evaluation, indexing and the logged model."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def open_rgb(source: Path | bytes) -> Image.Image:
    """Decode a file or encoded bytes to RGB, upright; raises on anything that is not a whole image.

    The EXIF orientation is applied (a phone photo is stored sideways with a tag that says so),
    so ingest, training, queries, the logged model and the service all see the same upright
    image. Transparent pixels are laid on white (a plain convert would turn them black).
    """
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        img.load()
        return as_rgb(img)


def as_rgb(img: Image.Image) -> Image.Image:
    """A decoded image upright and in RGB (see open_rgb)."""
    return _to_rgb(_upright(img))


def _upright(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block: the pixels are still a whole image, used as stored
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return img.convert("RGB")


def eval_transform(image_size: int, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> v2.Compose:
    """Resize and normalise, with the embedder's own mean and std (its pretrained weights', if any)."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize((image_size, image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


AUGMENTS = ("crop", "affine")


def train_transform(
    image_size: int,
    augment: str = "crop",
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
    strength: float = 1.0,
    erase: float = 0.0,
) -> v2.Compose:
    """The training-time augmentation policy named in params (`train.augment`, `augment_strength`, `erase`).

    crop:   random resized crops (75-100% of the area); needs no knowledge of the background,
            suits photos.
    affine: small rotations, shears, shifts and scale changes of the whole image, the gaps
            filled with white: suits dark strokes on a white page (handwriting, glyphs), where
            a crop would cut strokes off and a black fill would draw a frame.
    `strength` scales every range (1: the ranges above; 0: none); `erase` is the chance that a
    random patch (2-20% of the image) is blanked to the mean grey after normalising: occlusion.
    """
    if augment == "crop":
        low = max(0.05, 1.0 - 0.25 * strength)
        spread = 0.1 * strength
        geometric = [v2.RandomResizedCrop(image_size, scale=(low, 1.0), ratio=(1 - spread, 1 + spread), antialias=True)]
    elif augment == "affine":
        # Resize first: the affine warp then costs the same whatever the stored size.
        geometric = [
            v2.Resize((image_size, image_size), antialias=True),
            v2.RandomAffine(
                degrees=10 * strength,
                translate=(min(0.1 * strength, 1.0),) * 2,
                scale=(max(0.05, 1 - 0.15 * strength), 1 + 0.15 * strength),
                shear=10 * strength,
                fill=255,
            ),
        ]
    else:
        raise ValueError(f"unknown augment {augment!r}; choose from {', '.join(AUGMENTS)}")
    occlusion = [v2.RandomErasing(p=erase, scale=(0.02, 0.2), value=0.0)] if erase > 0 else []
    return v2.Compose(
        [
            v2.PILToTensor(),
            *geometric,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
            *occlusion,
        ]
    )
