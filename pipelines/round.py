"""One CapFilt round: plan, run the missing shards on Ray, then commit the manifest."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext

from capfilt.models.source import model_class_name
from capfilt.report.round_report import write_report
from capfilt.rounds.folder import name_parts_in_round
from capfilt.shards.reader import shard_format
from capfilt.terminal import held_records, log_file
from manifests import (
    InputShard,
    ModelRef,
    RoundManifest,
    ShardStatus,
    Totals,
    validate_manifest,
    write_manifest,
)
from manifests.lineage import parent_as_stored
from pipelines.dispatch import dispatch
from pipelines.duplicates import DuplicateIndex, index_duplicates, recorded_counts
from pipelines.jobs import job_versions, now
from pipelines.plan import RoundOptions, RoundPlan, plan_round
from pipelines.progress import Progress
from workers.ray_cluster import ensure_ray

log = logging.getLogger(__name__)


def run_round(options: RoundOptions, stream=None) -> RoundManifest:
    """Run (or finish) the round described by ``options``; returns the manifest written.

    Plans first (inputs expanded, models, settings and output checked, a rerun matched against
    ``plan.json``; a ``PlanError`` or ``ModelSourceError`` before any work), runs the shards not
    yet finished on Ray workers, then writes ``ROUND/manifest.json`` ("complete" when every
    shard is done, else "incomplete" with the failed ones and their errors) and the report.
    ``stream`` takes the progress line (stderr by default). Raises ``WorkerStartError`` when no
    worker can load the models, ``DiskFullError`` when the disk fills mid-round.

    The round's own log goes to ``ROUND/capfilt.log`` (local folders), appended on reruns,
    what the plan found (shards run again, stale files swept) included.
    """
    created = now()
    started = time.perf_counter()
    with held_records() as planning:
        plan = plan_round(options)
    local = "://" not in options.output or options.output.startswith("file://")
    log_path = f"{options.output.removeprefix('file://').rstrip('/')}/capfilt.log"
    with log_file(log_path, planning) if local else nullcontext():
        return _run_planned(plan, options, created, started, stream)


def _run_planned(plan: RoundPlan, options: RoundOptions, created: str, started: float,
                 stream) -> RoundManifest:
    log.info("round %d: %d shards, %d already done, %d to run; settings %s", options.round,
             len(plan.shards), len(plan.done), len(plan.todo), options.parameters())
    progress = Progress(len(plan.shards), len(plan.done), stream)
    results = dict(plan.done)
    # Hashed by the plan, before the workers load them: a folder overwritten mid-round (a
    # training job saving into it) must not put the new weights' hash on data the old ones made.
    models = model_refs(options, plan.weights)
    indexed: list[DuplicateIndex] = []

    def find_repeats() -> dict:
        indexed.append(index_duplicates(plan.shards, options.reader, options.dedup,
                                        options.output))
        return indexed[0].dropped

    if plan.todo:
        ensure_ray(options.address)
        for result in dispatch(
            options.stage, plan.todo, options.output, options.batch_size, options.reader,
            options.workers, lambda r: progress.shard_finished(r.rows_in, r.status != "done"),
            options.write, progress.worker, progress.rows,
            find_repeats if options.dedup != "off" else None, options.cpu_decode_processes,
        ):
            results[result.index] = result
    else:
        progress.show()
    manifest = build_manifest(plan, results, models, created, time.perf_counter() - started,
                              indexed[0] if indexed else None)
    validate_manifest(manifest.to_dict())
    write_manifest(options.output, manifest)
    log.info("manifest written: status %s, %d rows in, %d scored, %d rejected", manifest.status,
             manifest.totals.rows_in, manifest.totals.rows_out, manifest.totals.rows_rejected)
    try:
        write_report(options.output)
    except (OSError, ValueError, KeyError) as exc:  # the round stands without its report
        log.warning("report not written: %s", exc)
    return manifest


def model_refs(options: RoundOptions, weights: dict[str, str | None]) -> list[ModelRef]:
    """The manifest's record of the two models: source, class and the weights' hash."""
    return [
        ModelRef(role=role, source=source, model_class=model_class_name(source, role),
                 weights_sha256=weights[role])
        for role, source in (("captioner", options.stage.captioner),
                             ("filter", options.stage.filter))
    ]


def build_manifest(plan: RoundPlan, results: dict, models: list[ModelRef], created: str,
                   seconds: float, repeats: DuplicateIndex | None = None) -> RoundManifest:
    options = plan.options
    duplicates = (repeats.counts if repeats else recorded_counts(options.output, options.dedup))
    timings = {"dedup_seconds": round(repeats.seconds, 3)} if repeats else {}
    shards = [name_parts_in_round(results[i]) for i in sorted(results)]
    totals = Totals.of(shards)
    images = sum(r.rows_out for i, r in results.items() if i not in plan.done)
    shard_seconds = sum(r.seconds for i, r in results.items() if i not in plan.done)
    model_seconds = sum(r.model_seconds for i, r in results.items() if i not in plan.done)
    inputs = [
        InputShard(
            index=i,
            path=path,
            format=shard_format(path),
            rows=results[i].rows_in if results[i].status == ShardStatus.DONE else None,
            bytes=results[i].input_bytes,
            sha256=results[i].input_sha256,
        )
        for i, path in enumerate(plan.shards)
    ]
    complete = all(r.status == ShardStatus.DONE for r in shards)
    return RoundManifest(
        round=options.round,
        parent=parent_as_stored(options.output, options.parent),
        duplicates={"mode": options.dedup, **duplicates} if duplicates is not None else None,
        status="complete" if complete else "incomplete",
        created_at=created,
        finished_at=now(),
        inputs=inputs,
        models=models,
        parameters={**options.parameters(), "workers": options.workers or 0,
                    "resolved_settings": options.settings},
        shards=shards,
        totals=totals,
        timings={
            "wall_seconds": round(seconds, 3),
            "shard_seconds": round(shard_seconds, 3),
            "model_seconds": round(model_seconds, 3),  # of shard_seconds, in the models
            "images_per_second": round(images / seconds, 3) if seconds > 0 else 0.0,
            **timings,
        },
        versions=job_versions(),
    )

