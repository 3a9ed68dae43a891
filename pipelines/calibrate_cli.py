"""``capfilt calibrate``: a threshold from an audited sample of a round's texts.

Prints precision, recall and keep-rate with bootstrap intervals over the thresholds, the one
that meets ``--precision`` or ``--keep-rate``, writes ``ROUND/calibration.json`` (the round
report draws it) and, with ``--write``, a preset snippet ``capfilt run --config`` reads.
"""

from __future__ import annotations

import argparse

from capfilt.terminal import terminal_safe

KEEP_RATE_STEP = 0.05  # the printed table: one row per 5 points of keep-rate


def command_calibrate(args: argparse.Namespace) -> int:
    from capfilt.calibration.record import calibrate_round, snippet, write_record
    from capfilt.report.round_report import write_report
    from manifests.store import write_text_atomic
    from pipelines.config import home_path

    target, value = _target(args)
    if not args.labels:
        raise ValueError("--labels FILE is required: a CSV or parquet of key, label and "
                         "caption or source")
    if args.write and args.score != "itm":
        raise ValueError("--write: capfilt run's policy thresholds ITM only; use --score itm "
                         "(the ITC threshold is printed either way)")
    if args.write and target is None:
        raise ValueError("--write needs a target: --precision P or --keep-rate K")
    labels = home_path("labels", args.labels)
    found = calibrate_round(args.round_dir, labels, target, value)
    if args.score not in found.curves:
        raise ValueError(f"--score {args.score}: the round's filter gives no "
                         f"{args.score.upper()} score; use the other one")
    for line in describe(found, args.score):
        print(terminal_safe(line))
    written = [write_record(args.round_dir, found), write_report(args.round_dir)]
    rec = found.recommendations.get(args.score)
    if args.write and rec is not None and rec.point is not None:
        path = home_path("write", args.write)
        write_text_atomic(path, snippet(found, _command_line(args)))
        written.append(path)
    print(terminal_safe(f"written: {', '.join(written)}"))
    if args.write and len(written) == 3:
        print(terminal_safe(f"use it: capfilt run --config {written[2]} --input ... "
                            "--output ... (flags still override it)"))
    return 1 if rec is not None and rec.point is None else 0


def _target(args: argparse.Namespace) -> tuple[str | None, float | None]:
    from capfilt.scoring.selection import check_number

    if args.precision is not None and args.keep_rate is not None:
        raise ValueError("give --precision or --keep-rate, not both")
    if args.precision is not None:
        check_number("--precision", args.precision, 0.0, 1.0, low_open=True)
        return "precision", args.precision
    if args.keep_rate is not None:
        check_number("--keep-rate", args.keep_rate, 0.0, 1.0, low_open=True)
        return "keep_rate", args.keep_rate
    return None, None


def _command_line(args: argparse.Namespace) -> str:
    target = (f" --precision {args.precision:g}" if args.precision is not None
              else f" --keep-rate {args.keep_rate:g}")
    return f"capfilt calibrate {args.round_dir} --labels {args.labels}{target}"


def describe(found, score: str) -> list[str]:
    """The lines ``capfilt calibrate`` prints: labels, table, recommendation."""
    curve = found.curves[score]
    name = score.upper()
    level = f"{curve.confidence:.0%}"
    lines = [f"labels: {found.labels} rows in {found.labels_path}; {found.matched} match a "
             f"scored text, {curve.labelled} with an {name} score ({curve.right} right, "
             f"{curve.labelled - curve.right} wrong)"]
    lines += [f"not matched: {count} ({reason})" for reason, count in found.unmatched.items()]
    if curve.labelled < found.matched:
        lines.append(f"no {name} score: {found.matched - curve.labelled} of the matched texts")
    rec = found.recommendations.get(score)
    shown = table_points(curve, rec.point if rec else None)
    lines.append(f"{name + ' >=':>10}  {'keep-rate (' + level + ')':<26}"
                 f"{'precision (' + level + ')':<26}recall ({level})")
    for point in shown:
        mark = "  <- recommended" if rec is not None and point == rec.point else ""
        lines.append(f"{point.threshold:>10g}  "
                     f"{_figure(point.keep_rate, point.keep_rate_ci, percent=True):<26}"
                     f"{_figure(point.precision, point.precision_ci):<26}"
                     f"{_figure(point.recall, point.recall_ci):<26}".rstrip() + mark)
    if rec is None:
        lines.append("give --precision P or --keep-rate K for a recommended threshold")
        return lines
    return lines + _recommendation(found, score, rec, level)


def _recommendation(found, score: str, rec, level: str) -> list[str]:
    from capfilt.calibration.thresholds import best_by_bound

    name = score.upper()
    if rec.point is None:
        best = best_by_bound(found.curves[score])
        return [f"no {name} threshold's precision has a lower {level} bound of "
                f"{rec.value:g} or more on these labels (the highest: "
                f"{best.precision_ci[0]:.3f} at >= {best.threshold:g}); label more texts or "
                "lower the target"]
    point = rec.point
    if rec.target == "precision":
        why = (f"the lowest threshold whose precision's lower {level} bound reaches "
               f"{rec.value:g}")
    else:
        why = f"the threshold whose keep-rate on the labels is closest to {rec.value:.1%}"
    lines = [f"recommended: {name} >= {point.threshold:g}, {why}",
             f"  on the labels: keeps {_figure(point.keep_rate, point.keep_rate_ci, True)}, "
             f"precision {_figure(point.precision, point.precision_ci)}, recall "
             f"{_figure(point.recall, point.recall_ci)}"]
    if rec.by_estimate is not None and rec.by_estimate != point:
        lines.append(f"  by the point estimate alone it would be {name} >= "
                     f"{rec.by_estimate.threshold:g} (precision {rec.by_estimate.precision:.3f})")
    kept = found.round_kept.get(score, {})
    if kept:
        lines.append("  on the whole round it keeps " + " and ".join(
            f"{k:,} of {n:,} {source} texts ({k / n:.1%})" if n else f"no {source} texts"
            for source, (k, n) in kept.items()))
    for other, other_rec in found.recommendations.items():
        if other != score and other_rec.point is not None:
            note = ("capfilt run thresholds ITM only" if other == "itc"
                    else "the threshold capfilt run applies")
            lines.append(f"{other.upper()}: the same target is met at >= "
                         f"{other_rec.point.threshold:g} ({note}; --score {other} for its table)")
    return lines


def _figure(value: float, bounds, percent: bool = False) -> str:
    form = (lambda v: f"{v:.1%}") if percent else (lambda v: f"{v:.3f}")
    low, high = bounds
    interval = "-" if low is None else f"{form(low)}-{form(high)}"
    return f"{form(value)} ({interval})"


def table_points(curve, recommended=None) -> list:
    """One point per keep-rate step (the nearest), and the recommended one, by threshold."""
    chosen = {id(recommended): recommended} if recommended is not None else {}
    steps = round(1 / KEEP_RATE_STEP)
    for i in range(steps, 0, -1):
        nearest = min(curve.points, key=lambda p: abs(p.keep_rate - i * KEEP_RATE_STEP))
        chosen.setdefault(id(nearest), nearest)
    return sorted(chosen.values(), key=lambda p: p.threshold)


def register(commands) -> dict:
    """Add ``capfilt calibrate``; return its handler by name."""
    calibrate = commands.add_parser(
        "calibrate", help="choose the filter threshold from an audited sample of a round",
        description="Join an audited sample of a round's texts (CSV or parquet: key, label "
        "right/wrong, and caption or source) with the round's scores; print precision, "
        "recall and keep-rate with bootstrap intervals over ITM thresholds (ITC with --score "
        "itc), the threshold meeting a target, and write ROUND/calibration.json, which the "
        "round report draws. Example: capfilt calibrate rounds/round-0001 --labels "
        "audit.csv --precision 0.95 --write threshold.toml",
    )
    calibrate.add_argument("round_dir")
    calibrate.add_argument("--labels", default=None, metavar="FILE", help="the audited sample: .csv or .parquet")
    calibrate.add_argument("--precision", type=float, default=None, metavar="P",
                           help="recommend the lowest threshold (keeping 10 labelled texts or "
                           "more) whose precision's lower 95%% bound reaches P")
    calibrate.add_argument("--keep-rate", type=float, default=None, metavar="K",
                           help="recommend the threshold keeping closest to this share K of the "
                           "labelled texts")
    calibrate.add_argument("--score", default="itm", choices=["itm", "itc"],
                           help="the score whose table is printed and whose threshold is "
                           "recommended first (capfilt run applies ITM thresholds)")
    calibrate.add_argument("--write", default=None, metavar="SNIPPET.toml",
                           help="write the recommended ITM threshold as a [policy] table "
                           "capfilt run --config reads")
    return {"calibrate": command_calibrate}
