"""One input shard through the CapFilt step to its committed output: the unit of work, in
three steps (read and first batch, models, commit) that a worker can overlap across shards."""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from capfilt.images.duplicate_index import EXACT, Mark
from capfilt.rounds.folder import commit_shard, rejects_path, shard_path, tar_path
from capfilt.rounds.webdataset_view import webdataset_tar
from capfilt.shards.reader import ReaderOptions, ShardReadError, read_shard
from capfilt.step.stage import (
    OUTPUT_SCHEMA,
    REJECT_SCHEMA,
    CapFiltStage,
    Prepared,
    reject_row,
)
from manifests import ShardResult, ShardStatus

log = logging.getLogger(__name__)


def run_shard(
    stage: CapFiltStage,
    index: int,
    input_path: str,
    round_dir: str,
    batch_size: int,
    reader: ReaderOptions = ReaderOptions(),
    attempt: int = 1,
    worker: str | None = None,
    write: tuple[str, ...] = (),
    on_rows: Callable[[int, int], None] = lambda done, total: None,
    repeats: dict[str, Mark] | None = None,
) -> ShardResult:
    """Process a whole shard and commit it; a shard that cannot be read comes back failed.

    Reads ``input_path`` (bounded: regular files, their size), runs ``stage`` over it in
    batches of ``batch_size`` (decoding the next batch while the models run) and commits
    ``ROUND/shards``, ``rejects`` and, last, ``stats/NNNNN.json`` under ``round_dir``. Returns
    the shard's ``ShardResult``: "done" with its counts (every input row in the output or the
    rejects), or "failed" with the reason when the shard cannot be read.

    ``write`` names extra views to write beside the parquet: ``("webdataset",)``.
    ``on_rows(done, total)`` hears after each batch how many of the shard's input rows are
    written or rejected (a shard of 100,000 rows runs for a while).
    ``repeats`` (key -> ``Mark``): rows whose image the round has seen earlier
    (``pipelines.duplicates``); they are rejected as ``duplicate_image`` or
    ``near_duplicate_image``, naming the first, and never reach the models.

    The three steps one after another; a worker overlaps them with other shards' through
    ``ShardRun`` (``capfilt/step/shard_turns.py``).
    """
    run = ShardRun(stage, index, input_path, round_dir, batch_size, reader, attempt, worker,
                   write, repeats)
    failed = run.open()
    if failed is not None:
        return failed
    run.score(on_rows)
    return run.commit()


class ShardRun:
    """One shard's way to its commit in three steps, so that a worker can overlap them with
    other shards': ``open`` reads it and decodes its first batch, ``score`` runs the models
    over it, ``commit`` writes it. Each is called once, in that order (``run_shard``'s
    arguments).

    ``seconds`` counts the shard's own work (as ``ShardResult.seconds`` records it): time spent
    waiting for another shard to leave the models is not in it.
    """

    def __init__(self, stage: CapFiltStage, index: int, input_path: str, round_dir: str,
                 batch_size: int, reader: ReaderOptions = ReaderOptions(), attempt: int = 1,
                 worker: str | None = None, write: tuple[str, ...] = (),
                 repeats: dict[str, Mark] | None = None):
        self.stage, self.index, self.input_path = stage, index, input_path
        self.round_dir, self.batch_size, self.reader = round_dir, batch_size, reader
        self.attempt, self.worker, self.write, self.repeats = attempt, worker, write, repeats
        self.seconds = 0.0
        self.model_seconds = 0.0

    def open(self) -> ShardResult | None:
        """Read the shard, set aside repeated keys and images, decode the first batch.
        Returns the "failed" result when the shard cannot be read, else None."""
        started = time.perf_counter()
        try:
            shard = read_shard(self.input_path, self.reader)
        except ShardReadError as exc:
            log.error("shard %05d failed: %s", self.index, exc)
            return ShardResult(index=self.index, input=self.input_path,
                               status=ShardStatus.FAILED, attempts=self.attempt,
                               worker=self.worker, error=str(exc))
        for warning in shard.warnings:
            log.warning("%s: %s", self.input_path, warning)
        # Only the counts and fingerprint of the whole input are kept: the table the models
        # read is a copy, and a shard waiting its turn should hold its rows once.
        self.rows_in, self.input_sha256, self.input_bytes = (
            shard.table.num_rows, shard.sha256, shard.nbytes)
        table, duplicates = split_duplicate_keys(shard.table)
        self.table, seen = split_repeated_images(table, self.repeats or {})
        del shard, table
        self.rejects = [duplicates, seen]
        self.first = (self.stage.prepare(self.table.slice(0, self.batch_size))
                      if self.table.num_rows else None)
        self.seconds += time.perf_counter() - started
        return None

    def score(self, on_rows: Callable[[int, int], None] = lambda done, total: None) -> None:
        """Run the models over every batch, decoding the next one while they run;
        ``on_rows(done, total)`` hears how far the shard has come, first before any batch."""
        started = time.perf_counter()
        spent = {"model": 0.0}
        outputs = []
        done = sum(r.num_rows for r in self.rejects)
        on_rows(done, self.rows_in)
        for rows, rejected in overlapped(self.stage, self.table, self.batch_size, spent,
                                         self.first):
            outputs.append(rows)
            self.rejects.append(rejected)
            done += rows.num_rows + rejected.num_rows
            on_rows(done, self.rows_in)
        self.first = self.table = None
        self.rows = pa.concat_tables(outputs) if outputs else OUTPUT_SCHEMA.empty_table()
        self.rejected = pa.concat_tables(self.rejects)
        self.rejects = []
        if self.rows.num_rows + self.rejected.num_rows != self.rows_in:
            raise RuntimeError(f"shard {self.index}: {self.rows_in} rows in, but only "
                               f"{self.rows.num_rows + self.rejected.num_rows} written or "
                               "rejected")
        self.model_seconds = spent["model"]
        self.seconds += time.perf_counter() - started

    def commit(self) -> ShardResult:
        """Write the shard's files, its stats marker last, and return its "done" result."""
        started = time.perf_counter()
        rows, rejected, round_dir = self.rows, self.rejected, self.round_dir
        result = ShardResult(
            index=self.index,
            input=self.input_path,
            status=ShardStatus.DONE,
            output=shard_path(round_dir, self.index),
            rejects=rejects_path(round_dir, self.index),
            rows_in=self.rows_in,
            rows_out=rows.num_rows,
            rows_rejected=rejected.num_rows,
            input_sha256=self.input_sha256,
            input_bytes=self.input_bytes,
            attempts=self.attempt,
            worker=self.worker,
            **shard_counts(rows, rejected),
        )
        tar = None
        if "webdataset" in self.write:
            tar, result.webdataset_samples = webdataset_tar(rows)
            result.webdataset = tar_path(round_dir, self.index)
        # The writes are not in it: the stats they end with record it.
        result.seconds = round(self.seconds + time.perf_counter() - started, 3)
        result.model_seconds = round(self.model_seconds, 3)
        commit_shard(round_dir, result, rows, rejected, tar)
        self.rows = self.rejected = None
        return result


def overlapped(stage: CapFiltStage, table: pa.Table, batch_size: int, spent: dict,
               first: Prepared | None = None):
    """Yield each batch's results while the next batch decodes on a CPU thread; adds the
    seconds spent in ``stage.compute`` to ``spent["model"]`` (waits for decoding excluded).
    ``first``: the first batch, decoded already (``ShardRun.open``)."""
    starts = range(0, table.num_rows, batch_size)
    with ThreadPoolExecutor(max_workers=1) as ahead:
        pending = None
        for start in starts:
            if start == 0 and first is not None:
                upcoming = Future()
                upcoming.set_result(first)
            else:
                upcoming = ahead.submit(stage.prepare, table.slice(start, batch_size))
            if pending is not None:
                yield _timed_compute(stage, pending.result(), spent)
            pending = upcoming
        if pending is not None:
            yield _timed_compute(stage, pending.result(), spent)


def _timed_compute(stage: CapFiltStage, prepared, spent: dict):
    if not len(prepared):  # every row was rejected while decoding: no model runs, none timed
        return stage.compute(prepared)
    started = time.perf_counter()
    out = stage.compute(prepared)
    spent["model"] += time.perf_counter() - started
    return out


def split_duplicate_keys(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Keep the first row of each key; later ones become ``duplicate_key`` rejects. Rows
    without a key pass: the reader marked them ``missing_key``, and the stage rejects them."""
    seen: set[str] = set()
    first = []
    for key in table.column("key").to_pylist():
        first.append(key is None or key not in seen)
        seen.add(key)
    mask = pa.array(first, pa.bool_())
    later = table.filter(pc.invert(mask)).to_pylist()
    rejects = [reject_row(r, "duplicate_key", f"key {r['key']!r} appeared earlier in this shard")
               for r in later]
    return table.filter(mask), pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA)


def split_repeated_images(table: pa.Table, repeats: dict[str, Mark]) -> tuple[pa.Table, pa.Table]:
    """Set aside the rows ``repeats`` names (images seen earlier in the round) as rejects whose
    message names the first copy."""
    if not repeats:
        return table, REJECT_SCHEMA.empty_table()
    keys = table.column("key").to_pylist()
    mask = pa.array([key not in repeats for key in keys], pa.bool_())
    rejects = []
    for row in table.filter(pc.invert(mask)).to_pylist():
        mark = repeats[row["key"]]
        reason = "duplicate_image" if mark.kind == EXACT else "near_duplicate_image"
        rejects.append(reject_row(row, reason, mark.message()))
    return table.filter(mask), pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA)


def shard_counts(rows: pa.Table, rejects: pa.Table) -> dict:
    """Counts the manifest sums: rejects by reason, texts written and kept by source, and
    synthetic captions set aside by each caption guard."""
    kept = Counter(s for sources in rows.column("kept_sources").to_pylist() for s in sources)
    guarded = Counter(r for reasons in rows.column("synthetic_guard").to_pylist()
                      for r in reasons if r is not None)
    texts = Counter()
    texts["web"] = rows.num_rows - rows.column("web_caption").null_count
    texts["synthetic"] = sum(len(c) for c in rows.column("synthetic_captions").to_pylist())
    return {
        "rejects_by_reason": dict(Counter(rejects.column("reason").to_pylist())),
        "kept_by_source": {"web": kept.get("web", 0), "synthetic": kept.get("synthetic", 0)},
        "texts_by_source": dict(texts),
        "images_without_kept": sum(1 for k in rows.column("kept_captions").to_pylist() if not k),
        "guarded_by_reason": dict(guarded),
    }
