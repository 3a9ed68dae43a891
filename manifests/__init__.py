"""Round manifests: what a round read, ran with and wrote.

This layer imports nothing from capfilt, workers or pipelines, so any tool (or a
training job in another repo) can read a round's manifest with it alone.
"""

from manifests.job import JOB_KINDS, JobManifest
from manifests.round import (
    InputShard,
    ModelRef,
    RoundManifest,
    ShardResult,
    ShardStatus,
    Totals,
)
from manifests.schema import load_schema, validate_manifest
from manifests.store import (
    ManifestError,
    read_manifest,
    write_json_atomic,
    write_manifest,
)

__all__ = [
    "JOB_KINDS",
    "InputShard",
    "JobManifest",
    "ManifestError",
    "ModelRef",
    "RoundManifest",
    "ShardResult",
    "ShardStatus",
    "Totals",
    "load_schema",
    "read_manifest",
    "validate_manifest",
    "write_json_atomic",
    "write_manifest",
]
