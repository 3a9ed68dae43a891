"""Fingerprints of every usable image of a shard: its bytes' sha256 and how it looks.

The sha256 finds copies (the same file under two URLs, as img2dataset's own ``sha256`` column
would); the difference hash (dHash: which of neighbouring greyscale pixels is brighter) with
the mean colour finds the same picture re-encoded, resized or recompressed. dHash alone is
blind to colour: a red and a blue drawing of one layout share it.
Both are taken from the image bytes themselves, never from a column a crawl could get wrong.
Rows that cannot be captioned anyway (failed downloads, a key seen earlier in the shard, a
missing key) get no fingerprint: the round rejects them for their own reason.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
from PIL import Image, ImageStat

from capfilt.images.decode import ImageRejected, decode_image
from capfilt.shards.input_rows import SUCCESS
from capfilt.shards.reader import ReaderOptions, read_shard

HASHES_SCHEMA = pa.schema([("row", pa.int32()), ("key", pa.string()),
                           ("sha256", pa.binary(32)), ("dhash", pa.int64()),
                           ("colour", pa.int32())])
# dHash compares neighbouring pixels of a 9x8 greyscale thumbnail: 64 bits.
_DHASH_SIZE = (9, 8)


def looks(data: bytes) -> tuple[int, int] | None:
    """(64-bit difference hash as a signed int64, mean colour packed as 0xRRGGBB), or None
    when the bytes do not decode.

    Decoded through ``decode_image`` (its size and cost limits), at 1/8 scale where the JPEG
    allows (libjpeg's DCT scaling): a fingerprint costs a fraction of a full decode.
    """
    try:
        image = decode_image(data, at_least=(32, 32))
    except ImageRejected:
        return None
    red, green, blue = (round(v) for v in ImageStat.Stat(image).mean)
    grey = image.convert("L").resize(_DHASH_SIZE, Image.Resampling.BOX)
    pixels = grey.tobytes()
    width = _DHASH_SIZE[0]
    bits = 0
    for row in range(_DHASH_SIZE[1]):
        for col in range(width - 1):
            left, right = pixels[row * width + col], pixels[row * width + col + 1]
            bits = (bits << 1) | (left > right)
    signed = bits - (1 << 64) if bits >= 1 << 63 else bits
    return signed, (red << 16) | (green << 8) | blue


def shard_hashes(url: str, reader: ReaderOptions = ReaderOptions(),
                 perceptual: bool = True) -> pa.Table:
    """``HASHES_SCHEMA`` rows for the shard's usable images, in input order (``row`` is the
    input row number); ``dhash`` is null when ``perceptual`` is off or the image does not
    decode (``colour`` with it). Raises ``ShardReadError`` when the shard cannot be read."""
    table = read_shard(url, reader).table
    rows, keys, digests, hashes, colours = [], [], [], [], []
    seen: set[str] = set()
    for row, (key, status, data) in enumerate(zip(table.column("key").to_pylist(),
                                                  table.column("status").to_pylist(),
                                                  table.column("jpg").to_pylist())):
        if key is None or key in seen:
            continue
        seen.add(key)
        if status != SUCCESS or not data:
            continue
        rows.append(row)
        keys.append(key)
        digests.append(hashlib.sha256(data).digest())
        look = looks(data) if perceptual else None
        hashes.append(look[0] if look else None)
        colours.append(look[1] if look else None)
    return pa.table([pa.array(rows, pa.int32()), pa.array(keys, pa.string()),
                     pa.array(digests, pa.binary(32)), pa.array(hashes, pa.int64()),
                     pa.array(colours, pa.int32())], schema=HASHES_SCHEMA)
