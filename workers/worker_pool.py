"""The round's worker actors: sized from the cluster, started, and replaced when they die.

Where the step runs is decided here, from what Ray reports: one actor per GPU, each decoding
images in processes fed by the node's cores; else CPU actors asking for fractional CPUs so
that Ray's own tasks keep a slot. Which shard runs where, and how often, is
``pipelines/dispatch.py``'s.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

from capfilt.step.stage_config import Placement, StageConfig
from workers.shard_worker import start_workers

log = logging.getLogger(__name__)

MAX_STARTS = 3  # replacements for one worker that die before their models are loaded

# Measured on a 16-core H100 node, BLIP-base at batch 1,024 (bench/README.md, one run each):
# in threads, 16 decoded 738 images/s inside a shard and slowed the model loop to 2.24 s a
# batch (1.46 s alone), 6 threads 1,234 images/s and 1.73 s; in processes, the shard ran at
# 597 images/s with 6 and 559 with 12 (492 with 6 threads, same code and lease).
MAX_GPU_DECODERS = 6


def gpu_decoders(cpus: float, gpus: int) -> int:
    """Decoding processes for a worker that has one of ``gpus`` GPUs on a node of ``cpus`` cores."""
    return max(2, min(MAX_GPU_DECODERS, int(cpus // max(1, gpus))))


@dataclass(frozen=True)
class PoolSize:
    """How many actors, what each asks Ray for, and where each runs the step."""

    count: int
    gpus_each: float
    cpus_each: float
    torch_threads: int | None  # None: torch's own choice (GPU workers)
    placement: Placement


def size_pool(resources: dict, workers: int | None, shards: int,
              cpu_decode_processes: int = 0) -> PoolSize:
    """The pool for ``shards`` shards on a cluster with ``resources`` (``ray.cluster_resources()``):
    one actor per GPU (at most ``workers``), else ``workers`` CPU actors (default 1), never more
    than there are shards, each CPU actor with the cores split among the workers asked for.
    CPU actors decode in threads, or in ``cpu_decode_processes`` processes; GPU actors always
    in processes, as many as the node's cores allow."""
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", os.cpu_count() or 1)
    if gpus:
        # The GPU waits on JPEG decoding unless the node's cores decode for it, in processes:
        # decode threads take the GIL from the model loop (capfilt/images/batch_decoding.py).
        return PoolSize(min(workers or gpus, shards), 1.0, 1.0, None,
                        Placement(device="cuda", decode_processes=gpu_decoders(cpus, gpus)))
    count = max(1, min(workers or 1, shards))
    # Torch's threads follow the workers asked for, not the shards left: a sum split over
    # other threads rounds otherwise, and a rerun of one lost shard must write what the first
    # run would have (an ITC score moved by 2e-8 on an AVX2 machine when it got both cores).
    threads = max(1, int(cpus) // max(1, workers or 1))
    # Fractional CPUs: actors must not take every CPU slot from Ray's own tasks.
    return PoolSize(count, 0.0, min(1.0, cpus / (2 * count)), threads,
                    Placement(device="cpu", decode_processes=cpu_decode_processes))


class WorkerStartError(RuntimeError):
    """Workers could not start (their models would not load, say): before the first shard,
    nothing was run; mid-round, no worker is left and the shards committed so far stay."""


class WorkerPool:
    """Actors labelled 0 to ``size.count - 1``, each holding ``config``'s models.

    ``ready`` maps the label of each worker whose models are loaded to its actor, busy or not
    (how many shards each holds is the dispatcher's). A worker that died is replaced under its
    label, and the replacement joins ``ready`` only once its models are loaded, so one that
    dies while starting (on a node that is going away, say) costs no shard an attempt.
    ``on_worker(label, state)`` hears "loading", "restarting" and "could not start".
    """

    def __init__(self, config: StageConfig, size: PoolSize,
                 on_worker: Callable[[int, str], None] = lambda label, state: None):
        self.config, self.size, self.on_worker = config, size, on_worker
        self.ready: dict = {}  # label -> actor
        self.starting: dict = {}  # describe() refs of replacements still loading
        self.failed_start: Exception | None = None  # why the last replacement gave up
        self._first = self._start(size.count)
        for label in range(size.count):
            on_worker(label, "loading")

    def _start(self, count: int) -> list:
        s = self.size
        return start_workers(self.config, count, placement=s.placement, gpus=s.gpus_each,
                             cpus=s.cpus_each, torch_threads=s.torch_threads)

    def wait_until_ready(self) -> None:
        """Block until every first worker has loaded its models; if one cannot, stop them all
        and raise ``WorkerStartError`` with its reason in one line."""
        try:
            ray.get([actor.describe.remote() for actor in self._first])
        except (RayActorError, RayTaskError) as exc:  # died, or its models would not load
            for actor in self._first:
                ray.kill(actor)
            raise WorkerStartError(f"a worker could not start: {reason(exc)}") from exc
        self.ready.update(enumerate(self._first))

    def replace(self, label: int, tries: int = 1) -> None:
        """Start a new worker under ``label``, in place of one that died."""
        self.ready.pop(label, None)
        self.on_worker(label, "restarting")
        actor = self._start(1)[0]
        self.starting[actor.describe.remote()] = (label, actor, tries)

    def settle(self, ref) -> None:
        """A replacement's ``describe`` answered (``ref`` in ``starting``): it is ready now; or
        it died or its models would not load: it is tried again, ``MAX_STARTS`` times in a
        row, and then the round goes on without it."""
        label, actor, tries = self.starting.pop(ref)
        try:
            ray.get(ref)
            self.ready[label] = actor
        except (RayActorError, RayTaskError) as exc:
            ray.kill(actor)
            log.warning("worker %d could not start (try %d): %s", label, tries, reason(exc))
            if tries < MAX_STARTS:
                self.replace(label, tries + 1)
            else:
                self.failed_start = exc
                self.on_worker(label, "could not start")
                log.error("worker %d could not start %d times in a row; going on without it",
                          label, tries)

    def shut_down(self) -> None:
        """Stop the ready workers and the replacements still loading."""
        for actor in [*self.ready.values(), *(a for _, a, _ in self.starting.values())]:
            ray.kill(actor)


ANSI = re.compile(r"\x1b\[[0-9;]*m")
RAISED = re.compile(r"^(?:[\w.]+\.)?(\w+): (.+)$")


def reason(exc: Exception | None) -> str:
    """The error an actor died of or raised, in one line: Ray's message carries the actor's
    whole traceback, whose last line names the exception (``ModelSourceError: ...``)."""
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        return f"{type(exc.cause).__name__}: {exc.cause}"
    lines = [line.strip() for line in ANSI.sub("", str(exc)).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    raised = RAISED.match(lines[-1])
    return f"{raised[1]}: {raised[2]}" if raised else lines[-1]
