"""Which texts of an image to keep: a pure function of the scores and the policy.

Scores are columns of the output shard; the decision is recomputed from them, so a threshold
can change without rescoring anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

WEB, SYNTHETIC = "web", "synthetic"


@dataclass(frozen=True)
class Policy:
    """``threshold``: BLIP's filter (keep each text whose ITM probability >= threshold).
    ``topk``: BLIP-2's ranking (keep the ``top_k`` best texts by ``rank_by``).
    ``both``: the threshold first, then the best ``top_k`` of what passed.
    """

    mode: str = "threshold"
    threshold: float = 0.5
    top_k: int = 2
    rank_by: str = "itm"  # "itm" | "itc"

    def __post_init__(self):
        if self.mode not in ("threshold", "topk", "both"):
            raise ValueError(f"policy mode {self.mode!r}: use threshold, topk or both")
        if self.rank_by not in ("itm", "itc"):
            raise ValueError(f"rank_by {self.rank_by!r}: use itm or itc")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold {self.threshold} is not a probability")
        if self.top_k < 1:
            raise ValueError("top_k must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Candidate:
    text: str
    source: str
    itm: float | None  # None: the filter (CLIP) gives no match probability
    itc: float


def candidates(
    web_caption: str | None,
    web_itm: float | None,
    web_itc: float | None,
    synthetic: list[str],
    synthetic_itm: list[float],
    synthetic_itc: list[float],
) -> list[Candidate]:
    """An image's scored texts, web first; a missing web caption is simply not a candidate."""
    found = []
    if web_caption is not None and (web_itm is not None or web_itc is not None):
        found.append(Candidate(web_caption, WEB, web_itm, web_itc))
    found += [
        Candidate(text, SYNTHETIC, itm, itc)
        for text, itm, itc in zip(synthetic, synthetic_itm, synthetic_itc)
    ]
    return found


def select(texts: list[Candidate], policy: Policy) -> list[Candidate]:
    """The kept texts, in order: for ranking, best first (ties keep web before synthetic)."""
    kept = texts
    if policy.mode in ("threshold", "both"):
        # A text without an ITM probability (a CLIP filter) never passes a threshold.
        kept = [c for c in kept if c.itm is not None and c.itm >= policy.threshold]
    if policy.mode in ("topk", "both"):
        score = (lambda c: c.itm) if policy.rank_by == "itm" else (lambda c: c.itc)
        kept = sorted(kept, key=score, reverse=True)[: policy.top_k]
    return kept
