"""Ray tasks that fingerprint input shards (``capfilt.images.fingerprints``), one task a shard."""

from __future__ import annotations

import pyarrow as pa
import ray

from capfilt.images.fingerprints import shard_hashes
from capfilt.shards.reader import ReaderOptions, ShardReadError

# Fingerprinting reads and hashes: light, and it must not take the CPU slots workers need.
TASK_CPUS = 0.5


def fingerprint_shards(shards: list[str], reader: ReaderOptions) -> dict[int, pa.Table | str]:
    """Shard index -> its ``HASHES_SCHEMA`` table, or why it could not be read; needs Ray."""
    task = ray.remote(num_cpus=TASK_CPUS)(_hashes_or_error)
    refs = {index: task.remote(path, reader) for index, path in enumerate(shards)}
    return {index: ray.get(ref) for index, ref in refs.items()}


def _hashes_or_error(path: str, reader: ReaderOptions) -> pa.Table | str:
    try:
        return shard_hashes(path, reader)
    except ShardReadError as exc:
        return str(exc)
