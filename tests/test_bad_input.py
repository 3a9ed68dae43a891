"""Hostile web input, made for real: every row becomes a correct output row or a reject row."""

import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.shards.samples import draw_shape, jpeg_bytes
from capfilt.step.shard_runner import run_shard
from tests.conftest import NO_GUARDS, make_stage


def save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header that declares huge dimensions, with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def palette_with_transparency() -> bytes:
    image = Image.new("P", (24, 24), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (6, 6, 18, 18))
    return save(image, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [draw_shape("circle", "red", 32), draw_shape("square", "blue", 32)]
    return save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise on display
    return save(Image.new("RGB", (60, 20), (10, 200, 30)), "JPEG", exif=exif)


GOOD = jpeg_bytes(draw_shape("circle", "red"))
# (key, image bytes, caption) -> the expected outcome: ("row", (width, height)) or the reason.
CASES = [
    ("truncated-jpeg", GOOD[: len(GOOD) // 3], "a red circle", "undecodable_image"),
    ("empty-bytes", b"", "a red circle", "missing_image"),
    ("not-an-image", b"<html><body>404</body></html>", "a red circle", "undecodable_image"),
    ("cmyk-jpeg", save(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"), "red", (40, 30)),
    ("png-16-bit", save(Image.fromarray(np.full((20, 30), 40000, np.uint16)), "PNG"), "grey",
     (30, 20)),
    ("palette-transparent", palette_with_transparency(), "a red square", (24, 24)),
    ("animated-gif", animated_gif(), "a red circle", (32, 32)),
    ("webp", save(draw_shape("triangle", "green", 48), "WEBP"), "a green triangle", (48, 48)),
    ("one-pixel", save(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"), "red", (1, 1)),
    ("extreme-aspect", save(Image.new("RGB", (3000, 2), (0, 0, 255)), "PNG"), "a line", (3000, 2)),
    ("decompression-bomb", png_declaring(100_000, 100_000), "huge", "image_too_large"),
    ("exif-rotated", exif_rotated(), "green", (20, 60)),
    ("empty-caption", GOOD, "", (64, 64)),
    ("whitespace-caption", GOOD, " \t\n ", (64, 64)),
    ("long-caption", GOOD, "red circle " * 1000, (64, 64)),
    ("html-caption", GOOD, "<p>a <b>red</b> circle &amp; <script>alert(1)</script></p>",
     (64, 64)),
    ("dup", GOOD, "first", (64, 64)),
    ("dup", GOOD, "second", "duplicate_key"),
    ("../../escape/../../key", GOOD, "a red circle", (64, 64)),
    ("a/b/c", GOOD, "a red circle", (64, 64)),
]


@pytest.fixture(scope="module")
def hostile_round(loaded, tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile")
    # Captions as bytes, so one of them can be invalid UTF-8 as crawls have.
    captions = [c.encode() for _, _, c, _ in CASES] + [b"caf\xe9 au lait"]
    keys = [k for k, *_ in CASES] + ["latin-1-caption"]
    images = [data for _, data, _, _ in CASES] + [GOOD]
    shard = work / "in" / "00000.parquet"
    shard.parent.mkdir()
    pq.write_table(pa.table({"key": keys, "jpg": pa.array(images, pa.binary()),
                             "caption": pa.array(captions, pa.binary())}), shard)
    out = work / "round"
    result = run_shard(make_stage(loaded, guards=NO_GUARDS), 0, str(shard), str(out),
                       batch_size=4)
    rows = {r["key"]: r for r in pq.read_table(out / "shards" / "00000.parquet").to_pylist()}
    rejects = pq.read_table(out / "rejects" / "00000.parquet").to_pylist()
    return work, result, rows, rejects


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_each_hostile_row_has_a_correct_outcome(hostile_round, case):
    _, _, rows, rejects = hostile_round
    key, _, _, expected = CASES[case]
    if isinstance(expected, tuple):
        row = rows[key]
        assert (row["width"], row["height"]) == expected
        assert row["synthetic_captions"] and 0.0 <= row["synthetic_itm"][0] <= 1.0
    else:
        reasons = [r["reason"] for r in rejects if r["key"] == key]
        assert expected in reasons
        message = next(r["message"] for r in rejects if r["reason"] == expected)
        assert len(message) > 10


def test_every_row_is_accounted_and_captions_are_cleaned(hostile_round):
    work, result, rows, rejects = hostile_round
    assert result.rows_in == len(CASES) + 1 == len(rows) + len(rejects)
    assert rows["empty-caption"]["web_caption"] is None
    assert rows["whitespace-caption"]["web_caption"] is None
    assert rows["html-caption"]["web_caption"] == "a red circle & alert(1)"
    assert rows["long-caption"]["web_caption"].count("circle") == 1000
    assert rows["dup"]["web_caption"] == "first"
    assert rows["latin-1-caption"]["web_caption"] == "caf\ufffd au lait"


def test_keys_never_become_paths(hostile_round):
    work, _, rows, _ = hostile_round
    written = sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file())
    assert written == ["in/00000.parquet", "round/rejects/00000.parquet",
                       "round/shards/00000.parquet", "round/stats/00000.json"]
    assert "../../escape/../../key" in rows


def test_shard_without_caption_column_and_empty_shard(loaded, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"key": ["a", "b"], "jpg": [GOOD, GOOD]}), folder / "0.parquet")
    pq.write_table(pa.table({"key": pa.array([], pa.string()), "jpg": pa.array([], pa.binary()),
                             "caption": pa.array([], pa.string())}), folder / "1.parquet")
    stage = make_stage(loaded)
    no_caption = run_shard(stage, 0, str(folder / "0.parquet"), str(tmp_path / "r"), 4)
    empty = run_shard(stage, 1, str(folder / "1.parquet"), str(tmp_path / "r"), 4)
    assert (no_caption.rows_out, no_caption.texts_by_source["web"]) == (2, 0)
    assert (empty.status, empty.rows_in, empty.rows_out, empty.rows_rejected) == ("done", 0, 0, 0)
    assert pq.read_table(tmp_path / "r" / "shards" / "00001.parquet").num_rows == 0
