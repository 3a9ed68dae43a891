"""The round report's calibration section: where ``capfilt calibrate`` left
``ROUND/calibration.json``, the precision, recall and keep-rate curves with their bootstrap
bands, the recommended threshold and the round's own."""

from __future__ import annotations

import math
from html import escape

from capfilt.calibration.record import read_record, record_url
from capfilt.report.svg_plots import lines

COLOURS = {"precision": "#3a9a5b", "recall": "#3b73b9", "keep-rate": "#d9822b"}
FIGURES = (("precision", "precision"), ("recall", "recall"), ("keep-rate", "keep_rate"))


def calibration_section(round_dir: str, manifest) -> str:
    """The section's HTML, or "" where the round has no calibration record."""
    record = read_record(round_dir)
    if record is None:
        return ""
    try:
        return _section(record, manifest)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        return (f"<h2>Threshold calibration</h2><p>{escape(record_url(round_dir))} could not be "
                f"read ({escape(type(exc).__name__)}: {escape(str(exc)[:200])}); run capfilt "
                "calibrate again.</p>")


def _section(record: dict, manifest) -> str:
    policy = manifest.parameters.get("policy", {})
    round_threshold = (float(policy.get("threshold", 0.5))
                       if policy.get("mode", "threshold") in ("threshold", "both") else None)
    filter_sha = next((m.weights_sha256 for m in manifest.models if m.role == "filter"), None)
    parts = ["<h2>Threshold calibration</h2>",
             f"<p>{int(record['matched'])} of {int(record['labels'])} labelled texts from "
             f"{escape(str(record['labels_path'])[:300])} matched the round's texts; "
             f"calibrated {escape(str(record['created_at']))}.</p>"]
    unmatched = record.get("unmatched") or {}
    if unmatched:
        parts.append("<p>Not matched: " + "; ".join(
            f"{int(n)} {escape(str(reason))}" for reason, n in unmatched.items()) + ".</p>")
    if record.get("filter_sha256") != filter_sha:
        parts.append("<p><b>The round's filter is not the one these labels were calibrated "
                     "against: its scores changed; run capfilt calibrate again.</b></p>")
    plots = []
    for score, curve in record["curves"].items():
        rec = (record.get("recommendations") or {}).get(score)
        point = rec.get("point") if rec else None
        markers = []
        if point is not None:
            markers.append((float(point["threshold"]), f"recommended {point['threshold']:g}"))
            parts.append(f"<p>{_recommended(score, rec, point, curve)}</p>")
        elif rec is not None:
            parts.append(f"<p>No {score.upper()} threshold meets the {_target(rec)} on these "
                         "labels.</p>")
        if score == "itm" and round_threshold is not None:
            markers.append((round_threshold, f"round {round_threshold:g}"))
        plots.append(_plot(score, curve, markers))
    parts.append('<div class="plots">' + "".join(plots) + "</div>")
    return "\n".join(parts)


def _target(rec: dict) -> str:
    value = float(rec["value"])
    if rec["target"] == "precision":
        return f"target precision {value:g} (lower bound of its interval)"
    return f"target keep-rate {value:.1%}"


def _recommended(score: str, rec: dict, point: dict, curve: dict) -> str:
    level = f"{float(curve['confidence']):.0%}"
    return (f"{score.upper()} &ge; {float(point['threshold']):g} for the {_target(rec)}: on "
            f"the labels it keeps {float(point['keep_rate']):.1%}, precision "
            f"{float(point['precision']):.3f} ({_bounds(point['precision_ci'])}), recall "
            f"{float(point['recall']):.3f} ({_bounds(point['recall_ci'])}); {level} "
            f"bootstrap intervals over {int(curve['resamples'])} resamples."
            + ("" if score == "itm" else " capfilt run thresholds ITM only."))


def _bounds(ci) -> str:
    low, high = ci
    return "-" if low is None else f"{float(low):.3f}&ndash;{float(high):.3f}"


def _plot(score: str, curve: dict, markers: list) -> str:
    points = curve["points"]
    xs = [float(p["threshold"]) for p in points]
    if score == "itm":
        low, high = 0.0, 1.0
    else:  # a cosine: the labelled scores' range, to a tenth
        low, high = math.floor(min(xs) * 10) / 10, math.ceil(max(xs) * 10) / 10
    series = {}
    for name, field in FIGURES:
        series[name] = [(x, float(p[field]), *_pair(p[f"{field}_ci"])) for x, p in zip(xs, points)]
    title = (f"{score.upper()} threshold: {int(curve['labelled'])} labels "
             f"({int(curve['right'])} right)")
    return lines(series, low, high, title, COLOURS, tuple(markers))


def _pair(ci) -> tuple:
    low, high = ci
    return (None, None) if low is None or high is None else (float(low), float(high))
