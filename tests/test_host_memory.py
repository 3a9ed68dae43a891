"""Workers keep freed host memory for the next batch (capfilt/step/host_memory.py).

Whether glibc hands a batch's memory back to the kernel depends on where the process's other
small blocks happen to lie, so on the process's whole history, down to Python's hash seed: the
workload below faults 32 of its 72 MiB in again every batch under some seeds and not others,
and its 40 MiB block under every seed. Each seed runs in a fresh process: batches first as
glibc leaves them, then after ``keep_freed_memory``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ray

from capfilt.step.host_memory import keep_freed_memory
from capfilt.step.stage_config import StageConfig
from workers.shard_worker import start_workers

ROOT = Path(__file__).resolve().parent.parent
PAGES = 72 * (1 << 20) // os.sysconf("SC_PAGE_SIZE")  # the batch's working set

BATCHES = """
import json, resource, torch
from capfilt.step.host_memory import keep_freed_memory

def batch():
    # A block larger than the rest, then a stack of activations alive together, and one
    # above 32 MiB (glibc maps those whatever its threshold), all freed.
    big = torch.empty(1 << 18)
    del big
    layers = [torch.ones(1 << 17) for _ in range(64)]
    huge = torch.ones(10 << 20)
    del layers, huge

def faults_per_batch(warm):
    for _ in range(warm):
        batch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        batch()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4

torch.set_num_threads(1)
batch()
default = faults_per_batch(1)
kept = keep_freed_memory()
# The heap grows over the first batches until the 40 MiB block fits in what was freed.
print(json.dumps({"default": default, "set": kept, "kept": faults_per_batch(4)}))
"""


def run_batches(seed: int) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    env.update(PYTHONHASHSEED=str(seed), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", BATCHES], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_kept_memory_stops_batches_faulting_their_pages_in_again():
    runs = [run_batches(seed) for seed in range(4)]
    assert all(run["set"] for run in runs)
    # Some process histories make glibc hand the whole working set back every batch...
    assert max(run["default"] for run in runs) > PAGES / 2, runs
    # ...after keep_freed_memory none does.
    assert all(run["kept"] < PAGES / 20 for run in runs), runs


def test_an_allocator_the_user_chose_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert keep_freed_memory() is False


def test_a_shard_worker_keeps_its_freed_memory(ray_local, tiny_models):
    config = StageConfig(captioner=str(tiny_models["captioner"]), filter=str(tiny_models["filter"]))
    worker = start_workers(config, 1, gpus=0, cpus=0.5, torch_threads=1)[0]
    try:
        assert ray.get(worker.describe.remote())["keeps_freed_memory"] is True
    finally:
        ray.kill(worker)
