"""Shards taking turns at one worker's models, so that the models never wait between shards:
while one shard runs the models, the next is read and its first batch decoded, and the one
before is committed. Imports no torch (the driver catches ``ShardWithdrawn``)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable

from capfilt.rounds.folder import no_space

if TYPE_CHECKING:
    from capfilt.step.shard_runner import ShardRun
    from manifests import ShardResult


class ShardWithdrawn(RuntimeError):
    """The shard was not written, nothing of it: an earlier shard's commit on this worker found
    the disk full. It is as if it had not started; running the round again runs it."""


class ShardTurns:
    """Runs ``ShardRun``s called from several threads over one stage: each opens (reads, decodes
    its first batch) at once, runs the models when no other shard does, and commits after the
    shard that had the models before it has committed, while the next one runs the models.

    Once a commit finds the disk full, every later shard is withdrawn (``ShardWithdrawn``)
    before it writes, so a full disk costs one failed shard, as when shards ran one at a time.
    """

    def __init__(self):
        self._models = threading.Lock()
        self._commits = threading.Lock()
        self.disk_full: OSError | None = None

    def run(self, run: ShardRun,
            on_rows: Callable[[int, int], None] = lambda done, total: None) -> ShardResult:
        """``run`` opened, scored and committed in its turns; its result once committed, or the
        "failed" one of a shard that cannot be read (without waiting for a turn)."""
        failed = run.open()
        if failed is not None:
            return failed
        with self._models:
            self._withdraw_if_full(run)
            run.score(on_rows)
            # Taken before the models are let go: commits go in the order shards left them.
            self._commits.acquire()
        try:
            self._withdraw_if_full(run)
            try:
                return run.commit()
            except OSError as exc:
                if no_space(exc):
                    self.disk_full = exc
                raise
        finally:
            self._commits.release()

    def _withdraw_if_full(self, run: ShardRun) -> None:
        if self.disk_full is not None:
            raise ShardWithdrawn(f"shard {run.index:05d} not written: an earlier shard found "
                                 f"the disk full ({self.disk_full})")
