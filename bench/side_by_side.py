"""Pre-trainings of the demo's model one after another, then side by side, in one run.

    python bench/side_by_side.py RUN [--steps 150] [--jobs 2]

RUN is a finished ``capfilt demo --output RUN`` (its bootstrap.toml, world and blank models).
Each job pre-trains from scratch on the web + clean sets, as the demo's round 0 does, for
``--steps`` steps (a different seed each, into a temporary folder). First the jobs run one
after another in this process (torch's default threads), then at once through
``pipelines.side_by_side`` (spawned processes, the cores split); prints both walls and each
job's seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

from pipelines.bootstrap import train_step
from pipelines.bootstrap_config import load_bootstrap_config
from pipelines.side_by_side import cores, run_side_by_side


def pretrain(run: str, steps: int, seed: int, out: str) -> None:
    cfg = load_bootstrap_config(Path(run) / "bootstrap.toml")
    step = replace(cfg.pretrain, config=replace(cfg.pretrain.config, steps=steps, seed=seed))
    train_step(step, "pretrain", cfg.init, [*cfg.web, *cfg.clean], Path(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    result = {"machine": f"{platform.processor() or platform.machine()}, {cores()} cores",
              "steps": args.steps, "jobs": args.jobs}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, parallel in (("one after another", 1), ("side by side", args.jobs)):
            calls = [partial(pretrain, args.run, args.steps, seed, f"{tmp}/{parallel}-{seed}")
                     for seed in range(args.jobs)]
            began = time.perf_counter()
            done = run_side_by_side(calls, parallel)
            result[mode] = {"wall_s": round(time.perf_counter() - began, 1),
                            "job_s": [seconds for _, seconds in done]}
            print(f"{mode}: {result[mode]['wall_s']} s wall, jobs {result[mode]['job_s']} s",
                  flush=True)
    ratio = result["one after another"]["wall_s"] / result["side by side"]["wall_s"]
    result["speedup"] = round(ratio, 2)
    print(f"side by side is {ratio:.2f}x one after another")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
