"""Load the captioner and filter the way Salesforce's checkpoints are loaded: ``from_pretrained``.

``source`` is a local folder or a Hugging Face hub id; nothing here downloads unless the user
named a hub id. What a source holds is read in ``capfilt.models.source``, which imports neither
torch nor transformers, so the round's driver can check models without loading them.
"""

from __future__ import annotations

import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoProcessor,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipProcessor,
)

from capfilt.models.attention import use_sdpa
from capfilt.models.patch_embedding import patches_as_products
from capfilt.models.source import ModelSourceError, check_model_source, model_class_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_CLASSES = {"captioner": BlipForConditionalGeneration, "filter": BlipForImageTextRetrieval}

transformers.utils.logging.disable_progress_bar()


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: BlipProcessor
    device: torch.device
    dtype: torch.dtype


def model_class(source: str, role: str) -> type:
    """The transformers class for ``role`` that the checkpoint's config names."""
    return getattr(transformers, model_class_name(source, role))


def load_model(source: str, role: str, device: str = "cpu", dtype: str = "float32",
               attention: str = "sdpa") -> LoadedModel:
    """Load the model for ``role`` ("captioner" or "filter") and its processor, in eval mode.

    ``attention``: "sdpa" runs BLIP's attention through scaled-dot-product attention and lets
    the scorer compute the image's cross-attention K/V once per image (capfilt/models/attention.py);
    "eager" keeps Hugging Face's modules as they are."""
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"attention {attention!r}: use 'sdpa' or 'eager'")
    check_model_source(source, role)
    torch_dtype = DTYPES[dtype]
    # A local folder never touches the network; only a hub id the user named does.
    local = Path(source).is_dir()
    wanted = model_class(source, role)
    try:
        # Shapes unlike the config's are reported with the other misfits below, not raised
        # with a pointer to a table in the log; their size is bounded by the checks above.
        with loading_quietly():
            model, info = wanted.from_pretrained(
                source, dtype=torch_dtype, local_files_only=local, output_loading_info=True,
                ignore_mismatched_sizes=True,
            )
    except pickle.UnpicklingError as exc:
        raise ModelSourceError(
            f"{role} model {source}: weights refused, they are a pickle that does more than "
            "hold tensors (only safetensors or torch.load(weights_only=True) files load)"
        ) from exc
    check_loading_info(info, f"{role} model {source}", wanted.__name__)
    model = model.to(device).eval()
    # cuDNN runs the patch convolution slowly there (capfilt/models/patch_embedding.py)
    if torch.device(device).type == "cuda":
        patches_as_products(model)
    if attention == "sdpa":
        use_sdpa(model)
    processor_class = BlipProcessor if isinstance(model, MODEL_CLASSES[role]) else AutoProcessor
    processor = processor_class.from_pretrained(source, local_files_only=local)
    return LoadedModel(model, processor, torch.device(device), torch_dtype)


def from_pretrained_checked(model_class: type, source: str, role: str) -> torch.nn.Module:
    """``model_class.from_pretrained(source)`` that refuses weights not filling the model: a
    training started from an incomplete checkpoint would otherwise train random layers."""
    with loading_quietly():
        model, info = model_class.from_pretrained(
            source, local_files_only=Path(source).is_dir(), output_loading_info=True,
            ignore_mismatched_sizes=True,
        )
    check_loading_info(info, f"{role} model {source}", model_class.__name__)
    return model


@contextmanager
def loading_quietly():
    """transformers' load report (a table of missing and unexpected tensors) left unprinted:
    ``check_loading_info`` refuses such weights in one line of its own."""
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(verbosity)


def check_loading_info(info: dict, what: str, class_name: str) -> None:
    """Refuse weights that do not fill the model exactly: transformers would initialise what is
    missing at random and run on with a warning in a worker's log. What it knows to be absent
    legitimately (tied weights, rebuilt buffers) it has already left out of ``info``."""
    problems = []
    for label, keys in (("missing", info["missing_keys"]), ("unexpected", info["unexpected_keys"])):
        if keys:
            problems.append(f"{label} {_tensors(len(keys))} ({_first(sorted(keys))})")
    if info["mismatched_keys"]:
        shapes = [f"{key} (weights {list(theirs)}, config {list(ours)})"
                  for key, theirs, ours in sorted(info["mismatched_keys"])]
        problems.append(f"{_tensors(len(shapes))} of other shapes than its config gives "
                        f"({_first(shapes)})")
    if info["error_msgs"]:
        problems.append(" ".join(str(info["error_msgs"][0]).split())[:300])
    if problems:
        raise ModelSourceError(f"{what}: its weights do not match {class_name}: "
                               + "; ".join(problems))


def _tensors(count: int) -> str:
    return f"{count} tensor" if count == 1 else f"{count} tensors"


def _first(items: list[str], shown: int = 3) -> str:
    return ", ".join(items[:shown]) + (", ..." if len(items) > shown else "")
