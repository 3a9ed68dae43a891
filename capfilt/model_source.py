"""What a model folder or hub id holds, read without importing torch or transformers.

The round's driver checks its models before any work and names their classes and weights in
the manifest; only the workers load them. Reading ``config.json`` directly keeps the driver's
start at about a second instead of the 6 to 12 s those imports take. A hub id is the exception:
its config is fetched with transformers (the user asked for the hub by naming it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# The transformers class for each role, chosen by the checkpoint's own config (model_type),
# not by a flag: role -> model_type -> class name. ``capfilt.models`` resolves the names.
MODEL_TYPES = {
    "captioner": {"blip": "BlipForConditionalGeneration", "blip-2": "Blip2ForConditionalGeneration",
                  "instructblip": "InstructBlipForConditionalGeneration"},
    "filter": {"blip": "BlipForImageTextRetrieval", "blip-2": "Blip2ForImageTextRetrieval",
               "clip": "CLIPModel"},
}
ROLE_FAMILIES = {"captioner": "BLIP, BLIP-2 or InstructBLIP captioning",
                 "filter": "BLIP ITM, BLIP-2 ITM or CLIP"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


class ModelSourceError(ValueError):
    """A model folder or id that cannot serve as the captioner or filter."""


def read_config(source: str) -> dict:
    """The checkpoint's config as a dict: ``config.json`` of a folder, or fetched for a hub id."""
    path = Path(source)
    if path.is_dir():
        return json.loads((path / "config.json").read_text())
    from transformers import AutoConfig  # a hub id only: the network and its imports

    return AutoConfig.from_pretrained(source).to_dict()


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
        config = read_config(source)
        model_type = config["model_type"]
    except KeyError:
        raise ModelSourceError(f"{role} model {source!r}: its config names no model_type")
    except (OSError, ValueError) as exc:
        first_line = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise ModelSourceError(f"{role} model {source!r}: cannot load its config ({first_line})")
    if model_type not in MODEL_TYPES[role]:
        expected = " or ".join(repr(t) for t in MODEL_TYPES[role])
        raise ModelSourceError(
            f"{role} model {source}: model_type {model_type!r}, expected {expected} (a "
            f"{ROLE_FAMILIES[role]} checkpoint)"
        )
    wanted = MODEL_TYPES[role][model_type]
    named = config.get("architectures") or [wanted]
    if model_type != "blip" and wanted not in named:
        # A BLIP-2 captioner given as the filter would load with a random ITM head.
        raise ModelSourceError(f"{role} model {source}: its config names {', '.join(named)}, "
                               f"not {wanted}")


def model_class_name(source: str, role: str) -> str:
    """The name of the transformers class for ``role`` that the checkpoint's config names."""
    model_type = read_config(source).get("model_type")
    return MODEL_TYPES[role].get(model_type, MODEL_TYPES[role]["blip"])


def gives_itm(source: str) -> bool:
    """Whether the filter at ``source`` has an ITM head (CLIP does not: it only ranks)."""
    return model_class_name(source, "filter") != "CLIPModel"


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
