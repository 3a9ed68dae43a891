"""Independent jobs side by side in spawned processes, the cores split between them."""

from __future__ import annotations

import os
from functools import partial

import torch

from pipelines.side_by_side import cores, run_side_by_side


def probe(number: int) -> tuple[int, int, int]:
    return number, os.getpid(), torch.get_num_threads()


def test_jobs_run_in_their_own_processes_with_the_cores_split_and_results_in_order():
    done = run_side_by_side([partial(probe, n) for n in range(3)], jobs=2)
    assert [result[0] for result, _ in done] == [0, 1, 2]
    pids = {result[1] for result, _ in done}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert {result[2] for result, _ in done} == {max(1, cores() // 2)}
    assert all(seconds >= 0 for _, seconds in done)
    # One job, or jobs = 1: here, as before.
    here = run_side_by_side([partial(probe, 7)], jobs=4)
    assert here[0][0] == (7, os.getpid(), torch.get_num_threads())
    assert [r for r, _ in run_side_by_side([partial(probe, 1), partial(probe, 2)], jobs=1)] == [
        (1, os.getpid(), torch.get_num_threads()), (2, os.getpid(), torch.get_num_threads())]
