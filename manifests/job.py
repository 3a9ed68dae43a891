"""Manifests of the jobs around a round: pre-training, fine-tuning, evaluation, a bootstrap.

Each records what it read (data with counts, models with weight hashes), what it wrote, its
settings and results, and the manifests it stands on (``parents``), so a model can be traced
back to the rounds and shards it learned from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from manifests.round import SCHEMA_VERSION

JOB_KINDS = ("pretrain", "finetune-captioner", "finetune-filter", "eval", "bootstrap")


@dataclass
class JobManifest:
    kind: str
    status: str  # "complete" | "incomplete"
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    parameters: dict[str, Any]
    results: dict[str, Any]
    timings: dict[str, float]
    versions: dict[str, str]
    parents: list[str] = field(default_factory=list)
    created_at: str = ""
    finished_at: str = ""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        if self.kind not in JOB_KINDS:
            raise ValueError(f"job kind {self.kind!r}: one of {', '.join(JOB_KINDS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobManifest:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
