"""Which texts of an image to keep: a pure function of the scores and the policy.

Scores are columns of the output shard; the decision is recomputed from them, so a threshold
can change without rescoring anything.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

WEB, SYNTHETIC = "web", "synthetic"


def check_whole(name: str, value, least: int) -> None:
    """Refuse a count that is not a whole number of at least ``least``, naming its flag: a
    setting the manifest's schema refuses must stop the run before any work, not at commit."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} {value!r}: use a whole number of at least {least}")


def check_number(name: str, value, low: float, high: float | None = None,
                 low_open: bool = False) -> None:
    """Refuse a number outside [low, high] (``low_open``: above ``low``), naming its flag."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    inside = number and math.isfinite(value) and (value > low if low_open else value >= low)
    if not inside or (high is not None and value > high):
        if high is None:
            wanted = f"above {low:g}" if low_open else f"of at least {low:g}"
        else:
            wanted = (f"above {low:g} and at most {high:g}" if low_open
                      else f"from {low:g} to {high:g}")
        raise ValueError(f"{name} {value!r}: use a number {wanted}")


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    """Refuse a value that is not one of ``choices``, naming its flag."""
    if value not in choices:
        raise ValueError(f"{name} {value!r}: use one of {', '.join(choices)}")


@dataclass(frozen=True)
class Policy:
    """Which of an image's texts (its web caption and synthetic captions) are kept, decided from
    their stored scores alone, so a policy can change without rescoring.

    ``threshold``: BLIP's filter (keep each text whose ITM probability >= threshold).
    ``topk``: BLIP-2's ranking (keep the ``top_k`` best texts by ``rank_by``, "itm" or "itc").
    ``both``: the threshold first, then the best ``top_k`` of what passed.
    Construction refuses values the round manifest's schema refuses (a one-line ValueError).
    """

    mode: str = "threshold"
    threshold: float = 0.5
    top_k: int = 2
    rank_by: str = "itm"  # "itm" | "itc"

    def __post_init__(self):
        """The bounds of ``manifests/round.schema.json``'s policy, checked before any work."""
        check_choice("--policy (policy mode)", self.mode, ("threshold", "topk", "both"))
        check_choice("--rank-by", self.rank_by, ("itm", "itc"))
        check_number("--threshold", self.threshold, 0.0, 1.0)
        check_whole("--keep (policy top_k)", self.top_k, 1)

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
    synthetic_itm: list[float | None],
    synthetic_itc: list[float | None],
    synthetic_guard: list[str | None] | None = None,
) -> list[Candidate]:
    """An image's scored texts, web first; a missing web caption is simply not a candidate,
    nor is a synthetic caption a caption guard set aside (its reason in ``synthetic_guard``,
    capfilt/captioning/guards.py: it has no scores)."""
    found = []
    if web_caption is not None and (web_itm is not None or web_itc is not None):
        found.append(Candidate(web_caption, WEB, web_itm, web_itc))
    guards = synthetic_guard or [None] * len(synthetic)
    found += [
        Candidate(text, SYNTHETIC, itm, itc)
        for text, itm, itc, reason in zip(synthetic, synthetic_itm, synthetic_itc, guards)
        if reason is None
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
