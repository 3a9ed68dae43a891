"""Check a finished round folder: manifest valid, and every input row in shards/ or rejects/."""

from __future__ import annotations

import fsspec
import jsonschema
import pyarrow.parquet as pq

from manifests import ManifestError, read_manifest, validate_manifest
from manifests.store import read_json


def _rows(url: str) -> int:
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).metadata.num_rows


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
        out, rejected = _rows(shard.output), _rows(shard.rejects)
        if (out, rejected) != (shard.rows_out, shard.rows_rejected):
            problems.append(f"shard {shard.index:05d}: files hold {out}+{rejected} rows, "
                            f"manifest says {shard.rows_out}+{shard.rows_rejected}")
        if out + rejected != shard.rows_in:
            problems.append(f"shard {shard.index:05d}: {shard.rows_in} rows in, "
                            f"{out + rejected} accounted for")
    return problems
