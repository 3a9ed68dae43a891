"""Caption guards: a synthetic caption that is broken as text never reaches the filter.

A captioner sometimes writes nothing (its end token first), loops ("a dog a dog a dog ..."),
writes word pieces and punctuation, or runs into its length limit without ending. Such a
caption is no description of its image whatever the filter would say of it, so it is set aside
with a reason before scoring and selection, and stays visible in the output row beside it.

``guard`` is a pure function of the caption, whether its writer ended it, and the settings, so
the verdict is reproducible from a round's output alone.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from capfilt.scoring.selection import check_number, check_whole

EMPTY, REPETITION, NON_WORDS, UNFINISHED = "empty", "repetition", "non_words", "unfinished"
# In the order they are checked: a looping caption usually also hits the length limit, and its
# loop is the better explanation.
REASONS = (EMPTY, REPETITION, NON_WORDS, UNFINISHED)

# Punctuation that may open or close a word without making it a non-word ("(dog", "dog,").
_OPENING = "\"'“‘«([{¿¡"
_CLOSING = "\"'”’»)]}.,!?;:…"
# A word: letters of any script, joined by inner apostrophes or hyphens ("don't", "t-shirt"),
# or a number ("3", "1,200", "2.5"). Letters mixed with digits or symbols ("brown4", "##t",
# "_2") are the word pieces a broken decoder writes.
_WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*|\d+(?:[.,:]\d+)*")


@dataclass(frozen=True)
class Caption:
    """A synthetic caption as its captioner wrote it (prompt removed) and whether the captioner
    ended it with its end token (False: it stopped at ``max_new_tokens``)."""

    text: str
    ended: bool = True


@dataclass(frozen=True)
class CaptionGuards:
    """When a synthetic caption is set aside before scoring (see ``guard``).

    ``max_repeat_share``: the most of a caption's word ``repeat_ngram``-grams that may repeat
    an earlier one (1 turns the check off). ``min_word_share``: the least share of its
    whitespace-separated tokens that must be words (0 turns it off). ``reject_unfinished``:
    whether a caption that hit the length limit without ending is set aside. ``enabled``
    False turns every guard off, the empty check included.
    Construction refuses values the round manifest's schema refuses (a one-line ValueError).
    """

    enabled: bool = True
    max_repeat_share: float = 0.4
    repeat_ngram: int = 2
    min_word_share: float = 0.5
    reject_unfinished: bool = True

    def __post_init__(self):
        """The bounds of ``manifests/round.schema.json``'s guards, checked before any work."""
        for name, value in (("--caption-guards", self.enabled),
                            ("--reject-unfinished", self.reject_unfinished)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} {value!r}: use true or false")
        check_number("--max-repeat-share", self.max_repeat_share, 0.0, 1.0)
        check_whole("--repeat-ngram", self.repeat_ngram, 1)
        check_number("--min-word-share", self.min_word_share, 0.0, 1.0)

    def to_dict(self) -> dict:
        return asdict(self)


def guard(caption: Caption, guards: CaptionGuards) -> str | None:
    """Why ``caption`` is set aside (one of ``REASONS``, the first that applies), or None."""
    if not guards.enabled:
        return None
    tokens = caption.text.split()
    if not tokens:
        return EMPTY
    if repeat_share(tokens, guards.repeat_ngram) > guards.max_repeat_share:
        return REPETITION
    if word_share(tokens) < guards.min_word_share:
        return NON_WORDS
    if guards.reject_unfinished and not caption.ended:
        return UNFINISHED
    return None


def _core(token: str) -> str:
    return token.lstrip(_OPENING).rstrip(_CLOSING)


def is_word(token: str) -> bool:
    """Whether a whitespace-separated token is a word or a number, once the punctuation that
    may open or close a word is stripped."""
    return _WORD.fullmatch(_core(token)) is not None


def word_share(tokens: list[str]) -> float:
    """The share of ``tokens`` that are words (``is_word``); 0 for no tokens."""
    return sum(map(is_word, tokens)) / len(tokens) if tokens else 0.0


def repeat_share(tokens: list[str], n: int) -> float:
    """The share of the ``n``-grams of ``tokens`` (lower case, edge punctuation stripped) that
    repeat an earlier one: 5 of the 7 bigrams of "a dog a dog a dog a dog"; 0 when there are
    fewer than ``n`` tokens."""
    words = [_core(t).lower() or t for t in tokens]
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams)
