"""Rounds over the same shards, differing in one setting, and ``capfilt diff`` between them.

    python bench/round_diff.py WORK [--images 400] [--change "--top-k 1" ...] [--out FILE.json]

Writes tiny random models (``capfilt tiny-models``) and the web set of a demo world
(capfilt/world/build.py) into WORK, runs round A with the defaults and 3 captions an image, then
for each ``--change`` a round B (its parent A) with those flags added, and diffs it with A. By
default two: ``--top-k 1``, greedy captions instead of nucleus sampling (the collapse BLIP's
nucleus sampling avoids), and ``--policy topk --keep 2 --rank-by itc``, BLIP-2's ranking
instead of BLIP's threshold. Prints the diffs and records them, with the timings, in
bench/results/round-diff-DATE.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import time
from pathlib import Path

from capfilt.models.tiny import write_tiny_models
from capfilt.rounds.diff import diff_rounds
from capfilt.world.build import WorldSpec, build_world
from pipelines.cli import main as capfilt
from pipelines.diff_cli import summary_lines

RESULTS = Path(__file__).parent / "results"
DEFAULT_CHANGES = ["--top-k 1", "--policy topk --keep 2 --rank-by itc"]


def machine() -> str:
    """'Intel(R) Xeon(R) Processor, 2 cores, AVX-512, x86_64', from /proc/cpuinfo."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name}, {os.cpu_count()} cores, {simd}, {platform.machine()}"


def commit() -> str:
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, cwd=Path(__file__).parent)
    return found.stdout.strip() or "unknown"


def run_round(flags: list[str]) -> float:
    began = time.perf_counter()
    code = capfilt(["run", *flags])
    if code != 0:
        raise SystemExit(f"capfilt run {' '.join(flags)} exited {code}")
    return round(time.perf_counter() - began, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work")
    parser.add_argument("--images", type=int, default=400, help="web images of the world")
    parser.add_argument("--change", action="append", default=None,
                        help="flags a round B adds to round A's (repeat for several)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Path(args.work)
    models = write_tiny_models(work / "models")
    world = build_world(work / "world", WorldSpec(n_clean=0, n_web=args.images, n_test=0,
                                                  rows_per_shard=100))
    common = ["--input", str(world.web), "--captioner", str(models["captioner"]),
              "--filter", str(models["filter"]), "--num-captions", "3", "--workers", "1",
              "--batch-size", "25"]
    changes = args.change or DEFAULT_CHANGES
    a = work / "round-a"
    round_a_seconds = run_round([*common, "--output", str(a)])
    diffs = []
    for number, change in enumerate(changes, 1):
        b = work / f"round-b{number}"
        seconds = run_round([*common, *shlex.split(change), "--output", str(b), "--parent", str(a)])
        began = time.perf_counter()
        diff = diff_rounds(str(a), str(b), examples=3)
        diff_seconds = round(time.perf_counter() - began, 2)
        print("\n".join(summary_lines(diff)), end="\n\n")
        diffs.append({"round_b_adds": change, "round_b_seconds": seconds,
                      "diff_seconds": diff_seconds, "diff": diff.to_dict()})
    date = time.strftime("%Y-%m-%d")
    result = {"date": date, "commit": commit(), "machine": machine(),
              "command": f"python bench/round_diff.py WORK --images {args.images} "
                         + " ".join(f"--change {shlex.quote(c)}" for c in changes),
              "world": {"web_images": args.images, "rows_per_shard": 100},
              "round_a": "tiny models (capfilt tiny-models), defaults, --num-captions 3",
              "round_a_seconds": round_a_seconds, "diffs": diffs}
    out = Path(args.out) if args.out else RESULTS / f"round-diff-{date}.json"
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
