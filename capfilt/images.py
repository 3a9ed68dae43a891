"""Decode web image bytes once, or refuse them with a reason (``capfilt.image_transform`` then
preprocesses them for a model; this half needs no torch, so the driver can make thumbnails)."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow warns at 89 Mpx and raises at twice that; we refuse earlier, before decoding pixels.
MAX_PIXELS = 64_000_000


class ImageRejected(ValueError):
    """An image that cannot be used; ``reason`` is a short code, ``str(exc)`` a sentence."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def decode_image(data: bytes | None, max_pixels: int = MAX_PIXELS,
                 at_least: tuple[int, int] | None = None) -> Image.Image:
    """Bytes -> RGB PIL image (EXIF orientation applied), or ``ImageRejected`` with a reason.

    The header is read first so that a file declaring huge dimensions is refused before its
    pixels are allocated. ``at_least`` (width, height): a JPEG may be decoded at 1/2, 1/4 or
    1/8 of its size (libjpeg's DCT scaling, Pillow's ``draft``) while it stays at least that
    large; training, which resizes to a small side anyway, decodes several times faster.
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
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("image_too_large", f"decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected("undecodable_image", "bytes are not an image Pillow can read") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected("undecodable_image", f"image could not be decoded: {exc}") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB as ``transformers.image_transforms.convert_to_rgb`` does it (transparent -> white)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if array.max() > 255 else 1.0
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")
