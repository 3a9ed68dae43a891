"""A whole CapFilt round on real Ray, over real img2dataset shards."""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from capfilt.captioning.settings import SamplingConfig
from capfilt.rounds.check import check_round
from capfilt.shards.reader import read_shard
from capfilt.step.stage_config import StageConfig
from manifests import validate_manifest
from pipelines.plan import PlanError, RoundOptions
from pipelines.round import run_round
from tests.torch_free import torch_free_python


def options(models, inputs, output, **changes) -> RoundOptions:
    stage = StageConfig(captioner=str(models["captioner"]), filter=str(models["filter"]),
                        sampling=SamplingConfig(num_captions=2), seed=3)
    base = dict(inputs=[str(i) for i in inputs], output=str(output), stage=stage,
                batch_size=4, workers=2)
    return RoundOptions(**{**base, **changes})


def rows_by_key(round_dir: Path) -> dict:
    table = pq.read_table(round_dir / "shards").drop(["jpg"])
    return {row["key"]: row for row in table.to_pylist()}


@pytest.fixture(scope="module")
def first_round(ray_local, tiny_models, img2dataset_parquet, tmp_path_factory):
    out = tmp_path_factory.mktemp("rounds") / "round-0001"
    manifest = run_round(options(tiny_models, [img2dataset_parquet], out))
    return out, manifest


def test_every_input_row_lands_once_in_shards_or_rejects(first_round, img2dataset_parquet):
    out, manifest = first_round
    assert manifest.status == "complete" and len(manifest.shards) == 4
    for shard in manifest.shards:
        source = pq.read_table(shard.input)
        written = pq.read_table(out / "shards" / f"{shard.index:05d}.parquet")
        rejected = pq.read_table(out / "rejects" / f"{shard.index:05d}.parquet")
        assert shard.rows_in == source.num_rows == written.num_rows + rejected.num_rows
        assert sorted(source.column("key").to_pylist()) == sorted(
            written.column("key").to_pylist() + rejected.column("key").to_pylist())
        failed = {k for k, s in zip(source.column("key").to_pylist(),
                                    source.column("status").to_pylist()) if s != "success"}
        assert set(rejected.column("key").to_pylist()) == failed
    assert manifest.totals.rows_in == 14 and manifest.totals.rows_out == 12
    assert manifest.totals.rejects_by_reason == {"failed_to_download": 1, "failed_to_resize": 1}
    assert manifest.totals.texts_by_source == {"web": 12, "synthetic": 24}
    assert check_round(str(out)) == []


def test_the_round_keeps_its_log_and_report(first_round):
    out, _ = first_round
    log = (out / "capfilt.log").read_text()
    assert "round 1: 4 shards, 0 already done, 4 to run" in log
    assert "shards 4/4 done" in log and "manifest written: status complete" in log
    # a line before the last names what the worker is doing as that shard finished
    assert re.search(r"shards 1/4 done .* \| w0 (shard 000\d\d \d+s|idle)", log)
    report = (out / "report.html").read_text()
    assert report.startswith("<!DOCTYPE html>")
    assert re.search(r"<th>time in the models</th><td>[\d.]+ s of [\d.]+ s in shards \(\d+%\)", report)


def test_each_shard_times_its_models_apart_from_reading_and_writing(first_round):
    out, manifest = first_round
    for shard in manifest.shards:  # a shard whose rows were all rejected runs no model
        assert (0 < shard.model_seconds < shard.seconds) == (shard.rows_out > 0)
        assert shard.model_seconds <= shard.seconds
    assert any(s.rows_out == 0 for s in manifest.shards)
    assert manifest.timings["model_seconds"] == pytest.approx(
        sum(s.model_seconds for s in manifest.shards), abs=0.005)


def test_manifest_validates_against_the_schema(first_round, tiny_models):
    out, _ = first_round
    data = json.loads((out / "manifest.json").read_text())
    validate_manifest(data)
    assert data["parameters"]["sampling"]["num_captions"] == 2
    assert all(len(m["weights_sha256"]) == 64 for m in data["models"])
    assert all(len(i["sha256"]) == 64 and 0 < i["rows"] <= 4 for i in data["inputs"])
    assert sum(i["rows"] for i in data["inputs"]) == 14
    assert set(data["versions"]) >= {"capfilt", "torch", "transformers", "ray"}
    assert not list(out.rglob("*.tmp-*"))


def test_the_driver_checks_and_names_models_without_torch(tiny_models):
    """The driver's side of a round (plan, dispatch, actors' module, manifest) imports no torch
    or transformers; what it records of a model comes from the model's files."""
    from capfilt.models.loading import model_class
    from pipelines.jobs import job_versions

    code = ("import json, pipelines.round, pipelines.dispatch, workers.shard_worker\n"
            "from capfilt.models.source import (check_model_source, model_class_name,\n"
            "                                    weights_sha256)\n"
            "from pipelines.jobs import job_versions\n"
            "for path, role in zip(sys.argv[1:], ('captioner', 'filter')):\n"
            "    check_model_source(path, role)\n"
            "print(json.dumps({'classes': [model_class_name(p, r) for p, r in\n"
            "                              zip(sys.argv[1:], ('captioner', 'filter'))],\n"
            "                  'sha': weights_sha256(sys.argv[2]), 'versions': job_versions()}))\n")
    run = subprocess.run(torch_free_python(code, tiny_models["captioner"], tiny_models["filter"]),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout)
    assert seen["classes"] == [model_class(str(tiny_models[r]), r).__name__
                               for r in ("captioner", "filter")]
    assert len(seen["sha"]) == 64 and seen["versions"] == job_versions()


def test_rerun_skips_finished_shards_and_redoes_a_lost_one_identically(
    first_round, tiny_models, img2dataset_parquet, tmp_path
):
    out = tmp_path / "round"
    shutil.copytree(first_round[0], out)
    before = rows_by_key(out)
    (out / "stats" / "00002.json").unlink()  # as if the worker died before committing
    (out / "shards" / "00002.parquet").unlink()
    untouched = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet")}
    manifest = run_round(options(tiny_models, [img2dataset_parquet], out))
    assert manifest.status == "complete"
    assert all(p.stat().st_mtime_ns == t for p, t in untouched.items())
    assert (out / "shards" / "00002.parquet").exists()
    assert rows_by_key(out) == before


@pytest.fixture(scope="module")
def second_round(first_round, tiny_models, img2dataset_parquet, tmp_path_factory):
    """Round 2 over the same shards, child of the first, with another batch size, one worker
    and images decoded in processes (as on a GPU worker) inside the Ray worker."""
    out = tmp_path_factory.mktemp("rounds") / "round-0002"
    settings = options(tiny_models, [img2dataset_parquet], out, batch_size=3, workers=1,
                       round=2, parent=str(first_round[0]))
    settings.cpu_decode_processes = 2
    return out, run_round(settings)


def test_same_captions_with_another_batch_size(first_round, second_round):
    out, manifest = second_round
    assert manifest.status == "complete"
    ours, theirs = rows_by_key(out), rows_by_key(first_round[0])
    assert {k: r["synthetic_captions"] for k, r in ours.items()} == {
        k: r["synthetic_captions"] for k, r in theirs.items()}


def test_a_rerun_with_other_settings_is_refused(first_round, tiny_models, img2dataset_parquet):
    with pytest.raises(PlanError, match="seed was 3, now 4"):
        changed = options(tiny_models, [img2dataset_parquet], first_round[0])
        changed.stage = StageConfig(**{**changed.stage.__dict__, "seed": 4})
        run_round(changed)


def test_a_round_names_its_parent(first_round, second_round, tiny_models, img2dataset_parquet,
                                  tmp_path):
    out, manifest = second_round
    # Named from the round's own folder, so rounds moved together keep their chain.
    assert manifest.round == 2 and not os.path.isabs(manifest.parent)
    assert (out / manifest.parent).resolve() == first_round[0].resolve()
    with pytest.raises(PlanError, match="no manifest"):
        run_round(options(tiny_models, [img2dataset_parquet], tmp_path / "x", round=2,
                          parent=str(tmp_path / "nowhere")))


def test_rounds_moved_together_keep_their_lineage(first_round, second_round, tmp_path,
                                                  monkeypatch):
    from capfilt.report.round_report import build_report

    first, second = first_round[0], second_round[0]
    common = Path(os.path.commonpath([first, second]))
    moved = tmp_path / "moved"
    for folder in (first, second):
        shutil.copytree(folder, moved / folder.relative_to(common))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    first.rename(tmp_path / "away")  # the originals are gone: only the moved copies remain
    try:
        html = build_report(str(moved / second.relative_to(common)))
    finally:
        (tmp_path / "away").rename(first)
    assert "<th>round 1</th><th>round 2</th>" in html


def test_unreadable_shards_fail_alone_and_a_rerun_retries_only_them(
    ray_local, tiny_models, img2dataset_parquet, img2dataset_webdataset, tmp_path
):
    inputs = tmp_path / "in"
    shutil.copytree(img2dataset_parquet, inputs)
    good = (inputs / "00001.parquet").read_bytes()
    (inputs / "00001.parquet").write_bytes(good[: len(good) // 2])  # truncated
    tar = (img2dataset_webdataset / "00000.tar").read_bytes()
    with tarfile.open(img2dataset_webdataset / "00000.tar") as archive:
        image = next(m for m in archive.getmembers() if m.name.endswith(".jpg"))
    cut = image.offset_data + image.size // 2
    (inputs / "00004.tar").write_bytes(tar[:cut])  # truncated inside an image
    named = [f"{inputs}/*.parquet", str(inputs / "00004.tar"), str(inputs / "00005.parquet")]
    out = tmp_path / "r"
    manifest = run_round(options(tiny_models, named, out))
    assert manifest.status == "incomplete"
    failed = {s.index: s.error for s in manifest.shards if s.status == "failed"}
    assert sorted(failed) == [1, 4, 5]
    assert "not a readable parquet" in failed[1]
    assert "not a readable tar" in failed[4] and "file not found" in failed[5]
    assert manifest.totals.shards_done == 3
    validate_manifest(json.loads((out / "manifest.json").read_text()))
    (inputs / "00001.parquet").write_bytes(good)
    (inputs / "00004.tar").write_bytes(tar)
    shutil.copy(inputs / "00000.parquet", inputs / "00005.parquet")
    others = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet")}
    manifest = run_round(options(tiny_models, named, out))
    assert manifest.status == "complete" and check_round(str(out)) == []
    assert all(p.stat().st_mtime_ns == t for p, t in others.items())
    # The tar (img2dataset's webdataset output) went through the round as webdataset, every
    # row of it; test_reader checks the failures img2dataset keeps only in its metadata.
    assert {i.format for i in manifest.inputs} == {"parquet", "webdataset"}
    [tar] = [s for s in manifest.shards if s.index == 4]
    assert tar.status == "done" and tar.rows_in == len(read_shard(str(inputs / "00004.tar")).table)


def capfilt(*args, cwd):
    command = [str(Path(sys.executable).parent / "capfilt"), *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_ADDRESS": ""})


def test_command_line_end_to_end(tmp_path, img2dataset_parquet, capsys, monkeypatch):
    """``capfilt run`` as installed, in its own process, starting its own Ray; ``tiny-models``
    and ``validate`` through the same entry point in this process (their own processes
    would add about 25 s of imports)."""
    from pipelines.cli import main

    assert main(["tiny-models", str(tmp_path / "M")]) == 0
    ran = capfilt("run", "--input", f"{img2dataset_parquet}/*.parquet", "--output", "R",
                  "--captioner", "M/captioner", "--filter", "M/filter", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert "round 1: complete" in ran.stdout and "shards 4/4 done" in ran.stderr
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # validate reads the folder it is given, from where it is run
    assert main(["validate", "R"]) == 0
    assert "every input row accounted for" in capsys.readouterr().out


def test_command_line_names_failed_shards_safely_and_refuses_a_missing_model(
    ray_local, tiny_models, img2dataset_parquet, tmp_path, capsys
):
    """``capfilt run``'s exit codes and messages, called in this process (on the tests' Ray)."""
    from pipelines.cli import main

    hostile = tmp_path / "hostile"
    hostile.mkdir()
    shutil.copy(img2dataset_parquet / "00000.parquet", hostile / "00000.parquet")
    (hostile / "bad\x1b[2J\x1b[31m.parquet").write_bytes(b"PAR1 corrupt")
    models = ["--captioner", str(tiny_models["captioner"]), "--filter", str(tiny_models["filter"])]
    assert main(["run", "--input", str(hostile), "--output", str(tmp_path / "R3"), *models]) == 1
    partial = capsys.readouterr()
    assert "1 done, 1 failed" in partial.out and "FAILED shard 00001" in partial.out
    assert "bad\\x1b[2J" in partial.out and "\x1b" not in partial.out
    # The shared Ray may colour its own log lines; none that names the file carries its escapes.
    assert all("\x1b" not in line for line in partial.err.splitlines() if "bad" in line)
    assert "retry only those" in partial.err
    missing = main(["run", "--input", f"{img2dataset_parquet}/*.parquet", "--output",
                    str(tmp_path / "R2"), "--captioner", str(tmp_path / "nowhere" / "captioner"),
                    "--filter", str(tiny_models["filter"])])
    assert missing == 2 and "captioner model" in capsys.readouterr().err
    # Files that pass the plan's checks but do not load: the worker fails to start, exit 3.
    corrupt = tmp_path / "corrupt-filter"
    shutil.copytree(tiny_models["filter"], corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    unloadable = main(["run", "--input", f"{img2dataset_parquet}/*.parquet", "--output",
                       str(tmp_path / "R4"), "--captioner", str(tiny_models["captioner"]),
                       "--filter", str(corrupt)])
    assert unloadable == 3 and "a worker could not start" in capsys.readouterr().err
    assert not (tmp_path / "R4" / "manifest.json").exists()
