"""How varied a set of captions is: distinct-n and self-BLEU-4.

A captioner that collapses (greedy decoding, an over-trained checkpoint) writes the same few
phrases for every image; distinct-n falls and self-BLEU rises. Both depend on how many captions
are measured (more captions, more repeated n-grams), so two rounds are compared on samples of
equal size, drawn by a hash of each caption's image key: deterministic, and the same images in
both rounds wherever both kept a caption for them.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import Counter
from dataclasses import asdict, dataclass

from capfilt.evaluation.bleu import tokens

# Captions held for the distinct-n sample (memory stays bounded on rounds of any size).
DISTINCT_SAMPLE = 100_000
# Captions in the self-BLEU sample: each is scored against the other 499.
SELF_BLEU_SAMPLE = 500


def caption_rank(key: str | None, index: int) -> bytes:
    """The order captions are sampled in: a hash of the image key and the caption's place."""
    return hashlib.blake2b(f"{key}\0{index}".encode("utf-8", "replace"), digest_size=8).digest()


class CaptionSample:
    """The ``size`` captions with the smallest ranks seen so far, whatever order they come in."""

    def __init__(self, size: int = DISTINCT_SAMPLE):
        self.size = size
        self.seen = 0
        self._heap: list[tuple[bytes, str]] = []  # ranks negated by inversion: a max-heap

    def add(self, key: str | None, index: int, text: str) -> None:
        self.seen += 1
        entry = (bytes(255 - b for b in caption_rank(key, index)), text)
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, entry)
        elif entry > self._heap[0]:
            heapq.heapreplace(self._heap, entry)

    def texts(self) -> list[str]:
        """The sampled captions, smallest rank first (ties broken by text)."""
        return [text for _, text in sorted(self._heap, reverse=True)]


def distinct_n(texts: list[str], n: int) -> float | None:
    """Distinct n-grams over all n-grams of ``texts`` (Li et al. 2016); None without any."""
    grams = Counter()
    for text in texts:
        words = tokens(text)
        grams.update(tuple(words[i: i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else None


def self_bleu(texts: list[str], max_n: int = 4) -> float | None:
    """Corpus BLEU-``max_n`` of each text against all the others as references (Zhu et al.
    2018); None for fewer than two texts.

    The same number as ``bleu.corpus_bleu(texts, [others...])``, computed from each n-gram's
    two largest counts instead of one union of references per text: 500 texts take
    milliseconds, not the seconds of 500 x 499 unions.
    """
    if len(texts) < 2:
        return None
    words = [tokens(t) for t in texts]
    matched = [0] * max_n
    possible = [0] * max_n
    for n in range(1, max_n + 1):
        counts = [Counter(tuple(w[i: i + n]) for i in range(len(w) - n + 1)) for w in words]
        best: dict[tuple, tuple[int, int, int]] = {}  # gram -> (top count, its text, second)
        for index, grams in enumerate(counts):
            for gram, count in grams.items():
                top, holder, second = best.get(gram, (0, -1, 0))
                if count > top:
                    best[gram] = (count, index, top)
                else:
                    best[gram] = (top, holder, max(second, count))
        for index, grams in enumerate(counts):
            for gram, count in grams.items():
                top, holder, second = best[gram]
                matched[n - 1] += min(count, second if holder == index else top)
            possible[n - 1] += max(0, len(words[index]) - n + 1)
    hyp_length = sum(len(w) for w in words)
    lengths = Counter(len(w) for w in words)
    ref_length = 0
    for w in words:
        others = lengths.copy()
        others[len(w)] -= 1
        # The reference length closest to the hypothesis' (the shorter one on a tie).
        ref_length += min((abs(length - len(w)), length) for length, c in others.items() if c)[1]
    if min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / p) for m, p in zip(matched, possible)) / max_n
    brevity = 1.0 if hyp_length > ref_length else math.exp(1 - ref_length / max(hyp_length, 1))
    return brevity * math.exp(log_precision)


@dataclass
class Diversity:
    """One round's kept synthetic captions: how many, and how varied a sample of them is."""

    captions: int  # kept synthetic captions in the round (the compared shards)
    sample: int  # captions distinct-n was measured on
    distinct_1: float | None
    distinct_2: float | None
    self_bleu_sample: int  # captions self-BLEU-4 was measured on
    self_bleu_4: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def diversity(texts: list[str], captions: int, self_bleu_size: int = SELF_BLEU_SAMPLE) -> Diversity:
    """Diversity of ``texts`` (a sample in rank order); self-BLEU on its first captions."""
    few = texts[:self_bleu_size]
    return Diversity(captions=captions, sample=len(texts), distinct_1=distinct_n(texts, 1),
                     distinct_2=distinct_n(texts, 2), self_bleu_sample=len(few),
                     self_bleu_4=self_bleu(few))
