"""Plan a round before any work: inputs expanded, models and output checked, reruns matched."""

from __future__ import annotations

import logging
import shutil
import uuid
from dataclasses import dataclass, field

import fsspec

from capfilt.captioning.generation_length import check_generation_length
from capfilt.images.duplicate_index import MODES
from capfilt.models.source import check_model_source, gives_itm, weights_sha256
from capfilt.rounds.folder import finished_shard, plan_path, sweep_temporaries
from capfilt.shards.reader import ReaderOptions, expand_inputs
from capfilt.step.stage_config import StageConfig
from manifests import ManifestError, ShardResult, read_manifest
from manifests.store import read_json, write_json_atomic

log = logging.getLogger(__name__)
ROLES = ("captioner", "filter")


class PlanError(ValueError):
    """The round cannot start; the message says why and what to do."""


@dataclass
class RoundOptions:
    """What ``capfilt run`` was asked to do."""

    inputs: list[str]
    output: str
    stage: StageConfig
    batch_size: int = 16
    workers: int | None = None
    address: str | None = None
    reader: ReaderOptions = field(default_factory=ReaderOptions)
    round: int = 1
    parent: str | None = None
    settings: dict = field(default_factory=dict)  # as resolved from config and flags
    write: tuple[str, ...] = ()  # extra views per shard: "webdataset"
    # Images seen earlier in the round: "exact" rejects copies, "near" near-copies too
    dedup: str = "exact"
    # CPU workers decode in this many processes (0: in threads); GPU workers always do, as
    # many as their node's cores allow. Where the round runs, so not one of its parameters.
    cpu_decode_processes: int = 0

    def parameters(self) -> dict:
        """The settings that decide the output; a rerun must use the same ones."""
        return {
            "seed": self.stage.seed,
            "batch_size": self.batch_size,
            "dtype": self.stage.dtype,
            "sampling": self.stage.sampling.to_dict(),
            "policy": self.stage.policy.to_dict(),
            "guards": self.stage.guards.to_dict(),
            "itm_token": self.stage.itm_token,
            "reader": self.reader.to_dict(),
            "captioner": self.stage.captioner,
            "filter": self.stage.filter,
            "dedup": self.dedup,
        }


@dataclass
class RoundPlan:
    options: RoundOptions
    shards: list[str]
    done: dict[int, ShardResult]
    # Each model's weights hash as the round was first planned (None: a hub id): the
    # manifest names these, hashed before any worker loaded the weights.
    weights: dict[str, str | None] = field(default_factory=dict)

    @property
    def todo(self) -> list[tuple[int, str]]:
        return [(i, path) for i, path in enumerate(self.shards) if i not in self.done]


def plan_round(options: RoundOptions) -> RoundPlan:
    """Check everything that can be checked up front, then list the shards still to run."""
    if options.batch_size < 1:
        raise PlanError("--batch-size must be at least 1")
    if options.dedup not in MODES:
        raise PlanError(f"--dedup {options.dedup!r}: use one of {', '.join(MODES)}")
    try:
        shards = expand_inputs(options.inputs)
    except ValueError as exc:
        raise PlanError(str(exc)) from exc
    if options.parent:
        try:
            parent = read_manifest(options.parent)
        except ManifestError as exc:
            raise PlanError(f"--parent: {exc}") from exc
        if options.round <= parent.round:
            raise PlanError(f"--round {options.round} must come after the parent's round "
                            f"{parent.round}")
    check_model_source(options.stage.captioner, "captioner")
    sampling = options.stage.sampling
    check_generation_length(options.stage.captioner, sampling.max_new_tokens, sampling.prompt)
    check_model_source(options.stage.filter, "filter")
    policy = options.stage.policy
    if not gives_itm(options.stage.filter) and (policy.mode, policy.rank_by) != ("topk", "itc"):
        raise PlanError(f"filter {options.stage.filter} is CLIP, which gives no ITM "
                        "probability to threshold or rank by: use --policy topk --rank-by itc "
                        "(BLIP-2's ranking)")
    _check_writable(options.output)
    weights = match_plan(options, shards)
    sweep_temporaries(options.output)
    done = {}
    for index, shard in enumerate(shards):
        result = finished_shard(options.output, index, shard, "webdataset" in options.write)
        if result is not None:
            done[index] = result
    plan = RoundPlan(options=options, shards=shards, done=done, weights=weights)
    _check_space(options.output, [path for _, path in plan.todo])
    return plan


def match_plan(options: RoundOptions, shards: list[str]) -> dict[str, str | None]:
    """Record the round's inputs, settings and models' weights hashes in ROUND/plan.json, or
    check a rerun against them; returns the weights hashes the round stands on.

    A plan.json from before weights were recorded in it is read as it is: its inputs and
    settings must match, and today's weights hashes are added to it, so later reruns are
    checked against them (the shards it holds cannot tell which weights made them).
    """
    recorded = {"parameters": options.parameters(), "inputs": shards}
    weights = {role: weights_sha256(getattr(options.stage, role)) for role in ROLES}
    url = plan_path(options.output)
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        write_json_atomic(url, {**recorded, "weights_sha256": weights})
        return weights
    before = read_json(url)
    planned = before.pop("weights_sha256", None)
    if before != recorded:
        raise PlanError(
            f"{options.output} holds a round started with other inputs or settings "
            f"({_first_difference(before, recorded)}); use a new --output folder"
        )
    if planned is None:
        log.warning("%s: plan.json records no weights hashes (an earlier capfilt); recording "
                    "today's", url)
        write_json_atomic(url, {**recorded, "weights_sha256": weights})
        return weights
    for role in ROLES:
        if planned.get(role) != weights[role]:
            raise PlanError(
                f"the {role} weights at {getattr(options.stage, role)} changed since "
                f"{options.output} was started (sha256 {_short(planned.get(role))} then, "
                f"{_short(weights[role])} now): its finished shards were made with the old "
                "weights; use a new --output folder for the new ones"
            )
    return weights


def _short(digest: str | None) -> str:
    return "none" if digest is None else digest[:12]


def _check_space(output: str, todo: list[str]) -> None:
    """Output shards carry the images, so a round needs about its inputs' size on disk."""
    fs, path = fsspec.core.url_to_fs(output)
    if "file" not in fs.protocol and "local" not in fs.protocol:
        return  # object stores report no free space
    needed = 0
    for shard in todo:
        shard_fs, shard_path = fsspec.core.url_to_fs(shard)
        try:
            needed += shard_fs.size(shard_path)
        except FileNotFoundError:
            continue  # recorded as a failed shard when its turn comes
    needed = int(needed * 1.05) + (1 << 20)
    free = shutil.disk_usage(path).free
    if free < needed:
        raise PlanError(
            f"output folder {output} has {free / 2**20:.1f} MiB free; this round needs about "
            f"{needed / 2**20:.1f} MiB (output shards carry the images); free some space or "
            "choose another --output"
        )


def _check_writable(output: str) -> None:
    fs, path = fsspec.core.url_to_fs(output)
    probe = f"{path.rstrip('/')}/.write-probe-{uuid.uuid4().hex[:8]}"
    try:
        fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as handle:
            handle.write(b"ok")
        fs.rm(probe)
    except OSError as exc:
        raise PlanError(f"output folder {output} is not writable ({exc})") from exc


def _first_difference(before: dict, now: dict, prefix: str = "") -> str:
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            return _first_difference(a, b, f"{prefix}{key}.")
        return f"{prefix}{key} was {a!r}, now {b!r}"
    return "no difference"
