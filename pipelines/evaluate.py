"""``capfilt eval``: a filter's retrieval recall and a captioner's caption quality on a test set."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict

from capfilt.captioning.settings import SamplingConfig
from capfilt.evaluation.evaluate import caption_quality, load_eval_set, retrieval_recall
from capfilt.models.loading import load_model
from capfilt.models.source import weights_sha256
from manifests import JobManifest, validate_manifest, write_json_atomic
from pipelines.eval_settings import EvalJob
from pipelines.jobs import job_versions, now, parent_manifest

log = logging.getLogger(__name__)


def make_judge(spec: str | None) -> Callable[[str, str], bool] | None:
    """``world:TRUTH_DIR``: a caption is right when it states the demo world's scene exactly."""
    if spec is None:
        return None
    kind, _, where = spec.partition(":")
    if kind != "world" or not where:
        raise ValueError(f"--judge {spec!r}: use world:TRUTH_DIR")
    from capfilt.world import caption_is_correct, load_scenes

    scenes = load_scenes(where)
    return lambda key, caption: caption_is_correct(caption, scenes[key])


def run_eval(job: EvalJob) -> JobManifest:
    created, started = now(), time.perf_counter()
    data = load_eval_set(list(job.data), job.limit)
    metrics: dict = {"images": len(data.keys), "texts": len(data.texts)}
    inputs = [{"role": "data", "source": s, "manifest": None} for s in job.data]
    samples = []
    if job.filter:
        loaded = load_model(job.filter, "filter", job.device)
        metrics.update(retrieval_recall(loaded, data, k=job.k))
        inputs.append(_model_input("filter", job.filter))
    if job.captioner:
        loaded = load_model(job.captioner, "captioner", job.device)
        sampling = SamplingConfig(method="beam", num_beams=job.num_beams,
                                  max_new_tokens=job.max_new_tokens, min_new_tokens=1,
                                  repetition_penalty=1.0, prompt=job.prompt)
        caption_metrics, captions = caption_quality(loaded, data, sampling, make_judge(job.judge))
        metrics.update(caption_metrics)
        samples = [{"key": k, "caption": c, "references": r}
                   for k, c, r in list(zip(data.keys, captions, data.references))[:20]]
        inputs.append(_model_input("captioner", job.captioner))
    log.info("eval: %s", metrics)
    manifest = JobManifest(
        kind="eval", status="complete", inputs=inputs, outputs=[], parameters=asdict(job),
        results={"metrics": metrics, "samples": samples},
        timings={"wall_seconds": round(time.perf_counter() - started, 2)},
        versions=job_versions(), parents=[i["manifest"] for i in inputs if i["manifest"]],
        created_at=created, finished_at=now(),
    )
    validate_manifest(manifest.to_dict(), "job")
    if job.output:
        write_json_atomic(job.output, manifest.to_dict())
    return manifest


def _model_input(role: str, source: str) -> dict:
    return {"role": role, "source": source, "weights_sha256": weights_sha256(source),
            "manifest": parent_manifest(source)}
