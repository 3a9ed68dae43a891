"""Trainings of the demo's model one after another, then side by side, in one run.

    python bench/side_by_side.py RUN [--steps 150] [--jobs 2]
    python bench/side_by_side.py RUN --fine-tunes

RUN is a finished ``capfilt demo --output RUN`` (its bootstrap.toml, world and blank models).
Each job pre-trains from scratch on the web + clean sets, as the demo's round 0 does, for
``--steps`` steps (a different seed each, into a temporary folder). With ``--fine-tunes`` the
jobs are instead round 0's two fine-tunes, captioner and filter from RUN's round-0 pre-training
on the clean set, with the demo's own steps. First the jobs run one after another in this
process (torch's default threads), then at once through ``pipelines.side_by_side`` (spawned
processes, the cores split); prints both walls and each job's seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
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


def fine_tune(run: str, task: str, out: str) -> None:
    cfg = load_bootstrap_config(Path(run) / "bootstrap.toml")
    step = cfg.finetune_captioner if task == "captioner" else cfg.finetune_filter
    train_step(step, task, str(Path(run) / "round-0" / "pretrain"), list(cfg.clean), Path(out))


def jobs(args, folder: str) -> list[partial]:
    if args.fine_tunes:
        return [partial(fine_tune, args.run, task, f"{folder}-{task}")
                for task in ("captioner", "filter")]
    return [partial(pretrain, args.run, args.steps, seed, f"{folder}-{seed}")
            for seed in range(args.jobs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--fine-tunes", action="store_true",
                        help="round 0's captioner and filter fine-tunes instead of pre-trainings")
    args = parser.parse_args()
    if args.fine_tunes:
        args.jobs, args.steps = 2, None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    result = {"machine": f"{platform.processor() or platform.machine()}, {cores()} cores",
              "date": time.strftime("%Y-%m-%d"), "commit": commit,
              "jobs": "round-0 fine-tunes" if args.fine_tunes else args.jobs, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, parallel in (("one after another", 1), ("side by side", args.jobs)):
            calls = jobs(args, f"{tmp}/{parallel}")
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
