"""Blank BLIP models sized for the demo world: its vocabulary, its image size, a laptop's budget.

Written like any checkpoint folder (config, random weights, processor), so ``capfilt
pretrain --init scratch:FOLDER`` starts from them exactly as it would from a real config.
"""

from __future__ import annotations

from pathlib import Path

from capfilt.models.tiny import save_random_models, tiny_config, tiny_processor, tiny_vocabulary
from capfilt.world.vocab import vocabulary


def write_world_models(folder: str | Path, image_size: int = 64, hidden: int = 128,
                       layers: int = 3, patch: int = 8, seed: int = 0) -> dict[str, Path]:
    """``folder/captioner`` and ``folder/filter``: random BLIP models for the world."""
    processor = tiny_processor(image_size, words=vocabulary())
    config = tiny_config(len(processor.tokenizer), image_size=image_size, hidden=hidden,
                         layers=layers, heads=max(2, hidden // 64), patch=patch, mlp_ratio=4,
                         vocab=tiny_vocabulary(vocabulary()), init_std=hidden ** -0.5)
    return save_random_models(folder, config, processor, seed)
