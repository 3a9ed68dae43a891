"""Is CapFilt's gain its content, or the steps its extra pairs buy? (BLIP's Table 12)

    python bench/equal_steps.py RUN [RUN ...] [--steps 418 800] [--views ...] [--out FILE.json]

Each RUN is a folder that ``capfilt demo --seed N --output RUN`` finished. BLIP pre-trains every
Table 1 row for the same epochs over its (image, text) pairs, so CapFilt's row (kept web and
synthetic texts) takes more steps than filter only's; its Table 12 replicated the web texts to
CapFilt's count and found no gain, so its CapFilt gain is the texts, not the steps. Here both
rows' data (the round's ``kept_web`` and ``kept`` views, each with the clean set, read as pairs)
are pre-trained again for the same number of steps, for each ``--steps`` (default: the steps
the demo's CapFilt row took), into ``RUN/variants/equal-steps/STEPS/VIEW``, and evaluated as the
demo's rows are. ``--views`` adds captioner only's data (``web_and_synthetic``). Prints them
beside the demo's rows, per seed and as means; a shared pool of ``--parallel`` processes
(default 2) runs the trainings; a training or evaluation already finished there is not run again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

from bootstrap_variants import HEADERS, METRICS, ROOT, machine

sys.path.insert(0, str(ROOT))

from pipelines.bootstrap import table_row, train_model  # noqa: E402
from pipelines.bootstrap_config import load_bootstrap_config  # noqa: E402
from pipelines.side_by_side import run_side_by_side  # noqa: E402

VIEWS = {"kept_web": "filter only", "web_and_synthetic": "captioner only",
         "kept": "CapFilt (both)"}


def capfilt_steps(run: Path) -> int:
    manifest = json.loads((run / "round-1" / "pretrain" / "manifest.json").read_text())
    return manifest["results"]["steps"]


def train_row(run: Path, view: str, steps: int) -> dict:
    """One view of RUN's round pre-trained (as pairs) for ``steps`` steps and evaluated."""
    cfg = load_bootstrap_config(run / "bootstrap.toml")
    config = replace(cfg.pretrain.config, epochs=0.0, steps=steps, samples="pairs")
    cfg = replace(cfg, pretrain=replace(cfg.pretrain, config=config))
    data = [f"{run / 'round-1' / 'capfilt'}@{view}", *cfg.clean]
    folder = run / "variants" / "equal-steps" / str(steps) / view
    row = table_row(f"{VIEWS[view]} at {steps} steps", view,
                    train_model(cfg, folder, data, feeds_a_round=False))
    return {"view": view, "steps": steps, **{m: row[m] for m in METRICS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--steps", nargs="+", type=int, help="default: the CapFilt row's")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--views", nargs="+", choices=list(VIEWS), default=["kept_web", "kept"],
                        help="the rows to train again (default: filter only and CapFilt)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here (.md beside)")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    began = time.perf_counter()
    runs = [run.resolve() for run in args.runs]
    plan = [(run, view, steps) for run in runs for steps in (args.steps or [capfilt_steps(run)])
            for view in args.views]
    done = run_side_by_side([partial(train_row, *item) for item in plan], args.parallel)
    results = []
    for run in runs:
        demo = json.loads((run / "demo.json").read_text())
        rows = [row for (r, _, _), (row, _) in zip(plan, done) if r == run]
        results.append({"run": str(run), "seed": demo["seed"],
                        "capfilt_steps": capfilt_steps(run),
                        "demo": [{"row": r["row"], **{m: r[m] for m in METRICS}}
                                 for r in demo["table"]], "equal_steps": rows})
    report = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": machine(),
              "seconds": round(time.perf_counter() - began, 1), "results": results}
    text = markdown(results)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)


def markdown(results: list[dict]) -> str:
    lines = []
    for result in results:
        lines += [f"seed {result['seed']} ({result['run']}; the demo's CapFilt row took "
                  f"{result['capfilt_steps']} steps)", "",
                  "| row | " + " | ".join(HEADERS) + " |", "|---|" + "---|" * len(HEADERS)]
        for row in result["demo"]:
            lines.append(f"| demo: {row['row']} | "
                         + " | ".join(f"{row[m]:.3f}" for m in METRICS) + " |")
        for row in result["equal_steps"]:
            lines.append(f"| {VIEWS[row['view']]} at {row['steps']} steps | "
                         + " | ".join(f"{row[m]:.3f}" for m in METRICS) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
