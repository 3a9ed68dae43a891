"""Preprocess decoded images exactly as ``BlipImageProcessor`` (or CLIP's) does."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvF


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
