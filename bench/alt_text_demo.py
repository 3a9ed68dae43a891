"""The demo in a world whose true web captions are mostly partial, as real alt-text is.

    python bench/alt_text_demo.py RUN --seed N [--complete 0.15] [--partial 0.45]
    python bench/alt_text_demo.py RUN --probe [--out FILE.json]
    python bench/demo_seeds.py RUN0 RUN1 RUN2 --out FILE.json

The demo's web set is 60% true and complete captions, 40% wrong. Real alt-text is mostly true
but says little ("my new car"), so here ``--partial`` of the web set names some attributes only
(``capfilt.world.noise.PARTIAL_FORMS``), ``--complete`` states the whole scene, and the wrong
40% keep the demo's mix. Everything else is ``capfilt demo``'s default profile, into RUN.

``--probe`` scores, with RUN's round-0 filter, the true captions of RUN's first 400 web images
written whole and with attributes left out: which omissions the filter still calls a match.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bootstrap_variants import machine  # noqa: E402

ALL = ("size", "colour", "shape", "position")
# The attributes each probed form states (``capfilt.world.noise.partial_caption``).
FORMS = {
    "whole": (*ALL, "background"),
    "no background": ALL,
    "no size": ("colour", "shape", "position", "background"),
    "no position": ("size", "colour", "shape", "background"),
    "no colour": ("size", "shape", "position", "background"),
    "colour and shape": ("colour", "shape"),
}


def run(out: str, seed: int, complete: float, partial: float) -> dict:
    from dataclasses import replace

    import pipelines.demo as demo
    from capfilt.world.noise import NoiseMix

    # The wrong 40% in the default mix (NoiseMix's own fractions); complete + partial make 60%.
    demo.PROFILES["default"]["world"]["noise"] = replace(NoiseMix(), correct=complete,
                                                         partial=partial)
    return demo.run_demo(out, seed=seed)


def itm_scores(model: Path, rows: list[dict], texts: Callable[[dict], list[str]],
               batch: int = 64) -> list[list[float]]:
    """The match probability of each of ``texts(row)`` with the row's image (``jpg``), by the
    filter at ``model``: one list per row."""
    import torch
    from PIL import Image

    from capfilt.images.transform import ImageTransform
    from capfilt.models.loading import load_model
    from capfilt.scoring.blip_itm import Scorer

    loaded = load_model(str(model), "filter")
    scorer, transform = Scorer(loaded), ImageTransform.from_processor(
        loaded.processor.image_processor)
    scores = []
    for start in range(0, len(rows), batch):
        part = rows[start:start + batch]
        pixels = torch.stack([transform(Image.open(io.BytesIO(r["jpg"])).convert("RGB"))
                              for r in part])
        itm, _ = scorer(pixels, [texts(r) for r in part])
        scores += itm
    return scores


def probe(run_dir: Path, images: int = 400) -> dict:
    import pyarrow.parquet as pq

    from capfilt.world.build import load_scenes
    from capfilt.world.noise import partial_caption

    scenes = load_scenes(run_dir / "world" / "truth")
    rows = pq.read_table(run_dir / "world" / "web", columns=["key", "jpg"]).slice(
        0, images).to_pylist()
    itm = itm_scores(run_dir / "round-0" / "filter" / "filter", rows,
                     lambda r: [partial_caption(scenes[r["key"]], form)
                                for form in FORMS.values()])
    scores = {name: [row[n] for row in itm] for n, name in enumerate(FORMS)}
    return {name: {"kept": round(sum(v >= 0.5 for v in values) / len(values), 3),
                   "median_itm": round(sorted(values)[len(values) // 2], 4)}
            for name, values in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--complete", type=float, default=0.15)
    parser.add_argument("--partial", type=float, default=0.45)
    parser.add_argument("--probe", action="store_true",
                        help="score partial forms with RUN's round-0 filter instead")
    parser.add_argument("--out", type=Path, help="with --probe: write its figures here (JSON)")
    args = parser.parse_args()
    if args.probe:
        result = probe(args.run)
        for name, figures in result.items():
            print(f"{name:18s} kept at ITM >= 0.5: {figures['kept']:.3f}, "
                  f"median ITM {figures['median_itm']}")
        if args.out:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, cwd=ROOT).stdout.strip()
            report = {"date": time.strftime("%Y-%m-%d"), "commit": commit,
                      "machine": machine(),
                      "run": str(args.run), "images": 400, "forms": result}
            args.out.write_text(json.dumps(report, indent=2) + "\n")
        return
    print(run(str(args.run), args.seed, args.complete, args.partial)["text"])


if __name__ == "__main__":
    main()
