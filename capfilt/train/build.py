"""Build a training task from where its weights start.

``init`` is one of:
- ``scratch:FOLDER``: a new model shaped by FOLDER's ``config.json`` and using its processor
  (weights there are not read); optionally the vision tower from a timm ViT (``vision_init``);
- a folder holding ``filter/`` and/or ``captioner/`` (what ``capfilt pretrain`` or
  ``capfilt tiny-models`` writes): continue from those;
- a single Hugging Face checkpoint folder or hub id.

With a ``TrainConfig``, the pretrain and filter tasks train with BLIP's momentum encoders,
queue, distillation and ``negative_all_rank`` as it says, and ``grad_checkpointing`` turns on
activation checkpointing in the Hugging Face models (the online ones; the momentum copies run
without gradient and keep nothing for a backward).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import (
    AutoConfig,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipProcessor,
)

from capfilt.models.loading import from_pretrained_checked
from capfilt.models.source import weights_sha256
from capfilt.train.blip_pair import BlipPair
from capfilt.train.tasks import CaptionerTask, FilterTask, Objectives, PretrainTask
from capfilt.train.timm_vision import blip_vision_config, load_timm_into

if TYPE_CHECKING:
    from capfilt.train.loop import TrainConfig

SCRATCH = "scratch:"
ROLE_OF_TASK = {"captioner": "captioner", "filter": "filter", "pretrain": "filter"}


@dataclass
class BuiltTask:
    task: nn.Module
    processor: BlipProcessor
    init_sources: dict[str, str]  # role -> folder or id the weights came from


def role_source(init: str, role: str) -> str | None:
    """``init/role`` when ``init`` is a folder of roles, else ``init`` itself."""
    folder = Path(init)
    if (folder / role).is_dir():
        return str(folder / role)
    if any((folder / r).is_dir() for r in ("filter", "captioner")):
        return None
    return init


def build_task(task: str, init: str, vision_init: str | None = None, seed: int = 0,
               negative_mix: float = 0.0, config: TrainConfig | None = None) -> BuiltTask:
    """The task module with its weights; ``negative_mix`` see ``objectives.hard_negatives``.

    ``config`` (None: momentum off, no checkpointing, as before it existed) gives the pretrain
    and filter tasks BLIP's momentum, queue, distillation and negative settings, and turns on
    gradient checkpointing where it asks for it. With momentum on, the queue size must divide by
    the global batch (``config.batch_size``), as BLIP asserts.
    """
    objectives = Objectives()
    if config is not None:
        objectives = Objectives.from_config(config)
        if objectives.momentum and task in QUEUED_TASKS:
            check_queue_size(objectives.queue_size, config.batch_size)
    built = _build(task, init, vision_init, seed, objectives)
    if hasattr(built.task, "negative_mix"):
        built.task.negative_mix = negative_mix
    if config is not None and config.grad_checkpointing:
        for model in built.task.online_models():
            enable_grad_checkpointing(model)
    return built


QUEUED_TASKS = ("pretrain", "filter")


def check_queue_size(queue_size: int, batch_size: int) -> None:
    """BLIP's queue takes whole global batches: refuse a size that does not divide by one."""
    if queue_size < batch_size or queue_size % batch_size:
        raise ValueError(f"queue_size {queue_size} is not a multiple of the global batch_size "
                         f"{batch_size}: BLIP's feature queue takes whole batches (57,600 is "
                         "a multiple of most batch sizes); change one of them")


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing in every layer of a Hugging Face model (BLIP's vision and text
    layers are ``GradientCheckpointingLayer``s): their activations are recomputed in the
    backward pass. Non-reentrant, which works under DDP and with inputs that need no grad."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _build(task: str, init: str, vision_init: str | None, seed: int,
           objectives: Objectives) -> BuiltTask:
    if task not in ROLE_OF_TASK:
        raise ValueError(f"task {task!r}: pretrain, captioner or filter")
    if init.startswith(SCRATCH):
        return _from_scratch(task, init[len(SCRATCH):], vision_init, seed, objectives)
    if vision_init:
        raise ValueError("--vision-init starts a new model: use it with --init scratch:FOLDER")
    main = role_source(init, ROLE_OF_TASK[task])
    if main is None:
        raise FileNotFoundError(f"{init}: no {ROLE_OF_TASK[task]}/ model folder in it")
    local = Path(main).is_dir()
    processor = BlipProcessor.from_pretrained(main, local_files_only=local)
    if task == "captioner":
        model = from_pretrained_checked(BlipForConditionalGeneration, main, "captioner")
        return BuiltTask(CaptionerTask(model, processor), processor, {"captioner": main})
    if task == "filter":
        model = from_pretrained_checked(BlipForImageTextRetrieval, main, "filter")
        return BuiltTask(FilterTask(model, processor, objectives=objectives), processor,
                         {"filter": main})
    captioner = role_source(init, "captioner")
    if captioner == main:
        captioner = None
    pair = BlipPair.from_pretrained(main, captioner)
    sources = {"filter": main, **({"captioner": captioner} if captioner else {})}
    return BuiltTask(PretrainTask(pair, processor, objectives=objectives), processor, sources)


def _from_scratch(task: str, folder: str, vision_init: str | None, seed: int,
                  objectives: Objectives) -> BuiltTask:
    source = role_source(folder, ROLE_OF_TASK[task]) or role_source(folder, "captioner")
    if source is None:
        raise FileNotFoundError(f"{folder}: no model config to start from")
    local = Path(source).is_dir()
    config = AutoConfig.from_pretrained(source, local_files_only=local)
    if not isinstance(config, BlipConfig):
        raise ValueError(f"{source}: model_type {config.model_type!r}, expected blip")
    processor = BlipProcessor.from_pretrained(source, local_files_only=local)
    timm_model = None
    if vision_init:
        timm_model = create_timm(vision_init)
        vision = blip_vision_config(timm_model, config.vision_config.image_size)
        config = BlipConfig(
            text_config={**config.text_config.to_dict(), "encoder_hidden_size": vision["hidden_size"]},
            vision_config={**config.vision_config.to_dict(), **vision},
            projection_dim=config.projection_dim,
            image_text_hidden_size=config.image_text_hidden_size,
        )
    torch.manual_seed(seed)
    if task == "captioner":
        model = BlipForConditionalGeneration(config)
    elif task == "filter":
        model = BlipForImageTextRetrieval(config)
    else:
        model = BlipPair.from_config(config, seed)
    # Before the task is made: its momentum encoders copy the vision tower as it starts.
    if timm_model is not None:
        load_timm_into(model.filter.vision_model if task == "pretrain" else model.vision_model,
                       timm_model)
    if task == "captioner":
        built = CaptionerTask(model, processor)
    elif task == "filter":
        built = FilterTask(model, processor, objectives=objectives)
    else:
        built = PretrainTask(model, processor, objectives=objectives)
    return BuiltTask(built, processor, {"config": source, **({"vision": vision_init} if vision_init else {})})


def create_timm(spec: str) -> nn.Module:
    """``timm:NAME`` (timm's pretrained weights) or ``timm:NAME@FILE`` (weights from a file)."""
    import timm

    if not spec.startswith("timm:"):
        raise ValueError(f"vision init {spec!r}: use timm:NAME or timm:NAME@FILE")
    name, _, file = spec[len("timm:"):].partition("@")
    overlay = {"file": file} if file else None
    return timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)


def output_refs(paths: dict[str, Path]) -> list[dict]:
    return [{"role": role, "path": str(path), "weights_sha256": weights_sha256(str(path))}
            for role, path in paths.items()]
