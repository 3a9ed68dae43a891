"""The round folder's layout and its atomic writes (local paths or any fsspec URL).

    ROUND/shards/NNNNN.parquet   scored rows of input shard NNNNN
    ROUND/webdataset/NNNNN.tar   with ``--write webdataset``: its images with kept text (not
                                 in shards/: a tar there breaks ``pq.read_table(ROUND/shards)``)
    ROUND/rejects/NNNNN.parquet  its rows that were not scored, with a reason
    ROUND/stats/NNNNN.json       its counts: written last, the shard's completion marker
    ROUND/plan.json              what the round was started with (a rerun must match it)
    ROUND/duplicates.parquet     rows showing an image seen earlier in the round, and which
    ROUND/manifest.json          written last of all: the round's commit point

The manifest and the stats name a shard's files relative to the round folder
(``shards/00000.parquet``), and readers find them by index in the folder they are given, so a
round folder can be moved or copied (local -> object store and back) and still be read.
Temporary files start with "." (manifests/store.py), so dataset readers never list them.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import time

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.shards.reader import ShardReadError, input_fingerprint
from manifests import ShardResult, ShardStatus, write_json_atomic
from manifests.store import TEMPORARY, write_bytes_atomic

log = logging.getLogger(__name__)

SUBFOLDERS = ("shards", "webdataset", "rejects", "stats")


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def shard_name(index: int) -> str:
    """The shard's rows, named relative to the round folder (as the manifest records them)."""
    return f"shards/{index:05d}.parquet"


def tar_name(index: int) -> str:
    return f"webdataset/{index:05d}.tar"


def rejects_name(index: int) -> str:
    return f"rejects/{index:05d}.parquet"


def shard_path(root: str, index: int) -> str:
    return _join(root, shard_name(index))


def tar_path(root: str, index: int) -> str:
    return _join(root, tar_name(index))


def rejects_path(root: str, index: int) -> str:
    return _join(root, rejects_name(index))


def stats_path(root: str, index: int) -> str:
    return _join(root, "stats", f"{index:05d}.json")


def plan_path(root: str) -> str:
    return _join(root, "plan.json")


def duplicates_path(root: str) -> str:
    return _join(root, "duplicates.parquet")


# Per synthetic caption, the caption guard's reason (capfilt/captioning/guards.py); rounds written
# before the guards lack the column, and their captions were all scored.
GUARD_COLUMN = "synthetic_guard"


def read_columns(url: str, columns: list[str]) -> pa.Table:
    """``columns`` of one of a round's parquet files; ``GUARD_COLUMN`` only where the file has
    it. A file the manifest names but the folder lacks is a ``ValueError`` saying so."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        handle = fs.open(path, "rb")
    except FileNotFoundError as exc:
        raise ValueError(f"{url} is missing from the round; capfilt validate lists what "
                         "else is") from exc
    with handle:
        file = pq.ParquetFile(handle)
        names = set(file.schema_arrow.names)
        return file.read(columns=[c for c in columns if c in names or c != GUARD_COLUMN])


# Rows per parquet row group, as img2dataset writes them: training streams a round's shards in
# row groups (capfilt/train/sources.py), so a group bounds what a reader holds.
ROW_GROUP_ROWS = 100


def write_parquet_atomic(url: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    write_bytes_atomic(url, buffer.getvalue())


def name_parts_in_round(result: ShardResult) -> ShardResult:
    """Name the shard's files relative to the round folder, whatever root they were written
    under (stats and manifests of earlier versions hold the paths the run was given)."""
    if result.output is not None:
        result.output = shard_name(result.index)
    if result.rejects is not None:
        result.rejects = rejects_name(result.index)
    if result.webdataset is not None:
        result.webdataset = tar_name(result.index)
    return result


def no_space(error: BaseException | None) -> bool:
    """Whether ``error`` is a full disk (pyarrow's writers raise it without an errno)."""
    return isinstance(error, OSError) and (
        error.errno == errno.ENOSPC or "No space left on device" in str(error))


def commit_shard(root: str, result: ShardResult, rows: pa.Table, rejects: pa.Table,
                 tar: bytes | None = None) -> None:
    """Rows, the tar, rejects, then the stats marker: a shard without its marker is not done.

    ``result`` comes out naming its files relative to the round folder, as the stats record it.
    """
    name_parts_in_round(result)
    write_parquet_atomic(shard_path(root, result.index), rows)
    if tar is not None:
        write_bytes_atomic(tar_path(root, result.index), tar)
    write_parquet_atomic(rejects_path(root, result.index), rejects)
    write_json_atomic(stats_path(root, result.index), result.__dict__)


def finished_shard(root: str, index: int, input_path: str,
                   webdataset: bool = False) -> ShardResult | None:
    """The result of a shard already done in this round folder, or None.

    A shard done without the webdataset tar now asked for runs again (same seed, same rows).
    A shard whose input no longer has the size and sha256 it was done from runs again too: its
    files and marker are removed first, so no reader sees rows of the old input meanwhile.
    """
    fs, path = fsspec.core.url_to_fs(stats_path(root, index))
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as handle:
        result = ShardResult.from_dict(json.load(handle))
    if result.status != ShardStatus.DONE or result.input != input_path:
        return None
    parts = [shard_path(root, index), rejects_path(root, index)]
    if webdataset:
        if result.webdataset is None:
            return None
        parts.append(tar_path(root, index))
    for part in parts:
        part_fs, part_path = fsspec.core.url_to_fs(part)
        if not part_fs.exists(part_path):
            return None
    if not same_input(result, input_path):
        log.warning("shard %05d: %s is not the input it was done from (size or sha256 "
                    "changed); running it again", index, input_path)
        discard_shard(root, index)
        return None
    return name_parts_in_round(result)


def same_input(result: ShardResult, input_path: str) -> bool:
    """Whether the input still has the recorded size and sha256 (hashed only if sizes match)."""
    if result.input_bytes is None or result.input_sha256 is None:
        return False  # nothing to check it against: not trusted
    fs, path = fsspec.core.url_to_fs(input_path)
    try:
        info = fs.info(path)  # a FIFO or device is never read: its size says nothing
        if info.get("type") != "file" or info.get("size") != result.input_bytes:
            return False
        return input_fingerprint(input_path) == (result.input_bytes, result.input_sha256)
    except (OSError, ShardReadError):  # gone or unreadable: the shard runs again, says why
        return False


def discard_shard(root: str, index: int) -> None:
    """Remove a shard's marker, then its files: a shard is never half-discarded yet marked."""
    for part in (stats_path(root, index), shard_path(root, index), tar_path(root, index),
                 rejects_path(root, index)):
        fs, path = fsspec.core.url_to_fs(part)
        if fs.exists(path):
            fs.rm(path)


# A temporary file this old is no write in flight (a shard's files are written in seconds):
# younger ones may be another driver's, and are invisible to readers meanwhile.
STALE_SECONDS = 600


def sweep_temporaries(root: str, stale_seconds: float = STALE_SECONDS) -> list[str]:
    """Remove what writers that died mid-write left in the round folder; returns the paths.

    Hidden temporaries (".NAME.tmp-" and 8 hex digits) go once stale; visible ones
    ("NAME.tmp-" and 8 hex digits, from earlier versions) go at once, since dataset readers
    would list them.
    """
    fs, base = fsspec.core.url_to_fs(root)
    removed = []
    for folder in [base, *(_join(base, sub) for sub in SUBFOLDERS)]:
        try:
            entries = fs.ls(folder, detail=True)
        except FileNotFoundError:
            continue
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type") != "file" or not TEMPORARY.search(name):
                continue
            if name.startswith(".") and _age(entry) < stale_seconds:
                continue
            fs.rm(entry["name"])
            removed.append(entry["name"])
    for path in removed:
        log.warning("removed %s, left by a write that did not finish", path)
    return removed


def _age(entry: dict) -> float:
    """Seconds since the file was last written; infinite where the filesystem does not say."""
    stamp = entry.get("mtime", entry.get("created", entry.get("LastModified")))
    if hasattr(stamp, "timestamp"):
        stamp = stamp.timestamp()
    if not isinstance(stamp, (int, float)):
        return float("inf")
    return time.time() - stamp
