"""GPU benchmark of pre-training: BLIP-base at 224 px, bf16 autocast, BLIP's momentum encoders
and 57,600-feature queue, batches streamed from parquet shards by the loader's processes.

Prints and writes (JSON, with the card, date and commit): images/s per GPU streamed, the same
steps on batches made beforehand and held on the host (bare), their ratio, the share of the
streamed run spent waiting for data, and peak GPU memory; against BLIP's own pace (14M images x
20 epochs in 3-4 days on 32 GPUs: about 29 images/s per GPU) and the aim of ten times that.

    python bench/gpu_train.py                     # on a GPU machine (bench/gpu.sh runs it)
    python bench/gpu_train.py --smoke             # tiny model on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_pipeline import full_config, full_processor, photo  # noqa: E402

from capfilt.models.tiny import WORDS, tiny_config, tiny_processor  # noqa: E402
from capfilt.shards.samples import IMG2DATASET_ROW_GROUP, IMG2DATASET_SCHEMA  # noqa: E402
from capfilt.train.build import build_task  # noqa: E402
from capfilt.train.loader import rank_loader  # noqa: E402
from capfilt.train.loop import TrainConfig, autocast_dtype, train_step  # noqa: E402
from capfilt.train.run import RankJob, stream_spec  # noqa: E402
from capfilt.train.sources import Source, list_pieces  # noqa: E402

BLIP_IMAGES_PER_S_PER_GPU = 29.0  # 14M x 20 epochs / (3.5 days x 32 GPUs)
IMAGE_SIDE = 224


def write_blank(folder: Path, smoke: bool) -> str:
    """A config and processor to start from (``scratch:``), no weights."""
    if smoke:
        processor = tiny_processor(32)
        config = tiny_config(len(processor.tokenizer), layers=2)
    else:
        processor = full_processor(folder, IMAGE_SIDE)
        config = full_config("base")
        config.vision_config.image_size = IMAGE_SIDE
    config.save_pretrained(folder / "blank" / "filter")
    processor.save_pretrained(folder / "blank" / "filter")
    return f"scratch:{folder / 'blank'}"


def write_data(folder: Path, images: int, per_shard: int = 1000) -> str:
    """img2dataset-shaped shards of 384 px photo-like JPEGs (cropped and resized to 224)."""
    folder.mkdir(parents=True, exist_ok=True)
    pool = [photo(i) for i in range(32)]
    for shard, start in enumerate(range(0, images, per_shard)):
        rows = [{"key": f"{n:09d}", "url": None,
                 "caption": " ".join(WORDS[(n * 7 + k) % len(WORDS)] for k in range(6 + n % 12)),
                 "jpg": pool[n % len(pool)], "status": "success", "error_message": None,
                 "width": 384, "height": 384, "original_width": 384, "original_height": 384,
                 "exif": None, "sha256": None}
                for n in range(start, min(images, start + per_shard))]
        pq.write_table(pa.Table.from_pylist(rows, schema=IMG2DATASET_SCHEMA),
                       folder / f"{shard:05d}.parquet", row_group_size=IMG2DATASET_ROW_GROUP)
    return str(folder)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_steps(built, spec, config, batches, device, warmup: int, steps: int) -> dict:
    optimizer = torch.optim.AdamW(built.task.parameters(), lr=config.lr)
    dtype = autocast_dtype(config, device)
    waited = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            began, waited = time.perf_counter(), 0.0
        before = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - before
        train_step(built.task, optimizer, batch, spec.transform, device, dtype,
                   torch.Generator().manual_seed(step), progress=step / 100)
    synchronize(device)
    seconds = time.perf_counter() - began
    return {"images_per_s": round(steps * config.batch_size / seconds, 1),
            "data_wait_share": round(waited / seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--loader-workers", type=int, default=min(12, (os.cpu_count() or 2) - 2))
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.steps, args.warmup, args.loader_workers = 8, 3, 1, 1
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    config = TrainConfig(steps=args.warmup + args.steps, batch_size=args.batch, lr=1e-4,
                         queue_size=57600 if not args.smoke else args.batch * 8,
                         loader_workers=args.loader_workers,
                         grad_checkpointing=args.grad_checkpointing)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        init = write_blank(work, args.smoke)
        images = args.batch * (args.warmup + args.steps) * 2
        data = write_data(work / "data", images)
        job = RankJob(task="pretrain", init=init, data=(data,), output=str(work / "out"),
                      config=config)
        built = build_task(job.task, job.init, config=config)
        built.task.to(device)
        pieces = list_pieces([Source.parse(data)])
        spec = stream_spec(job, built, pieces, world=1)
        loader = iter(rank_loader(spec, 0, 1, 0, None, pin_memory=device == "cuda"))
        prepared = [next(loader) for _ in range(args.warmup + args.steps)]
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        bare = timed_steps(built, spec, config, iter(prepared), device, args.warmup, args.steps)
        streamed = timed_steps(built, spec, config, loader, device, args.warmup, args.steps)
        del loader
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    figures = {
        "date": time.strftime("%Y-%m-%d"), "commit": commit, "card": card,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "model": "tiny (smoke)" if args.smoke else "BLIP-base, ViT-B/16 at 224 px, random weights",
        "precision": str(autocast_dtype(config, device)), "batch": args.batch,
        "steps": args.steps, "loader_workers": args.loader_workers,
        "grad_checkpointing": args.grad_checkpointing, "momentum_queue": config.queue_size,
        "bare_images_per_s": bare["images_per_s"],
        "streamed_images_per_s": streamed["images_per_s"],
        "efficiency": round(streamed["images_per_s"] / bare["images_per_s"], 3),
        "streamed_data_wait_share": streamed["data_wait_share"],
        "peak_gpu_memory_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                                if device == "cuda" else None),
        "blip_images_per_s_per_gpu": BLIP_IMAGES_PER_S_PER_GPU,
        "aim_images_per_s_per_gpu": 10 * BLIP_IMAGES_PER_S_PER_GPU,
    }
    print(json.dumps(figures, indent=2))
    slug = card.lower().replace(" ", "-")
    out = Path(args.out) if args.out else (
        Path(os.environ["OUT"]) / f"gpu-train-{slug}.json" if os.environ.get("OUT")
        else ROOT / "bench" / "results" / f"gpu-train-{slug}.json")
    if not args.smoke or args.out:
        out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
