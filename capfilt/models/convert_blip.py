"""Original salesforce/BLIP checkpoints (``model_base_capfilt_large.pth``, ``model_large_caption.pth``,
``model_base_retrieval_coco.pth``, ...) to the Hugging Face layout that ``from_pretrained`` loads.

The files hold ``{"model": state_dict, ...}`` and are read with ``torch.load(weights_only=True)``
only. Names differ on the vision side alone (BLIP-NOTES.md); the text side keeps its names.
What the target model does not use is dropped by rule and listed: momentum encoders and queues
of pre-training and retrieval training, and the other model's half of a pre-training
checkpoint (a captioner needs no ITM head, a filter no decoder). Anything else left over, or
missing, is an error: a silent partial load would give a model of random weights.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import BlipConfig, BlipProcessor

from capfilt.models.loading import MODEL_CLASSES

log = logging.getLogger(__name__)

# Inside ``visual_encoder.blocks.N.``: BLIP's (timm's) names -> transformers' names.
_BLOCK_PARTS = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_VISION_TOP = {"cls_token": "embeddings.class_embedding",
               "pos_embed": "embeddings.position_embedding",
               "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
               "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
               "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)$")
# Training state the Hugging Face models do not hold.
_TRAINING_ONLY = {"image_queue", "text_queue", "idx_queue", "ptr_queue", "temp"}
# Top-level modules each kind keeps; the rest of a pre-training checkpoint is the other model.
KEEP = {"captioner": ("visual_encoder", "text_decoder"),
        "filter": ("visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head")}
OTHER = {"captioner": ("text_encoder", "vision_proj", "text_proj", "itm_head"),
         "filter": ("text_decoder",)}


class ConversionError(ValueError):
    """The checkpoint does not convert cleanly; the message names the keys."""


@dataclass
class Conversion:
    state_dict: dict[str, torch.Tensor]
    dropped: dict[str, list[str]] = field(default_factory=dict)  # why -> keys


def hf_vision_key(rest: str) -> str | None:
    """``rest`` is a key without its ``visual_encoder.`` prefix; None if it is not ViT's."""
    if rest in _VISION_TOP:
        return f"vision_model.{_VISION_TOP[rest]}"
    match = _BLOCK.fullmatch(rest)
    if match and match.group(2) in _BLOCK_PARTS:
        index, part, kind = match.groups()
        return f"vision_model.encoder.layers.{index}.{_BLOCK_PARTS[part]}.{kind}"
    return None


def drop_reason(key: str, kind: str) -> str | None:
    top = key.split(".", 1)[0]
    if top.endswith("_m") or top in _TRAINING_ONLY:
        return "momentum encoders and queues (training only)"
    if top in OTHER[kind]:
        return "the other model's part of the checkpoint"
    if key.endswith(".position_ids"):
        return "position_ids buffers (rebuilt by transformers)"
    return None


def convert_state_dict(original: dict[str, torch.Tensor], kind: str) -> Conversion:
    """Rename ``original``'s keys for ``kind`` ("captioner" or "filter")."""
    if kind not in KEEP:
        raise ConversionError(f"kind {kind!r}: use captioner or filter")
    result = Conversion({})
    unknown = []
    for key, tensor in original.items():
        reason = drop_reason(key, kind)
        if reason:
            result.dropped.setdefault(reason, []).append(key)
            continue
        top, _, rest = key.partition(".")
        if top == "visual_encoder":
            new = hf_vision_key(rest)
        elif top in KEEP[kind]:
            new = key  # text side: the same names in both codebases
        else:
            new = None
        if new is None:
            unknown.append(key)
        else:
            result.state_dict[new] = tensor
    if unknown:
        raise ConversionError(f"{len(unknown)} keys of no known BLIP module for a {kind}: "
                              f"{', '.join(sorted(unknown)[:10])}")
    return result


def load_original(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an original BLIP ``.pth`` (under ``"model"``), loaded as tensors only."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ConversionError(f"{path}: not found") from exc
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise ConversionError(f"{path}: not a tensors-only torch checkpoint ({exc})") from exc
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: no state dict of tensors (expected one under 'model')")
    return state


def convert_checkpoint(path: str | Path, kind: str, out: str | Path,
                       reference: str) -> Conversion:
    """Convert ``path`` and save a ``from_pretrained`` folder at ``out``.

    ``reference`` (a folder or hub id) gives the config and processor: the architecture's
    sizes and the tokenizer with BLIP's ``[DEC]``/``[ENC]`` tokens, which a .pth does not hold.
    """
    conversion = convert_state_dict(load_original(path), kind)
    config = BlipConfig.from_pretrained(reference)
    model = MODEL_CLASSES[kind](config)
    try:
        missing, unexpected = model.load_state_dict(conversion.state_dict, strict=False)
    except RuntimeError as exc:  # shapes that do not fit the reference config
        raise ConversionError(f"{path} does not fit the config of {reference}: {exc}") from exc
    if missing or unexpected:
        raise ConversionError(f"{path} as a {kind}: missing {sorted(missing)[:10]}, "
                              f"left over {sorted(unexpected)[:10]}")
    for reason, keys in conversion.dropped.items():
        log.warning("dropped %d keys: %s (%s%s)", len(keys), reason, ", ".join(keys[:6]),
                    ", ..." if len(keys) > 6 else "")
    model.eval().save_pretrained(out)
    BlipProcessor.from_pretrained(reference).save_pretrained(out)
    return conversion
