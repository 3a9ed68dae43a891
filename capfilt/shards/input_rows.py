"""The rows every shard reader returns: their schema, the status of a usable row, and text.

Parquet shards, webdataset tars and img2dataset's metadata parquet all become these rows, so
every consumer (the round, the training reader, the evaluation) reads one shape.
"""

from __future__ import annotations

import pyarrow as pa

from capfilt.shards.bounded_reads import ShardReadError

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
SUCCESS = "success"


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
        texts = [None if v is None else decode_text(v) for v in raw.to_pylist()]
        return pa.chunked_array([pa.array(texts, pa.string())])


def decode_text(data: bytes) -> str:
    """Bytes as text; what is not UTF-8 becomes U+FFFD."""
    return data.decode("utf-8", errors="replace")
