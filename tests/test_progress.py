"""The round's progress line: shards, images, time left and what each worker is doing."""

import io
import re

from pipelines.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_one_line_per_finished_shard_with_each_workers_state():
    out = io.StringIO()
    progress = Progress(total_shards=3, already_done=0, stream=out)
    progress.worker(0, "loading")
    progress.worker(1, "loading")
    assert out.getvalue() == ""  # state changes alone print nothing off a terminal
    progress.worker(0, "shard 00000")
    progress.worker(1, "shard 00001")
    progress.worker(0, "shard 00002")
    progress.shard_finished(rows=10, failed=False)
    progress.worker(1, "idle")
    progress.shard_finished(rows=5, failed=True)
    progress.shard_finished(rows=10, failed=False)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("shards 1/3 done | 10 images |")
    assert "about" in lines[0] and lines[0].endswith(" | w0 shard 00002 0s, w1 shard 00001 0s")
    assert lines[1].startswith("shards 2/3 done (1 failed) | 15 images") and lines[1].endswith(
        " | w0 shard 00002 0s, w1 idle")
    assert lines[2].startswith("shards 3/3 done (1 failed) | 25 images")
    assert "w0" not in lines[2] and "left" not in lines[2]


def test_on_a_terminal_the_line_is_rewritten_in_place_as_workers_change():
    out = Terminal()
    progress = Progress(total_shards=1, already_done=0, stream=out)
    progress.worker(0, "loading")
    progress.worker(0, "shard 00000")
    progress.shard_finished(rows=4, failed=False)
    drawn = out.getvalue().split("\r\033[K")[1:]
    assert drawn[0] == "shards 0/1 done | 0 images | 0.0 images/s | w0 loading"
    assert drawn[1].endswith("| w0 shard 00000 0s")
    assert drawn[2].startswith("shards 1/1 done | 4 images") and drawn[2].endswith("\n")
    assert out.getvalue().count("\n") == 1


def test_training_time_left_counts_from_the_first_logged_step_not_from_loading():
    from capfilt.train.progress import TrainProgress

    out = io.StringIO()
    progress = TrainProgress("pretrain", steps=300, stream=out)
    record = {"lr": 1e-3, "itc": 2.0, "images_per_s": 100.0}
    progress({"step": 100, **record})
    progress({"step": 200, **record})
    progress({"step": 300, **record})
    first, second, last = out.getvalue().splitlines()
    assert first == "pretrain step 100/300 | itc 2.000 | lr 1.00e-03 | 100.0 images/s"
    assert second.startswith("pretrain step 200/300 | itc 2.000") and "s left" in second
    assert last == "pretrain step 300/300 | itc 2.000 | lr 1.00e-03 | 100.0 images/s"


def test_training_jobs_are_named_after_their_output_folder():
    from capfilt.train.progress import job_label

    assert job_label("/work/runs/demo/round-1/pretrain") == "round-1/pretrain"
    assert job_label("runs/demo/ablation/kept_web/") == "ablation/kept_web"
    assert job_label("out") == "out"


def test_a_long_shard_shows_its_rows_done_on_a_terminal_and_in_a_log_every_so_often(monkeypatch):
    import pipelines.progress

    out = Terminal()
    progress = Progress(total_shards=1, already_done=0, stream=out)
    progress.worker(0, "shard 00000")
    progress.rows(0, 1_200, 100_000)
    assert out.getvalue().split("\r\033[K")[-1].endswith("| w0 shard 00000 0s 1,200/100,000 rows")
    log = io.StringIO()
    progress = Progress(total_shards=1, already_done=0, stream=log)
    progress.worker(0, "shard 00000")
    progress.rows(0, 1_200, 100_000)
    assert log.getvalue() == ""  # a log gets a line at most every ROWS_LINE_SECONDS
    monkeypatch.setattr(pipelines.progress, "ROWS_LINE_SECONDS", 0.0)
    progress.rows(0, 2_400, 100_000)
    assert log.getvalue().endswith("| w0 shard 00000 0s 2,400/100,000 rows\n")
    progress.worker(0, "shard 00001")  # the next shard starts at no rows
    assert progress.line().endswith("| w0 shard 00001 0s")


def test_a_round_reports_rows_inside_its_shard(ray_local, tiny_models, tmp_path, monkeypatch):
    """A real round: the driver asks the busy worker how far its shard has come."""
    import pipelines.dispatch
    import pipelines.progress
    from capfilt.shards.samples import write_sample_shards
    from capfilt.step.stage_config import StageConfig
    from pipelines.plan import RoundOptions
    from pipelines.round import run_round

    monkeypatch.setattr(pipelines.dispatch, "ROWS_POLL_SECONDS", 0.2)
    monkeypatch.setattr(pipelines.progress, "ROWS_LINE_SECONDS", 0.0)
    write_sample_shards(tmp_path / "in", shards=1, rows=120)
    stage = StageConfig(captioner=str(tiny_models["captioner"]), filter=str(tiny_models["filter"]))
    log = io.StringIO()
    options = RoundOptions(inputs=[str(tmp_path / "in")], output=str(tmp_path / "round"),
                           stage=stage, batch_size=2, workers=1)
    assert run_round(options, stream=log).status == "complete"
    done = [int(d) for d in re.findall(r"w0 shard 00000 \d+s (\d+)/120 rows", log.getvalue())]
    assert any(0 < d < 120 for d in done), log.getvalue()
    assert done == sorted(done)
