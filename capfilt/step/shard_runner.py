"""One input shard through the CapFilt step to its committed output: the unit of work."""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from capfilt.images.duplicate_index import EXACT, Mark
from capfilt.rounds.folder import commit_shard, rejects_path, shard_path, tar_path
from capfilt.rounds.webdataset_view import webdataset_tar
from capfilt.shards.reader import ReaderOptions, ShardReadError, read_shard
from capfilt.step.stage import OUTPUT_SCHEMA, REJECT_SCHEMA, CapFiltStage, reject_row
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
    """
    started = time.perf_counter()
    try:
        shard = read_shard(input_path, reader)
    except ShardReadError as exc:
        log.error("shard %05d failed: %s", index, exc)
        return ShardResult(index=index, input=input_path, status=ShardStatus.FAILED,
                           attempts=attempt, worker=worker, error=str(exc))
    for warning in shard.warnings:
        log.warning("%s: %s", input_path, warning)
    table, duplicates = split_duplicate_keys(shard.table)
    table, seen = split_repeated_images(table, repeats or {})
    outputs, rejects = [], [duplicates, seen]
    spent = {"model": 0.0}
    done = duplicates.num_rows + seen.num_rows
    on_rows(done, shard.table.num_rows)
    for rows, rejected in overlapped(stage, table, batch_size, spent):
        outputs.append(rows)
        rejects.append(rejected)
        done += rows.num_rows + rejected.num_rows
        on_rows(done, shard.table.num_rows)
    rows = pa.concat_tables(outputs) if outputs else OUTPUT_SCHEMA.empty_table()
    rejected = pa.concat_tables(rejects)
    if rows.num_rows + rejected.num_rows != shard.table.num_rows:
        raise RuntimeError(f"shard {index}: {shard.table.num_rows} rows in, but only "
                           f"{rows.num_rows + rejected.num_rows} written or rejected")
    result = ShardResult(
        index=index,
        input=input_path,
        status=ShardStatus.DONE,
        output=shard_path(round_dir, index),
        rejects=rejects_path(round_dir, index),
        rows_in=shard.table.num_rows,
        rows_out=rows.num_rows,
        rows_rejected=rejected.num_rows,
        input_sha256=shard.sha256,
        input_bytes=shard.nbytes,
        attempts=attempt,
        worker=worker,
        **shard_counts(rows, rejected),
    )
    tar = None
    if "webdataset" in write:
        tar, result.webdataset_samples = webdataset_tar(rows)
        result.webdataset = tar_path(round_dir, index)
    result.seconds = round(time.perf_counter() - started, 3)
    result.model_seconds = round(spent["model"], 3)
    commit_shard(round_dir, result, rows, rejected, tar)
    return result


def overlapped(stage: CapFiltStage, table: pa.Table, batch_size: int, spent: dict):
    """Yield each batch's results while the next batch decodes on a CPU thread; adds the
    seconds spent in ``stage.compute`` to ``spent["model"]`` (waits for decoding excluded)."""
    starts = range(0, table.num_rows, batch_size)
    with ThreadPoolExecutor(max_workers=1) as ahead:
        pending = None
        for start in starts:
            upcoming = ahead.submit(stage.prepare, table.slice(start, batch_size))
            if pending is not None:
                yield _timed_compute(stage, pending.result(), spent)
            pending = upcoming
        if pending is not None:
            yield _timed_compute(stage, pending.result(), spent)


def _timed_compute(stage: CapFiltStage, prepared, spent: dict):
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
