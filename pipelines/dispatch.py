"""Hand shards to the round's workers, two in flight each (one running the models, the next
read and decoded meanwhile); a shard whose worker died runs elsewhere. The workers themselves
(how many, where, their start and replacement) are ``workers/worker_pool.py``'s."""

from __future__ import annotations

import errno
import logging
from collections import deque
from typing import Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

from capfilt.rounds.folder import no_space
from capfilt.shards.reader import ReaderOptions
from capfilt.step.shard_turns import ShardWithdrawn
from capfilt.step.stage_config import StageConfig
from manifests import ShardResult, ShardStatus
from workers.shard_worker import SHARDS_IN_FLIGHT
from workers.worker_pool import MAX_STARTS, WorkerPool, WorkerStartError, reason, size_pool

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # runs of one shard, on workers that died under it
# How often the driver asks running workers how far their shards have come.
ROWS_POLL_SECONDS = 2.0


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
    cpu_decode_processes: int = 0,
) -> list[ShardResult]:
    """Run every shard in ``todo`` (index, input path) on worker actors and return their
    ``ShardResult``s, one per shard, "done" or "failed".

    The pool (``workers.worker_pool``) holds one actor per GPU (else ``workers`` CPU actors,
    default 1, decoding in threads or ``cpu_decode_processes`` processes), each with
    ``config``'s models, holding up to ``SHARDS_IN_FLIGHT`` shards at once (``hand_out``) and
    writing them into ``round_dir``; a result comes back once its shard is committed. The
    shards a worker held when it died run again on a fresh one (``MAX_ATTEMPTS``), each alone.
    Raises ``WorkerStartError`` when the workers cannot load their models (or none is left
    mid-round) and ``DiskFullError`` once the disk is full.

    ``on_result`` hears of each finished shard once the freed worker has its next one, so a
    progress line drawn then shows what every worker is doing; ``on_worker(label, state)``
    hears each worker's state change (loading, shard NNNNN: the oldest it holds, which is
    usually the one running the models; idle, restarting, could not start);
    ``on_rows(label, done, total)``, every ``ROWS_POLL_SECONDS`` while no shard finishes, how
    many rows of the shard in its models each busy worker has written or rejected.
    ``find_repeats()`` gives, shard index -> {key: ``Mark``}, the rows each shard sets aside as
    images seen earlier in the round (``pipelines.duplicates``); it runs while the workers load
    their models, and before any shard starts."""
    if not todo:
        return []
    pool = WorkerPool(config, size_pool(ray.cluster_resources(), workers, len(todo),
                                        cpu_decode_processes), on_worker)
    repeats = find_repeats() if find_repeats else {}
    pool.wait_until_ready()
    queue = deque((index, path, 1) for index, path in todo)
    running: dict = {}  # ref -> (label, actor, index, path, attempt), in the order handed out
    full: list[OSError] = []  # shards that could not be written: the disk is full
    withdrawn = False  # a worker withdrew a shard before writing it: its disk is full
    results: list[ShardResult] = []
    unreported: list[ShardResult] = []
    while queue or running:
        if not full and not withdrawn:
            for label, (index, path, attempt) in hand_out(_held(pool, running), queue):
                actor = pool.ready[label]
                ref = actor.process.remote(index, path, round_dir, batch_size, reader, attempt,
                                           write, repeats.get(index))
                running[ref] = (label, actor, index, path, attempt)
        for label, actor in pool.ready.items():
            held = [index for _, a, index, *_ in running.values() if a is actor]
            on_worker(label, f"shard {held[0]:05d}" if held else "idle")
        for result in unreported:
            on_result(result)
        unreported.clear()
        if not running and not pool.starting:
            break
        ready, _ = ray.wait([*running, *pool.starting], num_returns=1, timeout=ROWS_POLL_SECONDS)
        if not ready:
            _ask_rows(_busy(pool, running), on_rows)
            continue
        ref = ready[0]
        if ref in pool.starting:
            pool.settle(ref)
            continue
        label, actor, index, path, attempt = running.pop(ref)
        try:
            result = ShardResult.from_dict(ray.get(ref))
        except RayActorError as exc:
            log.warning("worker %d died holding shard %05d (attempt %d): %s", label, index,
                        attempt, reason(exc))
            if pool.ready.get(label) is actor:  # the first of its shards to say so
                pool.replace(label)
            if attempt < MAX_ATTEMPTS:
                queue.append((index, path, attempt + 1))
                continue
            result = _failed(index, path, attempt, f"worker died {attempt} times: {reason(exc)}")
        except RayTaskError as exc:
            if isinstance(exc.cause, ShardWithdrawn):  # nothing written: as if not started
                queue.appendleft((index, path, attempt))
                withdrawn = True
                continue
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
    pool.shut_down()
    if full:
        committed = sum(r.status == ShardStatus.DONE for r in results)
        raise DiskFullError(round_dir, committed, len(full), len(queue)) from full[0]
    if queue:  # every worker is gone and none could be started in its place
        raise WorkerStartError(
            f"no worker left: replacements could not start {MAX_STARTS} times in a row "
            f"({reason(pool.failed_start)}); {len(results)} shards finished and committed, "
            f"{len(queue)} not run; run the same command again to finish the round")
    return results


def hand_out(held: dict[int, list[int]], queue: deque) -> list[tuple[int, tuple]]:
    """Which waiting shards go to which worker now: (label, shard) pairs, each shard taken from
    the front of ``queue`` ((index, path, attempt) each).

    ``held``: per ready worker, the attempts of the shards it holds. First every worker that
    holds none gets one, then each that holds one a second (``SHARDS_IN_FLIGHT``), read while
    the first runs the models. A shard run again after its worker died (attempt 2 or more)
    runs alone: it may be what killed the worker, and a shard beside it would be charged an
    attempt for each death.
    """
    given = []
    held = {label: list(attempts) for label, attempts in held.items()}
    for room in range(1, SHARDS_IN_FLIGHT + 1):
        for label, attempts in held.items():
            if not queue or len(attempts) >= room:
                continue
            if attempts and max(*attempts, queue[0][2]) > 1:
                continue
            shard = queue.popleft()
            attempts.append(shard[2])
            given.append((label, shard))
    return given


def _held(pool: WorkerPool, running: dict) -> dict[int, list[int]]:
    """Per ready worker, the attempts of the shards it holds (not those of a dead one it
    replaced, still on their way back)."""
    held = {label: [] for label in pool.ready}
    for label, actor, _, _, attempt in running.values():
        if pool.ready.get(label) is actor:
            held[label].append(attempt)
    return held


def _busy(pool: WorkerPool, running: dict) -> dict:
    """The ready workers holding a shard: label -> actor."""
    return {label: actor for label, actor, *_ in running.values()
            if pool.ready.get(label) is actor}


def _ask_rows(busy: dict, on_rows: Callable[[int, int, int], None]) -> None:
    """Tell ``on_rows`` how far each busy worker's shard in the models has come; a worker that
    does not answer at once is skipped (its death shows on its shards' own references)."""
    refs = {label: actor.rows.remote() for label, actor in busy.items()}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=1.0)
    for label, ref in refs.items():
        if ref in ready:
            try:
                done, total = ray.get(ref)
            except RayActorError:
                continue
            on_rows(label, done, total)


def _failed(index: int, path: str, attempt: int, error: str) -> ShardResult:
    return ShardResult(index=index, input=path, status=ShardStatus.FAILED, attempts=attempt,
                       error=error)
