"""The demo's threshold calibration: an auditor's sample of web captions, labelled from the
world's hidden truth, calibrates the filter's ITM threshold for a precision target, and the
threshold it gives is set beside the best one in hindsight, which the whole truth picks.

Best in hindsight, for a precision target, is the lowest threshold whose precision on all of
the round's web captions reaches it: of the thresholds that meet the target, it keeps the most.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pyarrow.parquet as pq

from capfilt.calibration.record import calibrate_round, write_record
from capfilt.calibration.thresholds import shortest_cut
from capfilt.world.build import load_web_noise
from capfilt.world.noise import TRUE_KINDS

LABELS = 300  # web captions an auditor labels (at most half the round's, in --quick)
TARGET_PRECISION = 0.95


def write_labels(round_dir: Path, truth: Path, path: Path, size: int, seed: int) -> int:
    """Label ``size`` web captions of the round (a seeded sample of its keys; at most half of
    them) right or wrong from the truth, as CSV; returns how many."""
    noise = load_web_noise(truth)
    table = pq.read_table(round_dir / "shards", columns=["key", "web_itm"])
    keys = sorted(k for k, s in zip(table.column("key").to_pylist(),
                                   table.column("web_itm").to_pylist()) if s is not None)
    chosen = random.Random(seed).sample(keys, min(size, len(keys) // 2))
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "source", "label"])
        for key in chosen:
            writer.writerow([key, "web", "right" if noise[key] in TRUE_KINDS else "wrong"])
    return len(chosen)


def on_all_web(round_dir: Path, truth: Path) -> tuple[list[float], list[bool]]:
    """Every web caption's ITM score and truth (right when the world wrote it true: correct,
    or partial, which an auditor asked "is this caption right for its image?" would pass)."""
    noise = load_web_noise(truth)
    table = pq.read_table(round_dir / "shards", columns=["key", "web_itm"])
    pairs = [(s, noise[k] in TRUE_KINDS) for k, s in zip(table.column("key").to_pylist(),
                                                         table.column("web_itm").to_pylist())
             if s is not None]
    return [s for s, _ in pairs], [r for _, r in pairs]


def figures(scores: list[float], right: list[bool], threshold: float) -> dict:
    """Precision, recall and keep-rate of ``threshold`` on all the given texts."""
    kept = [r for s, r in zip(scores, right) if s >= threshold]
    right_total = sum(right)
    return {"threshold": threshold, "kept": len(kept),
            "precision": round(sum(kept) / len(kept), 4) if kept else None,
            "recall": round(sum(kept) / right_total, 4) if right_total else None,
            "keep_rate": round(len(kept) / len(scores), 4) if scores else None}


def hindsight_threshold(scores: list[float], right: list[bool], target: float) -> float | None:
    """The lowest threshold whose precision on all texts reaches ``target`` (None: none)."""
    ranked = sorted(zip(scores, right), key=lambda pair: -pair[0])
    best, kept, right_kept = None, 0, 0
    for i, (score, is_right) in enumerate(ranked):
        kept += 1
        right_kept += is_right
        last_of_cut = i + 1 == len(ranked) or ranked[i + 1][0] != score
        if last_of_cut and right_kept / kept >= target:
            best = (score, ranked[i + 1][0] if i + 1 < len(ranked) else None)
    return None if best is None else shortest_cut(*best)


def compare(round_dir: Path, truth: Path, labels: Path, size: int, seed: int,
            target: float = TARGET_PRECISION):
    """(the calibration, the comparison on all web captions): the calibrated threshold (lower
    bound and point estimate rules), the hindsight best and the round's own."""
    labelled = write_labels(round_dir, truth, labels, size, seed)
    found = calibrate_round(str(round_dir), str(labels), "precision", target)
    scores, right = on_all_web(round_dir, truth)
    rec = found.recommendations["itm"]
    hindsight = hindsight_threshold(scores, right, target)
    threshold = float(found.round_policy.get("threshold", 0.5))
    result = {
        "labels": labelled, "web_captions": len(scores), "target_precision": target,
        "calibrated": None if rec.point is None else figures(scores, right, rec.point.threshold),
        "point_estimate": (None if rec.by_estimate is None
                           else figures(scores, right, rec.by_estimate.threshold)),
        "hindsight": None if hindsight is None else figures(scores, right, hindsight),
        "round": figures(scores, right, threshold),
    }
    return found, result


def calibrate_demo(root: Path, round_dir: Path, truth: Path, seed: int) -> dict:
    """Calibrate the demo's CapFilt round from ``root/labels.csv`` (written here), record it
    in the round (its report shows the curves) and compare on all web captions."""
    from capfilt.report.round_report import write_report

    found, result = compare(round_dir, truth, root / "labels.csv", LABELS, seed)
    write_record(str(round_dir), found)
    write_report(str(round_dir))
    return result


def describe_calibration(result: dict) -> str:
    target = result["target_precision"]

    def line(name: str, figures: dict | None) -> str:
        if figures is None:
            return f"  {name:<32}none reaches {target:g}\n"
        precision = "-" if figures["precision"] is None else figures["precision"]
        return (f"  {name:<32}ITM >= {figures['threshold']:<7g} precision {precision}, recall "
                f"{figures['recall']}, keeps {figures['keep_rate']:.1%}\n")

    return (
        f"\nthreshold for web-caption precision {target:g} from {result['labels']} labelled web "
        f"captions, judged on all {result['web_captions']:,}:\n"
        + line("by the labels' lower 95% bound", result["calibrated"])
        + line("by the labels' point estimate", result["point_estimate"])
        + line("best in hindsight (the lowest)", result["hindsight"])
        + line("the round's own", result["round"])
    )
