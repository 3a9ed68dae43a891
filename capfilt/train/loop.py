"""The training loop: AdamW, warm-up then cosine, checkpoints every N steps, exact resume.

One process, or one rank of many (Ray Train wraps the task in DDP and passes rank and world
size; each rank takes its share of every global batch). Defaults follow BLIP's Table 14:
AdamW, weight decay 0.05, cosine schedule.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from capfilt.train.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from capfilt.train.data import BatchMaker

log = logging.getLogger("capfilt.train")


PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """How long and how a task trains. ``checkpoint_every`` 0 saves only at the end."""

    steps: int
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
    shuffle_buffer: int = 2048

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError("steps must be at least 1")
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


# Settings a resumed run may change without changing what it computes.
RESUME_FREE = ("checkpoint_every", "log_every")


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine down to ``min_lr`` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def train(task: nn.Module, batches: BatchMaker, config: TrainConfig, checkpoints: Path,
          *, model: nn.Module | None = None, rank: int = 0, world: int = 1,
          device: str = "cpu", on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``task`` (its forward returns a dict of losses) for ``config.steps`` steps.

    ``model`` is what the forward runs through (a DDP wrapper of ``task``); ``task`` itself
    owns the weights that are checkpointed. Resumes from the last checkpoint under
    ``checkpoints``; refuses one written with other settings.
    """
    model = model or task
    optimizer = torch.optim.AdamW(task.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start, history = 0, []
    found = latest_checkpoint(checkpoints)
    if found is not None:
        state = load_checkpoint(found)
        _check_same_settings(state["config"], config, found)
        task.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
        log.info("resuming from %s (step %d of %d)", found, start, config.steps)
    began = time.monotonic()
    window_start, window_images, sums = time.monotonic(), 0, {}
    for step in range(start, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        pixels, texts = batches(step, rank, world)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 101 + rank)
        losses = model(pixels.to(device), texts, generator)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        window_images += len(texts) * world
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            elapsed = time.monotonic() - window_start
            count = done - max(start, history[-1]["step"] if history else 0)
            record = {"step": done, "lr": lr_at(step, config),
                      **{name: round(total / count, 5) for name, total in sums.items()},
                      "images_per_s": round(window_images / max(elapsed, 1e-9), 2)}
            history.append(record)
            if on_log is not None and rank == 0:
                on_log(record)
            window_start, window_images, sums = time.monotonic(), 0, {}
        if rank == 0 and (
            (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.steps
        ):
            save_checkpoint(checkpoints, done, {
                "model": task.state_dict(), "optimizer": optimizer.state_dict(),
                "step": done, "history": history, "config": config.to_dict(),
            })
    return TrainResult(steps=config.steps, resumed_from=start, history=history,
                       seconds=time.monotonic() - began)


def _check_same_settings(saved: dict, config: TrainConfig, where: Path) -> None:
    for name, value in config.to_dict().items():
        if name in RESUME_FREE:
            continue
        if saved.get(name) != value:
            raise ValueError(
                f"{where} was written with {name}={saved.get(name)!r}, this run has {value!r}: "
                "use the same settings to resume, or another output folder to start over"
            )
