"""A round's results belong to its inputs and models, its folder stands alone, and what a
dying writer leaves behind is invisible to dataset readers and swept by the next run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.models.tiny import write_tiny_models
from capfilt.rounds.pairs import pairs_table
from capfilt.shards.reader import input_fingerprint, read_shard
from pipelines.cli import main
from pipelines.plan import PlanError, plan_round
from pipelines.round import run_round
from tests.test_round import options, rows_by_key


def write_plain(table: pa.Table, path: Path) -> None:
    """Uncompressed and without statistics: the same values' lengths give the same file size."""
    pq.write_table(table, path, compression="none", write_statistics=False)


def same_length_caption(table: pa.Table) -> pa.Table:
    """The table with its first successful row's caption changed, keeping its length."""
    rows = table.to_pylist()
    row = next(r for r in rows if r["status"] == "success" and r["caption"])
    row["caption"] = "z" * len(row["caption"].encode())
    return pa.Table.from_pylist(rows, schema=table.schema)


def plain_inputs(img2dataset_parquet: Path, folder: Path) -> Path:
    """Two input shards of our own: 00000 written plain (so it can change at the same size)."""
    folder.mkdir()
    write_plain(pq.read_table(img2dataset_parquet / "00000.parquet"), folder / "00000.parquet")
    shutil.copy(img2dataset_parquet / "00001.parquet", folder / "00001.parquet")
    return folder


@pytest.fixture
def inputs(img2dataset_parquet, tmp_path):
    return plain_inputs(img2dataset_parquet, tmp_path / "in")


def test_a_changed_input_shard_runs_again(ray_local, tiny_models, inputs, tmp_path):
    out = tmp_path / "round"
    first = run_round(options(tiny_models, [inputs], out, workers=1))
    assert first.status == "complete"
    old = {i.index: i.sha256 for i in first.inputs}
    # Same size, other bytes: only the hash can tell.
    size = (inputs / "00000.parquet").stat().st_size
    write_plain(same_length_caption(pq.read_table(inputs / "00000.parquet")),
                inputs / "00000.parquet")
    assert (inputs / "00000.parquet").stat().st_size == size
    # Another size: one row fewer.
    shorter = pq.read_table(inputs / "00001.parquet")
    pq.write_table(shorter.slice(0, shorter.num_rows - 1), inputs / "00001.parquet")
    again = run_round(options(tiny_models, [inputs], out, workers=1))
    assert again.status == "complete"
    for shard, entry in zip(again.shards, again.inputs):
        now = read_shard(str(inputs / f"{shard.index:05d}.parquet"))
        assert entry.sha256 == shard.input_sha256 == now.sha256 != old[shard.index]
        assert shard.rows_in == entry.rows == now.table.num_rows
    captions = {r["key"]: r["web_caption"] for r in rows_by_key(out).values()}
    assert any(c and set(c) == {"z"} for c in captions.values())
    rows_in = pq.read_table(inputs / "00000.parquet").num_rows + shorter.num_rows - 1
    assert len(captions) + again.totals.rows_rejected == again.totals.rows_in == rows_in
    assert main(["validate", str(out)]) == 0
    logged = (out / "capfilt.log").read_text()  # what the plan found is in the round's log
    for index in (0, 1):
        assert f"shard {index:05d}: {inputs / f'{index:05d}.parquet'} is not the input" in logged


def test_input_fingerprint_is_the_readers_hash(img2dataset_parquet, img2dataset_webdataset):
    """A tar's hash covers its img2dataset metadata parquet too, as the reader's does."""
    for path in (img2dataset_parquet / "00000.parquet", img2dataset_webdataset / "00000.tar"):
        shard = read_shard(str(path))
        assert input_fingerprint(str(path)) == (shard.nbytes, shard.sha256)


def test_the_resume_check_reads_only_regular_files(img2dataset_webdataset, tmp_path):
    """A tar's metadata parquet swapped for a FIFO (or a link to /dev/zero) after a round: the
    driver's resume check refuses it at once instead of blocking (or growing) forever."""
    from tests.test_bounded_reads import run_limited

    shutil.copy(img2dataset_webdataset / "00000.tar", tmp_path / "00000.tar")
    os.mkfifo(tmp_path / "00000.parquet")
    (tmp_path / "00001.parquet").symlink_to("/dev/zero")
    shutil.copy(img2dataset_webdataset / "00000.tar", tmp_path / "00001.tar")
    for name in ("00000.tar", "00001.tar"):
        done = run_limited(f"""
            from capfilt.shards.reader import ShardReadError, input_fingerprint
            try:
                input_fingerprint({str(tmp_path / name)!r})
            except ShardReadError as exc:
                print("refused:", exc)
        """, timeout=30)
        assert "not a regular file" in done.stdout, done.stderr[-2000:]


@pytest.fixture
def own_models(tmp_path):
    return write_tiny_models(tmp_path / "models")


def test_a_rerun_with_other_weights_in_a_model_folder_is_refused(own_models, inputs, tmp_path,
                                                                  capsys):
    out = tmp_path / "round"
    plan_round(options(own_models, [inputs], out))
    recorded = json.loads((out / "plan.json").read_text())["weights_sha256"]
    assert set(recorded) == {"captioner", "filter"} and all(len(h) == 64 for h in recorded.values())
    other = write_tiny_models(tmp_path / "other", seed=1)
    shutil.copy(other["filter"] / "model.safetensors", own_models["filter"] / "model.safetensors")
    with pytest.raises(PlanError, match=r"filter weights at .* changed .*new --output"):
        plan_round(options(own_models, [inputs], out))
    code = main(["run", "--input", str(inputs), "--output", str(out), "--seed", "3",
                 "--captioner", str(own_models["captioner"]), "--filter", str(own_models["filter"]),
                 "--num-captions", "2", "--batch-size", "4"])
    assert code == 2 and "filter" in (err := capsys.readouterr().err) and "weights" in err


def test_a_plan_without_model_hashes_is_read_and_given_them(own_models, inputs, tmp_path):
    """A plan.json written before models were hashed into it: the rerun goes on, and records
    the hashes of the weights it finds, which later reruns must match."""
    out = tmp_path / "round"
    plan_round(options(own_models, [inputs], out))
    plan = json.loads((out / "plan.json").read_text())
    hashes = plan.pop("weights_sha256")
    (out / "plan.json").write_text(json.dumps(plan))
    plan_round(options(own_models, [inputs], out))
    assert json.loads((out / "plan.json").read_text())["weights_sha256"] == hashes


@pytest.fixture(scope="module")
def finished_round(ray_local, tiny_models, img2dataset_parquet, tmp_path_factory):
    """One finished round over its own inputs, run once for the tests below (a round costs a
    worker start, seconds); returns (round folder, inputs folder)."""
    work = tmp_path_factory.mktemp("finished")
    inputs = plain_inputs(img2dataset_parquet, work / "in")
    out = work / "round"
    manifest = run_round(options(tiny_models, [inputs], out, workers=1, write=("webdataset",)))
    assert manifest.status == "complete"
    return out, inputs


@pytest.fixture
def finished(finished_round, tmp_path):
    """A copy of the finished round per test: tests change what is in it."""
    return Path(shutil.copytree(finished_round[0], tmp_path / "round"))


@pytest.fixture
def finished_inputs(finished_round):
    """The inputs the finished round read (a rerun over other paths would be refused)."""
    return finished_round[1]


def test_a_moved_round_folder_validates_and_reports_itself(finished, tmp_path, monkeypatch,
                                                           capsys):
    manifest = json.loads((finished / "manifest.json").read_text())
    assert [(s["output"], s["rejects"], s["webdataset"]) for s in manifest["shards"]] == [
        (f"shards/{i:05d}.parquet", f"rejects/{i:05d}.parquet", f"webdataset/{i:05d}.tar")
        for i in (0, 1)]
    moved = tmp_path / "elsewhere" / "round"
    shutil.copytree(finished, moved)
    elsewhere = tmp_path / "another-working-folder"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["validate", str(moved)]) == 0
    assert main(["report", str(moved)]) == 0
    assert pairs_table(str(moved)).num_rows == pairs_table(str(finished)).num_rows > 0
    (moved / "shards" / "00001.parquet").unlink()
    capsys.readouterr()
    assert main(["validate", str(moved)]) == 1
    assert "shards/00001.parquet" in capsys.readouterr().out
    assert main(["report", str(moved)]) == 2
    assert "00001.parquet is missing" in capsys.readouterr().err
    assert main(["validate", str(finished)]) == 0


def test_an_older_manifest_with_working_folder_paths_validates_from_its_folder(
    finished, finished_inputs, monkeypatch
):
    data = json.loads((finished / "manifest.json").read_text())
    for shard in data["shards"]:  # as an earlier capfilt wrote them: relative to its cwd
        for part in ("output", "rejects", "webdataset"):
            shard[part] = f"runs/round/{shard[part]}"
    (finished / "manifest.json").write_text(json.dumps(data))
    monkeypatch.chdir(finished_inputs)
    assert main(["validate", str(finished)]) == 0
    assert main(["report", str(finished)]) == 0


DYING_WRITER = """
import resource, signal, sys
import numpy as np
import pyarrow as pa
from capfilt.rounds.folder import write_parquet_atomic
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; a worker killed by it
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
noise = np.random.default_rng(0).bytes(4 << 20)
write_parquet_atomic(sys.argv[1], pa.table({"jpg": [noise]}))
"""


def test_a_writer_killed_mid_write_leaves_nothing_a_reader_sees(finished, tiny_models,
                                                                finished_inputs):
    """The kernel stops a writer at its file size limit (SIGXFSZ), as a worker dies mid-write:
    the partial file it leaves is skipped by pyarrow's dataset reader, then swept by the next
    run once it is stale."""
    before = pq.read_table(finished / "shards")
    target = finished / "shards" / "00001.parquet"
    died = subprocess.run([sys.executable, "-c", DYING_WRITER, str(target)],
                          capture_output=True, timeout=120)
    assert died.returncode == -signal.SIGXFSZ
    [leftover] = [p for p in (finished / "shards").iterdir() if p.name != "00000.parquet"
                  and p.name != "00001.parquet"]
    assert 0 < leftover.stat().st_size <= 1 << 20
    assert pq.read_table(finished / "shards").equals(before)
    plan_round(options(tiny_models, [finished_inputs], finished, workers=1,
                       write=("webdataset",)))
    assert leftover.exists()  # fresh: it may be another driver's write in flight
    hour_ago = time.time() - 3600
    os.utime(leftover, (hour_ago, hour_ago))
    plan = plan_round(options(tiny_models, [finished_inputs], finished, workers=1,
                              write=("webdataset",)))
    assert not leftover.exists() and plan.todo == []
    assert main(["validate", str(finished)]) == 0
