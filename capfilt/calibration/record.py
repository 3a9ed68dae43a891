"""A round's threshold calibration from a labels file: the curves of both scores, the
recommended thresholds, what they would keep of the whole round, ``ROUND/calibration.json``
(which the round report draws) and the preset snippet ``capfilt run --config`` reads.

``capfilt run``'s policy thresholds the ITM probability only: an ITC (cosine) threshold is
calibrated and shown, but a snippet can only carry the ITM one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import fsspec
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt.calibration.labels import SCORES, join_labels, read_labels
from capfilt.calibration.thresholds import (
    MIN_LABELS,
    CalibrationError,
    Curve,
    Recommendation,
    build_curve,
    recommend,
)
from capfilt.rounds.folder import shard_path
from capfilt.scoring.selection import SYNTHETIC, WEB
from manifests import read_manifest
from manifests.store import write_json_atomic

RECORD_NAME = "calibration.json"


@dataclass
class Calibration:
    """What ``calibrate_round`` found; ``round_kept[score][source]`` is (kept, of) on the whole
    round at that score's recommended threshold."""

    labels_path: str
    labels: int
    matched: int
    unmatched: dict[str, int]
    curves: dict[str, Curve]
    recommendations: dict[str, Recommendation] = field(default_factory=dict)
    round_kept: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    round_policy: dict = field(default_factory=dict)
    filter_sha256: str | None = None
    created_at: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate_round(round_dir: str, labels_path: str, target: str | None = None,
                    value: float | None = None) -> Calibration:
    """Join the labels with the round's scores and build both curves; with a ``target``
    ("precision" or "keep_rate") and its ``value``, recommend a threshold for each score.
    A labels file or a sample that cannot calibrate raises a one-line ``ValueError``."""
    labels = read_labels(labels_path)
    joined = join_labels(round_dir, labels)
    matched = len(joined.right)
    if matched < MIN_LABELS:
        raise CalibrationError(
            f"only {matched} of the {len(labels)} labels match a scored text of the round "
            f"({_reasons(joined.unmatched) or 'none unmatched'}); label at least {MIN_LABELS}")
    curves = {}
    for score in SCORES:
        pairs = [(s, r) for s, r in zip(joined.scores[score], joined.right) if s is not None]
        if pairs:  # a CLIP filter gives no ITM probability
            curves[score] = build_curve([s for s, _ in pairs], [r for _, r in pairs], score)
    manifest = read_manifest(round_dir)
    found = Calibration(
        labels_path=labels_path, labels=len(labels), matched=matched,
        unmatched=dict(joined.unmatched), curves=curves,
        round_policy=dict(manifest.parameters.get("policy", {})),
        filter_sha256=next((m.weights_sha256 for m in manifest.models if m.role == "filter"),
                           None),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if target is not None:
        found.recommendations = {s: recommend(c, target, value) for s, c in curves.items()}
        thresholds = {s: r.point.threshold for s, r in found.recommendations.items() if r.point}
        found.round_kept = round_kept(round_dir, thresholds)
    return found


def _reasons(unmatched: dict[str, int]) -> str:
    return "; ".join(f"{count} {reason}" for reason, count in unmatched.items())


def round_kept(round_dir: str, thresholds: dict[str, float]) -> dict[str, dict[str, tuple]]:
    """(kept, of) texts per source on the whole round at each score's threshold."""
    counts = {s: {WEB: [0, 0], SYNTHETIC: [0, 0]} for s in thresholds}
    columns = [f"{source}_{s}" for s in thresholds for source in (WEB, SYNTHETIC)]
    for shard in read_manifest(round_dir).shards:
        if shard.status != "done" or not columns:
            continue
        fs, path = fsspec.core.url_to_fs(shard_path(round_dir, shard.index))
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=columns)
        for score, threshold in thresholds.items():
            for source in (WEB, SYNTHETIC):
                values = table.column(f"{source}_{score}")
                if source == SYNTHETIC:
                    values = pc.list_flatten(values)
                passed = pc.sum(pc.greater_equal(values, threshold)).as_py() or 0
                counts[score][source][0] += passed
                counts[score][source][1] += len(values) - values.null_count
    return {s: {source: tuple(pair) for source, pair in by.items()} for s, by in counts.items()}


def record_url(round_dir: str) -> str:
    return f"{round_dir.rstrip('/')}/{RECORD_NAME}"


def write_record(round_dir: str, calibration: Calibration) -> str:
    """``ROUND/calibration.json``, which the round report draws; returns its URL."""
    url = record_url(round_dir)
    write_json_atomic(url, calibration.to_dict())
    return url


def read_record(round_dir: str) -> dict | None:
    """The round's calibration record, or None where it has none (or an unreadable one)."""
    fs, path = fsspec.core.url_to_fs(record_url(round_dir))
    try:
        with fs.open(path, "r") as handle:
            data = json.load(handle)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("curves"), dict) else None


def snippet(calibration: Calibration, command: str) -> str:
    """The recommended ITM threshold as TOML ``capfilt run --config`` reads (the ``[policy]``
    table of a preset), with the figures behind it as comments."""
    rec = calibration.recommendations.get("itm")
    if rec is None or rec.point is None:
        raise CalibrationError("--write: no ITM threshold was recommended, so there is "
                               "nothing to write")
    point, curve = rec.point, calibration.curves["itm"]
    # With "both", the threshold goes first and the top-k after it: keep the round's recipe.
    mode = "both" if calibration.round_policy.get("mode") == "both" else "threshold"
    shown = "".join(ch if ch.isprintable() else "?" for ch in command)  # one comment line
    lines = [f"# Written by `{shown}`",
             f"# on {calibration.created_at}, from {curve.labelled} labelled texts "
             f"({curve.right} right). On them ITM >= {point.threshold:g} keeps "
             f"{point.keep_rate:.1%},",
             f"# precision {point.precision:.3f} ({_interval(point.precision_ci)}), recall "
             f"{point.recall:.3f} ({_interval(point.recall_ci)}); "
             f"{curve.confidence:.0%} bootstrap intervals."]
    itc = calibration.recommendations.get("itc")
    if itc is not None and itc.point is not None:
        lines.append(f"# ITC (cosine) meets the same target at >= {itc.point.threshold:g}: not "
                     "set here, capfilt run thresholds ITM only.")
    lines += ["[policy]", f'policy = "{mode}"', f"threshold = {point.threshold!r}"]
    if mode == "both":  # the round ranked what passed: its ranking stays as it was
        policy = calibration.round_policy
        lines += [f"keep = {int(policy.get('top_k', 2))}",
                  f'rank_by = "{policy.get("rank_by", "itm")}"']
    return "\n".join(lines) + "\n"


def _interval(bounds) -> str:
    low, high = bounds
    if low is None:
        return "no interval"
    return f"{low:.3f}-{high:.3f}"
