"""Decode web image bytes once, or refuse them with a reason (``capfilt.images.transform`` then
preprocesses them for a model; this half needs no torch, so the driver can make thumbnails)."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow warns at 89 Mpx and raises at twice that; we refuse earlier, before decoding pixels.
MAX_PIXELS = 64_000_000
# Memory one decode may take: a greyscale or palette image at the pixel limit with the RGB copy
# it becomes (5 bytes a pixel). Modes that cost more a pixel are refused at fewer pixels: a
# 16-bit PNG of 140 KB at the pixel limit took 1.6 GB to decode before this limit.
MAX_DECODE_BYTES = MAX_PIXELS * 5
# Bytes a pixel while an image of each mode is decoded and made RGB, measured on this code at
# 16 Mpx (the peak resident memory a decode added, within 1%): the decoded image as Pillow
# holds it (1 byte for 1, L and P, 2 for 16-bit, 4 for the rest, RGB included), the RGB image
# (4), the arrays between; transparency composited on white adds three RGBA images (12).
_DECODE_BYTES_PER_PIXEL = {"1": 5, "L": 5, "P": 5, "RGB": 4, "RGBA": 4, "LA": 8, "PA": 8,
                           "I;16": 8, "I;16L": 8, "I;16B": 8, "I;16N": 8, "I": 12, "F": 9}
_OTHER_MODE_BYTES = 8  # CMYK, YCbCr, LAB, HSV: 4 decoded + 4 RGB
_ALPHA_BYTES = 12


class ImageRejected(ValueError):
    """An image that cannot be used; ``reason`` is a short code, ``str(exc)`` a sentence."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def decode_image(data: bytes | None, max_pixels: int = MAX_PIXELS,
                 at_least: tuple[int, int] | None = None) -> Image.Image:
    """Bytes -> RGB PIL image (EXIF orientation applied), or ``ImageRejected`` with a reason.

    The header is read first so that a file declaring huge dimensions, or whose mode would make
    its decode cost over ``MAX_DECODE_BYTES``, is refused before its pixels are allocated.
    ``at_least`` (width, height): a JPEG may be decoded at 1/2, 1/4 or 1/8 of its size
    (libjpeg's DCT scaling, Pillow's ``draft``) while it stays at least that large; training,
    which resizes to a small side anyway, decodes several times faster.
    """
    if not data:
        raise ImageRejected("missing_image", "the row has no image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected(
                    "image_too_large",
                    f"image declares {width}x{height} pixels, over the limit of {max_pixels}",
                )
            if at_least:
                image.draft(None, at_least)
            _check_cost(image)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            return _to_rgb(image)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("image_too_large", f"decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected("undecodable_image", "bytes are not an image Pillow can read") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected("undecodable_image", f"image could not be decoded: {exc}") from exc


def decode_cost(mode: str, size: tuple[int, int], transparent: bool = False) -> int:
    """Bytes that decoding an image of ``mode`` and ``size`` to RGB takes at its peak."""
    per_pixel = _DECODE_BYTES_PER_PIXEL.get(mode, _OTHER_MODE_BYTES)
    if transparent or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        per_pixel += _ALPHA_BYTES
    return size[0] * size[1] * per_pixel


def _check_cost(image: Image.Image) -> None:
    """Refuse, from the header alone, an image whose decode would take over the limit."""
    cost = decode_cost(image.mode, image.size, "transparency" in image.info)
    if cost > MAX_DECODE_BYTES:
        width, height = image.size
        raise ImageRejected(
            "image_too_large",
            f"{image.mode} image of {width}x{height} pixels would take {cost >> 20} MiB to "
            f"decode, over the limit of {MAX_DECODE_BYTES >> 20} MiB")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB as ``transformers.image_transforms.convert_to_rgb`` does it (transparent -> white)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        image = _eight_bit(image)
    return image.convert("RGB")


def _eight_bit(image: Image.Image) -> Image.Image:
    """A 16- or 32-bit greyscale image as 8-bit L: scaled down from 16 bits when its values
    go beyond 8. Converted a block of rows at a time, so that no float64 copy of the whole
    image is ever held (it was 8 bytes a pixel, twice over)."""
    array = np.asarray(image)
    scale = 255.0 / 65535.0 if array.max() > 255 else 1.0
    out = np.empty(array.shape, np.uint8)
    rows = max(1, (1 << 20) // max(1, array.shape[1]))
    for top in range(0, array.shape[0], rows):
        block = array[top : top + rows].astype(np.float64)
        out[top : top + rows] = np.clip(block * scale, 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")
