"""A one-line progress report: shards done, images, images per second, time left, and what each
worker is doing (loading its models, on which shard for how long and how many of its rows are
done, idle, restarting)."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)

# Off a terminal (a log, a pipe), a line while shards run long, at most this often: a shard of
# 100,000 rows takes a while, and one line per finished shard would say nothing meanwhile.
ROWS_LINE_SECONDS = 30.0


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
        self.rows_of: dict[int, tuple[int, int]] = {}  # label -> its shard's (done, total) rows
        self.last_line = time.perf_counter()

    def worker(self, label: int, state: str) -> None:
        """Worker ``label`` is now ``state``; redrawn at once on a terminal, else shown with
        the next finished shard (a log stays one line per shard)."""
        if self.workers.get(label, ("",))[0] == state:
            return  # no change: keep when it began, draw nothing
        self.workers[label] = (state, time.perf_counter())
        self.rows_of.pop(label, None)
        if self.tty:
            self._draw(self.line(), final=False)

    def rows(self, label: int, done: int, total: int) -> None:
        """Worker ``label`` has written or rejected ``done`` of its shard's ``total`` rows:
        redrawn on a terminal, else written as a line at most every ``ROWS_LINE_SECONDS``."""
        if self.rows_of.get(label) == (done, total):
            return
        self.rows_of[label] = (done, total)
        if self.tty:
            self._draw(self.line(), final=False)
        elif time.perf_counter() - self.last_line >= ROWS_LINE_SECONDS:
            self._write(self.line())

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
            self._write(line)

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()
        self.last_line = time.perf_counter()

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
            states = ", ".join(self._state(label, state, now - since)
                               for label, (state, since) in sorted(self.workers.items()))
            line += f" | {states}"
        return line

    def _state(self, label: int, state: str, seconds: float) -> str:
        if not state.startswith("shard"):
            return f"w{label} {state}"
        done, total = self.rows_of.get(label, (None, None))
        rows = f" {done:,}/{total:,} rows" if total else ""
        return f"w{label} {state} {seconds:.0f}s{rows}"

    def _draw(self, line: str, final: bool) -> None:
        self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        self.stream.flush()

