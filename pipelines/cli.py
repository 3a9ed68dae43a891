"""The ``capfilt`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from pipelines.config import CommandParser, home_path
from pipelines.exits import RECEIVED, catch_signals, run_command, stopped
from pipelines.round_settings import add_round_arguments, round_options

EXAMPLES = """examples:
  capfilt demo --output runs/demo
  capfilt bootstrap runs/demo/bootstrap.toml
  capfilt tiny-models models/
  capfilt run --input 'shards/{00000..00003}.parquet' --output rounds/round-0001 \\
      --captioner Salesforce/blip-image-captioning-base --filter Salesforce/blip-itm-base-coco
  capfilt run --input 'shards/*.tar' --output rounds/r1 --captioner M/captioner \\
      --filter M/filter --num-captions 10 --policy topk --keep 2 --rank-by itc
"""


REQUIRED = {"run": ("output", "captioner", "filter")}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, CommandParser]]:
    """The ``capfilt`` parser and its commands' parsers by name."""
    from pipelines import (calibrate_cli, convert, diff_cli, download, lineage, train_cli,
                           views)

    parser = CommandParser(
        prog="capfilt",
        description="CapFilt (BLIP's captioner + filter) over img2dataset shards, on Ray.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=CommandParser)

    tiny = commands.add_parser(
        "tiny-models", help="write a tiny random BLIP captioner and filter (for tests and smoke runs)",
        description="Write DIR/captioner and DIR/filter: tiny random BLIP models with processor "
        "and a small WordPiece vocabulary, loadable with from_pretrained. "
        "Example: capfilt tiny-models models/ && capfilt run --input 'shards/*.parquet' "
        "--output r1 --captioner models/captioner --filter models/filter",
    )
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--image-size", type=int, default=32)

    run = commands.add_parser(
        "run", help="run one CapFilt round over input shards",
        description="Caption every image, score web and synthetic captions with the filter, "
        "keep what the policy says, and write the round folder with its manifest.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_round_arguments(run)

    demo = commands.add_parser(
        "demo", help="BLIP's Table 1 in miniature: the whole bootstrap on a synthetic world",
        description="Build a synthetic image-caption world (clean, noisy web and test shards, "
        "hidden truth) and blank BLIP models, run one bootstrap round with the ablation rows "
        "(pre-train, fine-tune, CapFilt on Ray, pre-train again) and print BLIP's Table 1 for "
        "it, with the filter's precision and recall against the truth. No data or weights "
        "from outside. Example: capfilt demo --output runs/demo",
    )
    demo.add_argument("--output", default="runs/demo")
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="profile", action="store_const", const="quick",
                      default="default",
                      help="a small world and few steps: the machinery in a couple of minutes")
    size.add_argument("--long", dest="profile", action="store_const", const="long",
                      help="web captions mostly partial, as alt-text is, and pre-training until the "
                           "data is the limit, as in BLIP (several times the default's time)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--world-seed", type=int, metavar="N",
                      help="the world's seed (default: --seed): seeds of training on one world")
    demo.add_argument("--parallel", type=int, metavar="N",
                      help="trainings side by side, the cores split between them (default: 3, "
                           "or 1 with --quick, whose trainings take less than starting processes)")

    report = commands.add_parser(
        "report", help="write ROUND/report.html: score histograms, kept fractions, samples",
        description="Write a self-contained HTML report of a finished round (also written at "
        "the end of every run): ITM/ITC histograms with the threshold, kept fractions per "
        "shard and source, caption lengths, reject reasons, earlier rounds side by side, and a "
        "grid of samples at the threshold's edges. Example: capfilt report rounds/round-0001",
    )
    report.add_argument("round_dir")
    report.add_argument("--samples", type=int, default=24, help="thumbnails in the grid")

    validate = commands.add_parser(
        "validate", help="check a round's manifest against the JSON Schema and its files",
        description="Check that ROUND/manifest.json matches manifests/round.schema.json and "
        "that every input row of every shard is in shards/ or rejects/. "
        "Example: capfilt validate rounds/round-0001",
    )
    validate.add_argument("round_dir")
    # Commands with their own modules: each has register(commands) -> {name: handler}.
    for module in (download, views, lineage, convert, train_cli, calibrate_cli, diff_cli):
        COMMANDS.update(module.register(commands))
    for command in commands.choices.values():
        command.add_argument(
            "--config", default=None, metavar="TOML",
            help="settings from a TOML file or a preset (blip-base-paper, blip-large, "
            "blip2-ranking, demo); flags given here override it",
        )
    return parser, commands.choices


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse flags over the defaults a ``--config`` file or preset gives."""
    from pipelines.config import apply_config, load_config

    parser, subparsers = build_parser()
    args = parser.parse_args(argv)
    subparser = subparsers[args.command]
    if args.config:
        origin, values = load_config(home_path("config", args.config))
        apply_config(subparser, origin, values)
        args = parser.parse_args(argv)
    missing = [name for name in REQUIRED.get(args.command, ()) if getattr(args, name) is None]
    if args.command == "run" and not (args.input or args.url_list):
        missing.insert(0, "input or --url-list")
    if args.command == "run" and args.input and args.url_list:
        subparser.error("give --input or --url-list, not both")
    if missing:
        flags = ", ".join(f"--{m}" for m in missing)
        subparser.error(f"missing {flags} (give the flag, or the key in a --config file)")
    expand_home(args)
    return args


# Flags (and their config keys) that take paths, in any command.
PATH_DESTS = ("config", "input", "output", "url_list", "download_to", "parent", "captioner",
              "filter", "round_dir", "dir", "data", "init", "bootstrap_config", "checkpoint",
              "out", "processor_from", "judge")


def expand_home(args: argparse.Namespace) -> None:
    """``~`` is the user's home wherever a path is taken, as the shell would have made it: a
    quoted ``--output '~/x'`` or a path in a config file is never a folder named ``~``."""
    for dest in PATH_DESTS:
        value = getattr(args, dest, None)
        if isinstance(value, str):
            setattr(args, dest, home_path(dest, value))
        elif isinstance(value, list):
            setattr(args, dest, [home_path(dest, item) for item in value])


def print_summary(manifest, output: str) -> None:
    from capfilt.terminal import terminal_safe

    t = manifest.totals
    print(terminal_safe(f"round {manifest.round}: {manifest.status} -> {output}/manifest.json"))
    print(f"  shards: {t.shards_done} done, {t.shards_failed} failed")
    print(f"  rows: {t.rows_in} in, {t.rows_out} scored, {t.rows_rejected} rejected "
          f"{json.dumps(t.rejects_by_reason, sort_keys=True)}")
    print(f"  texts kept: {json.dumps(t.kept_by_source, sort_keys=True)} of "
          f"{json.dumps(t.texts_by_source, sort_keys=True)}; "
          f"{t.images_without_kept} images kept no text")
    if t.guarded_by_reason:
        print(f"  synthetic captions guarded: {json.dumps(t.guarded_by_reason, sort_keys=True)}")
    print(f"  {manifest.timings['wall_seconds']:.1f}s, "
          f"{manifest.timings['images_per_second']:.1f} images/s")
    print(terminal_safe(f"  report: {output.rstrip('/')}/report.html"))
    for shard in manifest.shards:
        if shard.status != "done":
            print(terminal_safe(f"  FAILED shard {shard.index:05d} ({shard.input}): {shard.error}"))


def command_run(args) -> int:
    from pipelines.round import run_round

    options = round_options(args)  # settings refused before the download, too
    if args.address and not args.dry_run:  # before any work: a wrong address is a usage error
        from workers.ray_cluster import wait_for_cluster

        wait_for_cluster(args.address)
    if args.url_list and not args.dry_run:
        from pipelines.download import download_for_run

        args.input = download_for_run(args)
        options = round_options(args)
    if args.dry_run:
        from pipelines.config import to_toml

        print(to_toml(options.settings), end="")
        return 0
    manifest = run_round(options)
    print_summary(manifest, options.output)
    if manifest.status != "complete":
        print("some shards failed; run the same command again to retry only those",
              file=sys.stderr)
        return 1
    return 0


def command_demo(args) -> int:
    from pipelines.demo import run_demo

    summary = run_demo(args.output, profile=args.profile, seed=args.seed, parallel=args.parallel,
                       world_seed=args.world_seed)
    print(summary["text"], end="")
    print(f"written: {args.output}/demo.md, demo.json; bootstrap in {args.output} "
          f"({summary['timings']['wall_seconds']:.0f}s)")
    return 0


def command_validate(args) -> int:
    from capfilt.rounds.check import check_round

    problems = check_round(args.round_dir)
    for problem in problems:
        print(f"problem: {problem}")
    if problems:
        return 1
    print(f"{args.round_dir}: manifest valid, every input row accounted for")
    return 0


def command_tiny_models(args) -> int:
    from capfilt.models.tiny import write_tiny_models

    paths = write_tiny_models(args.dir, seed=args.seed, image_size=args.image_size)
    for role, path in paths.items():
        print(f"{role}: {path}")
    return 0


def command_report(args) -> int:
    from capfilt.report.round_report import write_report

    print(write_report(args.round_dir, samples=args.samples))
    return 0


COMMANDS = {"run": command_run, "report": command_report, "demo": command_demo, "validate": command_validate,
            "tiny-models": command_tiny_models}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # plain text in logs and pipes
    from capfilt.terminal import configure_logging, terminal_safe
    from pipelines.config import ConfigError

    try:
        args = parse_args(argv)
    except ConfigError as exc:
        print(terminal_safe(f"capfilt: error: {exc}"), file=sys.stderr)
        return 2
    configure_logging(args.log_level)
    # A log file on a full disk must not print a traceback per record (the error is reported
    # once, by run_command).
    raising, logging.raiseExceptions = logging.raiseExceptions, False
    handlers = catch_signals()
    RECEIVED.clear()
    try:
        return run_command(COMMANDS[args.command], args)
    except KeyboardInterrupt:
        return stopped(args.command, RECEIVED[-1] if RECEIVED else signal.SIGINT)
    finally:
        logging.raiseExceptions = raising
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
