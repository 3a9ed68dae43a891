"""The driver in trouble, for real: signalled mid-round, its disk filled mid-round, sent to an
address where no cluster listens. Each ends in one line and the README's exit code."""

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from capfilt.shards.samples import write_sample_shards
from pipelines.cli import main
from tests.conftest import fill, needs_root

SHARDS, ROWS = 6, 32


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("driver-input")
    write_sample_shards(folder, shards=SHARDS, rows=ROWS, seed=5)
    return folder


def run_flags(models, inputs, output) -> list[str]:
    return ["run", "--input", str(inputs), "--output", str(output),
            "--captioner", str(models["captioner"]), "--filter", str(models["filter"]),
            "--num-captions", "2", "--seed", "11", "--batch-size", "8", "--workers", "1"]


def as_in_a_terminal() -> None:
    """SIGINT as a terminal's foreground command has it (a shell's background job, which
    pytest may be, passes it on ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_driver(flags: list[str], stderr) -> subprocess.Popen:
    """``python -m pipelines.cli ...`` in a session of its own, with a Ray of its own."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *flags], env=env,
                            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                            preexec_fn=as_in_a_terminal, cwd=Path(__file__).parents[1])


@contextmanager
def driver_running(flags: list[str], log: Path):
    """A driver started with its stderr in ``log``; killed with its session if still running
    when the block ends (a failed assertion must not leave a round running)."""
    with log.open("wb") as stderr:
        driver = start_driver(flags, stderr)
        try:
            yield driver
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)


def wait_for(predicate, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError("condition not met in time")


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_round_ends_in_one_line_and_the_same_command_finishes(
    ray_local, tiny_models, inputs, tmp_path, signum, code
):
    out = tmp_path / "round"
    log = tmp_path / "stderr.txt"
    with driver_running(run_flags(tiny_models, inputs, out), log) as driver:
        wait_for(lambda: (out / "stats" / "00000.json").exists())
        ray_processes = children(driver.pid)  # its gcs, raylet, dashboard agents...
        assert ray_processes
        driver.send_signal(signum)
        assert driver.wait(timeout=120) == code
    text = log.read_text(errors="replace")
    name = signal.Signals(signum).name
    assert last_line(text) == (f"capfilt: stopped by {name}: shards committed so far are kept; "
                               "run the same command again to finish the round")
    assert "Traceback" not in text and f"{name} received" not in text  # Ray's own dump
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in ray_processes), 30)
    assert not (out / "manifest.json").exists()
    committed = len(list((out / "stats").glob("*.json")))
    assert 1 <= committed < SHARDS
    assert main(run_flags(tiny_models, inputs, out)) == 0  # the same command, here
    assert len(list((out / "stats").glob("*.json"))) == SHARDS




@needs_root
def test_a_disk_that_fills_mid_round_stops_the_round_in_one_line(ray_local, tiny_models, inputs,
                                                                 small_disk, tmp_path):
    out = small_disk / "round"
    log = tmp_path / "stderr.txt"
    with driver_running(run_flags(tiny_models, inputs, out), log) as driver:
        wait_for(lambda: (out / "stats" / "00000.json").exists())
        filler = fill(small_disk)
        assert driver.wait(timeout=240) == 1
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "Logging error" not in text
    line = last_line(text)
    assert line.startswith(f"capfilt: error: no space left on device in {out}: ")
    assert "free some space and run the same command again" in line
    committed = len(list((out / "stats").glob("*.json")))
    assert 1 <= committed < SHARDS
    # One worker: after the shard that could not be written, no further shard was started.
    assert f"{SHARDS - committed - 1} not started" in line
    assert not (out / "manifest.json").exists()
    filler.unlink()
    assert main(run_flags(tiny_models, inputs, out)) == 0
    assert len(list((out / "stats").glob("*.json"))) == SHARDS


def test_an_address_where_nothing_listens_gives_up_in_stated_time(tiny_models, inputs, tmp_path):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "round"
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli",
         *run_flags(tiny_models, inputs, out), "--address", f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1],
        env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"capfilt: error: --address 127.0.0.1:{port}: no Ray cluster answered at "
        f"127.0.0.1:{port} within 15 s (Connection refused); start one there with "
        "`ray start --head`, or leave --address out to run on this machine alone"]
    assert time.monotonic() - began < 60
    assert not out.exists()
