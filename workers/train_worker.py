"""Ray Train: the same training loop on N workers with DDP (gloo on CPUs, NCCL on GPUs).

Every worker builds the task (same seed, same weights; DDP also broadcasts rank 0's) and
streams its own part of the data (``capfilt/train/run.py``): no process reads all of it. Rank
0 writes the checkpoints, with every worker's place in the data, into the job's folder, which
resumes a killed run like the one-process loop; a worker lost mid-run makes Ray Train start
the group again, which resumes the same way.
With BLIP's momentum encoders, each worker's ITC compares its rows with its own momentum
features and the queue that every worker feeds; without them, ITC spans the global batch
(features gathered across workers). ITM's hard negatives come from each worker's own share, as
in BLIP's pre-training, or from every worker's with ``negative_all_rank`` (BLIP's retrieval
fine-tune); see ``capfilt/train/objectives.py``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from capfilt.terminal import configure_logging

log = logging.getLogger(__name__)
MAX_FAILURES = 3


def _loop_per_worker(settings: dict) -> None:
    from capfilt.train.progress import TrainProgress, job_label
    from capfilt.train.run import run_rank

    configure_logging("INFO")
    job = settings["job"]
    context = ray.train.get_context()
    if not job.device.startswith("cuda"):
        # Workers on one machine share its cores; more threads than cores only thrash.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // context.get_local_world_size()))
    run_rank(job.rank_job(), rank=context.get_world_rank(), world=context.get_world_size(),
             device="cuda" if job.device.startswith("cuda") else "cpu",
             wrap=_ddp,
             on_log=TrainProgress(job_label(job.output), job.config.steps))


def _ddp(task: torch.nn.Module) -> torch.nn.Module:
    """DDP through Ray Train. Buffers are synced once at the start, not at every forward: the
    ITC queues (2 x 57,600 features) are the same on every worker by construction (same seeded
    start, the same gathered features enqueued), so broadcasting them each step would only
    move 118 MB."""
    return ray.train.torch.prepare_model(
        task, parallel_strategy_kwargs={"forward_sync_buffers": False})


class Trainer(TorchTrainer):
    """Ray Train's TorchTrainer, less its placement-group cleaner where Ray has no dashboard
    (``ray`` installed without ``[default]``, as capfilt installs it). The cleaner asks the
    dashboard's state API whether the controller still lives; with no answer, Ray waits 12 s
    for it at the end of every run and logs a traceback. It acts only when a controller dies
    without cleaning up, and then it could not ask either.

    Ray 2.60 offers no public switch for it: ``TorchTrainer`` adds the cleaner unconditionally
    in ``_create_default_callbacks`` (its metrics and NCCL callbacks have environment switches,
    this one none), so that method is overridden here and the cleaner filtered out by name; any
    other Ray keeps its callbacks if the name is not found.
    """

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if not dashboard_missing():
            return callbacks
        return [c for c in callbacks if type(c).__name__ != "PlacementGroupCleanerCallback"]


def dashboard_missing() -> bool:
    """Whether this Ray install lacks the dashboard's packages (then so does its state API):
    the import Ray itself tries before it starts the dashboard."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError:
        return True
    return False


def run_ray_train(job) -> None:
    """Train ``job`` on ``job.workers`` Ray Train workers (Ray already started); returns when
    all are done."""
    use_gpu = job.device.startswith("cuda")
    trainer = Trainer(
        _loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=job.workers, use_gpu=use_gpu,
            # Fractional CPUs: whole ones would starve the 2-core machines this also runs on.
            resources_per_worker=None if use_gpu else {"CPU": 0.5},
        ),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if use_gpu else "gloo"),
        # A lost worker (a process killed, a node gone): Ray Train starts the group again and
        # every worker resumes from the last checkpoint in the job's folder.
        run_config=RunConfig(name="capfilt-train",
                             storage_path=str((Path(job.output) / "ray").resolve()),
                             failure_config=FailureConfig(max_failures=MAX_FAILURES)),
    )
    trainer.fit()
