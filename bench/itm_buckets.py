"""CPU benchmark: ITM/ITC scoring with texts in length buckets (sorted by token count, chunked,
each chunk padded to its longest, scores put back in order: the scorer at ``--buckets``) against
texts chunked in their batch order (the scorer at ``--unsorted``).

Both scorers run in this process on the same small random BLIP as ``cpu_pipeline.py`` (ViT-S
sized vision at 224 px, 4-layer text side), on the same images and texts, in turn within each
repeat (a shared VM's speed drifts between minutes). Texts: a web caption per image whose word
count is log-normal (median 10 words, sigma 0.8: short alt-text and long descriptions that the
35-token cut truncates) and ``--captions`` synthetic captions of 5 to 12 words; the mix is
assumed, not measured on a real shard. Printed per setting: the share of the text encoder's
token positions that are padding, both ways; scorer texts/s both ways (whole call, vision tower
included), the vision tower's own seconds and the rest (the text side); the largest score
difference between the two. Each scorer is called twice per setting before timing: on the CPU
the first calls with new tensor shapes ran up to 10 times slower.

    python bench/itm_buckets.py --out bench/results/itm-buckets-cpu-2026-12-07.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cpu_pipeline import cpu_model, small_models  # noqa: E402
from capfilt.models.loading import load_model  # noqa: E402
from capfilt.models.tiny import WORDS  # noqa: E402

# (name, images per batch, synthetic captions per image, texts per chunk)
SETTINGS = [
    ("BLIP recipe, pipeline's CPU batch 16, chunk 256", 16, 1, 256),
    ("BLIP recipe, 64 images, chunks of 32", 64, 1, 32),
    ("BLIP-2 recipe, 16 images, chunk 256", 16, 10, 256),
    ("BLIP-2 recipe, 16 images, chunks of 32", 16, 10, 32),
]


def texts_for(images: int, captions: int, rng: np.random.Generator) -> list[list[str]]:
    words = [w for w in WORDS if w.isalpha()]
    out = []
    for _ in range(images):
        web_words = max(1, int(round(rng.lognormal(np.log(10), 0.8))))
        group = [" ".join(rng.choice(words, size=min(web_words, 200)))]
        group += [" ".join(rng.choice(words, size=int(rng.integers(5, 13))))
                  for _ in range(captions)]
        out.append(group)
    return out


def padding_share(ids: list[list[int]], order: list[int], chunk: int) -> float:
    """Padding positions over all positions the text encoder runs, chunked in ``order``."""
    real = padded = 0
    for start in range(0, len(order), chunk):
        lengths = [len(ids[k]) for k in order[start : start + chunk]]
        real += sum(lengths)
        padded += max(lengths) * len(lengths)
    return 1 - real / padded


def scorer_module(rev: str):
    """The scorer module as it is at ``rev``, imported from a temporary file."""
    source = subprocess.run(["git", "show", f"{rev}:capfilt/scoring/blip_itm.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"blip_itm_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"blip_itm_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unsorted", default="089c226",
                        help="revision of the unsorted scorer (the last before buckets)")
    parser.add_argument("--buckets", default="162ffb8", help="revision of the bucketed scorer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    revs = {label: subprocess.run(["git", "rev-parse", rev], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout.strip()
            for label, rev in (("unsorted", args.unsorted), ("buckets", args.buckets))}
    old_module, new_module = (scorer_module(revs[label]) for label in ("unsorted", "buckets"))
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        loaded = load_model(small_models(Path(folder))["filter"], "filter")
    figures = []
    for name, images, captions, chunk in SETTINGS:
        texts = texts_for(images, captions, rng)
        pixels = torch.randn(images, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        new = new_module.Scorer(loaded, text_batch_size=chunk)
        old = old_module.Scorer(loaded, text_batch_size=chunk)
        flat = [t for group in texts for t in group]
        ids = new.tokenizer(old_module.cut_texts(flat, new.max_text_tokens), truncation=True,
                            max_length=new.max_text_tokens).input_ids
        in_order = list(range(len(flat)))
        by_length = sorted(in_order, key=lambda k: len(ids[k]))
        for _ in range(2):  # warm-up
            new_scores, old_scores = new(pixels, texts), old(pixels, texts)
        rows = {"old": [], "new": [], "vision": []}
        for repeat in range(args.repeats):
            turns = (("old", old), ("new", new)) if repeat % 2 == 0 else (("new", new),
                                                                           ("old", old))
            for label, scorer in turns:
                seconds, _ = timed(scorer, pixels, texts)
                rows[label].append(seconds)
            with torch.inference_mode():
                seconds, _ = timed(loaded.model.vision_model, pixels)
            rows["vision"].append(seconds)
        diff = max(abs(a - b) for kind in (0, 1)
                   for ga, gb in zip(new_scores[kind], old_scores[kind]) for a, b in zip(ga, gb))
        lengths = [len(row) for row in ids]
        figure = {
            "setting": name, "images": images, "texts": len(flat), "chunk": chunk,
            "token_lengths": {"mean": statistics.mean(lengths), "min": min(lengths),
                              "max": max(lengths), "at_cut": sum(n == 35 for n in lengths)},
            "padding_share": {"unsorted": padding_share(ids, in_order, chunk),
                              "buckets": padding_share(ids, by_length, chunk)},
            "texts_per_s": {"unsorted": len(flat) / statistics.median(rows["old"]),
                            "buckets": len(flat) / statistics.median(rows["new"])},
            "speedup_median": statistics.median(o / n for o, n in zip(rows["old"], rows["new"])),
            "vision_s_median": statistics.median(rows["vision"]),
            "text_side_s": {label: statistics.median(rows[key]) - statistics.median(rows["vision"])
                            for label, key in (("unsorted", "old"), ("buckets", "new"))},
            "seconds": rows,
            "max_abs_score_diff": diff,
        }
        figures.append(figure)
        print(f"{name}: {len(flat)} texts, padding {figure['padding_share']['unsorted']:.1%}"
              f" -> {figure['padding_share']['buckets']:.1%}; texts/s"
              f" {figure['texts_per_s']['unsorted']:.1f} -> {figure['texts_per_s']['buckets']:.1f}"
              f" ({figure['speedup_median']:.3f}x); vision {figure['vision_s_median']:.2f} s;"
              f" text side {figure['text_side_s']['unsorted']:.2f}"
              f" -> {figure['text_side_s']['buckets']:.2f} s; max diff {diff:.1e}", flush=True)
    report = {
        "date": datetime.date.today().isoformat(),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True,
                                 capture_output=True, text=True).stdout.strip(),
        "revisions": revs, "machine": cpu_model(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "repeats": args.repeats, "figures": figures,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
