"""Small img2dataset-format parquet shards of drawn shapes, for smoke runs and tests.

Each row has img2dataset's columns. Some web captions are right, some belong to another image,
some are spam; a few rows are failed downloads or broken bytes, as real crawls have.
"""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
           "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
SPAM = ("buy cheap watches online", "click here for free shipping", "IMG_2041.JPG", "image")

# img2dataset's parquet writer flushes every 100 rows: one row group each.
IMG2DATASET_ROW_GROUP = 100
IMG2DATASET_SCHEMA = pa.schema(
    [
        ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()),
        ("jpg", pa.binary()), ("status", pa.string()), ("error_message", pa.string()),
        ("width", pa.int64()), ("height", pa.int64()),
        ("original_width", pa.int64()), ("original_height", pa.int64()),
        ("exif", pa.string()), ("sha256", pa.string()),
    ]
)


def draw_shape(shape: str, colour: str, size: int = 64, shade: int = 0) -> Image.Image:
    """``shape`` in ``colour`` on a light background tinted by ``shade`` (0 to 1,599): distinct
    bytes for the same drawing, as a crawl holds one picture re-encoded, not copied."""
    tint = (245 - shade % 40, 245 - shade // 40 % 40, 240)
    image = Image.new("RGB", (size, size), tint)
    draw = ImageDraw.Draw(image)
    box = (size // 5, size // 5, size * 4 // 5, size * 4 // 5)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(size // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return image


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def sample_rows(shard: int, rows: int, seed: int) -> list[dict]:
    rng = random.Random(seed * 1000 + shard)
    truth = [(rng.choice(SHAPES), rng.choice(list(COLOURS))) for _ in range(rows)]
    out = []
    for i, (shape, colour) in enumerate(truth):
        key = f"{shard:05d}{i:04d}"
        caption = f"a {colour} {shape}"
        roll = rng.random()
        if roll < 0.15:
            other = truth[rng.randrange(rows)]
            caption = f"a {other[1]} {other[0]}"
        elif roll < 0.25:
            caption = rng.choice(SPAM)
        row = {"key": key, "url": f"http://images.example/{key}.jpg", "caption": caption,
               "jpg": None, "status": "success", "error_message": None, "width": None,
               "height": None, "original_width": None, "original_height": None,
               "exif": None, "sha256": None}
        if i == rows - 1:
            row.update(status="failed_to_download", error_message="HTTP Error 404: Not Found")
        elif i == rows - 2:
            row["jpg"] = b"\xff\xd8\xff\xe0 truncated"  # a broken JPEG
        else:
            data = jpeg_bytes(draw_shape(shape, colour, shade=(shard * rows + i) % 1600))
            row.update(jpg=data, width=64, height=64, original_width=64, original_height=64,
                       sha256=hashlib.sha256(data).hexdigest())
        out.append(row)
    return out


def write_sample_shards(folder: str | Path, shards: int = 4, rows: int = 16, seed: int = 0) -> list[Path]:
    """Write ``shards`` parquet files of ``rows`` rows each; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(shards):
        table = pa.Table.from_pylist(sample_rows(shard, rows, seed), schema=IMG2DATASET_SCHEMA)
        path = folder / f"{shard:05d}.parquet"
        pq.write_table(table, path)
        paths.append(path)
    return paths
