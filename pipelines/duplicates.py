"""Find the round's repeated images before any shard runs, so each is captioned and scored once.

Every input shard is fingerprinted by a Ray task (``workers.fingerprint_tasks``); the driver
orders the fingerprints by input position (``capfilt.images.duplicate_index``), writes them to
``ROUND/duplicates.parquet`` and hands each worker the rows of its shard to set aside. The whole
index is made again on a rerun: it costs one more read of the inputs, and a resumed round gets
the same marks as an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.images.duplicate_index import EXACT, NEAR, Mark, find_duplicates, marks_by_shard
from capfilt.rounds.folder import duplicates_path, write_parquet_atomic
from capfilt.shards.reader import ReaderOptions
from workers.fingerprint_tasks import fingerprint_shards

log = logging.getLogger(__name__)


@dataclass
class DuplicateIndex:
    """What the round sets aside, by shard, and its counts for the manifest."""

    mode: str
    dropped: dict[int, dict[str, Mark]] = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    seconds: float = 0.0


def index_duplicates(shards: list[str], reader: ReaderOptions, mode: str,
                     round_dir: str) -> DuplicateIndex:
    """Fingerprint every shard, write ``ROUND/duplicates.parquet`` and return what each shard
    drops: copies with ``mode`` "exact", copies and near-copies with "near" (near-copies are
    listed either way). A shard that cannot be read is left out here; its own run fails it
    with the reason. Needs Ray started."""
    started = time.perf_counter()
    hashes = {}
    for index, result in fingerprint_shards(shards, reader).items():
        if isinstance(result, str):
            log.warning("shard %05d not checked for repeated images: %s", index, result)
        else:
            hashes[index] = result
    images = sum(table.num_rows for table in hashes.values())
    marks = find_duplicates(hashes).replace_schema_metadata({"images": str(images)})
    write_parquet_atomic(duplicates_path(round_dir), marks)
    counts = _counts(marks, mode)
    seconds = time.perf_counter() - started
    log.info("repeated images: %d copies, %d near-copies among %d images (%.1fs)",
             counts["exact"], counts["near"], images, seconds)
    dropped_kinds = (EXACT, NEAR) if mode == NEAR else (EXACT,)
    return DuplicateIndex(mode, marks_by_shard(marks, dropped_kinds), counts, seconds)


def recorded_counts(round_dir: str, mode: str) -> dict | None:
    """The counts of the ``duplicates.parquet`` an earlier run of the round wrote (a rerun
    with no shard left to run makes no new index), or None without one or with ``mode`` off."""
    if mode == "off":
        return None
    url = duplicates_path(round_dir)
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as handle:
        return _counts(pq.read_table(handle), mode)


def _counts(marks: pa.Table, mode: str) -> dict:
    kinds = marks.column("kind").to_pylist()
    images = int((marks.schema.metadata or {}).get(b"images", b"0"))
    return {"exact": kinds.count(EXACT), "near": kinds.count(NEAR), "near_dropped": mode == NEAR,
            "images": images}
