"""Repeated images: a copy is captioned and scored once per round, across shards and workers.

The crawl is real: a local site serves one drawing under two URLs (a copy, in another shard),
the same drawing re-encoded at a lower JPEG quality (a near-copy) and distinct drawings, and
img2dataset downloads it.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.captioning.settings import SamplingConfig
from capfilt.images.duplicate_index import find_duplicates
from capfilt.images.fingerprints import HASHES_SCHEMA, looks, shard_hashes
from capfilt.rounds.check import check_round
from capfilt.shards.samples import COLOURS, SHAPES, draw_shape, jpeg_bytes
from capfilt.step.stage_config import StageConfig
from pipelines.plan import RoundOptions
from pipelines.round import run_round
from tests.web_world import download_site

PER_SHARD = 4


def reencoded(data: bytes, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def crawl(tmp_path_factory) -> Path:
    """Shards of 4 rows: 000.jpg in shard 0 comes back as copy.jpg in shard 1, and re-encoded
    as near.jpg in shard 2; the other nine drawings are distinct."""
    work = tmp_path_factory.mktemp("repeats")
    site = work / "site"
    site.mkdir()
    names = []
    colours = list(COLOURS)
    for i in range(10):
        data = jpeg_bytes(draw_shape(SHAPES[i % 3], colours[(i + i // 6) % 6]))
        (site / f"{i:03d}.jpg").write_bytes(data)
        names.append(f"{i:03d}.jpg")
    original = (site / "000.jpg").read_bytes()
    (site / "copy.jpg").write_bytes(original)
    (site / "near.jpg").write_bytes(reencoded(original, 60))
    order = names[:4] + ["copy.jpg"] + names[4:7] + ["near.jpg"] + names[7:]
    return download_site(site, [(name, f"caption of {name}") for name in order], work,
                         "parquet", PER_SHARD)


def keys_by_url(folder: Path) -> dict[str, tuple[int, str]]:
    """File name on the site -> (shard index, key), from img2dataset's own output."""
    found = {}
    for index, path in enumerate(sorted(folder.glob("*.parquet"))):
        for row in pq.read_table(path, columns=["url", "key"]).to_pylist():
            found[row["url"].rsplit("/", 1)[1]] = (index, row["key"])
    return found


def options(models, crawl, output, **changes) -> RoundOptions:
    stage = StageConfig(captioner=str(models["captioner"]), filter=str(models["filter"]),
                        sampling=SamplingConfig(num_captions=2), seed=1)
    return RoundOptions(**{**dict(inputs=[str(crawl)], output=str(output), stage=stage,
                                  batch_size=4, workers=2), **changes})


def rejects(out: Path) -> dict[str, dict]:
    table = pq.read_table(out / "rejects", columns=["key", "reason", "message"])
    return {row["key"]: row for row in table.to_pylist()}


def scored_keys(out: Path) -> set[str]:
    return set(pq.read_table(out / "shards", columns=["key"]).column("key").to_pylist())


def hashes_of(images: list[bytes]) -> dict[int, pa.Table]:
    """One shard's fingerprints of ``images`` (keys "0", "1", ...), as ``shard_hashes`` makes
    them."""
    rows = [(i, str(i), hashlib.sha256(data).digest(), *(looks(data) or (None, None)))
            for i, data in enumerate(images)]
    return {0: pa.table([pa.array(list(c), f.type) for c, f in zip(zip(*rows), HASHES_SCHEMA)],
                        schema=HASHES_SCHEMA)}


def marked(images: list[bytes]) -> list[tuple[str, str, str]]:
    return [(m["key"], m["kind"], m["first_key"])
            for m in find_duplicates(hashes_of(images)).to_pylist()]


def test_a_reencoded_or_resized_picture_is_a_near_copy():
    base = jpeg_bytes(draw_shape("circle", "red"))
    resized = io.BytesIO()
    Image.open(io.BytesIO(base)).resize((200, 200)).save(resized, format="PNG")
    variants = [reencoded(base, q) for q in (95, 60, 30)] + [resized.getvalue()]
    assert marked([base, *variants]) == [(str(i), "near", "0") for i in range(1, 5)]
    assert marked([base, base]) == [("1", "exact", "0")]


def test_other_drawings_are_not_near_copies_whatever_their_colour():
    """dHash is greyscale: a red and a blue circle share it; the mean colour tells them apart."""
    drawings = [jpeg_bytes(draw_shape(shape, colour)) for shape in SHAPES for colour in COLOURS]
    assert marked(drawings) == []
    assert looks(b"not an image") is None


def test_the_index_names_the_first_of_each_repeat_in_input_order(crawl):
    where = keys_by_url(crawl)
    hashes = {i: shard_hashes(str(p)) for i, p in enumerate(sorted(crawl.glob("*.parquet")))}
    marks = find_duplicates(hashes).to_pylist()
    first = where["000.jpg"]
    assert [(m["kind"], (m["shard"], m["key"]), (m["first_shard"], m["first_key"]))
            for m in marks] == [("exact", where["copy.jpg"], first),
                                ("near", where["near.jpg"], first)]
    # The same marks whichever order the shards' fingerprints arrive in.
    assert find_duplicates(dict(reversed(list(hashes.items())))).to_pylist() == marks


def test_a_copy_is_scored_once_and_rejected_naming_the_first(ray_local, tiny_models, crawl,
                                                             tmp_path):
    where = keys_by_url(crawl)
    out = tmp_path / "round"
    manifest = run_round(options(tiny_models, crawl, out))
    copy, near, first = where["copy.jpg"], where["near.jpg"], where["000.jpg"]
    rejected = rejects(out)
    assert rejected[copy[1]]["reason"] == "duplicate_image"
    assert repr(first[1]) in rejected[copy[1]]["message"]
    assert f"shard {first[0]:05d}" in rejected[copy[1]]["message"]
    # The near-copy is listed, not dropped: it was captioned and scored.
    assert {first[1], near[1]} <= scored_keys(out) and copy[1] not in scored_keys(out)
    assert manifest.duplicates == {"mode": "exact", "exact": 1, "near": 1,
                                   "near_dropped": False, "images": 12}
    assert manifest.totals.rejects_by_reason["duplicate_image"] == 1
    # The models saw 11 images: 11 web captions and 22 synthetic ones scored.
    assert manifest.totals.rows_out == 11
    assert manifest.totals.texts_by_source == {"web": 11, "synthetic": 22}
    listed = pq.read_table(out / "duplicates.parquet").to_pylist()
    assert [(m["kind"], m["key"], m["first_key"]) for m in listed] == [
        ("exact", copy[1], first[1]), ("near", near[1], first[1])]
    assert check_round(str(out)) == []
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["duplicates"]["exact"] == 1 and saved["timings"]["dedup_seconds"] >= 0
    assert "1 copies rejected as duplicate_image" in (out / "report.html").read_text()


def test_near_mode_rejects_the_near_copy_and_off_scores_everything(ray_local, tiny_models,
                                                                    crawl, tmp_path):
    where = keys_by_url(crawl)
    near = run_round(options(tiny_models, crawl, tmp_path / "near", dedup="near"))
    assert rejects(tmp_path / "near")[where["near.jpg"][1]]["reason"] == "near_duplicate_image"
    assert near.totals.rows_out == 10 and near.duplicates["near_dropped"] is True
    off = run_round(options(tiny_models, crawl, tmp_path / "off", dedup="off"))
    assert off.totals.rows_out == 12 and off.duplicates is None
    assert not (tmp_path / "off" / "duplicates.parquet").exists()
    # The images both rounds scored got the same captions and scores (up to the float
    # rounding of other batch compositions): dedup changes which rows run, not what a row gets.
    kept = pq.read_table(tmp_path / "near" / "shards").drop(["jpg"]).to_pylist()
    every = {r["key"]: r for r in pq.read_table(tmp_path / "off" / "shards").drop(["jpg"])
             .to_pylist()}
    assert len(kept) == 10
    for row in kept:
        other = every[row["key"]]
        assert (row["web_caption"], row["synthetic_captions"]) == (
            other["web_caption"], other["synthetic_captions"])
        assert row["web_itm"] == pytest.approx(other["web_itm"], abs=1e-5)
        assert row["synthetic_itm"] == pytest.approx(other["synthetic_itm"], abs=1e-5)


def test_a_lying_sha256_column_marks_nothing(crawl, tmp_path):
    """img2dataset's sha256 column is not trusted: fingerprints come from the bytes."""
    lying = tmp_path / "lying"
    lying.mkdir()
    for path in sorted(crawl.glob("*.parquet")):
        table = pq.read_table(path)
        same = pa.array(["0" * 64] * table.num_rows, pa.string())
        pq.write_table(table.set_column(table.schema.get_field_index("sha256"), "sha256", same),
                       lying / path.name)
    hashes = {i: shard_hashes(str(p)) for i, p in enumerate(sorted(lying.glob("*.parquet")))}
    assert [m["kind"] for m in find_duplicates(hashes).to_pylist()] == ["exact", "near"]
