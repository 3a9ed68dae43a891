"""CPU benchmark of the training data path: the streaming loader against batches in memory, and
what a job costs as its data grows.

Prints, in one run on one machine:
  1. efficiency: pre-training images/s (BLIP's augmentation, momentum encoders and queue) with
     batches streamed from parquet shards of 320x240 JPEGs by the loader's processes, over the
     same steps on the same batches made beforehand and held in memory; repeated in turn,
     ratios within a repeat, the median reported (after 2 warm-up steps in both; the first
     step's seconds reported apart); for the small BLIP of cpu_pipeline.py
     (ViT-S/16 at 224 px) and for the demo's tiny model (48 px), whose step costs less than
     decoding its images;
  2. scaling: ``capfilt pretrain`` for 12 steps in a fresh process on 1x, 4x, 10x and 16x the
     base number of pictures of about 220 KiB (640 x 480 photo-like JPEGs): the peak memory of
     the whole process tree (the sum of the processes' PSS, so pages shared after fork count
     once), the time to the first step, and the wall time; and the check that 10x costs at most
     1.15x + 64 MiB the memory of 1x and 1.5x its time.

    python bench/train_pipeline.py --out bench/results/train-pipeline-2core.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from capfilt.shards.samples import IMG2DATASET_ROW_GROUP, IMG2DATASET_SCHEMA  # noqa: E402
from capfilt.train.build import build_task  # noqa: E402
from capfilt.train.loader import rank_loader  # noqa: E402
from capfilt.train.loop import TrainConfig, train_step  # noqa: E402
from capfilt.train.run import RankJob, stream_spec  # noqa: E402
from capfilt.train.sources import Source, list_pieces  # noqa: E402
from capfilt.world.models import write_world_models  # noqa: E402
from cpu_pipeline import small_models  # noqa: E402

ROWS_PER_SHARD = 500
POOL = 24  # distinct pictures; each row gets its own bytes (a trailer after the JPEG's end)
MODEL = {"image_size": 48, "hidden": 96, "layers": 2, "patch": 16}  # the demo's
MODELS = {"demo": "the demo's (48 px, 96 wide, 2 layers)",
          "small": "bench/cpu_pipeline.py's small BLIP (ViT-S/16 at 224 px, 4-layer text side)"}
EFFICIENCY = {"demo": (32, 30), "small": (16, 10)}  # batch, steps
WARMUP = 2  # steps before the clock starts, in both runs


def photo(seed: int, width: int, height: int, quality: int) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x * y) / (width * height)], -1)
    base = base * rng.uniform(80, 250, 3)
    pixels = np.clip(base + rng.normal(0, 32, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_data(folder: Path, images: int, width: int, height: int, quality: int) -> float:
    """img2dataset-shaped shards of ``images`` rows; returns the mean image size in KiB."""
    folder.mkdir(parents=True, exist_ok=True)
    pool = [photo(seed, width, height, quality) for seed in range(POOL)]
    sizes = []
    for shard, start in enumerate(range(0, images, ROWS_PER_SHARD)):
        records = []
        for n in range(start, min(images, start + ROWS_PER_SHARD)):
            data = pool[n % POOL] + f"capfilt-bench-{n}".encode()
            sizes.append(len(data))
            records.append({"key": f"{n:07d}", "url": None, "caption": f"photo {n % 97} of a set",
                            "jpg": data, "status": "success", "error_message": None,
                            "width": width, "height": height, "original_width": width,
                            "original_height": height, "exif": None, "sha256": None})
        pq.write_table(pa.Table.from_pylist(records, schema=IMG2DATASET_SCHEMA),
                       folder / f"{shard:05d}.parquet", row_group_size=IMG2DATASET_ROW_GROUP)
    return sum(sizes) / len(sizes) / 1024


def efficiency(work: Path, args, model: str) -> dict:
    data = work / "efficiency-data"
    batch, steps = EFFICIENCY[model]
    config = TrainConfig(steps=steps, batch_size=batch, lr=1e-4,
                         loader_workers=args.loader_workers, queue_size=batch * 64)
    job = RankJob(task="pretrain", init=f"scratch:{work / model}", data=(str(data),),
                  output=str(work / "unused"), config=config)
    built = build_task(job.task, job.init, config=config)
    initial = {k: v.clone() for k, v in built.task.state_dict().items()}
    pieces = list_pieces([Source.parse(str(data))])
    spec = stream_spec(job, built, pieces, world=1)
    loader = iter(rank_loader(spec, 0, 1, 0, None))
    prepared = [next(loader) for _ in range(steps)]
    del loader

    def run(batches) -> tuple[float, float]:
        """Images/s after WARMUP steps, and the seconds to the end of the first step. The first
        steps after a loader starts pay for its processes' start and, in this process, a
        copy-on-write fault for every page of its memory it writes again after the fork."""
        built.task.load_state_dict(initial)
        optimizer = torch.optim.AdamW(built.task.parameters(), lr=config.lr)
        began = time.perf_counter()
        for step in range(steps):
            if step == WARMUP:
                warm = time.perf_counter()
            train_step(built.task, optimizer, next(batches), spec.transform, "cpu", None,
                       torch.Generator().manual_seed(step), progress=0.0)
            if step == 0:
                first = time.perf_counter() - began
        return (steps - WARMUP) * batch / (time.perf_counter() - warm), first

    repeats = []
    for _ in range(args.repeats):
        memory_rate, memory_first = run(iter(prepared))
        stream_rate, first = run(iter(rank_loader(spec, 0, 1, 0, None)))
        repeats.append({"in_memory_images_per_s": round(memory_rate, 2),
                        "streamed_images_per_s": round(stream_rate, 2),
                        "efficiency": round(stream_rate / memory_rate, 3),
                        "in_memory_first_step_seconds": round(memory_first, 2),
                        "streamed_first_step_seconds": round(first, 2)})
        print(f"  in memory {memory_rate:.1f} images/s, streamed {stream_rate:.1f} images/s "
              f"({stream_rate / memory_rate:.3f}); first step {memory_first:.2f}s in memory, "
              f"{first:.2f}s streamed", flush=True)
    return {"model": MODELS[model], "images": args.images,
            "steps": steps, "batch_size": batch, "loader_workers": args.loader_workers,
            "repeats": repeats,
            "median_efficiency": statistics.median(r["efficiency"] for r in repeats)}


def tree_pss_mib(pid: int) -> float:
    """PSS of ``pid`` and all its descendants, MiB (shared pages divided among sharers)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/smaps_rollup") as handle:
                total += next(int(line.split()[1]) for line in handle if line.startswith("Pss:"))
            with open(f"/proc/{current}/task/{current}/children") as handle:
                stack += [int(c) for c in handle.read().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration, PermissionError):
            continue
    return total / 1024


def pretrain_run(work: Path, data: Path, name: str, args) -> dict:
    out = work / f"run-{name}"
    command = [sys.executable, "-m", "pipelines.cli", "pretrain", "--init",
               f"scratch:{work / 'demo'}", "--data", str(data), "--output", str(out),
               "--steps", "12", "--batch-size", str(args.batch_size), "--lr", "1e-4",
               "--log-every", "12", "--loader-workers", str(args.loader_workers)]
    began = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while child.poll() is None:
        peak = max(peak, tree_pss_mib(child.pid))
        time.sleep(0.05)
    wall = time.perf_counter() - began
    if child.returncode:
        raise RuntimeError(child.stderr.read()[-2000:])
    results = json.loads((out / "manifest.json").read_text())["results"]
    return {"peak_pss_mib": round(peak, 1), "wall_seconds": round(wall, 2),
            "first_step_seconds": round(results["first_step_seconds"], 2),
            "rows": results["rows"]}


def scaling(work: Path, args) -> dict:
    runs = {}
    for multiple in (1, 4, 10, 16):
        images = args.base * multiple
        data = work / f"scaling-{multiple}x"
        kib = write_data(data, images, 640, 480, 94)
        runs[f"{multiple}x"] = {"images": images, "image_kib": round(kib, 1),
                                **pretrain_run(work, data, f"{multiple}x", args)}
        print(f"  {multiple}x ({images} pictures of {kib:.0f} KiB): {runs[f'{multiple}x']}",
              flush=True)
        for file in data.iterdir():
            file.unlink()
    one, ten = runs["1x"], runs["10x"]
    memory_limit = 1.15 * one["peak_pss_mib"] + 64
    return {"runs": runs, "ten_x_memory_limit_mib": round(memory_limit, 1),
            "ten_x_memory_ratio": round(ten["peak_pss_mib"] / one["peak_pss_mib"], 3),
            "ten_x_time_ratio": round(ten["wall_seconds"] / one["wall_seconds"], 3),
            "ten_x_check_holds": (ten["peak_pss_mib"] <= memory_limit
                                  and ten["wall_seconds"] <= 1.5 * one["wall_seconds"])}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--images", type=int, default=1024, help="efficiency's data set")
    parser.add_argument("--batch-size", type=int, default=32, help="scaling's")
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base", type=int, default=400, help="scaling's 1x, in pictures")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    flags = Path("/proc/cpuinfo").read_text()
    figures = {"date": time.strftime("%Y-%m-%d"), "commit": commit,
               "machine": f"{cpu_model()}, {os.cpu_count()} cores, "
                          f"{'AVX-512' if 'avx512f' in flags else 'AVX2'}, {platform.machine()}",
               "model": MODEL}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_world_models(work / "demo", seed=0, **MODEL)
        small_models(work / "small")
        kib = write_data(work / "efficiency-data", args.images, 320, 240, 88)
        figures["efficiency"] = {"data": f"{args.images} JPEGs of 320x240, {kib:.1f} KiB"}
        for model in args.models:
            print(f"1. streamed against in memory, {MODELS[model]}", flush=True)
            figures["efficiency"][model] = efficiency(work, args, model)
        if not args.skip_scaling:
            print("2. 12 steps as the data grows", flush=True)
            figures["scaling"] = scaling(work, args)
    print(json.dumps(figures, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
