"""Tiny random BLIP captioner and filter, saved like Salesforce's checkpoints.

They load with ``from_pretrained(folder)`` through the very code that loads
``Salesforce/blip-image-captioning-base`` and ``Salesforce/blip-itm-base-coco``, so tests and
smoke runs on a new cluster exercise the real loading path with no download.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipImageProcessor,
    BlipProcessor,
)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# BLIP appends its two task tokens after BERT's vocabulary; we do the same.
TASK_TOKENS = ["[DEC]", "[ENC]"]

WORDS = """
a an the of in on at with and or to from by for is are this that there it its picture photo
image view close up small large big tiny little medium left right top bottom center middle
corner background foreground red green blue yellow orange purple pink white black gray grey
brown circle square triangle star cross shape shapes one two three man woman person people
dog cat car house tree sky water sea beach street city road table food plate room window
sitting standing walking running next near over under front back some many
""".split()


def tiny_vocabulary(words: list[str] | None = None) -> list[str]:
    """A WordPiece vocabulary that spells any lower-case ASCII text (letters as pieces).

    ``words`` become whole tokens (default: a few hundred common caption words)."""
    words = WORDS if words is None else words
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    punctuation = list(".,!?'\"-:;/()&#@%+=_*")
    pieces = [f"##{c}" for c in chars]
    vocab = list(dict.fromkeys(SPECIAL_TOKENS + list(words) + chars + punctuation + pieces))
    return vocab + TASK_TOKENS


def tiny_config(vocab_size: int, image_size: int = 32, hidden: int = 32, *, layers: int = 2,
                heads: int = 2, patch: int = 8, mlp_ratio: int = 2,
                vocab: list[str] | None = None, init_std: float = 0.02) -> BlipConfig:
    """A BLIP config small enough to run a batch in milliseconds on one CPU core.

    ``init_std``: BERT's 0.02 suits width 768; narrow models trained from scratch learn
    image-text fusion far sooner with about 1/sqrt(width) (see capfilt/world/models.py)."""
    vocab = vocab or tiny_vocabulary()
    text = dict(
        initializer_range=init_std,
        vocab_size=vocab_size,
        hidden_size=hidden,
        encoder_hidden_size=hidden,
        intermediate_size=hidden * mlp_ratio,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=64,
        bos_token_id=vocab.index("[DEC]"),
        pad_token_id=vocab.index("[PAD]"),
        sep_token_id=vocab.index("[SEP]"),
        eos_token_id=vocab.index("[SEP]"),
    )
    vision = dict(
        hidden_size=hidden,
        intermediate_size=hidden * mlp_ratio,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch,
        # The default 1e-10 makes every image embed alike (see BLIP-NOTES.md).
        initializer_range=init_std,
    )
    return BlipConfig(
        text_config=text, vision_config=vision, projection_dim=hidden, image_text_hidden_size=hidden
    )


def tiny_processor(image_size: int = 32, words: list[str] | None = None) -> BlipProcessor:
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.txt").write_text("\n".join(tiny_vocabulary(words)) + "\n")
        # transformers 5 ignores ``vocab_file=`` silently; from_pretrained on a folder works.
        tokenizer = BertTokenizer.from_pretrained(folder, do_lower_case=True)
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def write_tiny_models(folder: str | Path, seed: int = 0, image_size: int = 32) -> dict[str, Path]:
    """Write ``folder/captioner`` and ``folder/filter``; return their paths."""
    processor = tiny_processor(image_size)
    config = tiny_config(len(processor.tokenizer), image_size=image_size)
    return save_random_models(folder, config, processor, seed)


def save_random_models(folder: str | Path, config: BlipConfig, processor: BlipProcessor,
                       seed: int = 0) -> dict[str, Path]:
    """A randomly initialised captioner and filter of ``config``, saved with ``processor``."""
    paths = {}
    for role, model_class in (
        ("captioner", BlipForConditionalGeneration),
        ("filter", BlipForImageTextRetrieval),
    ):
        torch.manual_seed(seed)
        path = Path(folder) / role
        model_class(config).eval().save_pretrained(path)
        processor.save_pretrained(path)
        paths[role] = path
    return paths
