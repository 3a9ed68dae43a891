"""Check a finished round folder: manifest valid, and every input row in shards/ or rejects/.

Files are looked up by shard index in the folder given, never at the paths a manifest holds
(an earlier version stored them relative to the first run's working folder).
"""

from __future__ import annotations

import fsspec
import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.rounds.folder import (
    rejects_name,
    rejects_path,
    shard_name,
    shard_path,
    tar_name,
    tar_path,
)
from manifests import ManifestError, read_manifest, validate_manifest
from manifests.store import read_json


def _rows(url: str) -> int:
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def _missing(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return not fs.exists(path)


def check_round(round_dir: str) -> list[str]:
    """Problems found, as sentences; an empty list means the round is sound."""
    try:
        validate_manifest(read_json(f"{round_dir.rstrip('/')}/manifest.json"))
        manifest = read_manifest(round_dir)
    except FileNotFoundError:
        return [f"{round_dir}: no manifest.json (the round has not finished)"]
    except (ManifestError, jsonschema.ValidationError) as exc:
        return [f"manifest: {getattr(exc, 'message', exc)}"]
    problems = []
    for shard in manifest.shards:
        if shard.status != "done":
            problems.append(f"shard {shard.index:05d} failed: {shard.error}")
            continue
        found = _shard_files(round_dir, shard.index, shard.webdataset is not None)
        if isinstance(found, str):
            problems.append(found)
            continue
        out, rejected = found
        if (out, rejected) != (shard.rows_out, shard.rows_rejected):
            problems.append(f"shard {shard.index:05d}: files hold {out}+{rejected} rows, "
                            f"manifest says {shard.rows_out}+{shard.rows_rejected}")
        if out + rejected != shard.rows_in:
            problems.append(f"shard {shard.index:05d}: {shard.rows_in} rows in, "
                            f"{out + rejected} accounted for")
    return problems


def _shard_files(round_dir: str, index: int, with_tar: bool) -> tuple[int, int] | str:
    """The rows of a done shard's output and rejects, or the problem that stops reading them."""
    parts = [(shard_name(index), shard_path(round_dir, index)),
             (rejects_name(index), rejects_path(round_dir, index))]
    if with_tar:
        parts.append((tar_name(index), tar_path(round_dir, index)))
    for name, url in parts:
        if _missing(url):
            return f"shard {index:05d}: {name} is missing"
    try:
        return _rows(parts[0][1]), _rows(parts[1][1])
    except (OSError, pa.ArrowInvalid) as exc:
        return f"shard {index:05d}: its files cannot be read ({exc})"
