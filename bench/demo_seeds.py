"""Table 1 of ``capfilt demo`` over several seeds: each row's mean and spread (max - min), and
whether CapFilt beats the raw web data by more than the spread over seeds.

    python bench/demo_seeds.py runs/demo-seed0 runs/demo-seed1 runs/demo-seed2 [--out FILE.json]

Reads each folder's ``demo.json`` (what ``capfilt demo`` wrote); prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

METRICS = ("i2t_r1", "t2i_r1", "bleu4", "caption_accuracy", "noise_ratio")
HEADERS = ("TR@1", "IR@1", "BLEU-4", "caption acc.", "noise ratio")
COMPARED = ("i2t_r1", "t2i_r1", "caption_accuracy")


def summarise(runs: list[dict]) -> dict:
    rows = [row["row"] for row in runs[0]["table"]]
    out = {"seeds": [run["seed"] for run in runs], "rows": {}}
    for index, name in enumerate(rows):
        values = {m: [run["table"][index][m] for run in runs] for m in METRICS}
        out["rows"][name] = {m: {"mean": sum(v) / len(v), "spread": max(v) - min(v), "values": v}
                             for m, v in values.items()}
    base = out["rows"][rows[0]]
    out["beats_raw_web_beyond_spread"] = {
        name: {m: row[m]["mean"] - base[m]["mean"] > max(row[m]["spread"], base[m]["spread"])
               for m in COMPARED}
        for name, row in out["rows"].items() if name != rows[0]}
    out["audit"] = {
        run["seed"]: {"filter": run["audit"]["filter"],
                      "synthetic": run["audit"]["synthetic"]} for run in runs}
    out["bootstrap_seconds"] = {run["seed"]: run["timings"]["wall_seconds"] for run in runs}
    return out


def markdown(summary: dict) -> str:
    lines = ["| pre-training data | " + " | ".join(HEADERS) + " |",
             "|---|" + "---|" * len(HEADERS)]
    for name, row in summary["rows"].items():
        cells = [f"{row[m]['mean']:.3f} ± {row[m]['spread'] / 2:.3f}" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"mean ± half the spread (max - min) over seeds {summary['seeds']}")
    for name, beats in summary["beats_raw_web_beyond_spread"].items():
        lines.append(f"{name} beats no CapFilt by more than the spread: {beats}")
    for seed, audit in summary["audit"].items():
        f, s = audit["filter"], audit["synthetic"]
        lines.append(f"seed {seed}: filter dropped {f['wrong_web_dropped']} of wrong web captions, "
                     f"kept {f['right_web_kept']} of right ones; synthetic right {s['correct']} "
                     f"({s['kept_correct']} of kept)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--out", help="write the summary as JSON here (and .md beside it)")
    args = parser.parse_args()
    runs = [json.loads((Path(f) / "demo.json").read_text()) for f in args.folders]
    summary = summarise(runs)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    summary = {"date": time.strftime("%Y-%m-%d"), "commit": commit,
               "machine": f"{os.cpu_count()} cores, "
                          f"{'AVX-512' if 'avx512f' in flags else 'AVX2'}", **summary}
    text = markdown(summary)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
        Path(args.out).with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
