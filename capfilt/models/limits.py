"""What a model's config may ask a worker to allocate, and whether its weights fit the config.

Nothing here trusts a number in a model's files: sizes are checked against limits before a
worker allocates anything, and a local folder's config against the tensors its safetensors
headers list (names and shapes, read from the files' first bytes). No torch or transformers:
the round's driver runs these checks.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from capfilt.models.source import PROCESSOR_FILES, ModelSourceError, read_json_file

# A safetensors header is well under 1 MiB for a 13-billion-parameter model (a longer one is
# left to loading, which takes up to the format's 100 MB).
SAFETENSORS_HEADER_BYTES = 16 << 20

# What a config may ask a worker to allocate. The largest checkpoints capfilt is meant for stay
# far inside: BLIP-large (ViT-L, 24 layers, 384 px), BLIP-2 and InstructBLIP (ViT-g 39 layers
# of width 1,408; OPT-6.7b width 4,096, MLP 16,384; FlanT5-XXL d_model 4,096, 64 heads;
# Vicuna-13b 40 layers of 5,120, 2,048 positions), CLIP ViT-L/14-336 (577 image tokens).
SIZE_LIMITS = {
    "num_hidden_layers": 128, "num_layers": 128, "num_decoder_layers": 128,
    "hidden_size": 16_384, "d_model": 16_384, "encoder_hidden_size": 16_384,
    "word_embed_proj_dim": 16_384, "projection_dim": 16_384, "image_text_hidden_size": 16_384,
    "intermediate_size": 65_536, "ffn_dim": 65_536, "d_ff": 65_536, "d_kv": 1_024,
    "num_attention_heads": 256, "num_heads": 256, "num_key_value_heads": 256,
    "vocab_size": 1 << 19, "max_position_embeddings": 1 << 17, "num_query_tokens": 1_024,
    "image_size": 2_048, "patch_size": 2_048, "num_channels": 16,
}
MAX_IMAGE_TOKENS = 1 << 14  # (image_size / patch_size) ** 2: BLIP-large and CLIP-336 have 576
MAX_IMAGE_SIDE = SIZE_LIMITS["image_size"]  # a processor's resize and crop, in pixels


@dataclass(frozen=True)
class Layout:
    """Where a class keeps its tensors: the top-level modules, the sub-configs it builds, and
    the stacks of layers whose depth a sub-config gives (weight prefix -> sub-config)."""

    modules: frozenset
    parts: tuple
    stacks: dict


_VISION = {"vision_model.encoder.layers": "vision_config"}
_QFORMER = {**_VISION, "qformer.encoder.layer": "qformer_config"}
_LM_CAPTIONER = Layout(frozenset({"vision_model", "query_tokens", "qformer",
                                  "language_projection", "language_model"}),
                       ("vision_config", "qformer_config", "text_config"), _QFORMER)
LAYOUTS = {
    "BlipForConditionalGeneration": Layout(
        frozenset({"vision_model", "text_decoder"}), ("vision_config", "text_config"),
        {**_VISION, "text_decoder.bert.encoder.layer": "text_config"}),
    "BlipForImageTextRetrieval": Layout(
        frozenset({"vision_model", "text_encoder", "vision_proj", "text_proj", "itm_head"}),
        ("vision_config", "text_config"), {**_VISION, "text_encoder.encoder.layer": "text_config"}),
    "Blip2ForConditionalGeneration": _LM_CAPTIONER,
    "InstructBlipForConditionalGeneration": _LM_CAPTIONER,
    "Blip2ForImageTextRetrieval": Layout(
        frozenset({"vision_model", "query_tokens", "embeddings", "qformer", "vision_projection",
                   "text_projection", "itm_head"}), ("vision_config", "qformer_config"), _QFORMER),
    "CLIPModel": Layout(
        frozenset({"vision_model", "text_model", "visual_projection", "text_projection",
                   "logit_scale"}), ("vision_config", "text_config"),
        {**_VISION, "text_model.encoder.layers": "text_config"}),
}
# The language model's stacks in BLIP-2 and InstructBLIP, by text_config.model_type:
# weight prefix -> the key giving its depth.
LANGUAGE_STACKS = {
    "opt": {"language_model.model.decoder.layers": "num_hidden_layers"},
    "llama": {"language_model.model.layers": "num_hidden_layers"},
    "t5": {"language_model.encoder.block": "num_layers",
           "language_model.decoder.block": "num_decoder_layers"},
}
_LAYER_INDEX = re.compile(r"(\d+)\.")


def config_parts(config: dict, prefix: str = "") -> dict[str, dict]:
    """The config and its sub-configs (``text_config``, ...) by name; "" is the top level."""
    parts = {"": config}
    for key, value in config.items():
        if key.endswith("_config") and key != "quantization_config" and value is not None:
            if not isinstance(value, dict):
                raise ModelSourceError(f"{prefix}{key} is not a JSON object")
            parts[key] = value
    return parts


def check_sizes(config: dict, prefix: str) -> None:
    """Every size a config gives, within ``SIZE_LIMITS``: a number there is an allocation (or
    a loop: 100,000 layers never finish building)."""
    for name, part in config_parts(config, prefix).items():
        where = f"{name}." if name else ""
        for key, limit in SIZE_LIMITS.items():
            value = part.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ModelSourceError(f"{prefix}{where}{key} {value!r} is not a whole number")
            if value < 1:
                raise ModelSourceError(f"{prefix}{where}{key} {value} is below 1")
            if value > limit:
                raise ModelSourceError(f"{prefix}{where}{key} {value} is above the limit {limit}")
        side, patch = part.get("image_size"), part.get("patch_size")
        if side and patch and (side // patch) ** 2 > MAX_IMAGE_TOKENS:
            raise ModelSourceError(
                f"{prefix}{where}image_size {side} with patch_size {patch} gives "
                f"{(side // patch) ** 2} image tokens, above the limit {MAX_IMAGE_TOKENS}")


def check_processor(folder: Path, what: str) -> None:
    """The processor's resize and crop sizes, within ``MAX_IMAGE_SIDE`` pixels a side."""
    for name in PROCESSOR_FILES:
        if not (folder / name).exists():
            continue
        data = read_json_file(folder / name, what)
        settings = data.get("image_processor", data) if isinstance(data, dict) else None
        if not isinstance(settings, dict):
            raise ModelSourceError(f"{what}: {name} is not a JSON object")
        for key in ("size", "crop_size"):
            value = settings.get(key)
            if isinstance(value, (list, tuple)):
                value = {str(i): pixels for i, pixels in enumerate(value)}
            sides = value if isinstance(value, dict) else {} if value is None else {"": value}
            for side, pixels in sides.items():
                label = f"{key}.{side}" if side else key
                if pixels is None and side:
                    continue
                if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 1:
                    raise ModelSourceError(f"{what}: {name} {label} {pixels!r} is not a "
                                           "positive whole number")
                if pixels > MAX_IMAGE_SIDE:
                    raise ModelSourceError(f"{what}: {name} {label} {pixels} is above the "
                                           f"limit {MAX_IMAGE_SIDE}")


def weight_shapes(folder: Path, what: str) -> dict[str, list[int]] | None:
    """Tensor name -> shape, from the safetensors headers transformers would load (the index's
    files, or ``model.safetensors``); None where the weights are not safetensors or a header
    does not parse (loading then reports what is wrong)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = read_json_file(index, what)
        files = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(files, dict):
            raise ModelSourceError(f"{what}: {index.name} has no weight_map")
        names = sorted({str(name) for name in files.values()})
    elif (folder / "model.safetensors").exists():
        names = ["model.safetensors"]
    else:
        return None
    shapes: dict[str, list[int]] = {}
    for name in names:
        file = folder / name
        if Path(name).name != name or not file.is_file():
            raise ModelSourceError(f"{what}: {index.name} names {name!r}, which is not a file "
                                   "in the folder")
        header = safetensors_header(file, what)
        if header is None:
            return None
        shapes.update(header)
    return shapes


def safetensors_header(file: Path, what: str) -> dict[str, list[int]] | None:
    """Tensor name -> shape from one safetensors file's header; refuses a file shorter than
    the data its header lists (a cut download)."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 1 < length <= min(SAFETENSORS_HEADER_BYTES, size - 8):
            return None
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return None
    if not isinstance(header, dict):
        return None
    shapes, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shape, (start, stop) = list(entry["shape"]), entry["data_offsets"]
            if not all(isinstance(n, int) and n >= 0 for n in [*shape, start, stop]):
                return None
        except (TypeError, KeyError, ValueError):
            return None
        shapes[name] = shape
        end = max(end, stop)
    if 8 + length + end > size:
        raise ModelSourceError(f"{what}: {file.name} is truncated: its header lists "
                               f"{8 + length + end:,} bytes, the file holds {size:,}")
    return shapes


def check_weights_fit(config: dict, class_name: str, tensors: dict[str, list[int]],
                      what: str) -> None:
    """The tensors a ``class_name`` needs are there, nothing else is, each stack of layers is
    as deep as the config says, and the config's sizes need no more parameters than exist.
    Loading checks tensor by tensor; this catches the gross cases before any work."""
    layout = LAYOUTS[class_name]
    held = {name.split(".", 1)[0] for name in tensors}
    if layout.modules - held:
        absent = ", ".join(sorted(layout.modules - held))
        raise ModelSourceError(f"{what}: its weights hold nothing for {absent}, which a "
                               f"{class_name} needs")
    extra = sorted(name for name in tensors if name.split(".", 1)[0] not in layout.modules)
    if extra:
        raise ModelSourceError(f"{what}: its weights hold {_some(extra)}, which a {class_name} "
                               "has no place for")
    for prefix, part, key in _stacks(config, layout):
        depth = config[part].get(key)
        if depth is None and key == "num_decoder_layers":
            key, depth = "num_layers", config[part].get("num_layers")
        found = _layer_indices(tensors, prefix)
        if depth is not None and found != set(range(depth)):
            raise ModelSourceError(f"{what}: config.json's {part}.{key} {depth} does not match "
                                   f"its weights, which hold {_layers(found)} of {prefix}")
    least = sum(least_parameters(config.get(part) or {}, part == "text_config")
                for part in layout.parts)
    held_count = sum(math.prod(shape) for shape in tensors.values())
    if least > held_count:
        raise ModelSourceError(f"{what}: config.json describes at least {least:,} parameters; "
                               f"its weights hold {held_count:,} (the config is not these "
                               "weights')")


def _stacks(config: dict, layout: Layout):
    """(weight prefix, sub-config, depth key) of each stack of layers the config sizes."""
    for prefix, part in layout.stacks.items():
        if isinstance(config.get(part), dict):
            yield prefix, part, "num_hidden_layers"
    text = config.get("text_config")
    if "language_model" in layout.modules and isinstance(text, dict):
        for prefix, key in LANGUAGE_STACKS.get(text.get("model_type"), {}).items():
            yield prefix, "text_config", key


def _layer_indices(tensors: dict, prefix: str) -> set[int]:
    found = set()
    for name in tensors:
        if name.startswith(prefix + "."):
            match = _LAYER_INDEX.match(name, len(prefix) + 1)
            if match:
                found.add(int(match.group(1)))
    return found


def _layers(found: set[int]) -> str:
    if not found:
        return "no layers"
    if found == set(range(max(found) + 1)):
        return f"layers 0-{max(found)}" if found != {0} else "layer 0"
    return "layers " + ", ".join(map(str, sorted(found)[:8])) + (", ..." if len(found) > 8 else "")


def _some(names: list[str], shown: int = 3) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def least_parameters(part: dict, with_vocabulary: bool) -> int:
    """A lower bound on the parameters a sub-config implies: each layer's MLP (two matrices of
    width x MLP width; three in gated ones) and, for the text, the token embedding. Sizes the
    config leaves to transformers' defaults count as nothing."""
    width = part.get("hidden_size") or part.get("d_model")
    mlp = part.get("intermediate_size") or part.get("ffn_dim") or part.get("d_ff")
    depth = part.get("num_hidden_layers") or part.get("num_layers")
    if "d_model" in part and depth:  # T5: an encoder and a decoder stack
        depth += part.get("num_decoder_layers") or depth
    total = depth * 2 * width * mlp if width and mlp and depth else 0
    vocabulary = part.get("vocab_size")
    if with_vocabulary and vocabulary and width:
        total += vocabulary * (part.get("word_embed_proj_dim") or width)
    return total
