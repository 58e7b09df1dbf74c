"""Is this a whole image mnemo accepts? The checks every image passes, at ingest, in
`mnemo query` and in the service: size in bytes and pixels, format, pixel mode, a full
decode, nothing appended after a PNG's end.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from components.config import IngestParams
from components.data.transforms import as_rgb

PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk type and its CRC: nothing of a PNG follows it


def validate_image(data: bytes, limits: IngestParams) -> tuple[str | None, str | None]:
    """(format, None) for a good image, (None, reason) for a bad one. Decodes the whole image."""
    fmt, reason, _ = _checked(data, limits, keep=False)
    return fmt, reason


def decode_image(data: bytes, limits: IngestParams) -> tuple[Image.Image | None, str | None]:
    """(the image upright in RGB, None) for a good image, (None, reason) for a bad one: the checks of
    validate_image and the decode a query needs, in one pass over the pixels."""
    _, reason, image = _checked(data, limits, keep=True)
    return image, reason


def _checked(data: bytes, limits: IngestParams, *, keep: bool) -> tuple[str | None, str | None, Image.Image | None]:
    """(format, reason, image): reason None for a good image; the RGB image too when `keep`."""
    image = None
    if not data:
        return None, "empty file (0 bytes)", None
    if len(data) > limits.max_file_bytes:
        return None, too_big(len(data), limits.max_file_bytes), None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, mode, (width, height) = img.format, img.mode, img.size
                if fmt not in limits.formats:
                    return None, f"format {fmt} is not one of {', '.join(limits.formats)}", None
                if width * height > limits.max_pixels:
                    pixels = f"{width}x{height} = {width * height} pixels"
                    return None, f"{pixels}, over the {limits.max_pixels}-pixel limit", None
                if min(width, height) < limits.min_side:
                    return None, f"{width}x{height} is smaller than {limits.min_side} pixels on a side", None
                if mode not in limits.modes:
                    return None, f"pixel mode {mode} is not one of {', '.join(limits.modes)}", None
                img.load()  # full decode: truncated or corrupt data fails here
                if keep:
                    image = as_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return None, f"image dimensions are too large ({exc})", None
    except UnidentifiedImageError:
        return None, "not an image (no decoder recognises the file)", None
    except (OSError, SyntaxError, ValueError) as exc:
        return None, f"corrupt or truncated image ({exc})", None
    if fmt == "PNG":
        end = data.rfind(PNG_END)
        if end >= 0 and end + len(PNG_END) < len(data):
            extra = len(data) - end - len(PNG_END)
            return None, f"{extra} bytes after the end of the PNG image (a polyglot or appended payload)", None
    return fmt, None, image


def too_big(size: int, limit: int) -> str:
    return f"file is {size} bytes, over the {limit}-byte limit"
