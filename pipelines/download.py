"""``capfilt download``: img2dataset with CapFilt's defaults; also the first step of
``capfilt run --url-list``.

img2dataset does the downloading, resizing and shard writing; this module only picks BLIP's
settings (384 px, JPEG, the caption column kept) and resumes through img2dataset's own
incremental mode: a shard with its ``NNNNN_stats.json`` is done and is not downloaded again.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pyarrow.parquet as pq

# img2dataset's names for the url list formats it reads, by file suffix.
INPUT_FORMATS = ("parquet", "csv", "tsv", "txt", "json", "jsonl")


class DownloadError(ValueError):
    """The download cannot start; the message says why."""


@dataclass
class DownloadOptions:
    """What ``capfilt download`` passes to ``img2dataset.download``."""

    url_list: str
    output: str
    output_format: str = "parquet"  # or "webdataset"
    input_format: str | None = None  # None: from the url list's suffix
    url_col: str = "url"
    caption_col: str | None = "caption"
    image_size: int = 384  # BLIP's fine-tuning and CapFilt resolution
    resize_mode: str = "keep_ratio"  # shorter side to 384; the model's transform squashes
    per_shard: int = 10000
    processes: int = 1
    threads: int = 64
    timeout: int = 10
    retries: int = 0


def input_format(url_list: str) -> str:
    name = url_list.lower().removesuffix(".gz")
    for fmt in INPUT_FORMATS:
        if name.endswith(f".{fmt}"):
            return fmt + (".gz" if url_list.lower().endswith(".gz") else "")
    raise DownloadError(f"url list {url_list}: cannot tell its format from the name; give "
                        f"--input-format ({', '.join(INPUT_FORMATS)})")


def _caption_column(url_list: str, fmt: str, options: DownloadOptions) -> str | None:
    """The caption column to keep, or None where the list has none (img2dataset would crash)."""
    if fmt.startswith("txt") or options.caption_col is None:
        return None
    if fmt == "parquet" and not fsspec.core.url_to_fs(url_list)[0].isdir(url_list):
        with fsspec.open(url_list, "rb") as handle:
            names = pq.ParquetFile(handle).schema_arrow.names
        if options.url_col not in names:
            raise DownloadError(f"url list {url_list}: no url column {options.url_col!r} "
                                f"(columns: {', '.join(names)}); name it with --url-col")
        if options.caption_col not in names:
            print(f"warning: url list has no caption column {options.caption_col!r}: "
                  "images will have no web caption")
            return None
    return options.caption_col


def download(options: DownloadOptions) -> dict[str, int]:
    """Run img2dataset into ``options.output``; return its counts summed over all shards."""
    fs, path = fsspec.core.url_to_fs(options.url_list)
    if not fs.exists(path):
        raise DownloadError(f"url list {options.url_list}: not found")
    if options.output_format not in ("parquet", "webdataset"):
        raise DownloadError(f"--output-format {options.output_format!r}: use parquet or webdataset")
    fmt = options.input_format or input_format(options.url_list)
    caption_col = _caption_column(options.url_list, fmt, options)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download as img2dataset_download

    # img2dataset installs its own SIGINT handler for the whole process; give ours back.
    previous = signal.getsignal(signal.SIGINT)
    try:
        img2dataset_download(
            url_list=options.url_list, output_folder=options.output, input_format=fmt,
            url_col=options.url_col, caption_col=caption_col,
            output_format=options.output_format, image_size=options.image_size,
            resize_mode=options.resize_mode, resize_only_if_bigger=True, encode_format="jpg",
            encode_quality=95, number_sample_per_shard=options.per_shard,
            processes_count=options.processes, thread_count=options.threads,
            timeout=options.timeout, retries=options.retries, enable_wandb=False,
            incremental_mode="incremental",
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    return download_counts(options.output)


def download_counts(folder: str) -> dict[str, int]:
    """Sum img2dataset's per-shard ``NNNNN_stats.json``: shards, rows, successes, failures."""
    fs, path = fsspec.core.url_to_fs(folder)
    totals = {"shards": 0, "count": 0, "successes": 0, "failed_to_download": 0,
              "failed_to_resize": 0}
    for stats in sorted(fs.glob(f"{path.rstrip('/')}/*_stats.json")):
        with fs.open(stats, "r") as handle:
            data = json.load(handle)
        totals["shards"] += 1
        for key in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[key] += int(data.get(key, 0))
    return totals


def add_download_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url-list", help="img2dataset url list: parquet, csv, tsv, txt, json")
    parser.add_argument("--output-format", default="parquet", choices=["parquet", "webdataset"])
    parser.add_argument("--input-format", default=None, help="default: from the file's suffix")
    parser.add_argument("--url-col", default="url")
    parser.add_argument("--caption-col", default="caption")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--resize-mode", default="keep_ratio",
                        choices=["no", "keep_ratio", "center_crop", "border"])
    parser.add_argument("--per-shard", type=int, default=10000, help="images per shard")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--timeout", type=int, default=10, help="seconds per image")
    parser.add_argument("--retries", type=int, default=0)


def options_from_args(args: argparse.Namespace, output: str) -> DownloadOptions:
    return DownloadOptions(
        url_list=args.url_list, output=output, output_format=args.output_format,
        input_format=args.input_format, url_col=args.url_col, caption_col=args.caption_col,
        image_size=args.image_size, resize_mode=args.resize_mode, per_shard=args.per_shard,
        processes=args.processes, threads=args.threads, timeout=args.timeout,
        retries=args.retries,
    )


def print_counts(counts: dict[str, int], output: str) -> None:
    failed = counts["count"] - counts["successes"]
    print(f"downloaded -> {output}: {counts['shards']} shards, {counts['count']} rows, "
          f"{counts['successes']} images, {failed} failed "
          f"(failed_to_download {counts['failed_to_download']}, "
          f"failed_to_resize {counts['failed_to_resize']}); failures reach the round's rejects")


def command_download(args: argparse.Namespace) -> int:
    if not args.url_list or not args.output:
        raise DownloadError("capfilt download needs --url-list and --output")
    counts = download(options_from_args(args, args.output))
    print_counts(counts, args.output)
    return 0


def download_for_run(args: argparse.Namespace) -> list[str]:
    """``run --url-list``: download into ``--download-to`` (default: ``shards`` beside the
    round folder, shared by the rounds of a bootstrap) and return it as the round's input."""
    folder = args.download_to or str(Path(args.output.rstrip("/")).parent / "shards")
    counts = download(DownloadOptions(url_list=args.url_list, output=folder,
                                      url_col=args.url_column, caption_col=args.caption_column))
    print_counts(counts, folder)
    return [folder]


def register(commands) -> dict:
    """Add ``capfilt download`` to the command line; return its handler by name."""
    parser = commands.add_parser(
        "download", help="download a url list with img2dataset, with CapFilt's defaults",
        description="Run img2dataset on a url list: 384 px JPEG images (shorter side, only "
        "shrunk), the caption column kept, parquet shards with a jpg column (or "
        "--output-format webdataset). Running it again resumes: finished shards are skipped "
        "(img2dataset's incremental mode). Example: capfilt download --url-list urls.parquet "
        "--output shards",
    )
    parser.add_argument("--output", help="shard folder (local path or fsspec URL)")
    add_download_arguments(parser)
    return {"download": command_download}
