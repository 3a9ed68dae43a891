"""Decode web image bytes once, and preprocess them exactly as ``BlipImageProcessor`` does."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as tvF

# Pillow warns at 89 Mpx and raises at twice that; we refuse earlier, before decoding pixels.
MAX_PIXELS = 64_000_000


class ImageRejected(ValueError):
    """An image that cannot be used; ``reason`` is a short code, ``str(exc)`` a sentence."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def decode_image(data: bytes | None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes -> RGB PIL image (EXIF orientation applied), or ``ImageRejected`` with a reason.

    The header is read first so that a file declaring huge dimensions is refused before its
    pixels are allocated.
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


@dataclass(frozen=True)
class ImageTransform:
    """BLIP's eval transform: bicubic resize without keeping aspect, rescale, normalise.

    Built from the checkpoint's ``BlipImageProcessor`` and computed the way its torchvision
    backend does (uint8 antialiased bicubic resize, then one fused rescale-normalise), so the
    pixels are the processor's; a test checks the equality on real images.
    """

    height: int
    width: int
    interpolation: tvF.InterpolationMode
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # CLIP's processors resize the shorter side, then crop the centre to height x width.
    shortest_edge: int | None = None

    @classmethod
    def from_processor(cls, processor) -> "ImageTransform":
        size = processor.size
        # The processor's fused rescale-normalise: float32 tensors times 1/rescale_factor.
        scale = 1.0 / float(processor.rescale_factor)
        shortest = size.get("shortest_edge")
        if shortest is not None:
            crop = processor.crop_size if processor.do_center_crop else {
                "height": shortest, "width": shortest}
            size = {"height": crop["height"], "width": crop["width"]}
        return cls(
            height=int(size["height"]),
            width=int(size["width"]),
            shortest_edge=None if shortest is None else int(shortest),
            interpolation=_INTERPOLATION[int(processor.resample)],
            mean=tuple((torch.tensor(processor.image_mean) * scale).tolist()),
            std=tuple((torch.tensor(processor.image_std) * scale).tolist()),
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.resize(image))

    def resize(self, image: Image.Image) -> torch.Tensor:
        """The CPU half: uint8 (3, height, width). A quarter of float32's bytes to hold and to
        copy to the GPU, where ``normalize`` runs on the whole batch."""
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        if self.shortest_edge is None:
            target = [self.height, self.width]
        else:
            height, width = pixels.shape[1:]
            short, long = sorted((height, width))
            scaled = (self.shortest_edge, int(self.shortest_edge * long / short))
            target = list(scaled if height <= width else scaled[::-1])
        resized = tvF.resize(pixels, target, interpolation=self.interpolation, antialias=True)
        if self.shortest_edge is not None:
            resized = tvF.center_crop(resized, [self.height, self.width])
        return resized

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels, one image or a batch, on any device -> the model's float32 input."""
        return tvF.normalize(pixels.to(torch.float32), self.mean, self.std)


_INTERPOLATION = {
    int(Image.Resampling.NEAREST): tvF.InterpolationMode.NEAREST,
    int(Image.Resampling.BILINEAR): tvF.InterpolationMode.BILINEAR,
    int(Image.Resampling.BICUBIC): tvF.InterpolationMode.BICUBIC,
    int(Image.Resampling.LANCZOS): tvF.InterpolationMode.BICUBIC,  # as transformers does
}
