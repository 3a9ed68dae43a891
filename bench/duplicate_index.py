"""How fast and how large the round's index of repeated images grows: the driver's share.

    python bench/duplicate_index.py [--images 1000000] [--out FILE.json]

Fingerprint tables of ``--images`` distinct random images (10,000 a shard, 20% of them copies of
an earlier image and 5% near-copies) go through ``capfilt.images.duplicate_index.find_duplicates``
as the driver runs it; prints its seconds, images per second and the growth of the process's
peak resident memory per image, and checks the marks found against the ones made.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import time
from pathlib import Path

import pyarrow as pa

from bench.duplicates import commit, machine
from capfilt.images.duplicate_index import find_duplicates
from capfilt.images.fingerprints import HASHES_SCHEMA

PER_SHARD = 10_000


def fingerprints(images: int, seed: int = 0) -> tuple[dict[int, pa.Table], int, int]:
    """Shard -> fingerprint table, with the numbers of copies and near-copies made."""
    rng = random.Random(seed)
    rows, copies, near = [], 0, 0
    for _ in range(images):
        roll = rng.random()
        if rows and roll < 0.2:  # the same bytes again
            rows.append(rows[rng.randrange(len(rows))])
            copies += 1
        elif rows and roll < 0.25:  # other bytes, one bit of the difference hash moved
            _, code, colour = rows[rng.randrange(len(rows))]
            rows.append((os.urandom(32), code ^ (1 << rng.randrange(63)), colour))
            near += 1
        else:
            rows.append((os.urandom(32), rng.getrandbits(64) - (1 << 63), rng.getrandbits(24)))
    tables = {}
    for shard, start in enumerate(range(0, images, PER_SHARD)):
        part = rows[start:start + PER_SHARD]
        tables[shard] = pa.table([
            pa.array(range(len(part)), pa.int32()),
            pa.array([f"{shard:05d}{i:07d}" for i in range(len(part))], pa.string()),
            pa.array([r[0] for r in part], pa.binary(32)),
            pa.array([r[1] for r in part], pa.int64()),
            pa.array([r[2] for r in part], pa.int32())], schema=HASHES_SCHEMA)
    return tables, copies, near


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--out", default=None, help="write the figures here as JSON")
    args = parser.parse_args()
    tables, copies, near = fingerprints(args.images)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    marks = find_duplicates(tables)
    seconds = time.perf_counter() - started
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    kinds = marks.column("kind").to_pylist()
    found = {"exact": kinds.count("exact"), "near": kinds.count("near")}
    result = {"commit": commit(), "machine": machine(), "images": args.images,
              "made": {"exact": copies, "near": near}, "found": found,
              "seconds": round(seconds, 1), "images_per_second": round(args.images / seconds),
              "peak_memory_growth_bytes_per_image": round(grown / args.images)}
    result["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(result, indent=2))
    if found != result["made"]:
        raise SystemExit(f"found {found}, made {result['made']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
