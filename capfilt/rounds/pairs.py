"""One row per kept (image, text) pair, for trainers that sample pairs rather than images.

Read from a round's output shards (parquet); the scores come with each pair, so a trainer can
weight or re-threshold without reading the round's other columns.
"""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.rounds.folder import shard_path
from capfilt.rounds.kept_texts import kept_texts
from manifests import read_manifest

PAIRS_SCHEMA = pa.schema([("key", pa.string()), ("caption", pa.string()),
                          ("source", pa.string()), ("itm", pa.float32()), ("itc", pa.float32())])
COLUMNS = ["key", "kept_captions", "kept_sources", "web_itm", "web_itc", "synthetic_captions",
           "synthetic_itm", "synthetic_itc"]


def shard_pairs(rows: pa.Table, with_jpg: bool = False) -> pa.Table:
    """The kept pairs of one output shard's rows."""
    schema = PAIRS_SCHEMA.append(pa.field("jpg", pa.binary())) if with_jpg else PAIRS_SCHEMA
    out = {name: [] for name in schema.names}
    for row in rows.to_pylist():
        for kept in kept_texts(row):
            out["key"].append(row["key"])
            out["caption"].append(kept.caption)
            out["source"].append(kept.source)
            out["itm"].append(kept.itm)
            out["itc"].append(kept.itc)
            if with_jpg:
                out["jpg"].append(row["jpg"])
    return pa.table(out, schema=schema)


def pairs_table(round_dir: str, with_jpg: bool = False) -> pa.Table:
    """Every kept pair of a finished round, shard by shard in order (failed shards have none).

    Shards are found by index in ``round_dir``, so a moved or copied round reads its own files.
    """
    manifest = read_manifest(round_dir)
    columns = COLUMNS + (["jpg"] if with_jpg else [])
    tables = []
    for shard in manifest.shards:
        if shard.status != "done" or not shard.output:
            continue
        fs, path = fsspec.core.url_to_fs(shard_path(round_dir, shard.index))
        with fs.open(path, "rb") as handle:
            tables.append(shard_pairs(pq.read_table(handle, columns=columns), with_jpg))
    if not tables:
        return shard_pairs(pa.table({c: [] for c in COLUMNS}), with_jpg)
    return pa.concat_tables(tables)
