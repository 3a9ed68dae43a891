"""CPU benchmark of a CapFilt round with a small BLIP (ViT-S-sized vision at 224 px, 4-layer
text side, BERT's 30,524-token vocabulary), on real parquet shards of photo-like JPEGs.

Prints, in one run on one machine:
  1. pipeline efficiency: `capfilt run` (Ray, one worker) images/s over the same models called
     in a bare loop on already-decoded tensors with the same batch size;
  2. against the model-card way (processor per batch, `generate`, then the ITM model called once
     per text slot, so the vision encoder runs again for every text): the speed ratio, and the
     largest difference between the two in the web captions' ITM/ITC scores;
  3. scaling: 1, 4 and 16 shards, each size in a fresh process: seconds and peak memory;
  and the bare loop again with Hugging Face's eager attention instead of capfilt's SDPA
  (``--attention-only``: just that comparison). ``--flops-only``: the work per image of the bare
  loop and of the model-card way, counted on one batch (``FlopCounterMode``): at equal speed per
  FLOP, measure 2's ratio would be this one.

Measures 1 and 2 run ``--repeats`` times, bare loop, pipeline and model card back to back in each
repeat; ratios are taken within a repeat and their median reported, since a shared VM's speed
drifts between minutes. ``--captions 10``: BLIP-2's recipe (ten captions, eleven texts scored per
image) instead of BLIP's one caption.

This process keeps its freed memory as capfilt's workers do (``capfilt/step/host_memory.py``),
so the bare loop and the model card are not slowed by faulting pages in again; ``--glibc-default``
leaves malloc as glibc sets it. ``--actor-ab N``: one batch in turn here and in two actors, with
page faults per batch.

    python bench/cpu_pipeline.py --out bench/results/cpu-$(hostname).json
    python bench/cpu_pipeline.py --captions 10 --no-scaling --out bench/results/cpu-blip2.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
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

from capfilt.captioning.blip_decoder import Captioner  # noqa: E402
from capfilt.captioning.settings import SamplingConfig  # noqa: E402
from capfilt.images.decode import decode_image  # noqa: E402
from capfilt.images.transform import ImageTransform  # noqa: E402
from capfilt.models.loading import load_model  # noqa: E402
from capfilt.models.tiny import tiny_vocabulary  # noqa: E402
from capfilt.scoring.blip_itm import Scorer  # noqa: E402
from capfilt.shards.reader import read_shard  # noqa: E402
from capfilt.shards.samples import IMG2DATASET_SCHEMA  # noqa: E402
from capfilt.step.host_memory import keep_freed_memory  # noqa: E402
from capfilt.step.shard_runner import run_shard  # noqa: E402
from capfilt.step.stage import CapFiltStage  # noqa: E402
from capfilt.step.stage_config import StageConfig  # noqa: E402

BATCH = 16


def sampling(captions: int) -> SamplingConfig:
    """``captions`` nucleus captions per image (1: BLIP's recipe, 10: BLIP-2's), 16 tokens each."""
    return SamplingConfig(num_captions=captions, max_new_tokens=16, min_new_tokens=16)


def stage_config(models, captions: int) -> StageConfig:
    """What the pipeline's worker runs: the bare loop's models, sampling and ITM token."""
    return StageConfig(captioner=models["captioner"], filter=models["filter"],
                       sampling=sampling(captions), itm_token="cls")


def small_models(folder: Path) -> dict[str, str]:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
        BlipProcessor,
    )

    words = tiny_vocabulary()[:-2]
    vocab = words + [f"[unused{i}]" for i in range(30522 - len(words))] + ["[DEC]", "[ENC]"]
    (folder / "vocab").mkdir(parents=True)
    (folder / "vocab" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer.from_pretrained(folder / "vocab")
    processor = BlipProcessor(BlipImageProcessor(size={"height": 224, "width": 224}), tokenizer)
    config = BlipConfig(
        vision_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                           num_attention_heads=6, image_size=224, patch_size=16,
                           initializer_range=0.02),
        text_config=dict(vocab_size=len(vocab), hidden_size=384, encoder_hidden_size=384,
                         intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
                         bos_token_id=30522, pad_token_id=0, sep_token_id=vocab.index("[SEP]"),
                         eos_token_id=vocab.index("[SEP]")),
        projection_dim=256, image_text_hidden_size=256,
    )
    paths = {}
    for role, cls in (("captioner", BlipForConditionalGeneration),
                      ("filter", BlipForImageTextRetrieval)):
        torch.manual_seed(0)
        cls(config).save_pretrained(folder / role)
        processor.save_pretrained(folder / role)
        paths[role] = str(folder / role)
    return paths


def photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:240, 0:320]
    base = np.stack([x / 320, y / 240, (x * y) / 76800], -1) * rng.uniform(80, 250, 3)
    pixels = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=88)
    return buffer.getvalue()


def write_shards(folder: Path, shards: int, rows: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        records = [{"key": f"{s:05d}{i:04d}", "url": f"http://example/{s}/{i}.jpg",
                    "caption": f"a photo number {i} of shard {s}", "jpg": photo(s * 1000 + i),
                    "status": "success", "error_message": None, "width": 320, "height": 240,
                    "original_width": 320, "original_height": 240, "exif": None, "sha256": None}
                   for i in range(rows)]
        path = folder / f"{s:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(records, schema=IMG2DATASET_SCHEMA), path)
        paths.append(str(path))
    return paths


def bare_loop(models, shards, captions: int = 1, attention: str = "sdpa") -> tuple[float, int]:
    """The same models on already-decoded tensors: the ceiling for the pipeline."""
    cap = load_model(models["captioner"], "captioner", attention=attention)
    fil = load_model(models["filter"], "filter", attention=attention)
    captioner, scorer = Captioner(cap, sampling(captions), seed=0), Scorer(fil, itm_token="cls")
    transform = ImageTransform.from_processor(cap.processor.image_processor)
    rows = [r for s in shards for r in read_shard(s).table.to_pylist()]
    pixels = torch.stack([transform(decode_image(r["jpg"])) for r in rows])
    started = time.perf_counter()
    for start in range(0, len(rows), BATCH):
        batch = rows[start : start + BATCH]
        synthetic = captioner(pixels[start : start + BATCH], [r["key"] for r in batch])
        scorer(pixels[start : start + BATCH], [[r["caption"], *c] for r, c in zip(batch, synthetic)])
    return time.perf_counter() - started, len(rows)


@torch.inference_mode()
def model_card(models, shards, captions: int = 1) -> tuple[float, int, dict]:
    """As the Hugging Face model cards show it: processor per batch, generate, ITM per text."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor

    processor = BlipProcessor.from_pretrained(models["captioner"])
    captioner = BlipForConditionalGeneration.from_pretrained(models["captioner"]).eval()
    itm = BlipForImageTextRetrieval.from_pretrained(models["filter"]).eval()
    rows = [r for s in shards for r in read_shard(s).table.to_pylist()]
    scores = {}
    started = time.perf_counter()
    for start in range(0, len(rows), BATCH):
        batch = rows[start : start + BATCH]
        images = [Image.open(io.BytesIO(r["jpg"])).convert("RGB") for r in batch]
        inputs = processor(images=images, text=["a picture of "] * len(batch), return_tensors="pt")
        out = captioner.generate(**inputs, do_sample=True, top_p=0.9, top_k=50,
                                 repetition_penalty=1.1, max_new_tokens=16, min_new_tokens=16,
                                 num_return_sequences=captions)
        synthetic = processor.batch_decode(out, skip_special_tokens=True)  # image-major
        slots = [("web", [r["caption"] for r in batch])]
        slots += [("synthetic", synthetic[j::captions]) for j in range(captions)]
        for slot, texts in slots:
            tokens = processor(images=images, text=texts, padding=True, truncation=True,
                               max_length=35, return_tensors="pt")
            match = itm(**tokens, use_itm_head=True).itm_score.softmax(-1)[:, 1]
            cosine = itm(**tokens, use_itm_head=False).itm_score.diagonal()
            if slot == "web":
                for r, m, c in zip(batch, match.tolist(), cosine.tolist()):
                    scores[r["key"]] = (m, c)
    return time.perf_counter() - started, len(rows), scores


def flops_per_image(models, captions: int = 1) -> dict:
    """GFLOPs per image of the bare loop and of the model-card way, on one batch.

    The bare loop is counted with eager attention: the counter has no formula for the CPU SDPA
    kernel and would count its attention as zero (the arithmetic is the same either way).
    """
    from torch.utils.flop_counter import FlopCounterMode

    with tempfile.TemporaryDirectory(prefix="capfilt-flops-") as folder:
        one_batch = write_shards(Path(folder), 1, BATCH)
        counts = {}
        for name, run in (("bare", lambda: bare_loop(models, one_batch, captions, attention="eager")),
                          ("model_card", lambda: model_card(models, one_batch, captions))):
            with FlopCounterMode(display=False) as counter:
                run()
            counts[name] = counter.get_total_flops() / BATCH / 1e9
    return {"gflop_per_image_bare": counts["bare"],
            "gflop_per_image_model_card": counts["model_card"],
            "model_card_flop_ratio": counts["model_card"] / counts["bare"]}


def pipeline(models, shards, out: Path, captions: int = 1) -> dict:
    from pipelines.plan import RoundOptions
    from pipelines.round import run_round

    stage = stage_config(models, captions)
    started = time.perf_counter()
    manifest = run_round(RoundOptions(inputs=shards, output=str(out), stage=stage,
                                      batch_size=BATCH, workers=1), stream=io.StringIO())
    wall = time.perf_counter() - started
    table = pq.read_table(out / "shards", columns=["key", "web_itm", "web_itc"]).to_pylist()
    return {"wall": wall, "shard_seconds": manifest.timings["shard_seconds"],
            "model_seconds": manifest.timings["model_seconds"],
            "images": manifest.totals.rows_out,
            "scores": {r["key"]: (r["web_itm"], r["web_itc"]) for r in table}}


def actor_ab(models, shards, captions: int, batches: int) -> dict:
    """One batch through the same models, in turn in this process, in a Ray actor placed as
    ``capfilt run`` places its one CPU worker (1 CPU slot, a torch thread per core) that keeps
    its freed memory as capfilt's worker does, and in one left as glibc leaves it: what the
    actor itself costs, free of the drift between minutes that separate runs suffer. Minor page
    faults per batch say how much of the working set each faulted in again."""
    import ray

    from workers.ray_cluster import ensure_ray

    class Worker:
        def __init__(self, threads: int, keep: bool):
            if keep:
                keep_freed_memory()
            torch.set_num_threads(threads)
            self.stage = CapFiltStage.from_config(stage_config(models, captions))
            self.prepared = self.stage.prepare(read_shard(shards[0]).table.slice(0, BATCH))
            self.stage.compute(self.prepared)  # warm-up

        def batch(self) -> tuple[float, int]:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            started = time.perf_counter()
            self.stage.compute(self.prepared)
            return (time.perf_counter() - started,
                    resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)

    ensure_ray(None)
    cpus = ray.cluster_resources()["CPU"]
    remote = ray.remote(Worker).options(num_cpus=min(1.0, cpus / 4))
    actors = {"actor": remote.remote(int(cpus), True),
              "actor_glibc_default": remote.remote(int(cpus), False)}
    ray.get([actor.batch.remote() for actor in actors.values()])
    here = Worker(torch.get_num_threads(), False)  # main() has set this process up already
    runs = {"process": [], **{name: [] for name in actors}}
    for _ in range(batches):
        runs["process"].append(here.batch())
        for name, actor in actors.items():
            runs[name].append(ray.get(actor.batch.remote()))
    for actor in actors.values():
        ray.kill(actor)
    seconds = {name: sum(s for s, _ in batch) for name, batch in runs.items()}
    return {"batch_seconds_and_minor_faults": runs,
            "mean_minor_faults_per_batch": {name: statistics.mean(f for _, f in batch)
                                            for name, batch in runs.items()},
            "actor_over_process_time": seconds["actor"] / seconds["process"],
            "glibc_default_actor_over_process_time":
                seconds["actor_glibc_default"] / seconds["process"]}


def scaling_child(models, shards) -> None:
    """One process, one stage, N shards in a row: seconds and this process's peak RSS."""
    stage = CapFiltStage.from_config(StageConfig(captioner=models["captioner"],
                                                 filter=models["filter"], sampling=sampling(1)))
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        for index, shard in enumerate(shards):
            run_shard(stage, index, shard, out, BATCH)
        seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's own peak resident memory. Not ``ru_maxrss``: exec copies the parent's
    peak into the child's (the child starts as a copy of the parent), so a child spawned from
    this benchmark, models loaded, reported the benchmark's peak, not its own."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the figures as JSON here too")
    parser.add_argument("--rows", type=int, default=32, help="rows per shard")
    parser.add_argument("--repeats", type=int, default=3,
                        help="times measures 1 and 2 run, each ratio taken within one repeat")
    parser.add_argument("--captions", type=int, default=1,
                        help="captions per image: 1 is BLIP's recipe, 10 BLIP-2's")
    parser.add_argument("--no-scaling", action="store_true", help="skip measure 3")
    parser.add_argument("--scaling-only", action="store_true", help="only measure 3")
    parser.add_argument("--actor-ab", type=int, metavar="BATCHES", default=0,
                        help="only: BATCHES batches in turn in this process, a keeping actor "
                             "and a glibc-default one")
    parser.add_argument("--glibc-default", action="store_true",
                        help="leave this process's malloc as glibc sets it (the bare loop and "
                             "the model card then fault their pages in again as they may)")
    parser.add_argument("--shards", type=int, default=4, help="shards for measures 1 and 2")
    parser.add_argument("--scaling-child", nargs=2, metavar=("MODELS_JSON", "SHARDS_JSON"))
    parser.add_argument("--flops-only", action="store_true",
                        help="only the FLOPs per image of the bare loop and the model-card way")
    parser.add_argument("--attention-only", action="store_true",
                        help="only the bare loop with SDPA against Hugging Face's eager attention")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    # capfilt's workers keep their freed memory (capfilt/step/host_memory.py); the bare loop and
    # the model card get the same, so neither ratio credits capfilt with it.
    keeps = False if args.glibc_default else keep_freed_memory()
    if args.scaling_child:
        scaling_child(json.loads(args.scaling_child[0]), json.loads(args.scaling_child[1]))
        return
    work = Path(tempfile.mkdtemp(prefix="capfilt-bench-"))
    models = small_models(work / "models")
    figures = {"machine": f"{cpu_model()}, {os.cpu_count()} cores, "
                          f"{torch.get_num_threads()} torch threads, {platform.machine()}",
               "date": time.strftime("%Y-%m-%d"), "batch_size": BATCH,
               "bench_process_keeps_freed_memory": keeps}
    if args.flops_only:
        _report(figures | {"captions_per_image": args.captions}
                | flops_per_image(models, args.captions), args.out)
        return
    if args.scaling_only:
        _report(figures | {"scaling_32_rows_per_shard": scaling(models, work, args.glibc_default)},
                args.out)
        return
    shards = write_shards(work / "shards", args.shards, args.rows)
    if args.actor_ab:
        _report(figures | actor_ab(models, shards, args.captions, args.actor_ab), args.out)
        return
    figures.update(images=args.shards * args.rows, captions_per_image=args.captions,
                   repeats=args.repeats)
    # This VM's speed drifts by up to a fifth between minutes: every ratio is taken within
    # one repeat (its measures run back to back) and the median over repeats is reported.
    runs = []
    for repeat in range(args.repeats):
        bare_s, n = bare_loop(models, shards, args.captions)
        eager_s, _ = bare_loop(models, shards, args.captions, attention="eager")
        if args.attention_only:
            runs.append({"bare_images_per_s": n / bare_s,
                         "sdpa_speedup_bare": eager_s / bare_s})
            print(f"repeat {repeat}: {runs[-1]}", flush=True)
            continue
        run = pipeline(models, shards, work / f"round-{repeat}", args.captions)
        after_s, _ = bare_loop(models, shards, args.captions)  # the bare rate on both sides
        card_s, _, card_scores = model_card(models, shards, args.captions)
        bare_rate = (n / bare_s + n / after_s) / 2
        pipeline_rate = run["images"] / run["shard_seconds"]
        runs.append({
            "bare_images_per_s": bare_rate,
            "bare_images_per_s_before_and_after_pipeline": [n / bare_s, n / after_s],
            "bare_images_per_s_eager_attention": n / eager_s,
            "sdpa_speedup_bare": eager_s / bare_s,
            "pipeline_images_per_s": pipeline_rate,
            "pipeline_images_per_s_with_startup": run["images"] / run["wall"],
            # the same models inside the actor, counting only their own time: below the bare
            # rate, the models ran slower there; the rest of the loss is outside them
            "pipeline_model_images_per_s": run["images"] / run["model_seconds"],
            "model_card_images_per_s": n / card_s,
            "pipeline_efficiency": pipeline_rate / bare_rate,
            "speedup_vs_model_card": pipeline_rate * card_s / n,
            "web_score_max_abs_diff_vs_model_card": max(
                max(abs(a - b) for a, b in zip(run["scores"][k], card_scores[k]))
                for k in card_scores),
        })
        print(f"repeat {repeat}: {runs[-1]}", flush=True)
    figures["runs"] = runs
    figures.update({f"median_{key}": statistics.median(r[key] for r in runs)
                    for key, value in runs[0].items() if isinstance(value, float)})
    if args.attention_only or args.no_scaling:
        _report(figures, args.out)
        return
    figures["scaling_32_rows_per_shard"] = scaling(models, work, args.glibc_default)
    _report(figures, args.out)


def scaling(models, work: Path, glibc_default: bool = False) -> dict:
    """Measure 3: 1, 4 and 16 shards of 32 rows, each in a fresh process."""
    figures = {}
    for count in (1, 4, 16):
        scale_shards = write_shards(work / f"scale-{count}", count, 32)
        child = subprocess.run(
            [sys.executable, __file__, "--scaling-child", json.dumps(models),
             json.dumps(scale_shards), *(["--glibc-default"] if glibc_default else [])],
            capture_output=True, text=True, check=True)
        figures[count] = json.loads(child.stdout.strip().splitlines()[-1])
    return figures


def _report(figures: dict, out: str | None) -> None:
    for key, value in figures.items():
        print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
