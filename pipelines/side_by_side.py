"""Run independent CPU jobs (trainings, evaluations) side by side, each in its own process.

A small model's training step keeps two torch threads only partly busy: on 2 cores, two
150-step pre-trainings of the demo's model took 107 s one after another (2 threads) and 89 s
side by side (1 thread each; bench/results/side-by-side-2core.json). So a
bootstrap runs the trainings that do not depend on each other at once, the cores split
between them.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


def cores() -> int:
    """The cores this process may run on (a container's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_side_by_side(calls: list[Callable[[], T]], jobs: int) -> list[tuple[T, float]]:
    """Each call's result and its seconds, in order. With ``jobs`` > 1 and more than one call,
    up to ``jobs`` calls run at once in spawned processes, each with cores // running torch
    threads (at least one); otherwise, and inside such a process, one after another here.
    The calls and their results must pickle. A call that raises raises here, after the
    calls already running have finished."""
    running = min(jobs, len(calls))
    if running <= 1 or multiprocessing.parent_process() is not None:
        return [_timed(call) for call in calls]
    threads = max(1, cores() // running)
    with ProcessPoolExecutor(running, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start, initargs=(threads, _log_level())) as pool:
        return list(pool.map(_timed, calls))


def _timed(call: Callable[[], T]) -> tuple[T, float]:
    began = time.perf_counter()
    result = call()
    return result, round(time.perf_counter() - began, 2)


def _log_level() -> str:
    import logging

    levels = [h.level for h in logging.getLogger().handlers]
    return logging.getLevelName(min(levels)) if levels else "WARNING"


def _start(threads: int, log_level: str) -> None:
    import torch

    from capfilt.terminal import configure_logging

    torch.set_num_threads(threads)
    configure_logging(log_level)
