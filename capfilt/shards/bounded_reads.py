"""Bounded reads of an input file: regular files only, up to their size, and decompressed or
decoded within a ratio of it and a size.

A link to ``/dev/zero`` never ends, a FIFO without a writer blocks forever, and a few MB of gzip
or parquet can hold GBs: every reader of input shards (the round, training, evaluation, the
resume check) reads through these.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

# A tar of JPEGs hardly compresses (its images are compressed already): with gzip, one of
# 64 px thumbnails and their .txt and .json came out 6.6 times smaller, larger images nearer 1
# (a tar of text alone: 61 times, but it has no image to score). 50 leaves room and refuses
# bombs: gzip reaches about 1,000 times (3 MB became 3 GB).
MAX_COMPRESSION_RATIO = 50
# A decompressed tar is held in memory whole, as a plain one is: 4 GiB is several times
# img2dataset's usual shard (10,000 images of a few hundred KB at most).
MAX_DECOMPRESSED_BYTES = 4 << 30
# Parquet is decoded this many rows at a time and counted, so that a file whose values expand
# far beyond its size (parquet's dictionary encoding: 3 MB held 3 GB) is refused early.
PARQUET_BATCH_ROWS = 256
_DECOMPRESSORS = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}


class ShardReadError(RuntimeError):
    """A shard that cannot be read at all (missing, corrupt, no image column)."""


@contextmanager
def open_regular(url: str) -> Iterator[tuple[BinaryIO, int]]:
    """(binary handle, size) of a regular file; anything else is refused before a byte is
    read (a link to ``/dev/zero`` never ends, a FIFO without a writer blocks forever).

    A local file is opened without blocking and checked on its descriptor, so it cannot be
    swapped for something else between the check and the read.
    """
    fs, path = fsspec.core.url_to_fs(url)
    try:
        if isinstance(fs, LocalFileSystem):
            handle, size = _open_local(url, path)
        else:
            info = fs.info(path)
            if info.get("type") != "file":
                raise ShardReadError(f"{url}: not a regular file ({info.get('type')})")
            handle, size = fs.open(path, "rb"), int(info.get("size") or 0)
    except FileNotFoundError as exc:
        raise ShardReadError(f"{url}: file not found") from exc
    except OSError as exc:
        raise ShardReadError(f"{url}: cannot be read ({exc})") from exc
    with handle:
        yield handle, size


def _open_local(url: str, path: str) -> tuple[BinaryIO, int]:
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    mode = os.fstat(descriptor)
    if not stat.S_ISREG(mode.st_mode):
        os.close(descriptor)
        kind = "a folder" if stat.S_ISDIR(mode.st_mode) else "a device, FIFO or socket"
        raise ShardReadError(f"{url}: not a regular file ({kind})")
    return os.fdopen(descriptor, "rb"), mode.st_size


def read_regular(url: str) -> bytes:
    """A regular file's bytes, no more than its size when opened."""
    with open_regular(url) as (handle, size):
        try:
            data = handle.read(size + 1)
        except OSError as exc:
            raise ShardReadError(f"{url}: cannot be read ({exc})") from exc
    if len(data) > size:
        raise ShardReadError(f"{url}: grew while it was read; run again once it is written")
    return data


def read_parquet(url: str, file: pq.ParquetFile, size: int, row_groups: list[int] | None = None,
                 columns: list[str] | None = None) -> pa.Table:
    """Row groups of a parquet file of ``size`` bytes, decoded within ``MAX_COMPRESSION_RATIO``
    times that size and ``MAX_DECOMPRESSED_BYTES``: what the footer declares is checked first,
    then what the values take once decoded, batch by batch."""
    groups = range(file.num_row_groups) if row_groups is None else row_groups
    limit = min(MAX_DECOMPRESSED_BYTES, MAX_COMPRESSION_RATIO * max(size, 1))
    declared = sum(file.metadata.row_group(g).total_byte_size for g in groups)
    bound = f"{MAX_COMPRESSION_RATIO} times its {size:,} bytes, at most {MAX_DECOMPRESSED_BYTES:,}"
    if declared > limit:
        raise ShardReadError(f"{url}: declares {declared:,} bytes of data, more than {limit:,} "
                             f"({bound}): refused as a decompression bomb")
    batches, decoded = [], 0
    for batch in file.iter_batches(PARQUET_BATCH_ROWS, row_groups=list(groups), columns=columns):
        decoded += batch.nbytes
        if decoded > limit:
            raise ShardReadError(f"{url}: decodes to more than {limit:,} bytes ({bound}): "
                                 "refused as a decompression bomb")
        batches.append(batch)
    schema = file.schema_arrow
    if columns is not None:
        schema = pa.schema([schema.field(name) for name in columns])
    return pa.Table.from_batches(batches, schema=schema)


def decompressed(url: str, data: bytes) -> bytes:
    """A tar's bytes, decompressed when gzip, bzip2 or xz, within ``MAX_COMPRESSION_RATIO``
    times the compressed size and ``MAX_DECOMPRESSED_BYTES``."""
    opener = next((o for magic, o in _DECOMPRESSORS.items() if data.startswith(magic)), None)
    if opener is None:
        return data
    limit = min(MAX_DECOMPRESSED_BYTES, MAX_COMPRESSION_RATIO * len(data))
    chunks, size = [], 0
    try:
        with opener(io.BytesIO(data), "rb") as stream:
            while chunk := stream.read(1 << 20):
                size += len(chunk)
                if size > limit:
                    raise ShardReadError(
                        f"{url}: compressed tar decompresses to more than {limit:,} bytes "
                        f"({MAX_COMPRESSION_RATIO} times its {len(data):,} bytes, at most "
                        f"{MAX_DECOMPRESSED_BYTES:,}): refused as a decompression bomb")
                chunks.append(chunk)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise ShardReadError(f"{url}: not a readable compressed tar ({exc})") from exc
    return b"".join(chunks)
