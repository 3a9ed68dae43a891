"""``capfilt diff ROUND_A ROUND_B``: what changed between two rounds over the same inputs."""

from __future__ import annotations

import argparse
import json
from collections import Counter

from capfilt.rounds.diff import RoundDiff, diff_rounds
from capfilt.terminal import terminal_safe
from manifests import write_json_atomic

# Characters of a caption shown in an example line (captions are stored whole).
SHOWN = 120


def _by_reason(counts: Counter) -> str:
    """'5 (below the threshold 3, outranked (top-k) 2)', largest first; '0' for none."""
    total = sum(counts.values())
    if not total:
        return "0"
    parts = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return f"{total} (" + ", ".join(f"{reason} {n}" for reason, n in parts) + ")"


def _number(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _percent(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def _setting(value) -> str:
    text = json.dumps(value)
    return text[:15] + "..." if len(text) > 16 else text  # a weights hash: its first digits


def _quoted(text: str) -> str:
    """A caption in quotes, cut at SHOWN characters (control characters are escaped later)."""
    return '"' + (text if len(text) <= SHOWN else text[:SHOWN] + "...") + '"'


def summary_lines(diff: RoundDiff) -> list[str]:
    """The diff as readable lines (not yet made terminal-safe)."""
    a, b = diff.a, diff.b
    lines = [f"round {a.round} ({a.folder}) -> round {b.round} ({b.folder}): "
             f"{diff.shards_compared} input shards compared"]
    lines += [f"  skipped {line}" for line in diff.shards_skipped]
    changed = "; ".join(f"{name} {_setting(x)} -> {_setting(y)}"
                        for name, (x, y) in diff.settings_changed.items())
    lines.append(f"settings changed: {changed or 'none'}")
    rows = diff.rows
    lines.append(f"rows: {rows['scored_both']} scored in both, {rows['rejected_both']} rejected "
                 f"in both; scored -> rejected {_by_reason(rows['scored_to_rejected'])}; "
                 f"rejected -> scored {_by_reason(rows['rejected_to_scored'])}")
    if rows["reason_changed"]:
        lines.append(f"  reject reason changed: {_by_reason(rows['reason_changed'])}")
    if rows["only_a"] or rows["only_b"]:
        lines.append(f"  rows only in round {a.round}: {rows['only_a']}; only in round "
                     f"{b.round}: {rows['only_b']}")
    web = diff.web
    lines.append(f"web captions: {web['kept_both']} kept in both, {web['dropped_both']} dropped "
                 f"in both; kept -> dropped {_by_reason(web['kept_to_dropped'])}; "
                 f"dropped -> kept {_by_reason(web['dropped_to_kept'])}")
    syn = diff.synthetic
    lines.append(f"synthetic captions kept per image: {syn['images_fewer']} images fewer, "
                 f"{syn['images_more']} more, {syn['images_same']} the same; texts lost "
                 f"{_by_reason(syn['texts_lost'])}; gained {_by_reason(syn['texts_gained'])}")
    lines.append(f"kept texts: web {a.kept_web} -> {b.kept_web}, synthetic {a.kept_synthetic} "
                 f"-> {b.kept_synthetic}; synthetic share {_percent(a.synthetic_share)} -> "
                 f"{_percent(b.synthetic_share)}; images without kept text "
                 f"{a.images_without_kept} -> {b.images_without_kept}")
    da, db = a.diversity, b.diversity
    lines.append(f"diversity of kept synthetic captions ({da.sample} of each): distinct-1 "
                 f"{_number(da.distinct_1)} -> {_number(db.distinct_1)}, distinct-2 "
                 f"{_number(da.distinct_2)} -> {_number(db.distinct_2)}; self-BLEU-4 "
                 f"({da.self_bleu_sample} of each) {_number(da.self_bleu_4)} -> "
                 f"{_number(db.self_bleu_4)}")
    if diff.note:
        lines.append(diff.note)
    if diff.warning:
        lines.append(f"WARNING: {diff.warning}")
    return lines + _example_lines(diff)


def _example_lines(diff: RoundDiff) -> list[str]:
    examples = diff.examples
    lines = []
    for flip, label in (("web_kept_to_dropped", "kept -> dropped"),
                        ("web_dropped_to_kept", "dropped -> kept")):
        for e in examples[flip]:
            lines.append(f"  web {label} ({e['reason']}): {e['key']}: {_quoted(e['caption'])} "
                         f"ITM {_number(e['itm_a'])} -> {_number(e['itm_b'])}")
    for kind in ("synthetic_fewer", "synthetic_more"):
        for e in examples[kind]:
            shown = [_quoted(t) for t in e["kept_a"]], [_quoted(t) for t in e["kept_b"]]
            lines.append(f"  synthetic {kind.split('_')[1]} ({e['reason']}): {e['key']}: kept "
                         f"[{', '.join(shown[0])}] -> [{', '.join(shown[1])}]")
    return ["examples:", *lines] if lines else []


def command_diff(args: argparse.Namespace) -> int:
    diff = diff_rounds(args.round_a, args.round_b, examples=args.examples)
    for line in summary_lines(diff):
        print(terminal_safe(line))
    if args.json:
        write_json_atomic(args.json, diff.to_dict())
        print(terminal_safe(f"written: {args.json}"))
    return 0


def register(commands) -> dict:
    """Add ``capfilt diff``; return its handler by name."""
    parser = commands.add_parser(
        "diff", help="compare two rounds over the same inputs: flipped texts, diversity",
        description="Compare round B with round A (same inputs; other models or settings): "
        "web captions that flipped kept -> dropped and back with why, kept synthetic captions "
        "per image, the synthetic share of kept texts, and the diversity of kept synthetic "
        "captions (distinct-1/2, self-BLEU-4), with a warning when it collapses. Rounds over "
        "different inputs are refused (exit 2). "
        "Example: capfilt diff rounds/round-0001 rounds/round-0002 --json diff.json",
    )
    parser.add_argument("round_a")
    parser.add_argument("round_b")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the whole diff as JSON (path or fsspec URL)")
    parser.add_argument("--examples", type=int, default=3,
                        help="flipped rows shown per kind (default 3)")
    return {"diff": command_diff}
