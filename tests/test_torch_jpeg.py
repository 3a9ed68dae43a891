"""The JPEG decoder in torch (capfilt/images/torch_jpeg.py) against the PIL path, on real bytes.

Tolerance: on the CPU, pixels and outcomes equal the PIL path's exactly. The GPU resizes
through float32 (``_resize_float``); run here on the CPU it stays within ``GPU_LEVELS`` uint8
levels of the CPU's uint8 kernel (``GPU_NORMALISED`` after BLIP's normalisation), on under 1%
of the pixels. What nvJPEG itself adds to that is for a GPU session to measure.
"""

from __future__ import annotations

import io
import random
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from capfilt.images.batch_decoding import ThreadDecoder
from capfilt.images.decode import ImageRejected
from capfilt.images.torch_jpeg import TorchJpegDecoder, takes
from capfilt.images.transform import ImageTransform, _resize_float, _resize_uint8
from capfilt.shards.input_rows import INPUT_SCHEMA
from capfilt.step.stage import CapFiltStage
from capfilt.step.stage_config import Placement
from capfilt.world.build import WorldSpec, _image_row
from capfilt.world.scene import random_scene
from tests.conftest import make_stage
from workers.worker_pool import size_pool

BLIP = ImageTransform(384, 384, "bicubic", tuple(m * 255 for m in (0.48145466, 0.4578275,
                      0.40821073)), tuple(s * 255 for s in (0.26862954, 0.26130258, 0.27577711)))
SMALL = replace(BLIP, height=24, width=20)
GPU_LEVELS = 2
GPU_NORMALISED = GPU_LEVELS / min(BLIP.std) + 1e-6  # 0.0302


def photo(seed: int, size=(320, 240), **save) -> bytes:
    """A photo-like JPEG as bench/cpu_pipeline.py makes them: gradients and noise."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x * y) / (width * height)], -1)
    pixels = np.clip(base * rng.uniform(80, 250, 3) + rng.normal(0, 18, base.shape), 0, 255)
    return encode(Image.fromarray(pixels.astype(np.uint8)), "JPEG", quality=88, **save)


def encode(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def world(count: int) -> list[bytes]:
    rng = random.Random(1)
    return [_image_row(WorldSpec(), "web", i, random_scene(rng))[0]["jpg"] for i in range(count)]


def declared_huge(data: bytes) -> bytes:
    """``data`` with its baseline frame header declaring 10,000 x 10,000 pixels."""
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + (10_000).to_bytes(2, "big") * 2 + data[sof + 9 :]


def rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return photo(7, (64, 48), exif=exif.tobytes())


def row(data, status="success", error=None) -> dict:
    return {"key": "k", "url": None, "caption": "c", "jpg": data, "status": status,
            "error_message": error}


def mixed_rows() -> list[dict]:
    """JPEGs the torch path takes, and every kind it must hand to the CPU path."""
    plain = photo(0)
    picture = Image.open(io.BytesIO(plain))
    datas = [
        plain, photo(1, (333, 211)), photo(2, (1024, 768)), *world(4),
        photo(3, progressive=True), photo(4, subsampling=2),
        encode(picture.convert("L"), "JPEG"), encode(picture.convert("CMYK"), "JPEG"),
        encode(picture, "PNG"), rotated(), plain[: len(plain) // 2], b"\xff\xd8\xff not a jpeg",
        declared_huge(plain), None,
    ]
    return [row(d) for d in datas] + [row(None, "failed_to_download", "HTTP Error 404")]


def same(a, b) -> bool:
    if isinstance(a, ImageRejected):
        return isinstance(b, ImageRejected) and (a.reason, str(a)) == (b.reason, str(b))
    return a == b


@pytest.mark.parametrize("filter_", [BLIP, SMALL])
def test_on_the_cpu_outcomes_and_pixels_equal_the_pil_paths(filter_):
    rows = mixed_rows()
    expected = ThreadDecoder(BLIP, filter_, 1)(rows, False)
    decoder = TorchJpegDecoder(BLIP, filter_, "cpu", ThreadDecoder(BLIP, filter_, 1))
    got = decoder(rows, False)
    assert all(same(g, e) for g, e in zip(got.outcomes, expected.outcomes, strict=True))
    reasons = [o.reason for o in got.outcomes if isinstance(o, ImageRejected)]
    assert reasons == ["undecodable_image", "undecodable_image", "image_too_large",
                       "missing_image", "failed_to_download"]
    assert torch.equal(got.caption_pixels, expected.caption_pixels)
    assert torch.equal(got.filter_pixels, expected.filter_pixels)
    assert (got.filter_pixels is got.caption_pixels) == (filter_ == BLIP)
    decoder.close()


def test_it_takes_plain_jpegs_and_hands_the_rest_to_the_cpu_path():
    taken = [takes(r["jpg"]) is not None for r in mixed_rows()]
    # plain, odd size, large, 4 world, progressive, 4:2:0 | L, CMYK, PNG, rotated, truncated
    # (taken: torch refuses it, the CPU path rejects it), garbage, too large, none, failed
    assert taken == [True] * 9 + [False] * 4 + [True] + [False] * 4


def test_the_gpu_float_resize_stays_within_the_stated_tolerance_of_the_cpu_kernel():
    from torchvision.io import ImageReadMode, decode_jpeg

    datas = [photo(i) for i in range(6)] + [photo(9, (1024, 768))] + world(12)
    worst, differing, total = 0.0, 0, 0
    for data in datas:
        pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                             mode=ImageReadMode.RGB)
        cpu = _resize_uint8(pixels, [384, 384], "bicubic")
        gpu = _resize_float(pixels, [384, 384], "bicubic")
        levels = (gpu.int() - cpu.int()).abs()
        assert levels.max() <= GPU_LEVELS
        worst = max(worst, (BLIP.normalize(gpu) - BLIP.normalize(cpu)).abs().max().item())
        differing, total = differing + int((levels > 0).sum()), total + levels.numel()
    assert worst <= GPU_NORMALISED
    assert differing / total < 0.01


def test_placement_offers_the_torch_decoder_and_the_pool_does_not_pick_it_yet():
    assert Placement().jpeg_decoder == "pil"
    assert Placement(device="cuda", jpeg_decoder="torchvision").jpeg_decoder == "torchvision"
    with pytest.raises(ValueError, match="jpeg_decoder"):
        Placement(jpeg_decoder="nvjpeg")
    for resources in ({"CPU": 16, "GPU": 1}, {"CPU": 2}):
        assert size_pool(resources, None, 4).placement.jpeg_decoder == "pil"


def test_a_stage_with_the_torch_decoder_prepares_the_batch_as_the_pil_one(loaded):
    table = pa.Table.from_pylist([{**r, "key": f"k{i}"} for i, r in enumerate(mixed_rows())],
                                 schema=INPUT_SCHEMA)
    pil = make_stage(loaded)
    fast = CapFiltStage(pil.captioner, pil.scorer, pil.policy, pil.caption_transform,
                        pil.filter_transform, jpeg_decoder="torchvision")
    assert isinstance(fast.decoder, TorchJpegDecoder)
    want, got = pil.prepare(table), fast.prepare(table)
    assert got.rows == want.rows and got.sizes == want.sizes and got.rejects == want.rejects
    assert torch.equal(got.caption_pixels, want.caption_pixels)
    assert torch.equal(got.filter_pixels, want.filter_pixels)
    pil.close()
    fast.close()
