"""A training job's progress line: steps, losses, images/s and time left."""

from __future__ import annotations

import logging
import multiprocessing
import sys
import time

log = logging.getLogger(__name__)
NOT_LOSSES = ("step", "lr", "images_per_s", "epoch", "data_wait")


def job_label(output: str) -> str:
    """How a training job names itself in progress lines: its output folder and the one above
    (``round-1/pretrain``), so jobs that share a terminal can be told apart."""
    parts = [p for p in output.replace("\\", "/").rstrip("/").split("/") if p]
    return "/".join(parts[-2:]) or output


class TrainProgress:
    """Steps, losses, images/s and time left of a training job: one line per log interval
    (rewritten in place on a terminal)."""

    def __init__(self, name: str, steps: int, stream=None):
        self.name = name
        self.steps = steps
        self.stream = stream or sys.stderr
        # Jobs side by side (child processes) share the terminal: lines, not one rewritten.
        self.tty = (hasattr(self.stream, "isatty") and self.stream.isatty()
                    and multiprocessing.parent_process() is None)
        # Time left is measured from the first logged step on: before it lie model and data
        # loading (or a resume), which say nothing of the speed of a step.
        self.first: tuple[int, float] | None = None

    def __call__(self, record: dict) -> None:
        step, now = record["step"], time.perf_counter()
        if self.first is None:
            self.first = (step, now)
        rate = (step - self.first[0]) / max(now - self.first[1], 1e-9)
        losses = " ".join(f"{k} {v:.3f}" for k, v in record.items() if k not in NOT_LOSSES)
        line = (f"{self.name} step {step}/{self.steps} | {losses} | lr {record['lr']:.2e} | "
                f"{record['images_per_s']:.1f} images/s")
        if "epoch" in record:
            line += (f" | epoch {record['epoch']:.2f} | waiting for data "
                     f"{100 * record['data_wait']:.0f}%")
        if step < self.steps and rate > 0:
            line += f" | about {(self.steps - step) / rate:.0f}s left"
        log.info("%s", line)
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if step >= self.steps else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
