"""The training loop: AdamW, warm-up then cosine, checkpoints every N steps, exact resume.

One process, or one rank of many (Ray Train wraps the task in DDP and passes rank and world
size; each rank reads its own share of every global batch from its own loader). Defaults follow
BLIP's Table 14: AdamW, weight decay 0.05, cosine schedule.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from capfilt.images.transform import ImageTransform
from capfilt.train.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from capfilt.train.loader import StreamSpec, TrainBatch, rank_loader
from capfilt.train.stream import Position

log = logging.getLogger("capfilt.train")


PRECISIONS = ("auto", "fp32", "bf16")
SAMPLES = ("images", "pairs")


@dataclass(frozen=True)
class TrainConfig:
    """How long and how a task trains. ``checkpoint_every`` 0 saves only at the end.

    ``samples``: what one training sample is when a row offers several captions (a CapFilt
    round's kept web and synthetic texts). "images": one row per image per epoch, one of its
    captions drawn (BLIP-2, §3.4); "pairs": every (image, caption) its own sample, as BLIP's
    pre-training reads its web and synthetic annotation files one after the other, so an image
    with two kept texts is seen twice an epoch. ``epochs`` (> 0): train that many passes over
    the samples instead of a fixed ``steps``: BLIP pre-trains every Table 1 row for the same
    20 epochs, so a row with more kept pairs takes more steps. (As images, an epoch counts the
    rows the footers count, an image left with no text among them.)"""

    steps: int = 0
    batch_size: int = 64
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.05
    seed: int = 0
    augment: str = "blip"
    checkpoint_every: int = 0
    log_every: int = 10
    # BLIP's ITC and ITM (salesforce/BLIP blip_pretrain.py, blip_retrieval.py): momentum
    # encoders, a queue of their features, distillation from them, negatives across ranks.
    momentum: bool = True
    momentum_decay: float = 0.995
    queue_size: int = 57600
    alpha: float = 0.4
    negative_all_rank: bool = False
    # "auto": bf16 autocast on CUDA, float32 elsewhere.
    precision: str = "auto"
    grad_checkpointing: bool = False
    # The data stream (capfilt/train/stream.py): decoding processes per training process, and
    # the rows each of them shuffles together.
    loader_workers: int = 2
    shuffle_buffer: int = 512
    samples: str = "images"
    epochs: float = 0.0

    def __post_init__(self):
        if self.epochs < 0 or (self.steps < 1 and not self.epochs):
            raise ValueError("give steps (at least 1) or epochs (more than 0)")
        if self.epochs and self.steps:
            raise ValueError(f"give steps ({self.steps}) or epochs ({self.epochs}), not both")
        if self.samples not in SAMPLES:
            raise ValueError(f"samples {self.samples!r}: use one of {', '.join(SAMPLES)}")
        if self.batch_size < 2:
            raise ValueError("batch size must be at least 2 (ITC contrasts within a batch)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if not 0 <= self.momentum_decay < 1 or not 0 <= self.alpha <= 1:
            raise ValueError("momentum_decay must be in [0, 1) and alpha in [0, 1]")
        if self.loader_workers < 0 or self.shuffle_buffer < 1:
            raise ValueError("loader_workers must be >= 0 and shuffle_buffer >= 1")

    def to_dict(self) -> dict:
        return asdict(self)

    def for_samples(self, samples: int) -> TrainConfig:
        """The config with its steps fixed: ``epochs`` passes over ``samples`` samples, or the
        steps as given."""
        if not self.epochs:
            return self
        steps = max(1, math.ceil(self.epochs * samples / self.batch_size))
        return replace(self, steps=steps, epochs=0.0)


# Settings a resumed run may change without changing what it computes.
RESUME_FREE = ("checkpoint_every", "log_every")


@dataclass
class TrainResult:
    steps: int
    resumes: list[int]  # the steps this job resumed from, in order
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    first_step_seconds: float = 0.0  # from the start to the first batch in hand
    skipped: Counter = field(default_factory=Counter)  # (source index, reason) -> rows


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine down to ``min_lr`` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast_dtype(config: TrainConfig, device: str) -> torch.dtype | None:
    """bf16 autocast where asked for, and by default on CUDA."""
    if config.precision == "bf16" or (config.precision == "auto" and device.startswith("cuda")):
        return torch.bfloat16
    return None


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: TrainBatch,
               transform: ImageTransform, device: str, dtype: torch.dtype | None,
               generator: torch.Generator, progress: float) -> dict[str, torch.Tensor]:
    """One optimiser step on one batch: pixels normalised on the device, bf16 autocast where
    ``dtype`` says, the losses summed. Returns the losses."""
    pixels = transform.normalize(batch.pixels.to(device, non_blocking=True))
    ids = batch.input_ids.to(device, non_blocking=True)
    mask = batch.attention_mask.to(device, non_blocking=True)
    with torch.autocast(device.split(":")[0], dtype=dtype or torch.float32,
                        enabled=dtype is not None):
        losses = model(pixels, ids, mask, batch.texts, generator, progress)
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    optimizer.step()
    return losses


def train(task: nn.Module, stream: StreamSpec, config: TrainConfig, checkpoints: Path,
          *, rows: int, model: nn.Module | None = None, rank: int = 0, world: int = 1,
          device: str = "cpu", on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``task`` (its forward returns a dict of losses) for ``config.steps`` steps.

    ``stream`` says how this rank's batches are read (``capfilt/train/loader.py``); ``rows``
    is the data's row count from metadata, which turns steps into epochs (BLIP ramps its
    distillation over the first epochs). ``model`` is what the forward runs through (a DDP
    wrapper of ``task``); ``task`` itself owns the weights that are checkpointed. Resumes from
    the last checkpoint under ``checkpoints``, weights and every reader's place in the data;
    refuses one written with other settings.
    """
    began = time.monotonic()
    model = model or task
    optimizer = torch.optim.AdamW(task.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start, history, positions, skipped, resumes = 0, [], {}, Counter(), []
    data = data_fingerprint(stream)
    found = _agreed_checkpoint(checkpoints, world)
    if found is not None:
        state = load_checkpoint(found)
        _check_same_settings(state["config"], config, found)
        if state["world"] != world:
            raise ValueError(f"{found} was written by {state['world']} workers, this run "
                             f"has {world}: the data order depends on it; resume with as many")
        if state["data"] != data:
            raise ValueError(f"{found} was trained on other data (its shards or their row "
                             "counts differ): use the same --data to resume, or another output")
        task.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
        resumes = state["resumes"] + [start]
        own = range(rank * stream.per_rank, (rank + 1) * stream.per_rank)
        positions = {int(slot): Position(*place) for slot, place in state["positions"]
                     if int(slot) in own}
        if rank == 0:
            skipped = Counter({(int(src), reason): n for src, reason, n in state["skipped"]})
        log.info("resuming from %s (step %d of %d)", found, start, config.steps)
    loader = rank_loader(stream, rank, world, start, positions,
                         pin_memory=device.startswith("cuda"))
    batches = iter(loader)
    dtype = autocast_dtype(config, device)
    first_step = None
    window_start, window_images, window_wait, sums = time.monotonic(), 0, 0.0, {}
    for step in range(start, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        waited = time.monotonic()
        batch = next(batches)
        window_wait += time.monotonic() - waited
        if first_step is None:
            first_step = time.monotonic() - began
        positions[batch.slot] = batch.position
        skipped.update(batch.skipped)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 101 + rank)
        losses = train_step(model, optimizer, batch, stream.transform, device, dtype, generator,
                            progress=step * config.batch_size / max(rows, 1))
        window_images += len(batch.texts) * world
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            elapsed = time.monotonic() - window_start
            count = done - max(start, history[-1]["step"] if history else 0)
            record = {"step": done, "lr": lr_at(step, config),
                      **{name: round(total / count, 5) for name, total in sums.items()},
                      "epoch": round(done * config.batch_size / max(rows, 1), 4),
                      "images_per_s": round(window_images / max(elapsed, 1e-9), 2),
                      "data_wait": round(window_wait / max(elapsed, 1e-9), 3)}
            history.append(record)
            if on_log is not None and rank == 0:
                on_log(record)
            window_start, window_images, window_wait, sums = time.monotonic(), 0, 0.0, {}
        if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.steps:
            every_position, every_skip = _gather(positions, skipped, world)
            if rank == 0:
                save_checkpoint(checkpoints, done, {
                    "model": task.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": done, "history": history, "config": config.to_dict(),
                    "world": world, "resumes": resumes, "data": data,
                    "positions": [[slot, p.to_list()] for slot, p in sorted(every_position.items())],
                    "skipped": [[src, reason, n] for (src, reason), n in sorted(every_skip.items())],
                })
    _, every_skip = _gather(positions, skipped, world)
    del batches, loader
    return TrainResult(steps=config.steps, resumes=resumes, history=history,
                       seconds=time.monotonic() - began, first_step_seconds=first_step or 0.0,
                       skipped=every_skip)


def data_fingerprint(stream: StreamSpec) -> str:
    """What the order of the data depends on besides the seed: its pieces and their counts."""
    text = "\n".join(f"{p.url}|{p.group}|{p.rows}|{p.view}" for p in stream.pieces)
    return hashlib.sha256(text.encode()).hexdigest()


def _agreed_checkpoint(checkpoints: Path, world: int) -> Path | None:
    """The checkpoint to resume from: rank 0's choice, which every rank must see too (a
    checkpoint folder that is not shared by all ranks would split them at different steps)."""
    found = latest_checkpoint(checkpoints)
    if world == 1:
        return found
    import torch.distributed as dist

    choice = [str(found) if found else None]
    dist.broadcast_object_list(choice, src=0)
    if choice[0] != (str(found) if found else None):
        raise RuntimeError(f"rank {dist.get_rank()} sees checkpoint {found}, rank 0 sees "
                           f"{choice[0]}: the output folder must be shared by every worker")
    return found


def _gather(positions: dict[int, Position], skipped: Counter,
            world: int) -> tuple[dict[int, Position], Counter]:
    """Every rank's slot positions and skip counts (each rank holds its own slots')."""
    if world == 1:
        return dict(positions), Counter(skipped)
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, (positions, skipped))
    merged_positions, merged_skipped = {}, Counter()
    for part_positions, part_skipped in parts:
        merged_positions.update(part_positions)
        merged_skipped.update(part_skipped)
    return merged_positions, merged_skipped


def _check_same_settings(saved: dict, config: TrainConfig, where: Path) -> None:
    for name, value in config.to_dict().items():
        if name in RESUME_FREE:
            continue
        if saved.get(name) != value:
            raise ValueError(
                f"{where} was written with {name}={saved.get(name)!r}, this run has {value!r}: "
                "use the same settings to resume, or another output folder to start over"
            )
