"""One rank of a training job, from its settings to a trained task: build, stream, train.

The same function runs a one-process job and each Ray Train worker (``workers/``); only the
wrapping of the model (DDP) and the rank differ. No rank reads another's data, and nothing
reads images before the first step: the data is listed from parquet footers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from capfilt.images.transform import ImageTransform
from capfilt.train.build import BuiltTask, build_task
from capfilt.train.loader import StreamSpec
from capfilt.train.loop import TrainConfig, TrainResult, train
from capfilt.train.sources import Piece, Source, list_pieces


# Decoded pixels each decoding process keeps when training without augmentation (the demo's
# 8,000 pictures of 48 px take 55 MiB; at 384 px this holds about 600).
DECODED_CACHE_MIB = 256


@dataclass(frozen=True)
class RankJob:
    """What one rank needs to train: where weights start, the data, the settings."""

    task: str
    init: str
    data: tuple[str, ...]
    output: str
    config: TrainConfig
    vision_init: str | None = None
    negative_mix: float = 0.0


def stream_spec(job: RankJob, built: BuiltTask, pieces: list[Piece], world: int) -> StreamSpec:
    c = job.config
    return StreamSpec(pieces=tuple(pieces),
                      transform=ImageTransform.from_processor(built.processor.image_processor),
                      text=built.task.text_encoding, batch_size=c.batch_size // world,
                      seed=c.seed, augment=c.augment, buffer=c.shuffle_buffer,
                      loader_workers=c.loader_workers, cache_mib=DECODED_CACHE_MIB)


def run_rank(job: RankJob, rank: int = 0, world: int = 1, device: str = "cpu",
             wrap: Callable[[nn.Module], nn.Module] | None = None,
             on_log: Callable[[dict], None] | None = None,
             pieces: list[Piece] | None = None) -> tuple[BuiltTask, TrainResult]:
    """Train ``job`` as rank ``rank`` of ``world``: the one training entry, for the plain loop
    (rank 0 of 1) and for every Ray Train worker.

    ``wrap`` makes the DDP model (Ray Train); ``pieces``: the data as already listed (else
    listed here, from footers); ``on_log`` hears each logged step's record. Returns the built
    task (its models trained, to export) and the ``TrainResult`` (steps, resumes, history,
    rows skipped by reason). Checkpoints go to ``job.output``/checkpoints as it runs."""
    built = build_task(job.task, job.init, job.vision_init, job.config.seed, job.negative_mix,
                       config=job.config)
    built.task.to(device)
    model = wrap(built.task) if wrap else built.task
    device = str(next(built.task.parameters()).device)
    if pieces is None:
        pieces = list_pieces([Source.parse(text) for text in job.data],
                             pairs=job.config.samples == "pairs")
    rows = sum(p.count for p in pieces)
    job = replace(job, config=job.config.for_samples(rows))
    result = train(built.task, stream_spec(job, built, pieces, world), job.config,
                   Path(job.output) / "checkpoints", rows=rows, model=model, rank=rank,
                   world=world, device=device, on_log=on_log)
    return built, result
