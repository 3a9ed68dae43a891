"""The round folder's layout and its atomic writes (local paths or any fsspec URL).

    ROUND/shards/NNNNN.parquet   scored rows of input shard NNNNN
    ROUND/webdataset/NNNNN.tar   with ``--write webdataset``: its images with kept text (not
                                 in shards/: a tar there breaks ``pq.read_table(ROUND/shards)``)
    ROUND/rejects/NNNNN.parquet  its rows that were not scored, with a reason
    ROUND/stats/NNNNN.json       its counts: written last, the shard's completion marker
    ROUND/plan.json              what the round was started with (a rerun must match it)
    ROUND/manifest.json          written last of all: the round's commit point
"""

from __future__ import annotations

import io
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from manifests import ShardResult, ShardStatus, write_json_atomic
from manifests.store import write_bytes_atomic


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def shard_path(root: str, index: int) -> str:
    return _join(root, "shards", f"{index:05d}.parquet")


def tar_path(root: str, index: int) -> str:
    return _join(root, "webdataset", f"{index:05d}.tar")


def rejects_path(root: str, index: int) -> str:
    return _join(root, "rejects", f"{index:05d}.parquet")


def stats_path(root: str, index: int) -> str:
    return _join(root, "stats", f"{index:05d}.json")


def plan_path(root: str) -> str:
    return _join(root, "plan.json")


# Rows per parquet row group, as img2dataset writes them: training streams a round's shards in
# row groups (capfilt/train/sources.py), so a group bounds what a reader holds.
ROW_GROUP_ROWS = 100


def write_parquet_atomic(url: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    write_bytes_atomic(url, buffer.getvalue())


def commit_shard(root: str, result: ShardResult, rows: pa.Table, rejects: pa.Table,
                 tar: bytes | None = None) -> None:
    """Rows, the tar, rejects, then the stats marker: a shard without its marker is not done."""
    write_parquet_atomic(shard_path(root, result.index), rows)
    if tar is not None:
        write_bytes_atomic(tar_path(root, result.index), tar)
    write_parquet_atomic(rejects_path(root, result.index), rejects)
    write_json_atomic(stats_path(root, result.index), result.__dict__)


def finished_shard(root: str, index: int, input_path: str,
                   webdataset: bool = False) -> ShardResult | None:
    """The result of a shard already done in this round folder, or None.

    A shard done without the webdataset tar now asked for runs again (same seed, same rows).
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
    return result
