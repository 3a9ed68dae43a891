"""Decode once, preprocess exactly as the checkpoint's BlipImageProcessor does."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipImageProcessor

from capfilt.images.decode import ImageRejected, decode_image
from capfilt.images.transform import ImageTransform
from capfilt.shards.samples import draw_shape, jpeg_bytes


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise: compresses and resamples like a photo, not a flat drawing."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("size", [384, 32])
@pytest.mark.parametrize(
    "data",
    [
        encoded(photo_like(500, 333, 0), "JPEG"),
        encoded(photo_like(120, 640, 1), "PNG"),
        encoded(photo_like(384, 384, 2).convert("L"), "JPEG"),
        encoded(photo_like(90, 60, 3).convert("RGBA"), "PNG"),
        jpeg_bytes(draw_shape("triangle", "blue")),
    ],
    ids=["jpeg-landscape", "png-tall", "grey", "rgba", "drawn"],
)
def test_transform_equals_blip_image_processor(data, size):
    processor = BlipImageProcessor(size={"height": size, "width": size})
    image = decode_image(data)
    expected = processor(images=Image.open(io.BytesIO(data)), return_tensors="pt").pixel_values[0]
    got = ImageTransform.from_processor(processor)(image)
    assert got.shape == expected.shape == (3, size, size)
    assert torch.equal(got, expected)


def test_decode_converts_to_rgb_and_applies_exif_orientation():
    image = photo_like(40, 20, 4)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    decoded = decode_image(buffer.getvalue())
    assert decoded.mode == "RGB"
    assert decoded.size == (20, 40)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "missing_image"),
        (None, "missing_image"),
        (b"<html>not found</html>", "undecodable_image"),
        (jpeg_bytes(draw_shape("circle", "red"))[:200], "undecodable_image"),
    ],
    ids=["empty", "none", "html", "truncated-jpeg"],
)
def test_bad_bytes_are_rejected_with_a_reason(data, reason):
    with pytest.raises(ImageRejected) as caught:
        decode_image(data)
    assert caught.value.reason == reason
    assert str(caught.value)


def test_huge_declared_dimensions_are_refused_before_decoding():
    data = encoded(Image.new("L", (4000, 4000)), "PNG")
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, max_pixels=1_000_000)
    assert caught.value.reason == "image_too_large"
