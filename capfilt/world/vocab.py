"""The demo world's vocabulary: every word of every caption it can write."""

from __future__ import annotations

from capfilt.world.grammar import grammar_words
from capfilt.world.noise import noise_words


def vocabulary() -> list[str]:
    """Every word a caption of the world can contain (true captions and web noise), sorted;
    the comma is a word, and so is each digit 0-9."""
    return sorted(grammar_words() | noise_words())
