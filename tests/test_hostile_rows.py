"""One bad row is a reject with its reason, never a failed shard: odd column types, invalid
UTF-8, null keys, webdataset metadata that is not an object, keys repeated in a tar, and
member names in the round's webdataset view that cannot collide."""

import hashlib
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from capfilt.rounds.webdataset_view import member_stem, webdataset_tar
from capfilt.shards.samples import draw_shape, jpeg_bytes
from capfilt.step.shard_runner import run_shard
from capfilt.step.stage import OUTPUT_SCHEMA
from capfilt.train.sources import Piece, read_piece
from tests.conftest import make_stage

GOOD = jpeg_bytes(draw_shape("circle", "red"))


def run_one(loaded, shard, tmp_path):
    """Run ``shard`` through the unit of work; its result, output rows by key, and rejects."""
    out = tmp_path / "round"
    result = run_shard(make_stage(loaded), 0, str(shard), str(out), batch_size=4)
    assert result.status == "done", result.error
    rows = {r["key"]: r for r in pq.read_table(out / "shards" / "00000.parquet").to_pylist()}
    rejects = pq.read_table(out / "rejects" / "00000.parquet").to_pylist()
    assert result.rows_in == len(rows) + len(rejects)
    return result, rows, rejects


def invalid_utf8(values: list[bytes | None], kind=pa.string()) -> pa.Array:
    """A string-typed column holding bytes that are not UTF-8, as some writers produce."""
    return pa.array(values, pa.binary()).view(kind)


def test_invalid_utf8_in_string_columns_is_replaced_not_a_failed_shard(loaded, tmp_path):
    shard = tmp_path / "utf8.parquet"
    pq.write_table(pa.table({
        "key": invalid_utf8([b"k\xff1", b"k2", b"k3"]),
        "url": invalid_utf8([b"http://x/\xfe", None, b"http://x/3"]),
        "caption": invalid_utf8([b"caf\xe9 au lait", b"a red circle", None]),
        "jpg": pa.array([GOOD] * 3, pa.binary()),
    }), shard)
    _, rows, rejects = run_one(loaded, shard, tmp_path)
    assert rejects == []
    assert rows["k\ufffd1"]["web_caption"] == "caf\ufffd au lait"
    assert rows["k\ufffd1"]["url"] == "http://x/\ufffd"
    assert rows["k2"]["web_caption"] == "a red circle" and rows["k3"]["web_caption"] is None


@pytest.mark.parametrize("kind", [pa.large_binary(), pa.large_string()])
def test_caption_columns_of_any_text_type_are_read(loaded, tmp_path, kind):
    captions = [b"a red circle", b"caf\xe9", None]
    column = (pa.array(captions, pa.large_binary()).view(kind) if kind == pa.large_string()
              else pa.array(captions, kind))
    shard = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"key": ["a", "b", "c"], "jpg": [GOOD] * 3, "caption": column,
                             "status": pa.array(["success"] * 3, pa.large_string())}), shard)
    _, rows, rejects = run_one(loaded, shard, tmp_path)
    assert rejects == []
    assert [rows[k]["web_caption"] for k in "abc"] == ["a red circle", "caf\ufffd", None]


def test_null_keys_are_rejected_missing_key(loaded, tmp_path):
    shard = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"key": ["a", None, "b", None], "jpg": [GOOD] * 4,
                             "caption": ["one", "two", "three", "four"]}), shard)
    result, rows, rejects = run_one(loaded, shard, tmp_path)
    assert sorted(rows) == ["a", "b"]
    assert [(r["key"], r["caption"], r["reason"]) for r in rejects] == [
        (None, "two", "missing_key"), (None, "four", "missing_key")]
    assert all("no key" in r["message"] for r in rejects)
    assert result.rejects_by_reason == {"missing_key": 2}


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def sample(key: str, caption: bytes | None = None, meta=None) -> list[tuple[str, bytes]]:
    members = [(f"{key}.jpg", GOOD)]
    if caption is not None:
        members.append((f"{key}.txt", caption))
    if meta is not None:
        members.append((f"{key}.json", json.dumps(meta).encode()))
    return members


HOSTILE_TAR = [
    *sample("good", b"a red circle", {"url": "http://x/good"}),
    *sample("list-json", meta=[1, 2, 3]),
    *sample("number-caption", meta={"caption": 5}),
    *sample("list-caption", meta={"caption": ["a", "b"]}),
    *sample("json-caption", meta={"caption": "from the json", "url": 7}),
    ("too-deep.jpg", GOOD), ("too-deep.json", b"[" * 100_000),
    ("huge-int.jpg", GOOD), ("huge-int.json", b'{"key": 1' + b"0" * 5000 + b"}"),
    *sample("again", b"the first"),
    *sample("other", b"between"),
    *sample("again", b"the second, not adjacent"),
]


def test_webdataset_metadata_and_repeated_keys_are_row_rejects(loaded, tmp_path):
    shard = tmp_path / "hostile.tar"
    write_tar(shard, HOSTILE_TAR)
    result, rows, rejects = run_one(loaded, shard, tmp_path)
    assert sorted(rows) == ["again", "good", "json-caption", "other"]
    assert rows["again"]["web_caption"] == "the first"
    assert rows["json-caption"]["web_caption"] == "from the json"
    assert rows["json-caption"]["url"] is None
    reasons = {(r["key"], r["reason"], r["caption"]) for r in rejects}
    assert reasons == {("list-json", "invalid_metadata", None),
                       ("too-deep", "invalid_metadata", None),
                       ("huge-int", "invalid_metadata", None),
                       ("number-caption", "invalid_caption", None),
                       ("list-caption", "invalid_caption", None),
                       ("again", "duplicate_key", "the second, not adjacent")}
    assert all(len(r["message"]) > 10 and "\n" not in r["message"] for r in rejects)
    assert result.rows_in == 10


def test_training_reader_skips_the_same_rows_with_their_reasons(tmp_path):
    shard = tmp_path / "hostile.tar"
    write_tar(shard, HOSTILE_TAR)
    rows = read_piece(Piece(str(shard), 0, None, None, 10))
    skipped = {r.key: r.skip for r in rows if r.skip}
    assert skipped == {"list-json": "invalid_metadata", "number-caption": "invalid_caption",
                       "too-deep": "invalid_metadata", "huge-int": "invalid_metadata",
                       "list-caption": "invalid_caption"}
    assert [r.captions for r in rows if r.key == "again"] == [
        ["the first"], ["the second, not adjacent"]]


def output_row(key: str, caption: str) -> dict:
    return {"key": key, "url": None, "jpg": GOOD, "width": 64, "height": 64,
            "web_caption": caption, "web_itm": 0.9, "web_itc": 0.3, "synthetic_captions": [],
            "synthetic_itm": [], "synthetic_itc": [], "kept_captions": [caption],
            "kept_sources": ["web"]}


def test_hashed_member_names_cannot_collide_with_literal_keys(tmp_path):
    unsafe = "a/b.c"
    # A literal key spelled as a hashed name used to be: it must stay a sample of its own.
    literal = "k" + hashlib.sha256(unsafe.encode()).hexdigest()[:24]
    rows = [output_row(literal, "the literal key"), output_row(unsafe, "the unsafe key"),
            output_row("plain", "a plain key")]
    data, samples = webdataset_tar(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA))
    (tmp_path / "view.tar").write_bytes(data)
    read = list(wds.WebDataset(str(tmp_path / "view.tar"), shardshuffle=False).decode())
    assert samples == len(read) == 3
    assert {s["json"]["key"]: s["txt"] for s in read} == {
        literal: "the literal key", unsafe: "the unsafe key", "plain": "a plain key"}
    stems = {member_stem(r["key"]) for r in rows}
    assert len(stems) == 3 and member_stem("plain") == "plain"
    assert all("." not in s and "/" not in s for s in stems)


def test_training_reader_reads_any_text_column_and_invalid_utf8(tmp_path):
    shard = tmp_path / "train.parquet"
    pq.write_table(pa.table({
        "key": pa.array([b"a", b"b\xff"], pa.large_binary()),
        "caption": invalid_utf8([b"caf\xe9", b"a red circle"]),
        "jpg": [GOOD, GOOD],
    }), shard)
    rows = read_piece(Piece(str(shard), 0, None, 0, 2))
    assert [(r.key, r.captions, r.skip) for r in rows] == [
        ("a", ["caf\ufffd"], None), ("b\ufffd", ["a red circle"], None)]
