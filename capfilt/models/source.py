"""What a model folder or hub id holds, read without importing torch or transformers.

The round's driver checks its models before any work and names their classes and weights in
the manifest; only the workers load them. Reading ``config.json`` directly keeps the driver's
start at about a second instead of the 6 to 12 s those imports take. A hub id is the exception:
its config is fetched with transformers (the user asked for the hub by naming it). What a
config may ask for, and whether its weights fit it, is checked in ``capfilt.models.limits``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# The transformers class for each role, chosen by the checkpoint's own config (model_type),
# not by a flag: role -> model_type -> class name. ``capfilt.models.loading`` resolves the names.
MODEL_TYPES = {
    "captioner": {"blip": "BlipForConditionalGeneration", "blip-2": "Blip2ForConditionalGeneration",
                  "instructblip": "InstructBlipForConditionalGeneration"},
    "filter": {"blip": "BlipForImageTextRetrieval", "blip-2": "Blip2ForImageTextRetrieval",
               "clip": "CLIPModel"},
}
ROLE_FAMILIES = {"captioner": "BLIP, BLIP-2 or InstructBLIP captioning",
                 "filter": "BLIP ITM, BLIP-2 ITM or CLIP"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")

# A config is a few KiB: JSON files are read only up to this size.
JSON_BYTES = 16 << 20


class ModelSourceError(ValueError):
    """A model folder or id that cannot serve as the captioner or filter."""


def read_config(source: str) -> dict:
    """The checkpoint's config as a dict: ``config.json`` of a folder, or fetched for a hub id."""
    path = Path(source)
    if path.is_dir():
        config = read_json_file(path / "config.json", f"model {source}")
    else:
        from transformers import AutoConfig  # a hub id only: the network and its imports

        config = AutoConfig.from_pretrained(source).to_dict()
    if not isinstance(config, dict):
        raise ModelSourceError(f"model {source}: config.json is not a JSON object")
    return config


def read_json_file(path: Path, what: str):
    """A small JSON file, read only if it is a regular file of a sane size (never a FIFO or a
    link to /dev/zero, which would hang or fill memory)."""
    if not path.is_file():
        raise ModelSourceError(f"{what}: {path.name} is not a regular file")
    with path.open("rb") as handle:
        data = handle.read(JSON_BYTES + 1)
    if len(data) > JSON_BYTES:
        raise ModelSourceError(f"{what}: {path.name} is over {JSON_BYTES >> 20} MiB")
    try:
        return json.loads(data)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ModelSourceError(f"{what}: {path.name} is not JSON ({exc})") from None


def check_model_source(source: str, role: str) -> None:
    """Fail early, before any work, on a model that is missing, incomplete or not BLIP.

    A local folder is checked file by file; a hub id has its config fetched (the user asked
    for the hub by naming it), so a typo fails here rather than in every worker.
    """
    # Imported here: model_limits reads with this module's read_json_file and raises its
    # ModelSourceError, so importing it at the top would be a cycle.
    from capfilt.models.limits import check_processor, check_sizes, check_weights_fit, weight_shapes

    path = Path(source)
    if path.exists():
        _check_files(path, source, role)
    elif source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ModelSourceError(f"{role} model {source!r}: no such folder, and not a hub id")
    config = _role_config(source, role)
    model_type = config["model_type"]
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
    check_sizes(config, f"{role} model {source}: config.json's ")
    if path.is_dir():
        check_processor(path, f"{role} model {source}")
        tensors = weight_shapes(path, f"{role} model {source}")
        if tensors is not None:
            check_weights_fit(config, wanted, tensors, f"{role} model {source}")


def _check_files(path: Path, source: str, role: str) -> None:
    if not (path / "config.json").exists():
        raise ModelSourceError(f"{role} model folder {source}: no config.json")
    weights = [p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    if not weights:
        raise ModelSourceError(f"{role} model folder {source}: no weights (*.safetensors)")
    for file in weights:
        if not file.is_file():  # a FIFO or a device would hang or never end when hashed
            raise ModelSourceError(f"{role} model folder {source}: {file.name} is not a "
                                   "regular file")
    if not any((path / n).exists() for n in PROCESSOR_FILES):
        raise ModelSourceError(f"{role} model folder {source}: no image processor config")


def _role_config(source: str, role: str) -> dict:
    """The config, with every failure to read it as one line naming the role."""
    try:
        config = read_config(source)
    except ModelSourceError as exc:
        raise ModelSourceError(f"{role} {exc}") from None
    except (OSError, ValueError) as exc:
        first_line = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise ModelSourceError(f"{role} model {source!r}: cannot load its config ({first_line})")
    if "model_type" not in config:
        raise ModelSourceError(f"{role} model {source!r}: its config names no model_type")
    if not isinstance(config["model_type"], str):
        raise ModelSourceError(f"{role} model {source}: its model_type is not a name")
    return config


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
