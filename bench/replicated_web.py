"""BLIP's Table 12 in miniature: is CapFilt's gain its content, or the steps its extra pairs buy?

    python bench/replicated_web.py RUN0 RUN1 RUN2 [--out FILE.json]

Each RUN is a folder that ``capfilt demo --seed N --output RUN`` finished. The demo pre-trains
every Table 1 row for the same epochs over its (image, text) pairs, as BLIP does, so CapFilt's
row (kept web and synthetic texts) takes more steps than filter only's. BLIP's Table 12
replicated the web texts to CapFilt's count and found no gain. Here filter only's data (the
round's ``kept_web`` view and the clean set) is pre-trained again for as many steps as the
CapFilt row took, its texts seen as often as CapFilt's are, into ``RUN/variants/replicated_web``,
and evaluated as the demo's rows are. Prints it beside the demo's rows, per seed and as means.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from bootstrap_variants import HEADERS, METRICS, ROOT, machine

sys.path.insert(0, str(ROOT))

from pipelines.bootstrap import table_row, train_model  # noqa: E402
from pipelines.bootstrap_config import load_bootstrap_config  # noqa: E402

LABEL = "filter only, CapFilt's steps"


def replicated(run: Path) -> dict:
    """Filter only's data pre-trained for the CapFilt row's steps; the row and the demo's."""
    cfg = load_bootstrap_config(run / "bootstrap.toml")
    steps = json.loads((run / "round-1" / "pretrain" / "manifest.json").read_text())
    steps = steps["results"]["steps"]
    config = replace(cfg.pretrain.config, epochs=0.0, steps=steps)
    cfg = replace(cfg, pretrain=replace(cfg.pretrain, config=config))
    began = time.perf_counter()
    data = [f"{run / 'round-1' / 'capfilt'}@kept_web", *cfg.clean]
    models = train_model(cfg, run / "variants" / "replicated_web", data, feeds_a_round=False)
    row = table_row(LABEL, "kept_web", models)
    demo = json.loads((run / "demo.json").read_text())
    return {"seed": demo["seed"], "steps": steps, "table": demo["table"] + [row],
            "seconds": round(time.perf_counter() - began, 1)}


def summarise(results: list[dict]) -> dict:
    rows = {}
    for i, row in enumerate(results[0]["table"]):
        rows[row["row"]] = {}
        for m in METRICS:
            values = [r["table"][i][m] for r in results]
            rows[row["row"]][m] = {"values": values, "mean": sum(values) / len(values),
                                   "spread": max(values) - min(values)}
    return {"seeds": [r["seed"] for r in results], "rows": rows,
            "capfilt_steps": {r["seed"]: r["steps"] for r in results},
            "seconds": {r["seed"]: r["seconds"] for r in results}}


def markdown(summary: dict) -> str:
    lines = ["| pre-training data | " + " | ".join(HEADERS) + " |",
             "|---|" + "---|" * len(HEADERS)]
    for name, metrics in summary["rows"].items():
        cells = [f"{metrics[m]['mean']:.3f} ± {metrics[m]['spread'] / 2:.3f}" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    capfilt, copy = summary["rows"]["CapFilt (both)"], summary["rows"][LABEL]
    lines += ["", f"mean ± half the spread (max - min) over seeds {summary['seeds']}; "
              f"CapFilt's steps (and so the last row's): {summary['capfilt_steps']}",
              "CapFilt (both) above filter only at CapFilt's steps in every seed: "
              + str({m: all(a > b for a, b in zip(capfilt[m]["values"], copy[m]["values"]))
                     for m in METRICS})]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="write the summary as JSON here (.md beside)")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    summary = summarise([replicated(run.resolve()) for run in args.runs])
    report = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": machine(),
              "runs": [str(r) for r in args.runs], **summary}
    text = markdown(summary)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
