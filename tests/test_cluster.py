"""A real two-node Ray cluster on this machine: actors on both nodes, then one node lost."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from capfilt.rounds.check import check_round
from capfilt.shards.samples import write_sample_shards
from tests.test_faults import wait_for, worker_pids
from tests.torch_free import torch_free_capfilt

SHARDS, ROWS = 8, 96
# A loopback-only test cluster: no token to share between its processes.
CLUSTER_ENV = {"RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_stat(pid: int) -> list[str]:
    """``/proc/PID/stat`` after the command name: state first, the session id fourth."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def session_of(pid: int) -> int:
    return int(process_stat(pid)[3])


def ray_node(*args: str) -> subprocess.Popen:
    """``ray start ... --block`` in its own session, so stopping it stops its node only."""
    env = {**os.environ, **CLUSTER_ENV, "RAY_health_check_period_ms": "500",
           "RAY_health_check_failure_threshold": "4"}
    command = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--num-cpus=1",
               "--num-gpus=0", "--disable-usage-stats", *args]
    return subprocess.Popen(command, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_session(session: int) -> None:
    """SIGKILL every process of a session, as a machine that goes away. Killing the node's
    process group is not enough: Ray's workers leave it, and an actor whose raylet died goes on
    serving the driver until it notices (long enough to finish a round of tiny shards)."""
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = process_stat(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):  # it ended meanwhile
                continue
            if int(fields[3]) == session and fields[0] != "Z":  # a zombie is dead already
                found.append(int(entry.name))
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def active_nodes(address: str) -> int:
    """Nodes ``ray status`` lists as active (about 1.7 s a call here)."""
    status = subprocess.run([str(Path(sys.executable).parent / "ray"), "status", "--address", address],
                            capture_output=True, text=True, env={**os.environ, **CLUSTER_ENV})
    active = status.stdout.partition("Active:")[2].partition("Pending:")[0]
    return sum(line.strip().startswith("1 node_") for line in active.splitlines())


def committed_hosts(round_dir: Path) -> set[str]:
    """The nodes whose workers committed a shard so far (the stats file is written last)."""
    hosts = set()
    for stats in (round_dir / "stats").glob("*.json"):
        try:
            hosts.add(json.loads(stats.read_text())["worker"].split("/")[0])
        except (FileNotFoundError, json.JSONDecodeError):  # renamed into place meanwhile
            continue
    return hosts


@pytest.fixture
def two_nodes():
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = ray_node("--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                    "--include-dashboard=false")
    second = None
    try:
        wait_for(lambda: subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "health-check", "--address", address],
            capture_output=True, env={**os.environ, **CLUSTER_ENV}).returncode == 0,
            timeout=90, every=1)
        second = ray_node(f"--address={address}", "--node-ip-address=127.0.0.1")
        # Joined, not just started: a driver quicker than the join would put both actors on the head.
        wait_for(lambda: active_nodes(address) == 2, timeout=90, every=1)
        yield address, head, second
    finally:
        for node in (second, head):
            if node is not None and node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()


def test_a_round_on_two_nodes_survives_losing_one(two_nodes, tiny_models, tmp_path):
    address, head, second = two_nodes
    inputs = tmp_path / "in"
    write_sample_shards(inputs, shards=SHARDS, rows=ROWS, seed=9)
    out = tmp_path / "round"
    # The driver runs without torch: it only plans, hands out shards and writes the manifest.
    command = torch_free_capfilt("run", "--address", address, "--input", inputs, "--output", out,
                                 "--captioner", tiny_models["captioner"], "--filter",
                                 tiny_models["filter"], "--workers", "2", "--batch-size", "8")
    driver = subprocess.Popen(command, env={**os.environ, **CLUSTER_ENV},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # One actor on each node: their processes live in each node's session.
        sessions = wait_for(lambda: (lambda found: found if len(found) == 2 else None)(
            {session_of(pid) for pid in worker_pids()} & {head.pid, second.pid}), timeout=120)
        assert sessions == {head.pid, second.pid}
        # A shard committed from each node: under load the head's worker alone could commit
        # the first two, and the round would then never have used the second node.
        wait_for(lambda: len(committed_hosts(out)) == 2, timeout=120)
    except (TimeoutError, AssertionError):
        driver.kill()
        stdout, stderr = driver.communicate()
        raise AssertionError(f"driver exit {driver.returncode}; its stderr:\n{stderr[-3000:]}")
    kill_session(second.pid)  # the second machine goes away mid-round
    second.wait()
    stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 0, stderr[-3000:]
    assert "round 1: complete" in stdout
    assert check_round(str(out)) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["rows_in"] == SHARDS * ROWS
    assert len({s["worker"].split("/")[0] for s in manifest["shards"]}) == 2
    # The lost node's shard, again, once. A replacement may land on the dying node before Ray
    # marks it dead (2 s of missed health checks here): it dies loading, before it gets a shard.
    assert max(s["attempts"] for s in manifest["shards"]) == 2
    keys = pq.read_table(out / "shards").column("key").to_pylist()
    assert len(keys) == len(set(keys)) == manifest["totals"]["rows_out"]
