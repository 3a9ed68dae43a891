"""Table 1 of ``capfilt demo`` over several seeds: each row's mean and spread (max - min),
whether each row beats the raw web data by more than the spread over seeds, and whether CapFilt
(both) is above each half alone beyond the spread: its lowest seed above the other's highest.

    python bench/demo_seeds.py runs/demo-seed0 runs/demo-seed1 runs/demo-seed2 [--out FILE.json]
        [--commit SHA]

Reads each folder's ``demo.json`` (what ``capfilt demo`` wrote); prints a markdown table.
``--commit`` names the commit the runs were made at, when it is not this checkout's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bootstrap_variants import machine  # noqa: E402

METRICS = ("i2t_r1", "t2i_r1", "bleu4", "caption_accuracy", "noise_ratio")
HEADERS = ("TR@1", "IR@1", "BLEU-4", "caption acc.", "noise ratio")
COMPARED = ("i2t_r1", "t2i_r1", "caption_accuracy")
BOTH, HALVES = "CapFilt (both)", ("filter only", "captioner only")


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
    if BOTH in out["rows"]:
        out["capfilt_against_each_half"] = {
            half: {m: against(out["rows"][BOTH][m], out["rows"][half][m]) for m in COMPARED}
            for half in HALVES if half in out["rows"]}
    out["audit"] = {
        run["seed"]: {"filter": run["audit"]["filter"],
                      "synthetic": run["audit"]["synthetic"]} for run in runs}
    out["bootstrap_seconds"] = {run["seed"]: run["timings"]["wall_seconds"] for run in runs}
    return out


def against(both: dict, half: dict) -> dict:
    """CapFilt (both) against one half on one metric: above in mean, and beyond the spread."""
    return {"above_in_mean": both["mean"] > half["mean"],
            "beyond_spread": min(both["values"]) > max(half["values"])}


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
    for half, metrics in summary.get("capfilt_against_each_half", {}).items():
        cells = ", ".join(f"{HEADERS[METRICS.index(m)]} "
                          + ("beyond the spread" if v["beyond_spread"] else
                             "above in mean" if v["above_in_mean"] else "not above")
                          for m, v in metrics.items())
        lines.append(f"CapFilt (both) against {half}: {cells}")
    for seed, audit in summary["audit"].items():
        f, s = audit["filter"], audit["synthetic"]
        lines.append(f"seed {seed}: filter dropped {f['wrong_web_dropped']} of wrong web captions, "
                     f"kept {f['right_web_kept']} of right ones"
                     + (f", {f['partial_web_kept']} of partial ones"
                        if f.get("partial_web_kept") is not None else "")
                     + f"; synthetic right {s['correct']} "
                     f"({s['kept_correct']} of kept)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--out", help="write the summary as JSON here (and .md beside it)")
    parser.add_argument("--commit", help="the commit the runs were made at (default: HEAD)")
    args = parser.parse_args()
    runs = [json.loads((Path(f) / "demo.json").read_text()) for f in args.folders]
    summary = summarise(runs)
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True,
                                           cwd=Path(__file__).parent).stdout.strip()
    summary = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": machine(),
               "profile": runs[0].get("profile"), "folders": list(args.folders), **summary}
    text = markdown(summary)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
        Path(args.out).with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
