"""``capfilt rounds`` and ``capfilt show``: a bootstrap's rounds and one manifest, readably."""

from __future__ import annotations

import argparse

from capfilt.terminal import terminal_safe
from manifests import read_manifest
from manifests.lineage import describe, find_rounds, summary_row


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def command_rounds(args: argparse.Namespace) -> int:
    found, problems = find_rounds(args.dir)
    for problem in problems:
        print(terminal_safe(f"skipped {problem}"))
    if not found:
        print(terminal_safe(f"no round manifests under {args.dir}"))
        return 1
    header = ("round", "status", "rows in", "scored", "rejected", "web kept", "synth kept",
              "folder", "parent", "captioner", "filter")
    print("\t".join(header))
    for round_ in found:
        row = summary_row(round_)
        print("\t".join(terminal_safe(v) for v in (
            row["round"], row["status"], row["rows_in"], row["scored"], row["rejected"],
            _percent(row["kept_web"]), _percent(row["kept_synthetic"]), row["folder"],
            row["parent"] or "-", row["captioner"], row["filter"])))
    return 0


def command_show(args: argparse.Namespace) -> int:
    print(terminal_safe(describe(args.round_dir, read_manifest(args.round_dir))))
    return 0


def register(commands) -> dict:
    """Add ``capfilt rounds`` and ``capfilt show``; return their handlers by name."""
    rounds = commands.add_parser(
        "rounds", help="list the rounds under a folder: parents, models, counts, kept fractions",
        description="Find every round manifest under DIR (up to 3 folders deep) and list them "
        "by round number, tab-separated. Example: capfilt rounds rounds/",
    )
    rounds.add_argument("dir")
    show = commands.add_parser(
        "show", help="print one round's manifest readably",
        description="Print what a round read, ran with and wrote. "
        "Example: capfilt show rounds/round-0001",
    )
    show.add_argument("round_dir")
    return {"rounds": command_rounds, "show": command_show}
