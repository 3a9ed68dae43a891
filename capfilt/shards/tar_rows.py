"""Webdataset tars as input rows: members grouped into samples webdataset's way, one row each.

A sample whose metadata or caption cannot be used keeps its place with the reason as its
``status``, as img2dataset marks its own failures, instead of failing the shard.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from collections.abc import Iterator

import pyarrow as pa

from capfilt.shards.bounded_reads import ShardReadError, decompressed
from capfilt.shards.input_rows import INPUT_SCHEMA, SUCCESS, decode_text

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")


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
        row["caption"] = decode_text(parts["txt"])
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
