"""Which waiting shard goes to which worker (``pipelines.dispatch.hand_out``): two in flight per
worker, and a shard whose worker died runs alone."""

from collections import deque

from pipelines.dispatch import hand_out
from workers.shard_worker import SHARDS_IN_FLIGHT


def shards(*attempts: int) -> deque:
    return deque((index, f"in/{index:05d}.parquet", attempt)
                 for index, attempt in enumerate(attempts))


def given(pairs) -> list[tuple[int, int]]:
    return [(label, shard[0]) for label, shard in pairs]


def test_every_worker_gets_one_before_any_gets_a_second():
    assert SHARDS_IN_FLIGHT == 2
    queue = shards(1, 1, 1, 1, 1)
    assert given(hand_out({0: [], 1: []}, queue)) == [(0, 0), (1, 1), (0, 2), (1, 3)]
    assert [index for index, *_ in queue] == [4]


def test_a_worker_holding_two_gets_none_and_one_holding_one_gets_one():
    queue = shards(1, 1, 1)
    assert given(hand_out({0: [1, 1], 1: [1]}, queue)) == [(1, 0)]
    assert len(queue) == 2


def test_a_shard_run_again_runs_alone():
    """Shard 0 is on its second attempt: it waits for a worker that holds nothing, and no
    shard joins it; the shards behind it wait their turn (the queue keeps its order)."""
    queue = shards(2, 1)
    assert given(hand_out({0: [1]}, queue)) == []
    assert given(hand_out({0: []}, queue)) == [(0, 0)]
    assert given(hand_out({0: [2]}, queue)) == []
    # Worker 1 runs shard 1's third attempt alone; worker 0 takes shard 2 beside shard 0.
    assert given(hand_out({0: [], 1: []}, shards(1, 3, 1, 1))) == [(0, 0), (1, 1), (0, 2)]


def test_nothing_waiting_nothing_given():
    assert hand_out({0: [], 1: [1]}, deque()) == []
