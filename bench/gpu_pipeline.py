"""GPU benchmark of the CapFilt step: full-size BLIP-base and BLIP-large, random weights, bf16.

The work does not depend on the weights once the caption length is forced (20 new tokens), so
random models measure what Salesforce's checkpoints would cost. For each model size and recipe:
  - paper: 1 nucleus caption, ITM + ITC on the web and the synthetic caption (2 texts/image);
  - blip2: 10 captions, 11 texts scored per image;
it reports images/s of ``CapFiltStage.compute`` on already-decoded pixels (the bare model work)
and of ``run_shard`` on a parquet shard of JPEGs (the pipeline), their ratio, FLOPs per image
counted by torch's flop counter on one real batch, the achieved TFLOP/s against the card's bf16
dense peak, and peak GPU memory. Warm-up batches are not timed.

    bash bench/gpu.sh                          # on an H100 or H200 (bench/README.md)
    python bench/gpu_pipeline.py --smoke       # tiny models on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import re
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from capfilt.captioning.settings import SamplingConfig  # noqa: E402
from capfilt.models.tiny import WORDS, tiny_config, tiny_processor, tiny_vocabulary  # noqa: E402
from capfilt.scoring.selection import Policy  # noqa: E402
from capfilt.shards.reader import read_shard  # noqa: E402
from capfilt.shards.samples import IMG2DATASET_SCHEMA  # noqa: E402
from capfilt.step.host_memory import keep_freed_memory  # noqa: E402
from capfilt.step.shard_runner import run_shard  # noqa: E402
from capfilt.step.stage import CapFiltStage, scored_texts  # noqa: E402
from capfilt.step.stage_config import Placement, StageConfig  # noqa: E402
from workers.worker_pool import gpu_decoders  # noqa: E402

NEW_TOKENS = 20  # min = max: every caption costs the same, whatever the weights
RECIPES = {
    "paper": (SamplingConfig(num_captions=1, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS),
              Policy()),
    "blip2": (SamplingConfig(num_captions=10, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS),
              Policy(mode="topk", top_k=2, rank_by="itc")),
}
# bf16 dense tensor-core peaks (NVIDIA data sheets), most specific name first.
PEAK_TFLOPS = (("H100 PCIE", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 836.0), ("H100", 989.0),
               ("H200", 989.0))
TARGET_IMAGES_PER_S = 1000.0  # issue 6: paper recipe, BLIP-base, per H100
IMAGE_SIDE = 384


def blip_vocabulary() -> list[str]:
    """BERT's 30,522 ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103), then [DEC], [ENC].

    Fillers are plain words ("w123"), so a sampled caption tokenizes back to as many tokens as
    it was sampled with: the ITM texts are as long as real 20-token captions.
    """
    vocab = [f"w{i}" for i in range(30522)]
    for index, token in ((0, "[PAD]"), (100, "[UNK]"), (101, "[CLS]"), (102, "[SEP]"), (103, "[MASK]")):
        vocab[index] = token
    words = [w for w in tiny_vocabulary()[:-2] if not w.startswith("[")]  # words, letters, ##pieces
    vocab[1000 : 1000 + len(words)] = words
    return vocab + ["[DEC]", "[ENC]"]


def full_config(size: str) -> transformers.BlipConfig:
    """Salesforce's BLIP-base (ViT-B/16) or BLIP-large (ViT-L/16), 384 px, BERT-base text side."""
    vision = dict(initializer_range=0.02)  # the 1e-10 default embeds every image alike
    if size == "large":
        vision.update(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                      intermediate_size=4096)
    text = dict(num_attention_heads=12, encoder_hidden_size=vision.get("hidden_size", 768),
                sep_token_id=102, eos_token_id=102, pad_token_id=0, bos_token_id=30522)
    return transformers.BlipConfig(vision_config=vision, text_config=text,
                                   projection_dim=256, image_text_hidden_size=256)


def full_processor(folder: Path, side: int) -> transformers.BlipProcessor:
    """BLIP's processor at ``side`` px with BERT's id layout (vocabulary written to folder)."""
    (folder / "vocab").mkdir(parents=True, exist_ok=True)
    (folder / "vocab" / "vocab.txt").write_text("\n".join(blip_vocabulary()) + "\n")
    tokenizer = transformers.BertTokenizer.from_pretrained(folder / "vocab")
    image_processor = transformers.BlipImageProcessor(size={"height": side, "width": side})
    return transformers.BlipProcessor(image_processor, tokenizer)


def write_models(folder: Path, size: str, smoke: bool, device: str) -> dict[str, str]:
    """Random captioner and filter saved as checkpoints, so they load through ``load_model``."""
    if smoke:
        processor = tiny_processor(32)
        config = tiny_config(len(processor.tokenizer), layers=2 if size == "base" else 3)
    else:
        processor = full_processor(folder, IMAGE_SIDE)
        config = full_config(size)
    paths = {}
    for role, cls in (("captioner", transformers.BlipForConditionalGeneration),
                      ("filter", transformers.BlipForImageTextRetrieval)):
        torch.manual_seed(0)
        with torch.device(device):  # random init on the GPU: seconds, not a minute of CPU
            model = cls(config)
        if not smoke:
            model = model.to(torch.bfloat16)  # half the bytes to write and read
        model.save_pretrained(folder / role)
        processor.save_pretrained(folder / role)
        paths[role] = str(folder / role)
        del model
    return paths


def photo(seed: int) -> bytes:
    """A 384x384 photo-like JPEG (gradients and grain), so decoding costs what real ones do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE] / IMAGE_SIDE
    base = np.stack([x, y, x * y], -1) * rng.uniform(80, 250, 3)
    pixels = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_shard(path: Path, rows: int) -> str:
    """One img2dataset parquet shard: every row a good image with a 6 to 18 word web caption."""
    rng = np.random.default_rng(0)
    images = [photo(i) for i in range(min(rows, 32))]  # a pool: every row still decodes
    records = [{"key": f"{i:09d}", "url": f"http://images.example/{i}.jpg",
                "caption": " ".join(rng.choice(WORDS, rng.integers(6, 19))),
                "jpg": images[i % len(images)], "status": "success", "error_message": None,
                "width": IMAGE_SIDE, "height": IMAGE_SIDE, "original_width": IMAGE_SIDE,
                "original_height": IMAGE_SIDE, "exif": None, "sha256": None}
               for i in range(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records, schema=IMG2DATASET_SCHEMA), path)
    return str(path)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(call):
    """(seconds, result) of ``call()`` with the device's queued work finished on both sides."""
    synchronize()
    started = time.perf_counter()
    result = call()
    synchronize()
    return time.perf_counter() - started, result


def clocked(method, spent: dict[str, float], name: str):
    """``method`` adding its wall seconds to ``spent[name]``."""
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - started
    return wrapper


def phases(stage: CapFiltStage, prepared) -> dict[str, float]:
    """Seconds of one batch's parts, each timed alone with the device synchronised around it:
    the pixels' copy and normalisation, each vision tower, the caption decoding (the captioner
    less its tower), the filter's text passes (the scorer less its tower), and one whole
    ``compute``. Timed alone, the parts lose the overlap of host and device work, so they add
    up to more than ``compute``."""
    keys = [row["key"] for row in prepared.rows]
    captioner, scorer = stage.captioner, stage.scorer
    pixels_s, (caption_px, filter_px) = timed(lambda: stage.device_pixels(prepared))
    with torch.inference_mode():
        caption_vision_s, _ = timed(lambda: captioner.model.vision_model(
            pixel_values=caption_px.to(captioner.dtype)))
        filter_vision_s, _ = timed(lambda: scorer.model.vision_model(
            pixel_values=filter_px.to(scorer.dtype)))
    captioner_s, synthetic = timed(lambda: captioner(caption_px, keys))
    _, texts = scored_texts(prepared.rows, synthetic)
    scorer_s, _ = timed(lambda: scorer(filter_px, texts))
    compute_s, _ = timed(lambda: stage.compute(prepared))
    return {
        "pixels_to_device": pixels_s, "captioner_vision": caption_vision_s,
        "caption_decoding": captioner_s - caption_vision_s, "filter_vision": filter_vision_s,
        "filter_text": scorer_s - filter_vision_s, "compute": compute_s,
    }


def profile_table(stage: CapFiltStage, prepared, rows: int = 25) -> str:
    """torch.profiler's top operators by device time over one batch, and the device's busy
    share of the wall time (what the GPU idles while Python launches kernels)."""
    from torch.profiler import ProfilerActivity, profile

    synchronize()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        stage.compute(prepared)
        synchronize()
    wall = time.perf_counter() - started
    events = prof.key_averages()
    # Kernels only: an operator's self device time repeats its kernels'.
    busy_us = sum(e.self_device_time_total for e in events
                  if e.device_type == torch.autograd.DeviceType.CUDA)
    header = (f"wall {wall * 1e3:.1f} ms (profiled), device busy {busy_us / 1e3:.1f} ms "
              f"({busy_us / 1e6 / wall:.0%} of the wall)\n")
    # Host time in CUDA runtime calls: a synchronising copy or wait shows up here as its wait.
    runtime = sorted((e for e in events if e.key.startswith("cuda")),
                     key=lambda e: -e.self_cpu_time_total)[:8]
    header += "host, CUDA runtime calls: " + ", ".join(
        f"{e.key} {e.self_cpu_time_total / 1e3:.1f} ms x{e.count}" for e in runtime) + "\n"
    return header + events.table(sort_by="self_device_time_total", row_limit=rows)


def measure(size: str, recipe: str, batch: int, models: dict[str, str], shard: str,
            args: argparse.Namespace) -> dict:
    """One (model size, recipe, batch): bare and pipeline images/s, the split of a batch's
    time, FLOPs/image, peak memory."""
    sampling, policy = RECIPES[recipe]
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stage = CapFiltStage.from_config(
        StageConfig(captioner=models["captioner"], filter=models["filter"], sampling=sampling,
                    policy=policy, dtype=args.dtype, attention=args.attention),
        Placement(device=args.device, decode_threads=args.decode_threads,
                  decode_processes=args.decode_processes, jpeg_decoder=args.jpeg_decoder))
    weights = torch.cuda.memory_allocated() if cuda else None
    table = read_shard(shard).table.slice(0, batch)
    stage.prepare(table)  # warms the decode threads and the pinned-memory cache
    prepare_s, prepared = timed(partial(stage.prepare, table))  # decoding alone
    images = len(prepared)
    with FlopCounterMode(display=False) as counter:  # before any compile: eager ops are counted
        stage.compute(prepared)
    flops = counter.get_total_flops() / images
    by_module = {name: sum(ops.values()) / images / 1e9  # top-level modules: where the work goes
                 for name, ops in counter.get_flop_counts().items() if "." not in name}
    by_module.pop("Global", None)
    if args.compile:  # the A/B of torch.compile on both vision towers: the first batch compiles, timed apart
        for model in (stage.captioner.model, stage.scorer.model):
            model.vision_model = torch.compile(model.vision_model, dynamic=False)

    compile_s, _ = timed(partial(stage.compute, prepared)) if args.compile else (None, None)
    for _ in range(args.warmup):
        stage.compute(prepared)
    synchronize()
    started = time.perf_counter()
    for _ in range(args.batches):
        stage.compute(prepared)  # ends in .tolist(): the GPU work is done when it returns
    synchronize()
    bare_s = time.perf_counter() - started

    spent = {"prepare": 0.0, "compute": 0.0}  # inside run_shard: decode thread, model half
    for name in spent:
        setattr(stage, name, clocked(getattr(stage, name), spent, name))
    with tempfile.TemporaryDirectory() as round_dir:
        started = time.perf_counter()
        result = run_shard(stage, 0, shard, round_dir, batch)
        synchronize()
        pipeline_s = time.perf_counter() - started
    del stage.prepare, stage.compute

    split = phases(stage, prepared)
    if args.profile:
        with open(args.profile, "a") as out:
            out.write(f"\n## {size} {recipe} batch {batch} attention {args.attention}\n")
            out.write(profile_table(stage, prepared) + "\n")


    figures = {
        "model": size, "recipe": recipe, "texts_per_image": 1 + sampling.num_captions,
        "attention": args.attention, "compiled_vision": args.compile,
        "decode_processes": args.decode_processes, "jpeg_decoder": args.jpeg_decoder,
        "first_compiled_batch_seconds": compile_s,
        "batch_size": batch, "batch_after_oom_backoff": stage.max_rows,
        "timed_batches": args.batches, "warmup_batches": args.warmup,
        "gflops_per_image": flops / 1e9, "gflops_per_image_by_module": by_module,
        "bare_images_per_s": images * args.batches / bare_s,
        "batch_seconds": split,
        "decode_images_per_s": images / prepare_s,
        "pipeline_seconds": {"total": pipeline_s, "compute": spent["compute"],
                             "prepare_in_thread": spent["prepare"],
                             "not_compute": pipeline_s - spent["compute"]},
        "pipeline_images": result.rows_out, "pipeline_rejected": result.rows_rejected,
        "pipeline_images_per_s": result.rows_out / pipeline_s,
        "weights_gib": weights / 2**30 if cuda else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
    }
    figures["pipeline_efficiency"] = figures["pipeline_images_per_s"] / figures["bare_images_per_s"]
    for kind in ("bare", "pipeline"):
        tflops = figures[f"{kind}_images_per_s"] * flops / 1e12
        figures[f"{kind}_tflops"] = tflops
        figures[f"{kind}_fraction_of_peak"] = tflops / args.peak_tflops if args.peak_tflops else None
    stage.close()
    del stage, prepared
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return figures


def card_peak(name: str) -> float | None:
    upper = name.upper()
    return next((peak for key, peak in PEAK_TFLOPS if key in upper), None)


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    print(f"{'model':6} {'recipe':6} {'attn':5} {'batch':>5} {'texts':>5} {'GFLOP/img':>9} "
          f"{'bare img/s':>10} "
          f"{'pipe img/s':>10} {'effic.':>6} {'bare TF/s':>9} {'pipe TF/s':>9} {'% peak':>6} "
          f"{'peak GiB':>8}")
    for r in rows:
        share = r["pipeline_fraction_of_peak"]
        print(f"{r['model']:6} {r['recipe']:6} {r['attention']:5} {r['batch_size']:5d} "
              f"{r['texts_per_image']:5d} "
              f"{r['gflops_per_image']:9.1f} {r['bare_images_per_s']:10.1f} "
              f"{r['pipeline_images_per_s']:10.1f} {r['pipeline_efficiency']:6.2f} "
              f"{r['bare_tflops']:9.1f} {r['pipeline_tflops']:9.1f} "
              f"{fmt(share and 100 * share, '6.1f'):>6} {fmt(r['peak_memory_gib'], '8.1f'):>8}")


def verdict(rows: list[dict]) -> dict | None:
    """Issue 6's target, on the pipeline figure (what a user gets), BLIP-base paper recipe at
    the batch size that gave the most."""
    measured = [r for r in rows if (r["model"], r["recipe"]) == ("base", "paper")]
    if not measured:
        return None
    row = max(measured, key=lambda r: r["pipeline_images_per_s"])
    got = row["pipeline_images_per_s"]
    return {"target_images_per_s": TARGET_IMAGES_PER_S, "pipeline_images_per_s": got,
            "bare_images_per_s": row["bare_images_per_s"], "batch_size": row["batch_size"],
            "met": got >= TARGET_IMAGES_PER_S}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, seconds")
    parser.add_argument("--sizes", nargs="+", default=["base", "large"], choices=["base", "large"])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--batch", type=int, nargs="+", default=[256],
                        help="images per batch; several values measure each")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"],
                        help="eager: Hugging Face's own BLIP attention (the A/B)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both vision towers (the A/B; compiled before timing)")
    parser.add_argument("--profile", default=None,
                        help="append torch.profiler's top operators per configuration to this file")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches per configuration")
    parser.add_argument("--batches", type=int, default=5, help="timed bare batches per configuration")
    parser.add_argument("--shard-batches", type=int, default=16,
                        help="the pipeline's shard holds this many batches of images ...")
    parser.add_argument("--max-shard-images", type=int, default=8192,
                        help="... but no more images than this")
    parser.add_argument("--decode-processes", type=int, default=gpu_decoders(os.cpu_count() or 2, 1),
                        help="JPEG decoding processes (default: what a Ray GPU worker on this node "
                             "gets); 0 decodes in threads")
    parser.add_argument("--decode-threads", type=int, default=6,
                        help="JPEG decode threads, with --decode-processes 0 (the A/B)")
    parser.add_argument("--jpeg-decoder", default="pil", choices=["pil", "torchvision"],
                        help="torchvision: JPEGs decoded and resized on the device "
                             "(capfilt/images/torch_jpeg.py), the rest as above")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the card's bf16 dense peak; default from the device name")
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/gpu-<card>.json)")
    args = parser.parse_args()
    start = time.perf_counter()
    keeps = keep_freed_memory()  # as capfilt's workers do: the shard measure runs as one would

    if args.smoke:
        args.device, args.dtype, args.decode_threads, args.decode_processes = "cpu", "float32", 2, 0
        args.batch, args.warmup, args.batches, args.shard_batches = [4], 1, 2, 2
        torch.set_num_threads(1)  # tiny ops: OpenMP hand-offs on shared cores cost 50x the math
        card = "cpu-smoke"
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU, or use --smoke")
        args.device, args.dtype = "cuda", "bfloat16"
        card = torch.cuda.get_device_name()
        args.peak_tflops = args.peak_tflops or card_peak(card)
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    out = Path(args.out) if args.out else (
        Path(tempfile.gettempdir()) / "gpu-cpu-smoke.json" if args.smoke
        else ROOT / "bench" / "results" / f"gpu-{slug}.json")
    figures = {
        "card": card, "peak_bf16_dense_tflops": args.peak_tflops,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d"),
        "new_tokens_per_caption": NEW_TOKENS, "image_side": IMAGE_SIDE,
        "decode_threads": args.decode_threads, "cpu_cores": os.cpu_count(),
        "keeps_freed_memory": keeps, "configurations": [],
    }
    print(f"{card}: peak {fmt(args.peak_tflops, '.0f')} TFLOP/s bf16 dense; batch "
          f"{' '.join(map(str, args.batch))}, attention {args.attention}, "
          f"{args.warmup} warm-up + {args.batches} timed batches, shard of "
          f"{args.shard_batches} batches; JSON -> {out}", flush=True)

    with tempfile.TemporaryDirectory(prefix="capfilt-gpu-bench-") as folder:
        work = Path(folder)  # models (GBs) and the shard, removed at the end
        shards: dict[int, str] = {}
        for size in args.sizes:
            models = write_models(work / size, size, args.smoke, args.device)
            print(f"[{time.perf_counter() - start:5.0f} s] {size}: random models written", flush=True)
            for recipe, batch in [(r, b) for r in args.recipes for b in args.batch]:
                rows = min(batch * args.shard_batches, max(args.max_shard_images, batch))
                if rows not in shards:
                    shards[rows] = write_shard(work / "shards" / f"{rows}.parquet", rows)
                print(f"[{time.perf_counter() - start:5.0f} s] {size} {recipe} batch {batch}: "
                      "measuring", flush=True)
                row = measure(size, recipe, batch, models, shards[rows], args)
                figures["configurations"].append(row)
                figures["target"] = verdict(figures["configurations"])
                figures["seconds"] = time.perf_counter() - start
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(figures, indent=2) + "\n")  # kept if a later one times out
                split = " ".join(f"{k} {v * 1e3:.0f}" for k, v in row["batch_seconds"].items())
                split += "; shard, s: " + " ".join(
                    f"{k} {v:.1f}" for k, v in row["pipeline_seconds"].items())
                split += f"; decoding alone {row['decode_images_per_s']:.0f} img/s"
                print(f"[{time.perf_counter() - start:5.0f} s] {size} {recipe} batch {batch}: "
                      f"bare {row['bare_images_per_s']:.1f} img/s, pipeline "
                      f"{row['pipeline_images_per_s']:.1f} img/s, "
                      f"{row['gflops_per_image']:.4g} GFLOP/img; one batch, ms: {split}",
                      flush=True)

    print()
    print_table(figures["configurations"])
    target = figures.get("target")
    if args.smoke:
        print("\nsmoke run: tiny models on the CPU check the script; these figures measure nothing")
    elif target:
        state = "MET" if target["met"] else "NOT MET"
        print(f"\ntarget (issue 6): {TARGET_IMAGES_PER_S:.0f} images/s per H100, paper recipe, "
              f"BLIP-base: {state} on {card} (pipeline {target['pipeline_images_per_s']:.1f}, "
              f"bare {target['bare_images_per_s']:.1f} images/s)")
    print(f"total {time.perf_counter() - start:.0f} s; figures in {out}")


if __name__ == "__main__":
    main()
