"""Read input shards as img2dataset writes them, into one normalised Arrow table.

Formats: parquet (img2dataset's ``output_format="parquet"``, or any parquet whose image and text
columns are named by ``ReaderOptions``) and webdataset tars (``{key}.jpg``, ``{key}.txt``,
``{key}.json``). Paths are local, ``file://`` or any fsspec URL; globs and brace ranges expand.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from dataclasses import asdict, dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from braceexpand import braceexpand

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


class ShardReadError(RuntimeError):
    """A shard that cannot be read at all (missing, corrupt, no image column)."""


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
    raise ShardReadError(f"{path}: unknown shard format (expected .parquet or .tar)")


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
                raise ShardReadError(f"input {one!r} matches no file")
            found += [p if "://" not in one else fs.unstrip_protocol(p) for p in matches]
    shards = sorted(dict.fromkeys(found))
    for path in shards:
        shard_format(path)
    return shards


def read_shard(url: str, options: ReaderOptions = ReaderOptions()) -> ShardData:
    """Read one shard whole: bytes are hashed for the manifest, then parsed."""
    try:
        with fsspec.open(url, "rb") as handle:
            data = handle.read()
    except FileNotFoundError as exc:
        raise ShardReadError(f"{url}: file not found") from exc
    except OSError as exc:
        raise ShardReadError(f"{url}: cannot be read ({exc})") from exc
    digest = hashlib.sha256(data)
    if shard_format(url) == "parquet":
        table, warnings = _parquet_rows(url, data, options)
    else:
        table, warnings = webdataset_rows(url, data)
        sidecar = _read_sidecar(url)
        if sidecar is not None:
            digest.update(sidecar)
            table = pa.concat_tables([table, _sidecar_failures(url, sidecar, table)])
    return ShardData(table=table, sha256=digest.hexdigest(), nbytes=len(data), warnings=warnings)


def _read_sidecar(url: str) -> bytes | None:
    """img2dataset's webdataset output keeps every row, failed ones too, in NNNNN.parquet."""
    try:
        with fsspec.open(url[: -len(".tar")] + ".parquet", "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def _sidecar_failures(url: str, sidecar: bytes, in_tar: pa.Table) -> pa.Table:
    """The failed downloads the tar does not hold, as rows without image bytes."""
    try:
        meta = pq.read_table(pa.BufferReader(sidecar))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardReadError(f"{url}: its metadata parquet is unreadable ({exc})") from exc
    if "status" not in meta.column_names or "key" not in meta.column_names:
        return INPUT_SCHEMA.empty_table()
    present = set(in_tar.column("key").to_pylist())
    rows = [
        {name: row.get(name) for name in INPUT_SCHEMA.names if name != "jpg"}
        for row in meta.to_pylist()
        if row["status"] != SUCCESS and row["key"] not in present
    ]
    return pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)


def _parquet_rows(url: str, data: bytes, options: ReaderOptions) -> tuple[pa.Table, list[str]]:
    try:
        raw = pq.read_table(pa.BufferReader(data))
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

    def column(name: str, kind: pa.DataType):
        if name not in names:
            return None
        values = raw.column(name)
        if kind == pa.string() and pa.types.is_binary(values.type):
            # Text stored as bytes may not be UTF-8: decode leniently, never fail the shard.
            return pa.array([None if v is None else v.decode("utf-8", errors="replace")
                             for v in values.to_pylist()], pa.string())
        return values.cast(kind)

    keys = column(options.key_column, pa.string())
    if keys is None:
        warnings.append(f"no key column {options.key_column!r}: keys made from the shard name")
        keys = pa.array([f"{stem}-{i:07d}" for i in range(n)], pa.string())
    captions = column(options.caption_column, pa.string())
    if captions is None:
        warnings.append(f"no caption column {options.caption_column!r}: images have no web caption")
        captions = pa.nulls(n, pa.string())
    urls = column(options.url_column, pa.string())
    status = column("status", pa.string())
    errors = column("error_message", pa.string())
    table = pa.table(
        {
            "key": keys,
            "url": urls if urls is not None else pa.nulls(n, pa.string()),
            "caption": captions,
            "jpg": raw.column(options.image_column).cast(pa.binary()),
            "status": status if status is not None else pa.array([SUCCESS] * n, pa.string()),
            "error_message": errors if errors is not None else pa.nulls(n, pa.string()),
        },
        schema=INPUT_SCHEMA,
    )
    return table, warnings


def sample_key(name: str) -> str | None:
    """The sample a tar member belongs to, webdataset's way: its path up to the first dot of its
    basename (``a/b.c/00001.jpg`` -> ``a/b.c/00001``); None for a name without an extension."""
    folder, base = posixpath.split(name)
    if "." not in base:
        return None
    stem = base.split(".", 1)[0]
    return posixpath.join(folder, stem) if folder else stem


def webdataset_rows(url: str, data: bytes) -> tuple[pa.Table, list[str]]:
    """Group tar members by key, webdataset's way: the name up to the first dot of its basename."""
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
            for member in archive:
                key = sample_key(member.name) if member.isfile() else None
                if key is None:
                    continue
                extension = posixpath.basename(member.name).split(".", 1)[1]
                handle = archive.extractfile(member)
                samples.setdefault(key, {})[extension.lower()] = handle.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardReadError(f"{url}: not a readable tar file ({' '.join(str(exc).split())})") from exc
    rows = {name: [] for name in INPUT_SCHEMA.names}
    for key, parts in samples.items():
        meta = {}
        if "json" in parts:
            try:
                meta = json.loads(parts["json"])
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta = {}
        image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
        caption = parts.get("txt")
        rows["key"].append(str(meta.get("key") or key))
        rows["url"].append(meta.get("url") if isinstance(meta.get("url"), str) else None)
        rows["caption"].append(_text(caption) if caption is not None else meta.get("caption"))
        rows["jpg"].append(image)
        rows["status"].append(SUCCESS)
        rows["error_message"].append(None)
    return pa.table(rows, schema=INPUT_SCHEMA), []


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")
