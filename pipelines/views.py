"""``capfilt pairs``: a finished round as one parquet of kept (image, text) pairs."""

from __future__ import annotations

import argparse

from capfilt.rounds.folder import write_parquet_atomic
from capfilt.rounds.pairs import pairs_table


def command_pairs(args: argparse.Namespace) -> int:
    table = pairs_table(args.round_dir, with_jpg=args.with_jpg)
    write_parquet_atomic(args.output, table)
    images = len(set(table.column("key").to_pylist()))
    print(f"{table.num_rows} kept pairs of {images} images -> {args.output}")
    return 0


def register(commands) -> dict:
    """Add ``capfilt pairs`` to the command line; return its handler by name."""
    parser = commands.add_parser(
        "pairs", help="write one row per kept pair: key, caption, source, itm, itc",
        description="Write the kept (image, text) pairs of a finished round as one parquet "
        "file: key, caption, source (web or synthetic), itm, itc, and jpg with --with-jpg. "
        "Example: capfilt pairs rounds/round-0001 --output pairs.parquet",
    )
    parser.add_argument("round_dir")
    parser.add_argument("--output", required=True, help="parquet file (path or fsspec URL)")
    parser.add_argument("--with-jpg", action="store_true", help="carry the image bytes too")
    return {"pairs": command_pairs}
