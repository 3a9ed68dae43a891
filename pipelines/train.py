"""Pre-train or fine-tune a model, in one process or on Ray Train, and write its manifest.

``OUT/`` gets ``checkpoints/step-N/`` during training, then the exported Hugging Face models
(``captioner/`` and/or ``filter/``), ``metrics.jsonl`` and ``manifest.json`` last. Running the
same job again resumes from the last checkpoint, or does nothing when the manifest is there.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, fields, replace
from pathlib import Path

from capfilt.train.build import build_task, output_refs
from capfilt.train.checkpoints import latest_checkpoint, load_checkpoint
from capfilt.train.progress import TrainProgress, job_label
from capfilt.train.run import RankJob, run_rank
from capfilt.train.sources import Source, list_pieces, source_rows
from manifests import JobManifest, validate_manifest, write_json_atomic
from manifests.store import read_json
from pipelines.jobs import job_versions, now, parent_manifest

log = logging.getLogger(__name__)

KIND = {"pretrain": "pretrain", "captioner": "finetune-captioner", "filter": "finetune-filter"}


def uneven_shares(batch_size: int, workers: int) -> str | None:
    """Why ``batch_size`` cannot be split over ``workers``, or None. Each worker takes an equal
    share; ITC and its gradients span the whole batch (``objectives.itc_loss_across_ranks``)."""
    if workers > 1 and batch_size % workers:
        return f"batch_size {batch_size} does not divide by workers {workers}: give each an equal share"
    return None


@dataclass(frozen=True)
class TrainJob(RankJob):
    """One training run: what each rank trains (``RankJob``), and where: ``workers`` ranks
    (more than one: Ray Train, DDP) on ``device``, on the Ray cluster at ``address``. Plain
    data; it travels to Ray Train workers."""

    workers: int = 1
    device: str = "cpu"
    address: str | None = None

    def __post_init__(self):
        uneven = uneven_shares(self.config.batch_size, self.workers)
        if uneven:
            raise ValueError(uneven)

    def rank_job(self) -> RankJob:
        return RankJob(**{f.name: getattr(self, f.name) for f in fields(RankJob)})

    def parameters(self) -> dict:
        return {"task": self.task, "init": self.init, "data": list(self.data),
                "vision_init": self.vision_init, "negative_mix": self.negative_mix,
                "workers": self.workers, "device": self.device, **self.config.to_dict()}


def _absolute(path: str) -> str:
    """A local path made absolute (Ray Train runs its workers in folders of their own); URLs,
    hub ids and anything not on this disk stay as they are."""
    if "://" in path or not (Path(path).exists() or any(c in path for c in "*?[{")):
        return path
    return os.path.abspath(path)


def with_absolute_paths(job: TrainJob) -> TrainJob:
    init = job.init
    if init.startswith("scratch:"):
        init = "scratch:" + _absolute(init[len("scratch:"):])
    else:
        init = _absolute(init)
    data = []
    for text in job.data:
        path, sep, view = text.rpartition("@")
        data.append(_absolute(path) + sep + view if sep and "/" not in view else _absolute(text))
    return replace(job, init=init, data=tuple(data), output=os.path.abspath(job.output))


def run_training(job: TrainJob) -> JobManifest:
    out = Path(job.output)
    manifest_path = out / "manifest.json"
    parameters = job.parameters()  # as given: epochs, not the steps they come to
    if manifest_path.exists():
        done = JobManifest.from_dict(read_json(str(manifest_path)))
        if done.parameters != parameters:
            raise ValueError(f"{out} holds a finished {done.kind} with other settings; "
                             "use another --output")
        log.info("%s already finished: %s", out, manifest_path)
        return done
    created, started = now(), time.perf_counter()
    sources = [Source.parse(text) for text in job.data]
    # Footers only (and a round's captions, to count pairs): the data is counted, never read,
    # here; each rank streams its own part.
    pieces = list_pieces(sources, pairs=job.config.samples == "pairs")
    counts = source_rows(pieces, sources)
    log.info("%s: %d %s in %s", job.task, sum(c["rows"] for c in counts),
             "pairs" if job.config.samples == "pairs" else "rows", ", ".join(map(str, sources)))
    # Epochs become steps here, once: every rank then trains the same number of them.
    job = replace(job, config=job.config.for_samples(sum(c["rows"] for c in counts)))
    if job.workers > 1:
        from workers.ray_cluster import ensure_ray
        from workers.train_worker import run_ray_train

        ensure_ray(job.address)
        run_ray_train(with_absolute_paths(job))
        built = build_task(job.task, job.init, job.vision_init, job.config.seed, job.negative_mix,
                           config=job.config)
        state = load_checkpoint(latest_checkpoint(out / "checkpoints"))
        built.task.load_state_dict(state["model"])
        history, first_step, resumes = state["history"], None, state["resumes"]
        skipped = Counter({(src, reason): n for src, reason, n in state["skipped"]})
    else:
        built, result = run_rank(job.rank_job(), device=job.device, pieces=pieces,
                                 on_log=TrainProgress(job_label(job.output), job.config.steps))
        history, resumes, first_step = result.history, result.resumes, result.first_step_seconds
        skipped = result.skipped
    paths = built.task.cpu().export(out, built.processor)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    inputs = [{"role": "init", "source": source, "manifest": parent_manifest(source)}
              for source in built.init_sources.values()]
    for index, count in enumerate(counts):
        reasons = {reason: n for (src, reason), n in sorted(skipped.items()) if src == index}
        inputs.append({"role": "data", **count, "skipped": reasons,
                       "manifest": parent_manifest(count["source"])})
    rows = sum(c["rows"] for c in counts)
    manifest = JobManifest(
        kind=KIND[job.task], status="complete", inputs=inputs, outputs=output_refs(paths),
        parameters=parameters,
        results={"steps": job.config.steps, "resumes": resumes,
                 "resumed_from": resumes[-1] if resumes else 0, "rows": rows,
                 "epochs": round(job.config.steps * job.config.batch_size / max(rows, 1), 4),
                 "first_step_seconds": first_step,
                 "first": history[0] if history else None,
                 "last": history[-1] if history else None, "history": history},
        timings={"wall_seconds": round(time.perf_counter() - started, 2)},
        versions=job_versions(),
        parents=[m for m in (i["manifest"] for i in inputs) if m],
        created_at=created, finished_at=now(),
    )
    validate_manifest(manifest.to_dict(), "job")
    write_json_atomic(str(manifest_path), manifest.to_dict())
    return manifest
