"""Two shards taking turns at one stage (``capfilt/step/shard_turns.py``), in threads as a
worker runs them: the next shard is read and decoded while the models run, the last one is
committed while the next runs the models, and the files are those of one shard at a time."""

import threading
from pathlib import Path

import pytest

from capfilt.captioning.settings import SamplingConfig
from capfilt.rounds.folder import no_space
from capfilt.shards.samples import write_sample_shards
from capfilt.step.shard_runner import ShardRun, run_shard
from capfilt.step.shard_turns import ShardTurns, ShardWithdrawn
from tests.conftest import fill, make_stage, needs_root

WAIT = 60.0  # seconds an event may take before the test says it never came


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("turns-input")
    return [str(p) for p in write_sample_shards(folder, shards=3, rows=40, seed=2)]


@pytest.fixture(scope="module")
def stage(loaded):
    return make_stage(loaded, sampling=SamplingConfig(num_captions=2), seed=11)


def files(round_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(round_dir).as_posix(): p.read_bytes()
            for p in sorted(round_dir.rglob("*")) if p.is_file() and p.parent.name != "stats"}


class Watched(ShardRun):
    """The real steps, telling the test when each begins or ends."""

    def __init__(self, *args, before_commit=lambda: None, **kwargs):
        super().__init__(*args, **kwargs)
        self.opened, self.scoring = threading.Event(), threading.Event()
        self.before_commit = before_commit

    def open(self):
        failed = super().open()
        self.opened.set()
        return failed

    def score(self, on_rows=lambda done, total: None):
        self.scoring.set()
        super().score(on_rows)

    def commit(self):
        self.before_commit()
        return super().commit()


def in_thread(target) -> tuple[threading.Thread, dict]:
    outcome = {}

    def run():
        try:
            outcome["result"] = target()
        except Exception as exc:  # noqa: BLE001  (the test asserts on what was raised)
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def a_then_b(turns: ShardTurns, first: Watched, second: Watched) -> tuple[dict, dict, dict]:
    """``first`` starts; once it runs the models, ``second`` starts beside it. Returns both
    outcomes and what the test saw: whether ``second`` was read and its first batch decoded
    while ``first`` held the models, and whether it was still waiting for them then."""
    seen, started = {}, {}

    def first_rows(done, total):
        if "second" not in started:
            started["second"] = in_thread(lambda: turns.run(second))
            seen["opened_meanwhile"] = second.opened.wait(WAIT)
            decoded = getattr(second, "first", None)
            seen["first_batch_decoded"] = decoded is not None and len(decoded) > 0
            seen["second_waited"] = not second.scoring.is_set()

    a_thread, a_outcome = in_thread(lambda: turns.run(first, first_rows))
    a_thread.join(4 * WAIT)
    b_thread, b_outcome = started["second"]
    b_thread.join(4 * WAIT)
    return a_outcome, b_outcome, seen


def test_the_next_shard_is_read_while_the_models_run_and_the_last_committed_after(
        stage, inputs, tmp_path):
    alone, together = tmp_path / "alone", tmp_path / "together"
    for index, path in enumerate(inputs[:2]):
        run_shard(stage, index, path, str(alone), batch_size=4)
    committed = {}

    def first_commits():  # the models are free by now: the second shard runs them
        committed["while_second_scored"] = second.scoring.wait(WAIT)

    def second_commits():
        committed["after_first"] = (together / "stats" / "00000.json").exists()

    first = Watched(stage, 0, inputs[0], str(together), 4, before_commit=first_commits)
    second = Watched(stage, 1, inputs[1], str(together), 4, before_commit=second_commits)
    a, b, seen = a_then_b(ShardTurns(), first, second)
    assert "error" not in a and "error" not in b, (a, b)
    assert seen == {"opened_meanwhile": True, "first_batch_decoded": True, "second_waited": True}
    assert committed == {"while_second_scored": True, "after_first": True}
    assert [a["result"].status, b["result"].status] == ["done", "done"]
    assert a["result"].rows_in == b["result"].rows_in == 40
    assert 0 < a["result"].model_seconds < a["result"].seconds
    assert files(together) == files(alone)




@needs_root
def test_once_a_commit_finds_the_disk_full_the_shards_behind_it_write_nothing(
        stage, inputs, small_disk):
    """As when shards ran one at a time, a full disk costs one failed shard: the one scored
    beside it is withdrawn before it writes, and a later one before it runs the models."""
    out = small_disk / "round"
    turns = ShardTurns()
    first = Watched(stage, 0, inputs[0], str(out), 4, before_commit=lambda: fill(small_disk))
    second = Watched(stage, 1, inputs[1], str(out), 4)
    a, b, seen = a_then_b(turns, first, second)
    assert seen["opened_meanwhile"]
    assert no_space(a.get("error")), a
    assert isinstance(b.get("error"), ShardWithdrawn), b
    assert second.scoring.is_set()  # it had run the models: only its writes were held back
    third = Watched(stage, 2, inputs[2], str(out), 4)
    with pytest.raises(ShardWithdrawn, match="shard 00002 not written"):
        turns.run(third)
    assert not third.scoring.is_set()
    assert [p.name for p in out.rglob("*") if p.is_file()] == []  # nor a hidden temporary
