"""Pre-train or fine-tune a model, in one process or on Ray Train, and write its manifest.

``OUT/`` gets ``checkpoints/step-N/`` during training, then the exported Hugging Face models
(``captioner/`` and/or ``filter/``), ``metrics.jsonl`` and ``manifest.json`` last. Running the
same job again resumes from the last checkpoint, or does nothing when the manifest is there.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from capfilt.train.build import build_task, output_refs
from capfilt.train.checkpoints import latest_checkpoint, load_checkpoint
from capfilt.train.data import Source, batches_for, load_training_data
from capfilt.train.loop import TrainConfig, train
from capfilt.train.progress import TrainProgress, job_label
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
class TrainJob:
    """One training run, as plain data (it travels to Ray Train workers)."""

    task: str  # pretrain | captioner | filter
    init: str
    data: tuple[str, ...]
    output: str
    config: TrainConfig
    vision_init: str | None = None
    workers: int = 1
    device: str = "cpu"
    address: str | None = None
    negative_mix: float = 0.0

    def __post_init__(self):
        uneven = uneven_shares(self.config.batch_size, self.workers)
        if uneven:
            raise ValueError(uneven)

    def parameters(self) -> dict:
        return {"task": self.task, "init": self.init, "data": list(self.data),
                "vision_init": self.vision_init, "negative_mix": self.negative_mix,
                "workers": self.workers, "device": self.device, **self.config.to_dict()}


def run_training(job: TrainJob) -> JobManifest:
    out = Path(job.output)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        done = JobManifest.from_dict(read_json(str(manifest_path)))
        if done.parameters != job.parameters():
            raise ValueError(f"{out} holds a finished {done.kind} with other settings; "
                             "use another --output")
        log.info("%s already finished: %s", out, manifest_path)
        return done
    created, started = now(), time.perf_counter()
    sources = [Source.parse(text) for text in job.data]
    data = load_training_data(sources)
    log.info("%s: %d images from %s", job.task, len(data), ", ".join(map(str, sources)))
    if job.workers > 1:
        from pipelines.dispatch import ensure_ray
        from workers.train_worker import run_ray_train

        ensure_ray(job.address)
        run_ray_train(job)
        built = build_task(job.task, job.init, job.vision_init, job.config.seed, job.negative_mix)
        state = load_checkpoint(latest_checkpoint(out / "checkpoints"))
        built.task.load_state_dict(state["model"])
        history, resumed = state["history"], None
    else:
        built = build_task(job.task, job.init, job.vision_init, job.config.seed, job.negative_mix)
        built.task.to(job.device)
        batches = batches_for(data, built.processor, job.config)
        result = train(built.task, batches, job.config, out / "checkpoints", device=job.device,
                       on_log=TrainProgress(job_label(job.output), job.config.steps))
        history, resumed = result.history, result.resumed_from
    paths = built.task.cpu().export(out, built.processor)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    inputs = [{"role": "init", "source": source, "manifest": parent_manifest(source)}
              for source in built.init_sources.values()]
    inputs += [{"role": "data", **count.to_dict(), "manifest": parent_manifest(count.source)}
               for count in data.counts]
    manifest = JobManifest(
        kind=KIND[job.task], status="complete", inputs=inputs, outputs=output_refs(paths),
        parameters=job.parameters(),
        results={"steps": job.config.steps, "resumed_from": resumed, "images": len(data),
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

