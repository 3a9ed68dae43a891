"""Per-image seeds: a caption depends on (round seed, image key, caption index) and nothing else."""

from __future__ import annotations

import hashlib

import torch


def caption_seed(round_seed: int, key: str, index: int) -> int:
    """A 63-bit seed from the round seed, the image key and the caption's index."""
    digest = hashlib.sha256(f"{round_seed}\x00{key}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generators(round_seed: int, keys: list[str], per_key: int,
               device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator on ``device`` per (key, caption index), in row-major order."""
    return [
        torch.Generator(device=device).manual_seed(caption_seed(round_seed, key, i))
        for key in keys
        for i in range(per_key)
    ]
