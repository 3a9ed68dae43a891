"""Read input shards as img2dataset writes them, into one normalised Arrow table.

Formats: parquet (img2dataset's ``output_format="parquet"``, or any parquet whose image and text
columns are named by ``ReaderOptions``) and webdataset tars (``{key}.jpg``, ``{key}.txt``,
``{key}.json``). Paths are local, ``file://`` or any fsspec URL; globs and brace ranges expand.

Every read is bounded (``capfilt.shards.bounded_reads``): a shard must be a regular file and is read
up to the size it had when opened; a compressed tar is decompressed up to a ratio and a size.
A row the reader cannot use (no key, webdataset metadata that is not an object, a caption that
is not text) keeps its place with its reason as its ``status``, as img2dataset marks its own
failures, so that every consumer (the round, the training reader, the evaluation) sets it aside
with that reason. Tars are parsed in ``capfilt.shards.tar_rows``; the rows' schema is in
``capfilt.shards.input_rows``.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import asdict, dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from braceexpand import braceexpand

# ShardReadError is defined with the bounded reads, which raise it and sit below this module;
# it is this module's error too, and callers catch it from here.
from capfilt.shards.bounded_reads import ShardReadError, open_regular, read_parquet, read_regular
from capfilt.shards.input_rows import INPUT_SCHEMA, SUCCESS, text_column
from capfilt.shards.tar_rows import webdataset_rows

SHARD_FORMATS = ".parquet (img2dataset's parquet output, or any parquet with an image column) " \
    "or .tar (webdataset)"


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


def _image_column(url: str, name: str, values: pa.ChunkedArray) -> pa.ChunkedArray:
    try:
        return values.cast(pa.binary())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ShardReadError(
            f"{url}: image column {name!r} holds {values.type}, not bytes") from exc
