"""Build a training task from where its weights start.

``init`` is one of:
- ``scratch:FOLDER``: a new model shaped by FOLDER's ``config.json`` and using its processor
  (weights there are not read); optionally the vision tower from a timm ViT (``vision_init``);
- a folder holding ``filter/`` and/or ``captioner/`` (what ``capfilt pretrain`` or
  ``capfilt tiny-models`` writes): continue from those;
- a single Hugging Face checkpoint folder or hub id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipProcessor,
)

from capfilt.model_source import weights_sha256
from capfilt.train.blip_pair import BlipPair
from capfilt.train.tasks import CaptionerTask, FilterTask, PretrainTask
from capfilt.train.timm_vision import blip_vision_config, load_timm_into

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
               negative_mix: float = 0.0) -> BuiltTask:
    """The task module with its weights; ``negative_mix`` see ``objectives.hard_negatives``."""
    built = _build(task, init, vision_init, seed)
    if hasattr(built.task, "negative_mix"):
        built.task.negative_mix = negative_mix
    return built


def _build(task: str, init: str, vision_init: str | None, seed: int) -> BuiltTask:
    if task not in ROLE_OF_TASK:
        raise ValueError(f"task {task!r}: pretrain, captioner or filter")
    if init.startswith(SCRATCH):
        return _from_scratch(task, init[len(SCRATCH):], vision_init, seed)
    if vision_init:
        raise ValueError("--vision-init starts a new model: use it with --init scratch:FOLDER")
    main = role_source(init, ROLE_OF_TASK[task])
    if main is None:
        raise FileNotFoundError(f"{init}: no {ROLE_OF_TASK[task]}/ model folder in it")
    local = Path(main).is_dir()
    processor = BlipProcessor.from_pretrained(main, local_files_only=local)
    if task == "captioner":
        model = BlipForConditionalGeneration.from_pretrained(main, local_files_only=local)
        return BuiltTask(CaptionerTask(model, processor), processor, {"captioner": main})
    if task == "filter":
        model = BlipForImageTextRetrieval.from_pretrained(main, local_files_only=local)
        return BuiltTask(FilterTask(model, processor), processor, {"filter": main})
    captioner = role_source(init, "captioner")
    if captioner == main:
        captioner = None
    pair = BlipPair.from_pretrained(main, captioner)
    sources = {"filter": main, **({"captioner": captioner} if captioner else {})}
    return BuiltTask(PretrainTask(pair, processor), processor, sources)


def _from_scratch(task: str, folder: str, vision_init: str | None, seed: int) -> BuiltTask:
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
        built = CaptionerTask(model, processor)
    elif task == "filter":
        model = BlipForImageTextRetrieval(config)
        built = FilterTask(model, processor)
    else:
        model = BlipPair.from_config(config, seed)
        built = PretrainTask(model, processor)
    if timm_model is not None:
        load_timm_into(model.filter.vision_model if task == "pretrain" else model.vision_model,
                       timm_model)
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
