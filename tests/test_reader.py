"""Reading shards as img2dataset writes them: parquet, webdataset tars, named columns, URLs."""

import io
import tarfile

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.shards.reader import (
    ReaderOptions,
    ShardReadError,
    expand_inputs,
    read_shard,
)
from capfilt.shards.samples import draw_shape, jpeg_bytes


def test_img2dataset_parquet_rows_come_through_with_their_status(img2dataset_parquet):
    shards = expand_inputs([str(img2dataset_parquet)])
    assert [s.rsplit("/", 1)[1] for s in shards] == [f"{i:05d}.parquet" for i in range(4)]
    tables = [read_shard(s).table for s in shards]
    assert sum(t.num_rows for t in tables) == 14  # 12 images, a broken file, a missing one
    statuses = [s for t in tables for s in t.column("status").to_pylist()]
    assert statuses.count("success") == 12
    assert {"failed_to_download", "failed_to_resize"} <= set(statuses)
    good = tables[0].filter(pa.compute.equal(tables[0].column("status"), "success"))
    assert all(good.column("jpg").to_pylist()) and all(good.column("caption").to_pylist())


def test_img2dataset_webdataset_tars_are_read_and_their_metadata_parquet_skipped(
    img2dataset_webdataset,
):
    shards = expand_inputs([str(img2dataset_webdataset)])
    assert shards and all(s.endswith(".tar") for s in shards)
    rows = [r for s in shards for r in read_shard(s).table.to_pylist()]
    images = [r for r in rows if r["status"] == "success"]
    assert len(images) == 12
    assert all(r["jpg"] and r["caption"].startswith("a ") and r["url"] for r in images)
    # The failures img2dataset kept only in its metadata parquet come through too.
    failed = sorted((r["status"], r["jpg"]) for r in rows if r["status"] != "success")
    assert failed == [("failed_to_download", None), ("failed_to_resize", None)]


def test_globs_brace_ranges_and_file_urls(img2dataset_parquet):
    folder = str(img2dataset_parquet)
    assert len(expand_inputs([f"{folder}/*.parquet"])) == 4
    assert len(expand_inputs([f"{folder}/{{00001..00002}}.parquet"])) == 2
    urls = expand_inputs([f"file://{folder}/0000[03].parquet"])
    assert urls == [f"file://{folder}/00000.parquet", f"file://{folder}/00003.parquet"]
    assert read_shard(urls[0]).table.num_rows == read_shard(f"{folder}/00000.parquet").table.num_rows


def test_inputs_that_name_no_shard_are_one_line_value_errors(img2dataset_parquet, tmp_path):
    folder = str(img2dataset_parquet)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    cases = {
        f"{folder}/*.nothing.parquet": "matches no file",
        str(tmp_path / "empty"): "matches no file",
        str(tmp_path / "config.json"): "is not a shard",
        f"{tmp_path}/*.json": "is not a shard",
    }
    for pattern, problem in cases.items():
        with pytest.raises(ValueError) as caught:
            expand_inputs([pattern])
        message = str(caught.value)
        assert problem in message and "\n" not in message
        assert repr(pattern) in message or str(tmp_path / "config.json") in message
        assert ".parquet" in message and ".tar" in message


def test_any_parquet_with_named_columns_and_memory_urls():
    image = jpeg_bytes(draw_shape("square", "green"))
    table = pa.table({"id": ["x1", "x2"], "img": [image, image], "alt_text": ["a", None]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    with fsspec.open("memory://bucket/part-0.parquet", "wb") as handle:
        handle.write(buffer.getvalue())
    [url] = expand_inputs(["memory://bucket/*.parquet"])
    options = ReaderOptions(image_column="img", caption_column="alt_text", key_column="id")
    rows = read_shard(url, options).table.to_pylist()
    assert [(r["key"], r["caption"], r["status"]) for r in rows] == [
        ("x1", "a", "success"), ("x2", None, "success")]
    with pytest.raises(ShardReadError, match="no image column 'jpg'"):
        read_shard(url)


def test_webdataset_tar_without_image_gives_a_row_without_bytes(tmp_path):
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as archive:
        for name, data in [("a.jpg", jpeg_bytes(draw_shape("circle", "red"))),
                           ("a.txt", b"a red circle"), ("b.txt", b"caption only")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    rows = read_shard(str(path)).table.to_pylist()
    assert [(r["key"], bool(r["jpg"]), r["caption"]) for r in rows] == [
        ("a", True, "a red circle"), ("b", False, "caption only")]


def test_unreadable_shards_raise_a_clear_error(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not parquet at all")
    (tmp_path / "bad.tar").write_bytes(b"\x00" * 10 + b"garbage")
    with pytest.raises(ShardReadError, match="not a readable parquet"):
        read_shard(str(tmp_path / "bad.parquet"))
    with pytest.raises(ShardReadError, match="not a readable tar"):
        read_shard(str(tmp_path / "bad.tar"))
    with pytest.raises(ShardReadError, match="file not found"):
        read_shard(str(tmp_path / "missing.parquet"))


def test_capfilt_run_names_a_bad_input_in_one_line_and_exits_2(tiny_models, tmp_path, capsys):
    from pipelines.cli import main

    (tmp_path / "config.json").write_text("{}")
    models = ["--captioner", str(tiny_models["captioner"]), "--filter", str(tiny_models["filter"])]
    for given in (str(tmp_path / "config.json"), f"{tmp_path}/*.parquet"):
        code = main(["run", "--input", given, "--output", str(tmp_path / "round"), *models])
        error = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in error and given in error, error
        assert not (tmp_path / "round").exists()
