"""Corpus BLEU (Papineni et al. 2002): modified n-gram precision with a brevity penalty.

The captioning papers report BLEU-4 over a corpus with several references per image; this is
that computation on lower-cased word and punctuation tokens, with no smoothing.
"""

from __future__ import annotations

import math
import re
from collections import Counter

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(hypotheses: list[str], references: list[list[str]], max_n: int = 4) -> float:
    """BLEU-``max_n`` of ``hypotheses[i]`` against ``references[i]`` (one or more strings)."""
    if len(hypotheses) != len(references):
        raise ValueError("one list of references per hypothesis")
    matched = [0] * max_n
    possible = [0] * max_n
    hyp_length = ref_length = 0
    for hypothesis, refs in zip(hypotheses, references):
        hyp = tokens(hypothesis)
        ref_tokens = [tokens(r) for r in refs]
        hyp_length += len(hyp)
        # The reference length closest to the hypothesis' (the shorter one on a tie).
        ref_length += min((abs(len(r) - len(hyp)), len(r)) for r in ref_tokens)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(hyp, n)
            most = Counter()
            for r in ref_tokens:
                most |= _ngrams(r, n)
            matched[n - 1] += sum(min(c, most[g]) for g, c in counts.items())
            possible[n - 1] += max(0, len(hyp) - n + 1)
    if min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / p) for m, p in zip(matched, possible)) / max_n
    brevity = 1.0 if hyp_length > ref_length else math.exp(1 - ref_length / max(hyp_length, 1))
    return brevity * math.exp(log_precision)
