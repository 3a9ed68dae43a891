"""Choosing a filter threshold from an audited sample: precision, recall and keep-rate of every
threshold, with percentile bootstrap intervals, and the threshold that meets a named target.

A text is kept when its score is at least the threshold (as ``capfilt.scoring.selection`` keeps it).
Precision is the right share of the kept labelled texts, recall the kept share of the right
ones, keep-rate the kept share of all labelled ones. The intervals resample the labelled texts
with replacement (fixed seed, so the same labels give the same figures); a resample that keeps
nothing has no precision and is left out of that threshold's precision interval.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

MIN_LABELS = 20  # fewer labelled texts give intervals too wide to choose anything by
# A precision target is met only where at least this many labelled texts are kept: the
# bootstrap cannot bound a precision measured on a handful (one right text kept gives [1, 1]).
MIN_KEPT = 10
RESAMPLES = 1000
CONFIDENCE = 0.95
SEED = 0
CHUNK = 100  # resamples drawn at a time: memory is CHUNK x labels, whatever RESAMPLES is
TARGETS = ("precision", "keep_rate")


class CalibrationError(ValueError):
    """Labels that cannot calibrate anything (too few, or all of one class): one line."""


@dataclass(frozen=True)
class Point:
    """One threshold's figures on the labelled texts; ``*_ci`` are (low, high) bounds, None
    where no resample defines the figure."""

    threshold: float  # the shortest decimal that keeps exactly these labelled texts
    kept: int
    right_kept: int
    keep_rate: float
    precision: float
    recall: float
    keep_rate_ci: tuple[float | None, float | None]
    precision_ci: tuple[float | None, float | None]
    recall_ci: tuple[float | None, float | None]


@dataclass(frozen=True)
class Curve:
    """Every distinct cut of the labelled texts' scores, lowest threshold first."""

    score: str  # "itm" | "itc"
    labelled: int
    right: int
    points: list[Point]
    resamples: int
    seed: int
    confidence: float


@dataclass(frozen=True)
class Recommendation:
    """The threshold meeting ``target`` (None where none does). For a precision target it is
    the lowest threshold whose interval's low end reaches it; ``by_estimate`` is the lowest
    whose point estimate does, for comparison."""

    target: str  # "precision" | "keep_rate"
    value: float
    point: Point | None
    by_estimate: Point | None = None


def build_curve(scores: list[float], right: list[bool], score: str = "itm",
                resamples: int = RESAMPLES, seed: int = SEED,
                confidence: float = CONFIDENCE) -> Curve:
    """The curve of ``scores`` against ``right`` over all distinct scores; too few labels or
    labels of one class raise ``CalibrationError``."""
    n = len(scores)
    if n < MIN_LABELS:
        raise CalibrationError(f"only {n} labelled texts have a {score.upper()} score; "
                               f"label at least {MIN_LABELS}")
    right_total = int(sum(right))
    if right_total in (0, n):
        which = "right" if right_total else "wrong"
        raise CalibrationError(f"all {n} labelled texts are {which}: precision and recall "
                               "need both right and wrong ones")
    values = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-values, kind="stable")
    values, truth = values[order], np.asarray(right, dtype=np.int32)[order]
    ends = np.flatnonzero(np.r_[values[1:] != values[:-1], True]) + 1  # kept at each cut
    kept = ends
    right_kept = np.cumsum(truth)[ends - 1]
    bounds = _bootstrap(truth, ends, resamples, seed, confidence)
    points = []
    for i in range(len(ends)):
        below = float(values[ends[i]]) if ends[i] < n else None
        points.append(Point(
            threshold=shortest_cut(float(values[ends[i] - 1]), below),
            kept=int(kept[i]), right_kept=int(right_kept[i]), keep_rate=float(kept[i] / n),
            precision=float(right_kept[i] / kept[i]), recall=float(right_kept[i] / right_total),
            keep_rate_ci=bounds["keep_rate"][i], precision_ci=bounds["precision"][i],
            recall_ci=bounds["recall"][i]))
    return Curve(score=score, labelled=n, right=right_total, points=points[::-1],
                 resamples=resamples, seed=seed, confidence=confidence)


def _bootstrap(truth: np.ndarray, ends: np.ndarray, resamples: int, seed: int,
               confidence: float) -> dict[str, list[tuple]]:
    """Percentile intervals of each figure at each cut over ``resamples`` resamples."""
    n = len(truth)
    rng = np.random.default_rng(seed)
    drawn = {"precision": [], "recall": [], "keep_rate": []}
    for start in range(0, resamples, CHUNK):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(CHUNK, resamples - start))
        kept = np.cumsum(counts, axis=1)[:, ends - 1]
        right = np.cumsum(counts * truth, axis=1)[:, ends - 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            drawn["precision"].append(np.where(kept > 0, right / kept, np.nan))
            total = right[:, -1:]  # the lowest cut keeps every text
            drawn["recall"].append(np.where(total > 0, right / total, np.nan))
        drawn["keep_rate"].append(kept / n)
    tail = (1 - confidence) / 2 * 100
    out = {}
    for name, parts in drawn.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a cut no resample defines
            low, high = np.nanpercentile(np.concatenate(parts), [tail, 100 - tail], axis=0)
        out[name] = [(_number(a), _number(b)) for a, b in zip(low, high)]
    return out


def _number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def shortest_cut(score: float, below: float | None) -> float:
    """The shortest decimal in (``below``, ``score``]: any threshold there keeps the same
    labelled texts, and 0.73 reads better than 0.7318402."""
    for digits in range(1, 10):
        factor = 10 ** digits
        value = math.floor(score * factor) / factor
        if value <= score and (below is None or value > below):
            return value
    return score


def recommend(curve: Curve, target: str, value: float) -> Recommendation:
    """The threshold for a precision (the lowest keeping at least ``MIN_KEPT`` labelled texts
    whose interval's low end reaches ``value``) or a keep-rate (the one whose keep-rate is
    closest to ``value``, the lower on a tie)."""
    if target == "precision":
        counted = [p for p in curve.points if p.kept >= MIN_KEPT]
        by_bound = next((p for p in counted if p.precision_ci[0] is not None
                         and p.precision_ci[0] >= value), None)
        by_estimate = next((p for p in counted if p.precision >= value), None)
        return Recommendation(target, value, by_bound, by_estimate)
    if target == "keep_rate":
        closest = min(curve.points, key=lambda p: abs(p.keep_rate - value))
        return Recommendation(target, value, closest)
    raise ValueError(f"target {target!r}: use one of {', '.join(TARGETS)}")


def best_by_bound(curve: Curve) -> Point:
    """The threshold with the highest low end of its precision interval (what the labels can
    vouch for at most, for a target no threshold reaches)."""
    defined = [p for p in curve.points if p.precision_ci[0] is not None and p.kept >= MIN_KEPT]
    return max(defined, key=lambda p: (p.precision_ci[0], -p.threshold))

