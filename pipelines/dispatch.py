"""Hand shards to worker actors, one at a time each; a shard whose worker died runs elsewhere."""

from __future__ import annotations

import errno
import logging
import os
import re
from collections import deque
from dataclasses import replace
from typing import Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

from capfilt.shards.reader import ReaderOptions
from capfilt.step.stage_config import StageConfig, gpu_decoders
from manifests import ShardResult, ShardStatus
from workers.shard_worker import start_workers

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # runs of one shard, on workers that died under it
MAX_STARTS = 3  # replacements for one worker that die before their models are loaded
# How often the driver asks running workers how far their shards have come.
ROWS_POLL_SECONDS = 2.0


def no_space(error: BaseException | None) -> bool:
    """Whether ``error`` is a full disk (pyarrow's writers raise it without an errno)."""
    return isinstance(error, OSError) and (
        error.errno == errno.ENOSPC or "No space left on device" in str(error))


class DiskFullError(OSError):
    """The round's disk filled up: shards failed writing and no further shard was started;
    the committed ones stay, and the same command finishes the round once there is room."""

    def __init__(self, folder: str, committed: int, failed: int, not_started: int):
        super().__init__(
            errno.ENOSPC,
            f"no space left on device in {folder}: {committed} shards committed in this run, "
            f"{failed} failed writing, {not_started} not started; free some space and run the "
            "same command again to finish the round", folder)


def dispatch(
    config: StageConfig,
    todo: list[tuple[int, str]],
    round_dir: str,
    batch_size: int,
    reader: ReaderOptions,
    workers: int | None,
    on_result: Callable[[ShardResult], None],
    write: tuple[str, ...] = (),
    on_worker: Callable[[int, str], None] = lambda label, state: None,
    on_rows: Callable[[int, int, int], None] = lambda label, done, total: None,
    find_repeats: Callable[[], dict[int, dict]] | None = None,
) -> list[ShardResult]:
    """Run every shard in ``todo`` (index, input path) on worker actors and return their
    ``ShardResult``s, one per shard, "done" or "failed".

    One actor per GPU (else ``workers`` CPU actors, default 1), each holding ``config``'s models
    and running one shard at a time into ``round_dir``; a shard whose worker died runs again on
    a fresh one (``MAX_ATTEMPTS``). Raises ``WorkerStartError`` when the workers cannot load
    their models (or none is left mid-round) and ``DiskFullError`` once the disk is full.

    ``on_result`` hears of each finished shard once the freed worker has its next one, so a
    progress line drawn then shows what every worker is doing; ``on_worker(label, state)``
    hears each worker's state change (loading, shard NNNNN, idle, restarting, could not
    start); ``on_rows(label, done, total)``, every ``ROWS_POLL_SECONDS`` while no shard
    finishes, how many of its shard's rows each busy worker has written or rejected.
    ``find_repeats()`` gives, shard index -> {key: ``Mark``}, the rows each shard sets aside as
    images seen earlier in the round (``pipelines.duplicates``); it runs while the workers load
    their models, and before any shard starts."""
    if not todo:
        return []
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", os.cpu_count() or 1)
    if gpus:
        count = min(workers or gpus, len(todo))
        gpus_each, cpus_each, threads, device = 1.0, 1.0, None, "cuda"
        # The GPU waits on JPEG decoding unless the node's cores decode for it, in processes:
        # decode threads take the GIL from the model loop (capfilt/images/batch_decoding.py).
        decode_threads, decode_processes = config.decode_threads, gpu_decoders(cpus, gpus)
    else:
        count = max(1, min(workers or 1, len(todo)))
        gpus_each, device = 0.0, "cpu"
        # Fractional CPUs: actors must not take every CPU slot from Ray's own tasks.
        cpus_each = min(1.0, cpus / (2 * count))
        threads = max(1, int(cpus) // count)
        decode_threads, decode_processes = config.decode_threads, config.decode_processes
    config = replace(config, device=device, decode_threads=decode_threads,
                     decode_processes=decode_processes)
    pool = start_workers(config, count, gpus=gpus_each, cpus=cpus_each, torch_threads=threads)
    for label in range(count):
        on_worker(label, "loading")
    repeats = find_repeats() if find_repeats else {}
    wait_until_ready(pool)

    def fresh_worker(label: int, tries: int) -> None:
        """Start a replacement; it gets shards once ``describe`` answers (its models loaded),
        so one that dies while starting (on a node that is going away, say) costs no shard an
        attempt."""
        on_worker(label, "restarting")
        actor = start_workers(config, 1, gpus=gpus_each, cpus=cpus_each, torch_threads=threads)[0]
        starting[actor.describe.remote()] = (label, actor, tries)

    queue = deque((index, path, 1) for index, path in todo)
    idle = deque(enumerate(pool))
    running: dict = {}
    starting: dict = {}  # describe() refs of replacements still loading
    failed_start: Exception | None = None
    full: list[OSError] = []  # shards that could not be written: the disk is full
    results: list[ShardResult] = []
    unreported: list[ShardResult] = []
    while queue or running:
        while queue and idle and not full:
            label, actor = idle.popleft()
            index, path, attempt = queue.popleft()
            ref = actor.process.remote(index, path, round_dir, batch_size, reader, attempt,
                                       write, repeats.get(index))
            running[ref] = (label, actor, index, path, attempt)
            on_worker(label, f"shard {index:05d}")
        for label, _ in idle:
            on_worker(label, "idle")
        for result in unreported:
            on_result(result)
        unreported.clear()
        if not running and not starting:
            break
        ready, _ = ray.wait([*running, *starting], num_returns=1, timeout=ROWS_POLL_SECONDS)
        if not ready:
            _ask_rows(running.values(), on_rows)
            continue
        ref = ready[0]
        if ref in starting:
            label, actor, tries = starting.pop(ref)
            try:
                ray.get(ref)
                idle.append((label, actor))
            except (RayActorError, RayTaskError) as exc:  # died, or its models would not load
                ray.kill(actor)
                log.warning("worker %d could not start (try %d): %s", label, tries, reason(exc))
                if tries < MAX_STARTS:
                    fresh_worker(label, tries + 1)
                else:
                    failed_start = exc
                    on_worker(label, "could not start")
                    log.error("worker %d could not start %d times in a row; going on without "
                              "it", label, tries)
            continue
        label, actor, index, path, attempt = running.pop(ref)
        try:
            result = ShardResult.from_dict(ray.get(ref))
            idle.append((label, actor))
        except RayActorError as exc:
            log.warning("worker %d died on shard %05d (attempt %d): %s", label, index, attempt,
                        reason(exc))
            fresh_worker(label, 1)
            if attempt < MAX_ATTEMPTS:
                queue.append((index, path, attempt + 1))
                continue
            result = _failed(index, path, attempt, f"worker died {attempt} times: {reason(exc)}")
        except RayTaskError as exc:
            idle.append((label, actor))
            result = _failed(index, path, attempt, f"{type(exc.cause).__name__}: {exc.cause}")
            if no_space(exc.cause):
                full.append(exc.cause)
                log.error("shard %05d: no space left on device in %s; no further shard is "
                          "started", index, round_dir)
            else:
                log.error("shard %05d raised: %s", index, exc)
        results.append(result)
        unreported.append(result)
    for result in unreported:
        on_result(result)
    for actor in [actor for _, actor in idle] + [actor for _, actor, _ in starting.values()]:
        ray.kill(actor)
    if full:
        committed = sum(r.status == ShardStatus.DONE for r in results)
        raise DiskFullError(round_dir, committed, len(full), len(queue)) from full[0]
    if queue:  # every worker is gone and none could be started in its place
        raise WorkerStartError(
            f"no worker left: replacements could not start {MAX_STARTS} times in a row "
            f"({reason(failed_start)}); {len(results)} shards finished and committed, "
            f"{len(queue)} not run; run the same command again to finish the round")
    return results


def _ask_rows(running, on_rows: Callable[[int, int, int], None]) -> None:
    """Tell ``on_rows`` how far each running shard has come; a worker that does not answer
    at once is skipped (its death shows on its shard's own reference)."""
    busy = [(label, actor) for label, actor, *_ in running]
    refs = [actor.rows.remote() for _, actor in busy]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=1.0)
    for (label, _), ref in zip(busy, refs):
        if ref in ready:
            try:
                done, total = ray.get(ref)
            except RayActorError:
                continue
            on_rows(label, done, total)


class WorkerStartError(RuntimeError):
    """Workers could not start (their models would not load, say): before the first shard,
    nothing was run; mid-round, no worker is left and the shards committed so far stay."""


def wait_until_ready(pool: list) -> None:
    """Block until every worker has loaded its models; fail once, clearly, if one cannot."""
    try:
        ray.get([actor.describe.remote() for actor in pool])
    except (RayActorError, RayTaskError) as exc:  # died, or its models would not load
        for actor in pool:
            ray.kill(actor)
        raise WorkerStartError(f"a worker could not start: {reason(exc)}") from exc


ANSI = re.compile(r"\x1b\[[0-9;]*m")
RAISED = re.compile(r"^(?:[\w.]+\.)?(\w+): (.+)$")


def reason(exc: Exception) -> str:
    """The error an actor died of or raised, in one line: Ray's message carries the actor's
    whole traceback, whose last line names the exception (``ModelSourceError: ...``)."""
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        return f"{type(exc.cause).__name__}: {exc.cause}"
    lines = [line.strip() for line in ANSI.sub("", str(exc)).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    raised = RAISED.match(lines[-1])
    return f"{raised[1]}: {raised[2]}" if raised else lines[-1]


def _failed(index: int, path: str, attempt: int, error: str) -> ShardResult:
    return ShardResult(index=index, input=path, status=ShardStatus.FAILED, attempts=attempt,
                       error=error)
