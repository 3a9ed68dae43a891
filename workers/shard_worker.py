"""The Ray actor that holds a captioner and a filter and processes whole shards.

torch and the models are imported inside the actor, never at import: the driver imports this
module to start actors and stays free of torch (it starts in about a second)."""

from __future__ import annotations

import os
import socket

import ray

from capfilt.shards.reader import ReaderOptions
from capfilt.step.stage_config import Placement, StageConfig
from capfilt.terminal import configure_logging


# Shards a worker holds at once: one running the models, the next read and its first batch
# decoded meanwhile (or the one before committing while the next runs the models).
SHARDS_IN_FLIGHT = 2


class ShardWorker:
    """Loads the models once in ``__init__``; each ``process`` call is one shard, committed.

    Up to ``SHARDS_IN_FLIGHT`` ``process`` calls run at once, taking turns at the models
    (``capfilt/step/shard_turns.py``), and one thread more lets ``rows`` answer meanwhile:
    the driver asks how far a long shard has come."""

    def __init__(self, config: StageConfig, placement: Placement = Placement(),
                 torch_threads: int | None = None):
        self.rows_done = (0, 0)  # (input rows written or rejected, rows in the shard)
        self.cannot_start: Exception | None = None
        try:
            self._load(config, placement, torch_threads)
        except Exception as exc:  # noqa: BLE001  (any reason the models do not load)
            # Kept for ``describe`` to raise: the driver hears the reason as a task error and
            # kills this actor, where an actor dying in its constructor prints Ray's dump of it
            # on the user's terminal after capfilt's one line.
            self.cannot_start = exc

    def _load(self, config: StageConfig, placement: Placement,
              torch_threads: int | None) -> None:
        import torch

        from capfilt.step.host_memory import keep_freed_memory
        from capfilt.step.shard_turns import ShardTurns
        from capfilt.step.stage import CapFiltStage

        # Before the models load: each batch then reuses the pages the last one freed.
        self.keeps_freed_memory = keep_freed_memory()
        if torch_threads:
            torch.set_num_threads(torch_threads)
        configure_logging("WARNING")  # worker logs reach the driver's terminal
        self.stage = CapFiltStage.from_config(config, placement)
        self.turns = ShardTurns()

    def describe(self) -> dict:
        """Where this worker runs: ready once this returns (models are loaded by then); raises
        why they could not be loaded."""
        if self.cannot_start is not None:
            raise self.cannot_start
        context = ray.get_runtime_context()
        return {"pid": os.getpid(), "host": socket.gethostname(), "node": context.get_node_id(),
                "keeps_freed_memory": self.keeps_freed_memory}

    def rows(self) -> tuple[int, int]:
        """(rows done, rows in the shard) of the shard running the models now, or of the last
        one."""
        return self.rows_done

    def process(self, index: int, input_path: str, round_dir: str, batch_size: int,
                reader: ReaderOptions, attempt: int = 1, write: tuple[str, ...] = (),
                repeats: dict | None = None) -> dict:
        """One shard, run as ``run_shard`` runs it, in turns with the other shard in flight;
        its result once committed. Raises ``ShardWithdrawn`` for a shard not written because
        the disk is full."""
        from capfilt.step.shard_runner import ShardRun

        node = ray.get_runtime_context().get_node_id()[:12]
        run = ShardRun(self.stage, index, input_path, round_dir, batch_size, reader, attempt,
                       worker=f"{node}/{os.getpid()}", write=write, repeats=repeats)
        return self.turns.run(run, self._count_rows).__dict__

    def _count_rows(self, done: int, total: int) -> None:
        self.rows_done = (done, total)


def start_workers(config: StageConfig, count: int, *, placement: Placement = Placement(),
                  gpus: float, cpus: float, torch_threads: int | None) -> list:
    """Start ``count`` actors running ``config`` as ``placement`` says; each asks Ray for
    ``gpus`` GPUs (one per actor on GPU machines) and ``cpus`` CPUs."""
    # SPREAD: on a cluster, workers go to different nodes before doubling up on one.
    actor = ray.remote(ShardWorker).options(
        num_gpus=gpus, num_cpus=cpus, max_restarts=0, scheduling_strategy="SPREAD",
        max_concurrency=SHARDS_IN_FLIGHT + 1,  # ``rows`` beside the shards in flight
    )
    return [actor.remote(config, placement, torch_threads) for _ in range(count)]
