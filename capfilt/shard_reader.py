"""Read input shards as img2dataset writes them, into one normalised Arrow table.

Formats: parquet (img2dataset's ``output_format="parquet"``, or any parquet whose image and text
columns are named by ``ReaderOptions``) and webdataset tars (``{key}.jpg``, ``{key}.txt``,
``{key}.json``). Paths are local, ``file://`` or any fsspec URL; globs and brace ranges expand.

Every read is bounded: a shard must be a regular file and is read up to the size it had when
opened; a compressed tar is decompressed up to a ratio and a size. A row the reader cannot use
(no key, webdataset metadata that is not an object, a caption that is not text) keeps its place
with its reason as its ``status``, as img2dataset marks its own failures, so that every consumer
(the round, the training reader, the evaluation) sets it aside with that reason.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import posixpath
import stat
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import BinaryIO

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from braceexpand import braceexpand
from fsspec.implementations.local import LocalFileSystem

# The table every reader returns: one row per input row, in input order.
INPUT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("jpg", pa.binary()),
        ("status", pa.string()),
        ("error_message", pa.string()),
    ]
)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")
SUCCESS = "success"
SHARD_FORMATS = ".parquet (img2dataset's parquet output, or any parquet with an image column) " \
    "or .tar (webdataset)"

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


class InputError(ValueError):
    """An input pattern that names no shard: found before any work (the CLI's exit 2)."""


@dataclass(frozen=True)
class ReaderOptions:
    """Column names for parquet input; img2dataset's by default."""

    image_column: str = "jpg"
    caption_column: str = "caption"
    key_column: str = "key"
    url_column: str = "url"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ShardData:
    table: pa.Table
    sha256: str
    nbytes: int
    warnings: list[str]


def shard_format(path: str) -> str:
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith(".tar"):
        return "webdataset"
    raise ShardReadError(f"{path}: unknown shard format (expected {SHARD_FORMATS})")


def expand_inputs(patterns: list[str]) -> list[str]:
    """Expand brace ranges, globs and folders (any fsspec URL) to a sorted list of shards.

    A pattern that matches nothing is an error; a plainly named file that is missing stays in
    the list, so that its shard is recorded as failed ("file not found") and the rest run.

    A folder of img2dataset webdataset output holds ``NNNNN.tar`` and a metadata
    ``NNNNN.parquet`` beside it: the tar is the shard, the parquet is skipped.
    """
    found: list[str] = []
    for pattern in patterns:
        for one in braceexpand(pattern):
            fs, path = fsspec.core.url_to_fs(one)
            if fs.isdir(path):
                listed = [p for p in fs.ls(path, detail=False) if p.endswith((".parquet", ".tar"))]
                tars = {p[: -len(".tar")] for p in listed if p.endswith(".tar")}
                matches = [p for p in listed if not (p.endswith(".parquet") and p[:-8] in tars)]
            elif any(ch in path for ch in "*?["):
                matches = fs.glob(path)
            else:
                matches = [path]
            if not matches:
                raise InputError(f"input {one!r} matches no file; give {SHARD_FORMATS} files, "
                                 "a folder of them or a glob")
            found += [p if "://" not in one else fs.unstrip_protocol(p) for p in matches]
    shards = sorted(dict.fromkeys(found))
    for path in shards:
        if not path.endswith((".parquet", ".tar")):
            raise InputError(f"input {path} is not a shard: give {SHARD_FORMATS} files")
    return shards


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


def read_shard(url: str, options: ReaderOptions = ReaderOptions()) -> ShardData:
    """Read one shard whole: bytes are hashed for the manifest (``input_fingerprint``), then
    parsed."""
    kind = shard_format(url)
    data = read_regular(url)
    digest = hashlib.sha256(data)
    if kind == "parquet":
        table, warnings = _parquet_rows(url, data, options)
    else:
        table, warnings = webdataset_rows(url, data)
        sidecar = _read_sidecar(url)
        if sidecar is not None:
            digest.update(sidecar)
            table = pa.concat_tables([table, _sidecar_failures(url, sidecar, table)])
    table = mark_missing_keys(table)
    return ShardData(table=table, sha256=digest.hexdigest(), nbytes=len(data), warnings=warnings)


def input_fingerprint(url: str) -> tuple[int, str]:
    """(bytes, sha256) of an input shard as ``read_shard`` records them, read a block at a
    time: a tar's hash covers img2dataset's metadata parquet beside it, its size does not.
    Reads are bounded as ``read_shard``'s are (regular files only, up to their size)."""
    digest = hashlib.sha256()
    size = _hash_into(digest, url)
    if shard_format(url) == "webdataset":
        try:
            _hash_into(digest, url[: -len(".tar")] + ".parquet")
        except ShardReadError as exc:
            if not isinstance(exc.__cause__, FileNotFoundError):
                raise
    return size, digest.hexdigest()


def _hash_into(digest, url: str) -> int:
    with open_regular(url) as (handle, size):
        left = size
        while left > 0:
            block = handle.read(min(left, 1 << 20))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    return size - left


def mark_missing_keys(table: pa.Table) -> pa.Table:
    """A row without a key cannot be seeded, deduplicated or found again: ``missing_key``."""
    missing = pc.is_null(table.column("key"))
    if not pc.any(missing).as_py():
        return table
    for name, value in (("status", "missing_key"), ("error_message", "the row has no key")):
        column = pc.if_else(missing, pa.scalar(value), table.column(name))
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def _read_sidecar(url: str) -> bytes | None:
    """img2dataset's webdataset output keeps every row, failed ones too, in NNNNN.parquet."""
    try:
        return read_regular(url[: -len(".tar")] + ".parquet")
    except ShardReadError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            return None
        raise


def _sidecar_failures(url: str, sidecar: bytes, in_tar: pa.Table) -> pa.Table:
    """The failed downloads the tar does not hold, as rows without image bytes."""
    try:
        meta = pq.read_table(pa.BufferReader(sidecar))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardReadError(f"{url}: its metadata parquet is unreadable ({exc})") from exc
    if "status" not in meta.column_names or "key" not in meta.column_names:
        return INPUT_SCHEMA.empty_table()
    present = set(in_tar.column("key").to_pylist())
    texts = pa.table({name: text_column(url, name, meta.column(name))
                      for name in INPUT_SCHEMA.names if name in meta.column_names})
    rows = [
        {name: row.get(name) for name in INPUT_SCHEMA.names if name != "jpg"}
        for row in texts.to_pylist()
        if row["status"] != SUCCESS and row["key"] not in present
    ]
    return pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)


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


def _parquet_rows(url: str, data: bytes, options: ReaderOptions) -> tuple[pa.Table, list[str]]:
    try:
        raw = read_parquet(url, pq.ParquetFile(pa.BufferReader(data)), len(data))
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise ShardReadError(f"{url}: not a readable parquet file ({exc})") from exc
    names = raw.column_names
    if options.image_column not in names:
        raise ShardReadError(
            f"{url}: no image column {options.image_column!r} (columns: {', '.join(names)}); "
            "name it with --image-column"
        )
    warnings = []
    n = raw.num_rows
    stem = posixpath.basename(url).rsplit(".", 1)[0]

    def column(name: str):
        return text_column(url, name, raw.column(name)) if name in names else None

    keys = column(options.key_column)
    if keys is None:
        warnings.append(f"no key column {options.key_column!r}: keys made from the shard name")
        keys = pa.array([f"{stem}-{i:07d}" for i in range(n)], pa.string())
    captions = column(options.caption_column)
    if captions is None:
        warnings.append(f"no caption column {options.caption_column!r}: images have no web caption")
        captions = pa.nulls(n, pa.string())
    urls = column(options.url_column)
    status = column("status")
    errors = column("error_message")
    table = pa.table(
        {
            "key": keys,
            "url": urls if urls is not None else pa.nulls(n, pa.string()),
            "caption": captions,
            "jpg": _image_column(url, options.image_column, raw.column(options.image_column)),
            "status": status if status is not None else pa.array([SUCCESS] * n, pa.string()),
            "error_message": errors if errors is not None else pa.nulls(n, pa.string()),
        },
        schema=INPUT_SCHEMA,
    )
    return table, warnings


def text_column(url: str, name: str, values: pa.ChunkedArray) -> pa.ChunkedArray:
    """Any string or binary column (large or not) as UTF-8 strings. Bytes that are not UTF-8,
    even in a string-typed column (some writers never check), become U+FFFD: one odd row
    never fails its shard. Numbers become their text; other types refuse the shard."""
    kind = values.type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        try:
            return values.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ShardReadError(f"{url}: column {name!r} holds {kind}, not text") from exc
    raw = values.cast(pa.large_binary())  # a string column's bytes, unchecked
    try:
        return raw.cast(pa.string())  # checks that every value is UTF-8
    except pa.ArrowInvalid:
        texts = [None if v is None else _text(v) for v in raw.to_pylist()]
        return pa.chunked_array([pa.array(texts, pa.string())])


def _image_column(url: str, name: str, values: pa.ChunkedArray) -> pa.ChunkedArray:
    try:
        return values.cast(pa.binary())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ShardReadError(
            f"{url}: image column {name!r} holds {values.type}, not bytes") from exc


def sample_key(name: str) -> str | None:
    """The sample a tar member belongs to, webdataset's way: its path up to the first dot of its
    basename (``a/b.c/00001.jpg`` -> ``a/b.c/00001``); None for a name without an extension."""
    folder, base = posixpath.split(name)
    if "." not in base:
        return None
    stem = base.split(".", 1)[0]
    return posixpath.join(folder, stem) if folder else stem


def webdataset_rows(url: str, data: bytes) -> tuple[pa.Table, list[str]]:
    """One row per sample, in tar order. A key that comes back after other keys is a second
    sample with that key, as webdataset reads it (the round rejects it ``duplicate_key``)."""
    rows = {name: [] for name in INPUT_SCHEMA.names}
    for key, parts in tar_samples(url, data):
        row = _sample_row(key, parts)
        for name in INPUT_SCHEMA.names:
            rows[name].append(row[name])
    return pa.table(rows, schema=INPUT_SCHEMA), []


def tar_samples(url: str, data: bytes) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample: consecutive members with the same key, grouped
    webdataset's way (the name up to the first dot of its basename)."""
    key, parts = None, {}
    plain = decompressed(url, data)
    try:
        with tarfile.open(fileobj=io.BytesIO(plain), mode="r:") as archive:
            for member in archive:
                member_key = sample_key(member.name) if member.isfile() else None
                if member_key is None:
                    continue
                if member.size > len(plain):  # a sparse member: tarfile fills its holes
                    raise ShardReadError(
                        f"{url}: member {member.name} declares {member.size:,} bytes in a tar "
                        f"of {len(plain):,} (a sparse file): refused")
                extension = posixpath.basename(member.name).split(".", 1)[1].lower()
                if member_key != key or extension in parts:
                    if key is not None:
                        yield key, parts
                    key, parts = member_key, {}
                parts[extension] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        reason = " ".join(str(exc).split())
        raise ShardReadError(f"{url}: not a readable tar file ({reason})") from exc
    if key is not None:
        yield key, parts


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


def _sample_row(key: str, parts: dict[str, bytes]) -> dict:
    """A sample as an input row; metadata that is not a JSON object, or a caption that is not
    text, marks the row with that reason instead of failing the shard."""
    row = {"key": key, "url": None, "caption": None, "status": SUCCESS, "error_message": None,
           "jpg": next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)}
    meta = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, too deep, huge int
            return _unusable(row, "invalid_metadata", f"{key}.json is not usable JSON ({exc})")
        if not isinstance(meta, dict):
            return _unusable(row, "invalid_metadata",
                             f"{key}.json holds {_json_kind(meta)}, not an object")
    if isinstance(meta.get("key"), (str, int)) and not isinstance(meta.get("key"), bool):
        row["key"] = str(meta["key"]) or key
    row["url"] = meta.get("url") if isinstance(meta.get("url"), str) else None
    if "txt" in parts:
        row["caption"] = _text(parts["txt"])
    elif isinstance(meta.get("caption"), str) or meta.get("caption") is None:
        row["caption"] = meta.get("caption")
    else:
        return _unusable(row, "invalid_caption",
                         f"{key}.json's caption is {_json_kind(meta['caption'])}, not text")
    return row


def _json_kind(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    kinds = {dict: "an object", list: "an array", str: "a string", int: "a number",
             float: "a number"}
    return kinds.get(type(value), "null")


def _unusable(row: dict, reason: str, message: str) -> dict:
    return {**row, "status": reason, "error_message": message}


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")
