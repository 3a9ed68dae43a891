"""Dataclasses of a round manifest (the JSON written last in a round folder)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1


class ShardStatus:
    """Values of ``ShardResult.status``."""

    DONE = "done"
    FAILED = "failed"


@dataclass
class InputShard:
    """One input shard as the round saw it."""

    index: int
    path: str
    format: str  # "parquet" | "webdataset"
    rows: int | None = None
    bytes: int | None = None
    sha256: str | None = None


@dataclass
class ModelRef:
    """A model a round ran with: where it came from and which weights it had."""

    role: str  # "captioner" | "filter"
    source: str  # local folder or hub id, as given
    model_class: str
    weights_sha256: str | None = None
    revision: str | None = None


@dataclass(kw_only=True)
class Counts:
    """Rows and texts counted for one shard, or summed over a round's finished shards."""

    rows_in: int = 0
    rows_out: int = 0
    rows_rejected: int = 0
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    kept_by_source: dict[str, int] = field(default_factory=dict)
    texts_by_source: dict[str, int] = field(default_factory=dict)
    images_without_kept: int = 0
    # Synthetic captions a caption guard set aside unscored, by reason
    # (capfilt/captioning/guards.py)
    guarded_by_reason: dict[str, int] = field(default_factory=dict)

    def add(self, other: "Counts") -> None:
        """Add ``other``'s counts to these: numbers summed, counts by key merged."""
        for f in dataclasses.fields(Counts):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, dict):
                for key, count in theirs.items():
                    mine[key] = mine.get(key, 0) + count
            else:
                setattr(self, f.name, mine + theirs)


@dataclass(kw_only=True)
class ShardResult(Counts):
    """What one shard produced; a shard with ``status == "done"`` is run again only if its
    input no longer has ``input_bytes`` and ``input_sha256``.

    Its files are named relative to the round folder ("shards/00000.parquet"); manifests of
    earlier versions hold the paths the run was given, so readers look files up by index.
    """

    index: int
    input: str
    status: str
    output: str | None = None
    rejects: str | None = None
    webdataset: str | None = None  # the shard's webdataset tar, when one was asked for
    webdataset_samples: int | None = None  # images in it (those with a kept text)
    input_sha256: str | None = None
    input_bytes: int | None = None
    # The shard's own time: read, decoding waited for, models, its files made ready (not their
    # writes, nor waiting while another shard in flight on the worker ran the models).
    seconds: float = 0.0
    model_seconds: float = 0.0  # of ``seconds``, in the models (the rest: read, decode waits, commit)
    attempts: int = 1
    worker: str | None = None  # which worker ran it: "node-id-prefix/pid"
    error: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ShardResult":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(kw_only=True)
class Totals(Counts):
    """The counts summed over the shards that finished, and how many finished or failed."""

    shards_done: int = 0
    shards_failed: int = 0

    @classmethod
    def of(cls, shards: list[ShardResult]) -> "Totals":
        totals = cls()
        for shard in shards:
            if shard.status != ShardStatus.DONE:
                totals.shards_failed += 1
                continue
            totals.shards_done += 1
            totals.add(shard)
        return totals


@dataclass
class RoundManifest:
    """Everything needed to know what a round did, and to reproduce it."""

    round: int
    status: str  # "complete" | "incomplete"
    inputs: list[InputShard]
    models: list[ModelRef]
    parameters: dict[str, Any]
    shards: list[ShardResult]
    totals: Totals
    timings: dict[str, float]
    versions: dict[str, str]
    parent: str | None = None
    # Images seen earlier in the round: mode, copies, near-copies (None: --dedup off)
    duplicates: dict[str, Any] | None = None
    created_at: str = ""
    finished_at: str = ""
    kind: str = "capfilt-round"
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RoundManifest":
        return cls(
            round=data["round"],
            status=data["status"],
            inputs=[InputShard(**item) for item in data["inputs"]],
            models=[ModelRef(**item) for item in data["models"]],
            parameters=data["parameters"],
            shards=[ShardResult.from_dict(item) for item in data["shards"]],
            totals=Totals(**data["totals"]),
            timings=data["timings"],
            versions=data["versions"],
            parent=data.get("parent"),
            duplicates=data.get("duplicates"),
            created_at=data.get("created_at", ""),
            finished_at=data.get("finished_at", ""),
            kind=data.get("kind", "capfilt-round"),
            schema_version=data.get("schema_version", SCHEMA_VERSION),
        )
