"""Load the captioner and filter the way Salesforce's checkpoints are loaded: ``from_pretrained``.

``source`` is a local folder or a Hugging Face hub id; nothing here downloads unless the user
named a hub id.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoProcessor,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipProcessor,
    CLIPModel,
    InstructBlipForConditionalGeneration,
)

from capfilt.attention import use_sdpa
from capfilt.patch_embedding import patches_as_products

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_CLASSES = {"captioner": BlipForConditionalGeneration, "filter": BlipForImageTextRetrieval}
ROLE_FAMILIES = {"captioner": "BLIP, BLIP-2 or InstructBLIP captioning",
                 "filter": "BLIP ITM, BLIP-2 ITM or CLIP"}
# Chosen by the checkpoint's own config (model_type), not by a flag: role -> model_type -> class.
MODEL_TYPES = {
    "captioner": {"blip": BlipForConditionalGeneration, "blip-2": Blip2ForConditionalGeneration,
                  "instructblip": InstructBlipForConditionalGeneration},
    "filter": {"blip": BlipForImageTextRetrieval, "blip-2": Blip2ForImageTextRetrieval,
               "clip": CLIPModel},
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")

transformers.utils.logging.disable_progress_bar()


class ModelSourceError(ValueError):
    """A model folder or id that cannot serve as the captioner or filter."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: BlipProcessor
    device: torch.device
    dtype: torch.dtype


def check_model_source(source: str, role: str) -> None:
    """Fail early, before any work, on a model that is missing, incomplete or not BLIP.

    A local folder is checked file by file; a hub id has its config fetched (the user asked
    for the hub by naming it), so a typo fails here rather than in every worker.
    """
    path = Path(source)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{role} model folder {source}: no config.json")
        if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
            raise ModelSourceError(f"{role} model folder {source}: no weights (*.safetensors)")
        if not any((path / n).is_file() for n in ("preprocessor_config.json",
                                                   "processor_config.json")):
            raise ModelSourceError(f"{role} model folder {source}: no image processor config")
    elif source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ModelSourceError(f"{role} model {source!r}: no such folder, and not a hub id")
    try:
        config = AutoConfig.from_pretrained(source)
        model_type = config.model_type
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise ModelSourceError(f"{role} model {source!r}: cannot load its config ({first_line})")
    if model_type not in MODEL_TYPES[role]:
        expected = " or ".join(repr(t) for t in MODEL_TYPES[role])
        raise ModelSourceError(
            f"{role} model {source}: model_type {model_type!r}, expected {expected} (a "
            f"{ROLE_FAMILIES[role]} checkpoint)"
        )
    wanted = MODEL_TYPES[role][model_type].__name__
    named = getattr(config, "architectures", None) or [wanted]
    if model_type != "blip" and wanted not in named:
        # A BLIP-2 captioner given as the filter would load with a random ITM head.
        raise ModelSourceError(f"{role} model {source}: its config names {', '.join(named)}, "
                               f"not {wanted}")


def gives_itm(source: str) -> bool:
    """Whether the filter at ``source`` has an ITM head (CLIP does not: it only ranks)."""
    return model_class(source, "filter") is not CLIPModel


def model_class(source: str, role: str) -> type:
    """The transformers class for ``role`` that the checkpoint's config names."""
    model_type = AutoConfig.from_pretrained(source, local_files_only=Path(source).is_dir()).model_type
    return MODEL_TYPES[role].get(model_type, MODEL_CLASSES[role])


def load_model(source: str, role: str, device: str = "cpu", dtype: str = "float32",
               attention: str = "sdpa") -> LoadedModel:
    """Load the model for ``role`` ("captioner" or "filter") and its processor, in eval mode.

    ``attention``: "sdpa" runs BLIP's attention through scaled-dot-product attention and lets
    the scorer compute the image's cross-attention K/V once per image (capfilt/attention.py);
    "eager" keeps Hugging Face's modules as they are."""
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"attention {attention!r}: use 'sdpa' or 'eager'")
    check_model_source(source, role)
    torch_dtype = DTYPES[dtype]
    # A local folder never touches the network; only a hub id the user named does.
    local = Path(source).is_dir()
    try:
        model = model_class(source, role).from_pretrained(
            source, dtype=torch_dtype, local_files_only=local
        )
    except pickle.UnpicklingError as exc:
        raise ModelSourceError(
            f"{role} model {source}: weights refused, they are a pickle that does more than "
            "hold tensors (only safetensors or torch.load(weights_only=True) files load)"
        ) from exc
    model = model.to(device).eval()
    if torch.device(device).type == "cuda":  # cuDNN's convolution there: capfilt/patch_embedding.py
        patches_as_products(model)
    if attention == "sdpa":
        use_sdpa(model)
    processor_class = BlipProcessor if isinstance(model, MODEL_CLASSES[role]) else AutoProcessor
    processor = processor_class.from_pretrained(source, local_files_only=local)
    return LoadedModel(model, processor, torch.device(device), torch_dtype)


def weights_sha256(source: str) -> str | None:
    """SHA-256 over the weight files of a local model folder; None for a hub id."""
    path = Path(source)
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
