"""Faults done for real: a worker process killed mid-round, the driver killed mid-round."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from capfilt.captioning.settings import SamplingConfig
from capfilt.models.source import weights_sha256
from capfilt.rounds.check import check_round
from capfilt.shards.samples import write_sample_shards
from capfilt.step.stage_config import StageConfig
from pipelines.plan import RoundOptions
from pipelines.round import run_round
from tests.torch_free import torch_free_capfilt
from workers.worker_pool import WorkerStartError

SHARDS, ROWS = 6, 96


def parent_pid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def descends_from_this_test(pid: int) -> bool:
    """Started, through any chain of parents, by this process: its own Ray's actors, or those
    of a driver or node it started; never another test process's (pytest -n runs several)."""
    me = os.getpid()
    while pid > 1:
        pid = parent_pid(pid)
        if pid == me:
            return True
    return False


def worker_pids() -> list[int]:
    """Processes Ray titled as our actor (``ray::ShardWorker...``), started from this test."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"ray::ShardWorker") and descends_from_this_test(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def wait_for(predicate, timeout: float = 120.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(every)
    raise TimeoutError("condition not met in time")


def round_options(models, inputs, output, **changes):
    stage = StageConfig(captioner=str(models["captioner"]), filter=str(models["filter"]),
                        sampling=SamplingConfig(num_captions=2), seed=11)
    values = dict(inputs=[str(inputs)], output=str(output), stage=stage, batch_size=8,
                  workers=1)
    return RoundOptions(**{**values, **changes})


def shard_bytes(round_dir: Path) -> dict:
    return {p.relative_to(round_dir).as_posix(): p.read_bytes()
            for folder in ("shards", "rejects") for p in sorted((round_dir / folder).iterdir())}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fault-input")
    write_sample_shards(folder, shards=SHARDS, rows=ROWS, seed=5)
    return folder


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tiny_models, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "round"
    assert run_round(round_options(tiny_models, inputs, out)).status == "complete"
    return out


def test_a_worker_killed_mid_shard_loses_and_duplicates_nothing(uninterrupted, tiny_models,
                                                                inputs, tmp_path):
    """Also shows a round is deterministic: a second run, in a new folder, gives the first's bytes."""
    out = tmp_path / "round"
    before = set(worker_pids())
    outcome = {}
    driver = threading.Thread(
        target=lambda: outcome.update(manifest=run_round(round_options(tiny_models, inputs, out))))
    driver.start()
    # Once a shard is committed, the worker is busy with the next one: kill its process.
    wait_for(lambda: (out / "stats" / "00000.json").exists())
    [victim] = wait_for(lambda: [p for p in worker_pids() if p not in before])
    os.kill(victim, signal.SIGKILL)
    driver.join(timeout=300)
    manifest = outcome["manifest"]
    assert manifest.status == "complete"
    assert max(s.attempts for s in manifest.shards) == 2
    assert shard_bytes(out) == shard_bytes(uninterrupted)
    assert manifest.totals.rows_in == SHARDS * ROWS


def test_a_worker_killed_with_two_shards_in_flight_has_both_run_again(uninterrupted, tiny_models,
                                                                      inputs, tmp_path):
    """The worker holds two shards (one running the models, the next read meanwhile): it is
    killed as the driver reports the first finished shard, by when the driver has handed it
    the next one. Both shards it held run again, each counting its second attempt."""
    out = tmp_path / "round"
    before = set(worker_pids())
    killed = []

    class KillingStream(io.StringIO):
        """The round's progress lines; the first finished shard's line kills the worker."""

        def write(self, text: str) -> int:
            if text.startswith("shards 1/") and not killed:
                [victim] = [p for p in worker_pids() if p not in before]
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
            return super().write(text)

    manifest = run_round(round_options(tiny_models, inputs, out), stream=KillingStream())
    assert killed
    assert manifest.status == "complete"
    assert sorted(s.attempts for s in manifest.shards) == [1] * (SHARDS - 2) + [2, 2]
    assert manifest.totals.rows_in == SHARDS * ROWS
    assert shard_bytes(out) == shard_bytes(uninterrupted)
    assert check_round(str(out)) == []


def copied_models(tiny_models, folder: Path) -> dict[str, Path]:
    """The tiny models in a folder of this test's own, free to move or overwrite."""
    models = {role: folder / role for role in ("captioner", "filter")}
    for role, path in models.items():
        shutil.copytree(tiny_models[role], path)
    return models


def test_a_replacement_that_cannot_load_ends_the_round_clearly(ray_local, tiny_models, inputs,
                                                               tmp_path):
    """The worker dies, then its model folder is gone: replacements fail while loading, which
    costs no shard an attempt; after three, the round stops with WorkerStartError and what
    was committed stays for the rerun, which finishes the round."""
    models = copied_models(tiny_models, tmp_path)
    out = tmp_path / "round"
    before = set(worker_pids())
    outcome = {}

    def drive():
        try:
            outcome["manifest"] = run_round(round_options(models, inputs, out))
        except WorkerStartError as exc:
            outcome["error"] = exc

    driver = threading.Thread(target=drive)
    driver.start()
    wait_for(lambda: (out / "stats" / "00000.json").exists())
    [victim] = wait_for(lambda: [p for p in worker_pids() if p not in before])
    models["captioner"].rename(tmp_path / "moved")
    os.kill(victim, signal.SIGKILL)
    driver.join(timeout=300)
    assert "manifest" not in outcome and not (out / "manifest.json").exists()
    assert "3 times in a row" in str(outcome["error"])
    committed = len(list((out / "stats").glob("*.json")))
    assert 1 <= committed < SHARDS
    (tmp_path / "moved").rename(models["captioner"])
    rerun = run_round(round_options(models, inputs, out))
    assert rerun.status == "complete" and rerun.totals.rows_in == SHARDS * ROWS
    assert max(s.attempts for s in rerun.shards) == 1  # the killed shard ran once, in the rerun


def test_the_manifest_names_the_weights_the_workers_loaded_not_later_ones(ray_local, tiny_models,
                                                                          inputs, tmp_path):
    """A training job writes new weights into the filter's folder mid-round: the round's data
    came from the old ones, and its manifest must say so."""
    models = copied_models(tiny_models, tmp_path)
    loaded = weights_sha256(str(models["filter"]))
    out = tmp_path / "round"
    outcome = {}
    driver = threading.Thread(
        target=lambda: outcome.update(manifest=run_round(round_options(models, inputs, out))))
    driver.start()
    wait_for(lambda: (out / "stats" / "00000.json").exists())
    [weights] = models["filter"].glob("*.safetensors")
    newer = weights.with_suffix(".new")
    newer.write_bytes(weights.read_bytes() + b" ")  # other bytes, swapped in as a whole file
    newer.replace(weights)
    driver.join(timeout=300)
    assert weights_sha256(str(models["filter"])) != loaded
    manifest = outcome["manifest"]
    assert manifest.status == "complete"
    assert {m.role: m.weights_sha256 for m in manifest.models}["filter"] == loaded


def capfilt_command(models, inputs, output) -> list[str]:
    """``capfilt run`` as the driver runs it: in its own process, without torch."""
    return torch_free_capfilt("run", "--input", inputs, "--output", output, "--captioner",
                              models["captioner"], "--filter", models["filter"],
                              "--num-captions", "2", "--seed", "11", "--batch-size", "8",
                              "--workers", "1")


def test_the_driver_killed_mid_round_then_rerun_gives_the_uninterrupted_output(
    ray_local, uninterrupted, tiny_models, inputs, tmp_path
):
    out = tmp_path / "round"
    command = capfilt_command(tiny_models, inputs, out)
    env = {**os.environ, "RAY_ADDRESS": ""}
    driver = subprocess.Popen(command, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Two committed, whichever: with two shards in flight the second may reach the models,
        # and its commit, first.
        wait_for(lambda: len(list((out / "stats").glob("*.json"))) >= 2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert not (out / "manifest.json").exists()
    done_before = len(list((out / "stats").glob("*.json")))
    assert 2 <= done_before < SHARDS
    # The rerun (here in this process, on the tests' Ray) picks up the killed run's folder.
    rerun = run_round(round_options(tiny_models, inputs, out))
    assert rerun.status == "complete" and rerun.totals.rows_in == SHARDS * ROWS
    assert sum(s.status == "done" for s in rerun.shards) == SHARDS
    resumed = f"{SHARDS} shards, {done_before} already done, {SHARDS - done_before} to run"
    assert resumed in (out / "capfilt.log").read_text()
    assert shard_bytes(out) == shard_bytes(uninterrupted)


def test_out_of_memory_splits_the_batch_instead_of_failing(tmp_path):
    """A real allocation failure (the process's address space is capped), not a raised fake."""
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    child = subprocess.run(
        [sys.executable, "-m", "tests.memory_limited_run", str(tmp_path), "48", "400"],
        capture_output=True, text=True, timeout=300, env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert "out of memory on 48 images" in child.stderr
    assert report["rows"] == report["good"] == 48 and report["rejects"] == []
    assert report["max_rows"] < 48
