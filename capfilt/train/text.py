"""Tokenisation of training texts, done where the images are decoded (the loader's processes).

BLIP pads and truncates every text to 35 tokens at most; a task may put a prefix before each
text (the captioner's prompt, "a picture of "), which the LM loss then masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from capfilt.scoring.blip_itm import MAX_TEXT_TOKENS


@dataclass(frozen=True)
class TextEncoding:
    """How a task wants its texts as token ids: ``prefix + text``, longest-padded."""

    tokenizer: object
    prefix: str = ""
    max_tokens: int = MAX_TEXT_TOKENS

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer([self.prefix + text for text in texts], padding="longest",
                                truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return tokens.input_ids, tokens.attention_mask
