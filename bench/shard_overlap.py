"""What the time around each shard costs: a round over many small shards (real Ray, one worker)
against the bare model loop on the same images, already decoded, at the same batch size.

With the tests' tiny models (``capfilt/models/tiny.py``) the model loop is cheap, so what a
worker does outside it shows: reading the shard, decoding its first batch, committing it, and
the driver's round trip between shards. Shards hold ``cpu_pipeline.py``'s 320x240 photo-like
JPEGs.

Each repeat runs each code tree named (``--baseline REV`` adds the code at git revision REV
before this checkout's) in a fresh process with a local Ray of its own and that tree first on
``PYTHONPATH``, so its actors import that tree (checked, and recorded). There, back to back: the
bare loop (``CapFiltStage.compute`` on batches decoded beforehand), the round's shards through
``pipelines.dispatch`` (one worker), the bare loop again. The bare loop runs in an actor placed
and set up as the round's worker is (its CPUs, torch threads, kept freed memory): in this
benchmark's own process it ran up to 80 times slower than in an actor while other jobs shared
the cores. Every actor runs at nice 0 (Ray's default is 15, which hands the cores to any other
job on a shared machine).

A round's images/s is over the span from the first shard handed out (the worker has loaded its
models) to the last result; its efficiency is that rate over the mean of its two bare loops; the
models' idle time is the span less the shards' time in the models (one worker runs one batch at
a time). Medians over the repeats are reported, and ratios are taken within a repeat.

    python bench/shard_overlap.py --baseline 100d90f --out bench/results/shard-overlap.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pipeline_child(code: str, models: dict, shards: list[str], out: str, batch: int,
                   cpus: int) -> dict:
    """The bare loop, the round's shards through ``dispatch`` (one worker), the bare loop
    again, in this (fresh) process and its own Ray of ``cpus`` CPUs."""
    import logging

    import ray

    import capfilt
    from capfilt.shards.reader import ReaderOptions
    from capfilt.step.stage_config import StageConfig
    from pipelines.dispatch import dispatch

    ray.init(address="local", num_cpus=cpus, include_dashboard=False,
             logging_level=logging.WARNING, configure_logging=False)
    where = ray.get(ray.remote(num_cpus=0)(_capfilt_file).remote())
    if not (capfilt.__file__.startswith(code) and where.startswith(code)):
        raise RuntimeError(f"expected the code under {code}; driver {capfilt.__file__}, "
                           f"worker {where}")
    config = StageConfig(captioner=models["captioner"], filter=models["filter"])
    times: dict = {"first_shard": None, "results": []}
    peak = {"worker_vmhwm_mib": 0.0}

    def on_worker(label: int, state: str) -> None:
        if state.startswith("shard") and times["first_shard"] is None:
            times["first_shard"] = time.perf_counter()

    def on_result(result) -> None:
        times["results"].append(time.perf_counter())
        peak["worker_vmhwm_mib"] = max(peak["worker_vmhwm_mib"], worker_peak_mib())

    bare_before = bare_in_actor(config, shards, batch)
    started = time.perf_counter()
    results = dispatch(config, list(enumerate(shards)), out, batch, ReaderOptions(), 1,
                       on_result, on_worker=on_worker)
    wall = time.perf_counter() - started
    bare_after = bare_in_actor(config, shards, batch)
    ray.shutdown()
    if any(r.status != "done" for r in results):
        raise RuntimeError(f"shards failed: {[r.error for r in results if r.error]}")
    span = max(times["results"]) - times["first_shard"]
    images = sum(r.rows_out for r in results)
    model = sum(r.model_seconds for r in results)
    bare = (bare_before + bare_after) / 2
    return {"code": code, "worker_imports": where, "images": images,
            "bare_images_per_s_before_and_after": [bare_before, bare_after],
            "span_seconds": span, "wall_seconds": wall, "images_per_s": images / span,
            "pipeline_efficiency": images / span / bare, "model_seconds": model,
            "models_idle_seconds_per_shard": (span - model) / len(results),
            "shard_seconds": sum(r.seconds for r in results), **peak}


class BareLoop:
    """The stage's model half over every batch of the shards, decoded beforehand; set up as
    ``workers/shard_worker.py`` sets up the round's worker."""

    def __init__(self, config, shards: list[str], batch: int, torch_threads: int | None):
        import torch

        from capfilt.shards.reader import read_shard
        from capfilt.step.host_memory import keep_freed_memory
        from capfilt.step.stage import CapFiltStage

        keep_freed_memory()
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.stage = CapFiltStage.from_config(config)
        self.batches = [self.stage.prepare(table.slice(start, batch))
                        for table in (read_shard(s).table for s in shards)
                        for start in range(0, table.num_rows, batch)]

    def images_per_s(self) -> float:
        self.stage.compute(self.batches[0])  # warm-up
        started = time.perf_counter()
        images = sum(self.stage.compute(b)[0].num_rows for b in self.batches)
        return images / (time.perf_counter() - started)


def bare_in_actor(config, shards: list[str], batch: int) -> float:
    """The bare loop's images/s in an actor asking Ray for what the round's one worker asks."""
    import ray

    from workers.worker_pool import size_pool

    size = size_pool(ray.cluster_resources(), 1, len(shards))
    actor = ray.remote(BareLoop).options(num_cpus=size.cpus_each).remote(
        config, shards, batch, size.torch_threads)
    try:
        return ray.get(actor.images_per_s.remote())
    finally:
        ray.kill(actor)


def _capfilt_file() -> str:
    import capfilt

    return capfilt.__file__


def worker_peak_mib() -> float:
    """The largest peak resident memory (``VmHWM``) of this machine's ``ray::ShardWorker``
    processes: in a child with its own Ray, the one worker."""
    peak = 0.0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(
                    b"ray::ShardWorker"):
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024)
        except OSError:
            continue
    return peak


def code_tree(revision: str, into: Path) -> str:
    """The repository's files at ``revision``, extracted into ``into``."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return str(into)


def run_pipeline(code: str, models: dict, shards: list[str], out: Path, batch: int,
                 cpus: int) -> dict:
    env = {**os.environ, "PYTHONPATH": code, "RAY_ADDRESS": "", "RAY_worker_niceness": "0"}
    child = subprocess.run(
        [sys.executable, __file__, "--pipeline-child",
         json.dumps([code, models, shards, str(out), batch, cpus])],
        capture_output=True, text=True, env=env, cwd=code)
    if child.returncode != 0:
        raise RuntimeError(f"pipeline child failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--rows", type=int, default=64, help="rows per shard")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=1,
                        help="CPUs Ray is told of: the worker's torch threads (see above)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="also run the pipeline as the code at git revision REV has it")
    parser.add_argument("--out", default=None, help="write the figures as JSON here too")
    parser.add_argument("--pipeline-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pipeline_child:
        print(json.dumps(pipeline_child(*json.loads(args.pipeline_child))))
        return
    sys.path.insert(0, str(ROOT))
    from capfilt.models.tiny import write_tiny_models
    from cpu_pipeline import write_shards

    work = Path(tempfile.mkdtemp(prefix="capfilt-overlap-"))
    models = {role: str(path) for role, path in write_tiny_models(work / "models").items()}
    shards = write_shards(work / "shards", args.shards, args.rows)
    trees = {}
    if args.baseline:
        trees["baseline"] = code_tree(args.baseline, work / "baseline")
    trees["this_checkout"] = str(ROOT)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    figures = {"date": time.strftime("%Y-%m-%d"), "commit": head,
               "baseline": args.baseline and subprocess.run(
                   ["git", "-C", str(ROOT), "rev-parse", args.baseline], capture_output=True,
                   text=True, check=True).stdout.strip(),
               "machine": f"{cpu_model()}, {os.cpu_count()} cores",
               "models": "tiny (capfilt/models/tiny.py, 32 px)",
               "shards": args.shards, "rows_per_shard": args.rows,
               "batch_size": args.batch_size, "ray_cpus": args.cpus,
               "repeats": args.repeats, "runs": []}
    for repeat in range(args.repeats):
        run = {"load_average_before": os.getloadavg()[0]}
        for name, code in trees.items():
            run[name] = run_pipeline(code, models, shards, work / f"round-{repeat}-{name}",
                                     args.batch_size, args.cpus)
        run["load_average_after"] = os.getloadavg()[0]
        if "baseline" in trees:
            run["speedup_over_baseline"] = (run["this_checkout"]["images_per_s"]
                                            / run["baseline"]["images_per_s"])
        figures["runs"].append(run)
        print(f"repeat {repeat}: " + "; ".join(
            f"{name} bare {statistics.mean(run[name]['bare_images_per_s_before_and_after']):.1f}"
            f" images/s, round {run[name]['images_per_s']:.1f} images/s, efficiency "
            f"{run[name]['pipeline_efficiency']:.3f}, models idle "
            f"{run[name]['models_idle_seconds_per_shard']:.3f} s a shard" for name in trees),
            flush=True)
    runs = figures["runs"]
    for name in trees:
        figures[f"median_{name}_bare_images_per_s"] = statistics.median(
            statistics.mean(r[name]["bare_images_per_s_before_and_after"]) for r in runs)
        for key in ("images_per_s", "pipeline_efficiency", "models_idle_seconds_per_shard",
                    "worker_vmhwm_mib"):
            figures[f"median_{name}_{key}"] = statistics.median(r[name][key] for r in runs)
    if "baseline" in trees:
        figures["median_speedup_over_baseline"] = statistics.median(
            r["speedup_over_baseline"] for r in runs)
    for key, value in figures.items():
        if key != "runs":
            print(f"{key}: {value}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
