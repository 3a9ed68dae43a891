"""What a model folder or hub id holds, read without importing torch or transformers.

The round's driver checks its models before any work and names their classes and weights in
the manifest; only the workers load them. Reading ``config.json`` directly keeps the driver's
start at about a second instead of the 6 to 12 s those imports take. A hub id is the exception:
its config is fetched with transformers (the user asked for the hub by naming it).

Nothing here trusts a number in a model's files: sizes are checked against limits before a
worker allocates anything, and a local folder's config against the tensors its safetensors
headers list (names and shapes, read from the files' first bytes).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
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
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
BLIP_PROMPT = "a picture of "

# Files are read only up to these sizes: a config is a few KiB, a tokenizer.json a few MiB, a
# safetensors header well under 1 MiB for a 13-billion-parameter model (a longer one is left
# to loading, which takes up to the format's 100 MB).
JSON_BYTES = 16 << 20
TOKENIZER_BYTES = 64 << 20
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
    _check_sizes(config, f"{role} model {source}: config.json's ")
    if path.is_dir():
        _check_processor(path, f"{role} model {source}")
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


def config_parts(config: dict, prefix: str = "") -> dict[str, dict]:
    """The config and its sub-configs (``text_config``, ...) by name; "" is the top level."""
    parts = {"": config}
    for key, value in config.items():
        if key.endswith("_config") and key != "quantization_config" and value is not None:
            if not isinstance(value, dict):
                raise ModelSourceError(f"{prefix}{key} is not a JSON object")
            parts[key] = value
    return parts


def _check_sizes(config: dict, prefix: str) -> None:
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


def _check_processor(folder: Path, what: str) -> None:
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


def check_generation_length(source: str, max_new_tokens: int, prompt: str = BLIP_PROMPT) -> None:
    """Refuse, before any work, a ``max_new_tokens`` that would run the captioner past its text
    positions (every shard would fail with a shape error). Encoder-decoder language models
    (T5) have relative positions and no such limit."""
    config = read_config(source)
    text = config.get("text_config") or {}
    positions = text.get("max_position_embeddings")
    if not positions or text.get("is_encoder_decoder"):
        return
    if config.get("model_type") == "blip":
        used = 1 + count_tokens(source, prompt)  # [DEC], then the prompt without [CLS]/[SEP]
    else:
        lead = 1 if text.get("bos_token_id") is not None else 0
        used = config.get("num_query_tokens", 32) + lead + count_tokens(source, prompt.strip())
    fit_generation(f"captioner model {source}", max_new_tokens, used, positions)


def fit_generation(what: str, max_new_tokens: int, prompt_tokens: int, positions: int) -> None:
    """One check, shared by the driver and the captioners themselves."""
    if prompt_tokens + max_new_tokens <= positions:
        return
    room = positions - prompt_tokens
    fix = f"use --max-new-tokens {room} or fewer" if room > 0 else "use a shorter prompt"
    raise ModelSourceError(
        f"{what}: --max-new-tokens {max_new_tokens} needs {prompt_tokens} + {max_new_tokens} "
        f"text positions; the captioner has {positions} (text_config.max_position_embeddings): "
        f"{fix}")


def count_tokens(source: str, text: str) -> int:
    """Tokens of ``text`` without special tokens, by the folder's ``tokenizer.json`` (the
    ``tokenizers`` library, not transformers); else its UTF-8 bytes, which no tokenizer's
    count exceeds."""
    file = Path(source) / "tokenizer.json"
    if file.is_file() and file.stat().st_size <= TOKENIZER_BYTES:
        from tokenizers import Tokenizer

        try:
            return len(Tokenizer.from_file(str(file)).encode(text, add_special_tokens=False).ids)
        except Exception as exc:  # noqa: BLE001 - the library raises plain Exception, no subclass
            if type(exc) is not Exception:
                raise
    return len(text.encode("utf-8"))


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
