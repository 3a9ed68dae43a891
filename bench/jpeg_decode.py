"""JPEG decode and resize to BLIP's 384x384 input: torchvision's ``decode_jpeg`` with the resize
in torch (``capfilt/images/torch_jpeg.py``) against the PIL path (``decode_image`` and
``ImageTransform.resize``), images/s in the same run, one thread each, and how far the pixels
are apart after normalisation (uint8 resize as on the CPU, float32 resize as on a GPU).

    PYTHONPATH=$PWD python bench/jpeg_decode.py --out bench/results/jpeg-decode-cpu-DATE.json
    PYTHONPATH=$PWD python bench/jpeg_decode.py --device cuda   # on a GPU: nvJPEG, batched
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import random
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from capfilt.images.batch_decoding import ThreadDecoder
from capfilt.images.transform import ImageTransform, _resize_float, _resize_uint8
from capfilt.images.torch_jpeg import TorchJpegDecoder
from capfilt.world.build import WorldSpec, _image_row
from capfilt.world.scene import random_scene

# BlipImageProcessor's defaults (OpenAI CLIP's mean and std), scaled as from_processor does.
BLIP = ImageTransform(384, 384, "bicubic", tuple(m * 255 for m in (0.48145466, 0.4578275,
                      0.40821073)), tuple(s * 255 for s in (0.26862954, 0.26130258, 0.27577711)))


def photo(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    """bench/cpu_pipeline.py's photo-like JPEG (gradients and noise, quality 88), any size."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x * y) / (width * height)], -1)
    base = base * rng.uniform(80, 250, 3)
    pixels = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=88)
    return buffer.getvalue()


def world_images(count: int) -> list[bytes]:
    """The demo world's web images (64 px, quality 90, 4:4:4)."""
    rng = random.Random(0)
    return [_image_row(WorldSpec(), "web", i, random_scene(rng))[0]["jpg"] for i in range(count)]


def rows(datas: list[bytes]) -> list[dict]:
    return [{"key": str(i), "jpg": d, "status": "success", "error_message": None}
            for i, d in enumerate(datas)]


def differences(datas: list[bytes], device: str) -> dict:
    """Max and mean |difference| of normalised pixels against the PIL path: the torch path as
    it runs on ``device`` (nvJPEG on a GPU), and the GPU's float32 resize run on the CPU."""
    pil = ThreadDecoder(BLIP, BLIP, 1)
    expected = BLIP.normalize(pil(rows(datas), False).caption_pixels)
    torch_path = TorchJpegDecoder(BLIP, BLIP, device, pil)
    got = BLIP.normalize(torch_path(rows(datas), False).caption_pixels.cpu())
    from torchvision.io import ImageReadMode, decode_jpeg

    decoded = [decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8),
                           mode=ImageReadMode.RGB) for d in datas]
    as_gpu = torch.stack([_resize_float(p, [384, 384], "bicubic") for p in decoded])
    as_cpu = torch.stack([_resize_uint8(p, [384, 384], "bicubic") for p in decoded])
    out = {}
    for name, pixels in ((f"torch_path_{device}", got), ("float_resize", BLIP.normalize(as_gpu))):
        diff = (pixels - expected).abs()
        out[name] = {"max_abs": round(diff.max().item(), 6), "mean_abs": round(
            diff.mean().item(), 8)}
    levels = (as_gpu.int() - as_cpu.int()).abs()
    out["float_resize"]["max_uint8_levels"] = int(levels.max())
    out["float_resize"]["fraction_differing"] = round((levels > 0).float().mean().item(), 6)
    torch_path.close()
    return out


def rate(decode, batch: list[dict], repeats: int) -> float:
    decode(batch, False)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        decode(batch, False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return round(len(batch) / best, 1)


def speeds(datas: list[bytes], device: str, repeats: int) -> dict:
    """images/s, best of ``repeats``, both paths alternating in this process."""
    pil = ThreadDecoder(BLIP, BLIP, 1)
    fast = TorchJpegDecoder(BLIP, BLIP, device, ThreadDecoder(BLIP, BLIP, 1))
    batch = rows(datas)
    out = {"pil_images_per_s": rate(pil, batch, repeats),
           f"torchvision_{device}_images_per_s": rate(fast, batch, repeats)}
    pil.close()
    fast.close()
    return out


def machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} torch threads"
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=64, help="images per set")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    sets = {"photo_320x240": [photo(i) for i in range(args.images)],
            "photo_1024x768": [photo(i, (1024, 768)) for i in range(args.images // 4)],
            "demo_world_64": world_images(args.images)}
    figures = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "commit": commit, "machine": machine(), "device": args.device,
               "torch": torch.__version__, "torchvision": version("torchvision"),
               "pillow": version("pillow"), "cpus": os.cpu_count(),
               "python": sys.version.split()[0],
               "threads": 1, "repeats": args.repeats, "sets": {}}
    for name, datas in sets.items():
        figures["sets"][name] = {"images": len(datas), "pixels": differences(datas, args.device),
                                 **speeds(datas, args.device, args.repeats)}
        print(name, json.dumps(figures["sets"][name]), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
