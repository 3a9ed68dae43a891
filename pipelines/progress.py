"""A one-line progress report: shards done, images, images per second, time left, and what each
worker is doing (loading its models, on which shard for how long, idle, restarting)."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


class Progress:
    """Rewrites one line on a terminal; prints a line per finished shard elsewhere."""

    def __init__(self, total_shards: int, already_done: int, stream=None):
        self.stream = stream or sys.stderr
        self.total = total_shards
        self.done = already_done
        self.failed = 0
        self.images = 0
        self.started = time.perf_counter()
        self.run_here = total_shards - already_done
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.workers: dict[int, tuple[str, float]] = {}  # label -> (state, since when)

    def worker(self, label: int, state: str) -> None:
        """Worker ``label`` is now ``state``; redrawn at once on a terminal, else shown with
        the next finished shard (a log stays one line per shard)."""
        if self.workers.get(label, ("",))[0] == state:
            return  # no change: keep when it began, draw nothing
        self.workers[label] = (state, time.perf_counter())
        if self.tty:
            self._draw(self.line(), final=False)

    def shard_finished(self, rows: int, failed: bool) -> None:
        self.done += 1
        self.failed += int(failed)
        self.images += rows
        self.show()

    def show(self) -> None:
        line = self.line()
        log.info("%s", line)
        if self.tty:
            self._draw(line, final=self.done == self.total)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def line(self) -> str:
        now = time.perf_counter()
        elapsed = max(now - self.started, 1e-9)
        finished_here = self.done - (self.total - self.run_here)
        left = self.total - self.done
        eta = elapsed / finished_here * left if finished_here else float("nan")
        line = (
            f"shards {self.done}/{self.total} done"
            + (f" ({self.failed} failed)" if self.failed else "")
            + f" | {self.images} images | {self.images / elapsed:.1f} images/s"
            + (f" | about {eta:.0f}s left" if left and finished_here else "")
        )
        if self.workers and left:
            states = ", ".join(
                f"w{label} {state}" + (f" {now - since:.0f}s" if state.startswith("shard") else "")
                for label, (state, since) in sorted(self.workers.items()))
            line += f" | {states}"
        return line

    def _draw(self, line: str, final: bool) -> None:
        self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        self.stream.flush()

