"""The calibrated threshold against the best one in hindsight, on finished ``capfilt demo`` runs:
many auditors' samples of web captions (each a different seed), each calibrated for a
precision target, judged on all of the round's web captions with the world's hidden truth.

    python bench/calibration_demo.py runs/demo-seed0 runs/demo-seed1 [--samples 20]
        [--labels 300] [--target 0.95] [--out FILE.json]

Reads each folder's ``round-1/capfilt`` and ``world/truth`` (writes nothing there; the label
files go to a temporary folder). Prints a markdown table: per demo run, the hindsight best
threshold, and over the samples, the calibrated thresholds (the lowest whose lower 95% bound
reaches the target, and the lowest whose point estimate does), their precision and recall on
all web captions, and in how many samples that precision met the target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.demo_calibration import compare  # noqa: E402

RULES = (("calibrated", "lower 95% bound"), ("point_estimate", "point estimate"))


def one_run(folder: Path, samples: int, labels: int, target: float, work: Path) -> dict:
    round_dir, truth = folder / "round-1" / "capfilt", folder / "world" / "truth"
    seed = json.loads((folder / "demo.json").read_text())["seed"]
    results = []
    for sample in range(samples):
        _, result = compare(round_dir, truth, work / f"labels-{seed}-{sample}.csv", labels,
                            sample, target)
        results.append(result)
    out = {"demo_seed": seed, "web_captions": results[0]["web_captions"],
           "hindsight": results[0]["hindsight"], "round": results[0]["round"]}
    for rule, _ in RULES:
        chosen = [r[rule] for r in results]
        found = [c for c in chosen if c is not None]
        out[rule] = {
            "found": len(found), "of": samples,
            "thresholds": [c["threshold"] for c in found],
            "precision": [c["precision"] for c in found],
            "recall": [c["recall"] for c in found],
            "met_target": sum(c["precision"] >= target for c in found),
        }
    return out


def _spread(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    return (f"{statistics.median(values):.{digits}f} "
            f"[{min(values):.{digits}f}-{max(values):.{digits}f}]")


def table(runs: list[dict], target: float, labels: int, samples: int) -> str:
    lines = [f"precision target {target:g}; {samples} samples of {labels} labelled web captions "
             "per run; figures on all of the run's web captions (median [min-max] over samples)",
             "",
             "| demo seed | rule | ITM threshold | precision | recall | met the target |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        h = run["hindsight"]
        lines.append(f"| {run['demo_seed']} | hindsight best | {h['threshold']:g} | "
                     f"{h['precision']:.3f} | {h['recall']:.3f} | by definition |")
        for rule, name in RULES:
            r = run[rule]
            lines.append(f"| {run['demo_seed']} | {name} | {_spread(r['thresholds'])} | "
                         f"{_spread(r['precision'])} | {_spread(r['recall'])} | "
                         f"{r['met_target']} of {r['found']} (found in {r['found']} of "
                         f"{r['of']}) |")
        k = run["round"]
        lines.append(f"| {run['demo_seed']} | the round's | {k['threshold']:g} | "
                     f"{k['precision']:.3f} | {k['recall']:.3f} | - |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="capfilt demo output folders")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--labels", type=int, default=300)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as work:
        runs = [one_run(folder, args.samples, args.labels, args.target, Path(work))
                for folder in args.runs]
    text = table(runs, args.target, args.labels, args.samples)
    print(text, end="")
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
        args.out.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": machine(),
            "target_precision": args.target, "labels": args.labels, "samples": args.samples,
            "seconds": round(time.monotonic() - began, 1), "runs": runs, "table": text,
        }, indent=2) + "\n")


def machine() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cores = flags.count("processor\t:")
    return f"{cores}-core CPU, {'AVX-512' if 'avx512f' in flags else 'no AVX-512'}"


if __name__ == "__main__":
    main()
