"""What skipping repeated images saves: one corpus, rounds with --dedup off and exact, one run.

    python bench/duplicates.py [--images 1000] [--share 0.2] [--out FILE.json]

Builds the demo world's web set (``--images`` images, 48 px, the demo's model size), makes a
crawl in which ``--share`` of the rows repeat an earlier image under a new key and URL (as one
picture linked from many pages comes back from img2dataset), and runs a CapFilt round over it
twice on local Ray: ``--dedup off`` and ``--dedup exact``. Prints the models' seconds, the
round's wall seconds and the fingerprinting's seconds for each, and the share of model time
saved; writes them to ``--out`` with the date, the commit and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import tempfile
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.captioning.settings import SamplingConfig
from capfilt.step.stage_config import StageConfig
from capfilt.world.build import WorldSpec, build_world
from capfilt.world.models import write_world_models
from pipelines.plan import RoundOptions
from pipelines.round import run_round

ROWS_PER_SHARD = 250


def repeated_crawl(world: Path, out: Path, share: float, seed: int = 0) -> tuple[list[str], int]:
    """Shards of the world's web rows in which ``share`` of all rows are copies of an earlier
    row's image; returns the shard paths and the number of copies."""
    rows = pq.read_table(sorted((world / "web").glob("*.parquet"))).to_pylist()
    rng = random.Random(seed)
    copies = round(len(rows) * share / (1 - share))
    for n in range(copies):
        source = rows[rng.randrange(len(rows))]
        rows.insert(rng.randrange(len(rows) + 1),
                    {**source, "key": f"copy{n:06d}", "url": f"{source['url']}?copy={n}"})
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(rows), ROWS_PER_SHARD):
        path = out / f"{start // ROWS_PER_SHARD:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[start:start + ROWS_PER_SHARD]), path)
        paths.append(str(path))
    return paths, copies


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def machine() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{os.cpu_count()}-core {platform.machine()} CPU, {simd}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--share", type=float, default=0.2)
    parser.add_argument("--out", default=None, help="write the figures here as JSON")
    args = parser.parse_args()
    result = {"date": date.today().isoformat(), "commit": commit(), "machine": machine(),
              "images": args.images, "share": args.share, "rounds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        world = build_world(work / "world", WorldSpec(n_clean=0, n_web=args.images, n_test=0,
                                                      image_size=48, rows_per_shard=500))
        models = write_world_models(work / "models", image_size=48, hidden=96, layers=2,
                                    patch=16)
        shards, copies = repeated_crawl(world.root, work / "crawl", args.share)
        result["rows"], result["copies"] = args.images + copies, copies
        stage = StageConfig(captioner=str(models["captioner"]), filter=str(models["filter"]),
                            sampling=SamplingConfig(num_captions=1))
        for mode in ("off", "exact"):
            manifest = run_round(RoundOptions(inputs=shards, output=str(work / mode),
                                              stage=stage, batch_size=32, dedup=mode))
            timings = manifest.timings
            result["rounds"][mode] = {
                "images_scored": manifest.totals.rows_out,
                "model_seconds": timings["model_seconds"],
                "wall_seconds": timings["wall_seconds"],
                "dedup_seconds": timings.get("dedup_seconds", 0.0),
                "duplicates": manifest.duplicates,
            }
            print(f"--dedup {mode}: {manifest.totals.rows_out} images scored, models "
                  f"{timings['model_seconds']:.1f} s, round {timings['wall_seconds']:.1f} s, "
                  f"fingerprints {timings.get('dedup_seconds', 0.0):.1f} s", flush=True)
    off, exact = result["rounds"]["off"], result["rounds"]["exact"]
    result["model_time_saved"] = round(1 - exact["model_seconds"] / off["model_seconds"], 3)
    result["wall_time_saved"] = round(1 - exact["wall_seconds"] / off["wall_seconds"], 3)
    print(f"{copies} copies in {result['rows']} rows: model time saved "
          f"{result['model_time_saved']:.1%}, round wall time saved {result['wall_time_saved']:.1%}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
