"""What training code reads out of a round, read by the real libraries: webdataset, Ray Data;
the pairs view; and fsspec inputs (memory://, file://) through the unit of work."""

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from capfilt.rounds.check import check_round
from capfilt.rounds.folder import finished_shard, shard_path, tar_path
from capfilt.rounds.pairs import pairs_table
from capfilt.rounds.webdataset_view import member_stem, webdataset_tar
from capfilt.shards.reader import expand_inputs
from capfilt.step.shard_runner import run_shard
from capfilt.step.stage import OUTPUT_SCHEMA
from manifests import read_manifest
from pipelines.cli import main
from tests.conftest import make_stage


def kept_rows(round_dir) -> dict:
    rows = pq.read_table(round_dir / "shards").drop(["jpg"]).to_pylist()
    return {r["key"]: r for r in rows if r["kept_captions"]}


def test_webdataset_tars_read_with_webdataset(url_list_round):
    _, _, round_dir = url_list_round
    expected = kept_rows(round_dir)
    manifest = read_manifest(str(round_dir))
    [shard] = manifest.shards
    assert shard.webdataset == "webdataset/00000.tar"  # relative to the round folder
    assert shard.webdataset_samples == len(expected) > 0
    samples = list(wds.WebDataset(str(round_dir / shard.webdataset), shardshuffle=False).decode())
    assert sorted(s["__key__"] for s in samples) == sorted(expected)
    for sample in samples:
        row, meta = expected[sample["__key__"]], sample["json"]
        assert sample["jpg"][:2] == b"\xff\xd8"
        assert sample["txt"] == row["kept_captions"][0]
        assert meta["captions"] == row["kept_captions"]
        assert meta["sources"] == row["kept_sources"]
        assert len(meta["itm"]) == len(meta["captions"]) and all(s >= 0.5 for s in meta["itm"])
    assert check_round(str(round_dir)) == []


def test_images_with_no_kept_text_are_left_out_of_the_tar(url_list_round, tmp_path):
    _, _, round_dir = url_list_round
    rows = pq.read_table(round_dir / "shards").to_pylist()
    for row in rows[:2]:  # as if the filter had rejected every text of these two
        row["kept_captions"], row["kept_sources"] = [], []
    rows[2]["key"] = "../odd/key.with.dots"  # keys never name files: hashed, kept in json
    data, samples = webdataset_tar(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA))
    (tmp_path / "t.tar").write_bytes(data)
    read = list(wds.WebDataset(str(tmp_path / "t.tar"), shardshuffle=False).decode())
    assert samples == len(read) == 5
    assert {s["json"]["key"] for s in read} == {r["key"] for r in rows[2:]}
    assert member_stem("../odd/key.with.dots") in {s["__key__"] for s in read}
    assert webdataset_tar(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA))[0] == data


def test_ray_data_reads_the_tars_and_the_parquet_shards(url_list_round):
    import ray.data

    _, _, round_dir = url_list_round
    tars = ray.data.read_webdataset(str(round_dir / "webdataset")).take_all()
    assert sorted(r["__key__"] for r in tars) == sorted(kept_rows(round_dir))
    assert all(isinstance(r["txt"], str) and r["json"]["captions"] for r in tars)
    shards = ray.data.read_parquet(str(round_dir / "shards"))
    assert shards.count() == 7
    assert "kept_captions" in shards.schema().names


def test_pairs_view_has_one_row_per_kept_pair(url_list_round, tmp_path, capsys):
    _, _, round_dir = url_list_round
    expected = kept_rows(round_dir)
    table = pairs_table(str(round_dir))
    assert table.num_rows == sum(len(r["kept_captions"]) for r in expected.values())
    for pair in table.to_pylist():
        row = expected[pair["key"]]
        assert pair["caption"] in row["kept_captions"] and pair["itm"] >= 0.5
        if pair["source"] == "web":
            assert pair["itm"] == row["web_itm"] and pair["itc"] == row["web_itc"]
    out = tmp_path / "pairs.parquet"
    assert main(["pairs", str(round_dir), "--output", str(out), "--with-jpg"]) == 0
    written = pq.read_table(out)
    assert written.column_names == ["key", "caption", "source", "itm", "itc", "jpg"]
    assert written.num_rows == table.num_rows
    assert f"{table.num_rows} kept pairs of {len(expected)} images" in capsys.readouterr().out


def test_memory_urls_through_the_unit_of_work(loaded, img2dataset_parquet):
    """Brace ranges and globs over memory://, read, run and committed there (no Ray: the
    memory filesystem lives in this process)."""
    for name in ("00000.parquet", "00001.parquet"):
        with fsspec.open(f"memory://in/{name}", "wb") as handle:
            handle.write((img2dataset_parquet / name).read_bytes())
    urls = expand_inputs(["memory://in/{00000..00001}.parquet"])
    assert urls == expand_inputs(["memory://in/*.parquet"])
    assert [u.rsplit("/", 1)[1] for u in urls] == ["00000.parquet", "00001.parquet"]
    stage = make_stage(loaded)
    result = run_shard(stage, 1, urls[1], "memory://round", 4, write=("webdataset",))
    assert result.status == "done" and result.rows_in == 4
    fs = fsspec.filesystem("memory")
    assert fs.exists(shard_path("/round", 1)) and fs.exists(tar_path("/round", 1))
    assert finished_shard("memory://round", 1, urls[1], webdataset=True) == result
    fs.rm("/round", recursive=True)
    fs.rm("/in", recursive=True)


def test_file_urls_with_brace_ranges_in_a_round_and_lineage(
    url_list_round, img2dataset_parquet, tiny_models, capsys
):
    """A second round over file:// brace-range inputs names the first as its parent; then
    ``capfilt rounds`` and ``capfilt show`` describe both."""
    work, _, first = url_list_round
    second = work / "rounds" / "round-0002"
    code = main(["run", "--input", f"file://{img2dataset_parquet}/{{00000..00001}}.parquet",
                 "--output", str(second), "--parent", str(first), "--workers", "1",
                 "--captioner", str(tiny_models["captioner"]),
                 "--filter", str(tiny_models["filter"]), "--policy", "topk"])
    assert code == 0
    manifest = read_manifest(str(second))
    assert [i.path for i in manifest.inputs] == [
        f"file://{img2dataset_parquet}/0000{i}.parquet" for i in range(2)]
    assert (manifest.round, manifest.totals.rows_in) == (2, 8)
    capsys.readouterr()
    assert main(["rounds", str(work / "rounds")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("round\tstatus\trows in")
    one, two = (line.split("\t") for line in lines[1:])
    assert one[:5] == ["1", "complete", "9", "7", "2"] and one[8] == "-"
    assert two[:2] == ["2", "complete"] and two[8] == str(first)
    assert two[9] == str(tiny_models["captioner"])
    kept = manifest.totals.kept_by_source
    assert two[5] == f"{kept['web'] / manifest.totals.texts_by_source['web']:.1%}"
    assert main(["show", str(second)]) == 0
    shown = capsys.readouterr().out
    assert f"round 2 (complete) in {second}" in shown and f"parent: {first}" in shown
    assert '"mode": "topk"' in shown and "shard 00001: 4 in" in shown
    data = json.loads((second / "manifest.json").read_text())
    assert data["shards"][0]["webdataset"] is None
