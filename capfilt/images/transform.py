"""Preprocess decoded images exactly as ``BlipImageProcessor`` (or CLIP's) does.

The processors' torchvision backend, written with torch alone: a decoding process then starts
without importing torchvision, which took 3.7 s and 168 MB here (``import torch`` alone: 4.2 s).
Tests compare the pixels with the processors' own.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class ImageTransform:
    """BLIP's eval transform: bicubic resize without keeping aspect, rescale, normalise.

    Built from the checkpoint's ``BlipImageProcessor`` and computed the way its torchvision
    backend does (uint8 antialiased bicubic resize, then one fused rescale-normalise), so the
    pixels are the processor's; a test checks the equality on real images.
    """

    height: int
    width: int
    interpolation: str  # torch's interpolate mode: "bicubic", "bilinear" or "nearest"
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
        return self.resize_pixels(pixels)

    def resize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """``resize`` of decoded uint8 (3, H, W) pixels: the JPEG decoder in torch
        (``capfilt.images.torch_jpeg``) resizes its images here, on their device."""
        if self.shortest_edge is None:
            target = [self.height, self.width]
        else:
            height, width = pixels.shape[1:]
            short, long = sorted((height, width))
            scaled = (self.shortest_edge, int(self.shortest_edge * long / short))
            target = list(scaled if height <= width else scaled[::-1])
        resized = _resize_uint8(pixels, target, self.interpolation)
        if self.shortest_edge is not None:
            resized = _center_crop(resized, self.height, self.width)
        return resized

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels, one image or a batch, on any device -> the model's float32 input."""
        image = pixels.to(torch.float32)
        mean = torch.as_tensor(self.mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
        return image.sub(mean).div_(std)


_INTERPOLATION = {
    int(Image.Resampling.NEAREST): "nearest",
    int(Image.Resampling.BILINEAR): "bilinear",
    int(Image.Resampling.BICUBIC): "bicubic",
    int(Image.Resampling.LANCZOS): "bicubic",  # as transformers does
}


# Where torchvision resizes uint8 bilinear in torch's uint8 kernel (elsewhere through float32).
_NATIVE_UINT8_BILINEAR = (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                          or platform.machine() in ("aarch64", "arm64"))


def _resize_uint8(pixels: torch.Tensor, size: list[int], mode: str) -> torch.Tensor:
    """torchvision's ``resize_image`` on a CPU uint8 (C, H, W) tensor, antialiased: uint8 in
    torch's own kernels where torchvision uses them (nearest, bicubic; bilinear on AVX2, AVX512
    and ARM), else through float32 and rounded back."""
    channels, height, width = pixels.shape
    if [height, width] == list(size):
        return pixels
    if pixels.device.type != "cpu":
        return _resize_float(pixels, size, mode)
    image = pixels.reshape(1, channels, height, width)
    strides = image.stride()
    if image.is_contiguous(memory_format=torch.channels_last) and image.numel() != strides[0]:
        # As torchvision does: restrided, so that interpolate keeps channels_last (torch #68430).
        image = image.as_strided(image.shape, (image.numel(), *strides[1:]))
    native = mode != "bilinear" or _NATIVE_UINT8_BILINEAR
    smooth = mode in ("bilinear", "bicubic")
    out = F.interpolate(image if native else image.to(torch.float32), size=list(size), mode=mode,
                        align_corners=False if smooth else None, antialias=smooth)
    if not native:
        out = out.round_().to(torch.uint8)
    return out.reshape(channels, *size)


def _resize_float(pixels: torch.Tensor, size: list[int], mode: str) -> torch.Tensor:
    """The resize on a GPU, through float32 (CUDA's antialiased resize takes no uint8). As
    torch's uint8 kernel does, the width first, then the height, rounded and clamped to uint8
    in between: one float pass clamps only at the end, and overshoot at sharp edges then
    differs by up to 11 levels; these two passes stay within 2 (tests/test_torch_jpeg.py)."""
    image = pixels.unsqueeze(0).to(torch.float32)
    smooth = mode in ("bilinear", "bicubic")
    steps = [[image.shape[2], size[1]], list(size)] if smooth else [list(size)]
    for step in steps:
        if list(image.shape[2:]) != step:
            image = F.interpolate(image, size=step, mode=mode,
                                  align_corners=False if smooth else None, antialias=smooth)
            image = image.round_().clamp_(0, 255)
    return image.to(torch.uint8)[0]


def _center_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's ``center_crop`` (zero padding where the image is smaller)."""
    image_height, image_width = image.shape[-2:]
    if height > image_height or width > image_width:
        left, top = max(0, (width - image_width) // 2), max(0, (height - image_height) // 2)
        right = max(0, (width - image_width + 1) // 2)
        bottom = max(0, (height - image_height + 1) // 2)
        image = F.pad(image, [left, right, top, bottom], value=0.0)
        image_height, image_width = image.shape[-2:]
    top = int(round((image_height - height) / 2.0))
    left = int(round((image_width - width) / 2.0))
    return image[..., top : top + height, left : left + width]
