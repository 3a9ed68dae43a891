"""A round's settings, declared and checked in one place: the flags of ``capfilt run``.

``capfilt run`` reads them from its flags and ``--config`` file, the bootstrap from its
``[round]`` table (``round_table``): the same names (those of the flags, ``num_captions`` for
``--num-captions``), the same types, the same checks, and one function (``round_options``) that
turns them into what a round runs with.
"""

from __future__ import annotations

import argparse

from pipelines.config import CommandParser, ConfigError, apply_config

# What the bootstrap sets for each of its rounds; a [round] table cannot.
SET_BY_BOOTSTRAP = ("input", "output", "url_list", "download_to", "captioner", "filter",
                    "round", "parent", "seed", "address", "dry_run")


def resolved_settings(args: argparse.Namespace) -> dict:
    """Every setting the command runs with, after config and flags (saved in the manifest)."""
    skip = {"config", "dry_run", "command", "log_level"}
    return {k: v for k, v in sorted(vars(args).items()) if k not in skip}


def add_round_arguments(run: argparse.ArgumentParser) -> None:
    io = run.add_argument_group("input and output")
    io.add_argument("--input", nargs="+",
                    help="shards: paths, globs, brace ranges, folders or fsspec URLs")
    io.add_argument("--output", help="round folder (local path or fsspec URL)")
    io.add_argument("--url-list", default=None,
                    help="download this img2dataset url list first (instead of --input)")
    io.add_argument("--download-to", default=None,
                    help="shard folder for --url-list (default: shards/ beside --output)")
    io.add_argument("--write", action="append", default=[], choices=["webdataset"],
                    help="also write shards/NNNNN.tar for training loaders")
    io.add_argument("--image-column", default="jpg")
    io.add_argument("--caption-column", default="caption")
    io.add_argument("--key-column", default="key")
    io.add_argument("--url-column", default="url")
    io.add_argument("--round", type=int, default=None,
                    help="round number in the bootstrap (default: the parent's + 1, or 1)")
    io.add_argument("--parent", default=None, help="the previous round's folder")
    io.add_argument("--dedup", default="exact", choices=["off", "exact", "near"],
                    help="images seen earlier in the round: exact (default) captions and scores "
                    "a copy (same bytes) once and rejects the rest as duplicate_image; near "
                    "also rejects near-copies (difference hash), which exact only lists; off")

    models = run.add_argument_group("models")
    models.add_argument("--captioner", help="BLIP captioner: folder or hub id")
    models.add_argument("--filter", help="BLIP ITM model: folder or hub id")
    models.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    sampling = run.add_argument_group("captioning")
    sampling.add_argument("--method", default="nucleus", choices=["nucleus", "beam"])
    sampling.add_argument("--num-captions", type=int, default=1,
                          help="synthetic captions per image (1: BLIP; 10: the BLIP-2 recipe)")
    sampling.add_argument("--prompt", default="a picture of ")
    sampling.add_argument("--top-p", type=float, default=0.9)
    sampling.add_argument("--top-k", type=int, default=50, help="0 turns top-k off")
    sampling.add_argument("--repetition-penalty", type=float, default=1.1)
    sampling.add_argument("--max-new-tokens", type=int, default=16)
    sampling.add_argument("--min-new-tokens", type=int, default=1)
    sampling.add_argument("--num-beams", type=int, default=3)

    models.add_argument("--itm-token", default="enc", choices=["enc", "cls"],
                        help="first token of ITM text: BLIP's [ENC] (default) or HF's [CLS]")

    policy = run.add_argument_group("selection")
    policy.add_argument("--policy", default="threshold", choices=["threshold", "topk", "both"])
    policy.add_argument("--threshold", type=float, default=0.5, help="ITM probability to keep")
    policy.add_argument("--keep", type=int, default=2, help="texts kept per image by topk")
    policy.add_argument("--rank-by", default="itm", choices=["itm", "itc"])

    guards = run.add_argument_group(
        "caption guards", "synthetic captions set aside unscored, each with its reason")
    guards.add_argument("--caption-guards", action=argparse.BooleanOptionalAction, default=True,
                        help="guard synthetic captions (--no-caption-guards: score them all)")
    guards.add_argument("--max-repeat-share", type=float, default=0.4,
                        help="most of a caption's word n-grams that may repeat (1: off)")
    guards.add_argument("--repeat-ngram", type=int, default=2, help="n of those n-grams")
    guards.add_argument("--min-word-share", type=float, default=0.5,
                        help="least share of a caption's tokens that must be words (0: off)")
    guards.add_argument("--reject-unfinished", action=argparse.BooleanOptionalAction,
                        default=True, help="set aside a caption cut at --max-new-tokens")

    engine = run.add_argument_group("engine")
    engine.add_argument("--seed", type=int, default=0)
    engine.add_argument("--batch-size", type=int, default=16)
    engine.add_argument("--workers", type=int, default=None,
                        help="actors (default: one per GPU, or 1 on CPUs)")
    engine.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    engine.add_argument("--dry-run", action="store_true",
                        help="print the resolved settings as TOML and stop")


def round_options(args: argparse.Namespace):
    """The round ``args`` ask for; every setting is checked here, before any work (a setting
    the manifest's schema refuses would otherwise fail the round at its commit)."""
    from capfilt.captioning.guards import CaptionGuards
    from capfilt.captioning.settings import SamplingConfig
    from capfilt.scoring.selection import Policy, check_whole
    from capfilt.shards.reader import ReaderOptions
    from capfilt.step.stage_config import StageConfig
    from pipelines.plan import RoundOptions

    sampling = SamplingConfig(
        method=args.method, num_captions=args.num_captions, prompt=args.prompt,
        top_p=args.top_p, top_k=args.top_k or None, repetition_penalty=args.repetition_penalty,
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
        num_beams=args.num_beams,
    )
    policy = Policy(mode=args.policy, threshold=args.threshold, top_k=args.keep,
                    rank_by=args.rank_by)
    guards = CaptionGuards(enabled=args.caption_guards, max_repeat_share=args.max_repeat_share,
                           repeat_ngram=args.repeat_ngram, min_word_share=args.min_word_share,
                           reject_unfinished=args.reject_unfinished)
    stage = StageConfig(captioner=args.captioner, filter=args.filter, sampling=sampling,
                        policy=policy, seed=args.seed, dtype=args.dtype,
                        itm_token=args.itm_token, guards=guards)
    reader = ReaderOptions(image_column=args.image_column, caption_column=args.caption_column,
                           key_column=args.key_column, url_column=args.url_column)
    check_whole("--batch-size", args.batch_size, 1)
    if args.workers is not None:
        check_whole("--workers", args.workers, 1)
    if args.round is not None:
        check_whole("--round", args.round, 0)
    number = args.round if args.round is not None else _next_round(args.parent)
    return RoundOptions(inputs=args.input, output=args.output, stage=stage,
                        batch_size=args.batch_size, workers=args.workers, address=args.address,
                        settings=resolved_settings(args), reader=reader, round=number,
                        parent=args.parent, write=tuple(sorted(set(args.write))),
                        dedup=args.dedup)


def _next_round(parent: str | None) -> int:
    from manifests import ManifestError, read_manifest
    from pipelines.plan import PlanError

    if not parent:
        return 1
    try:
        return read_manifest(parent).round + 1
    except ManifestError as exc:
        raise PlanError(f"--parent: {exc}") from exc


def round_table(values: dict, origin: str) -> dict:
    """A bootstrap's ``[round]`` table read as ``capfilt run --config`` reads its keys, and
    checked now (not when the round starts after hours of training); returns every round
    setting with its default where the table gives none. Raises ``ConfigError`` naming the key.
    """
    given = {key.replace("-", "_"): value for key, value in values.items()}
    taken = sorted(set(given) & set(SET_BY_BOOTSTRAP))
    if taken:
        raise ConfigError(f"{origin}: {', '.join(taken)}: the bootstrap sets these for each "
                          "round (seed: the top-level one)")
    if "top_k" in given and "keep" not in given and given.get("policy") in ("topk", "both"):
        raise ConfigError(
            f"{origin}: top_k = {given['top_k']!r} is the captioner's top-k sampling, as "
            "capfilt run's --top-k; the texts a ranking keeps per image are keep")
    parser = CommandParser(prog="capfilt run", add_help=False)
    add_round_arguments(parser)
    apply_config(parser, origin, given)
    settings = {k: v for k, v in vars(parser.parse_args([])).items()
                if k not in SET_BY_BOOTSTRAP}
    placeholders = {"input": ["-"], "output": "-", "captioner": "-", "filter": "-", "round": 1,
                    "parent": None, "seed": 0, "address": None}
    try:
        round_options(argparse.Namespace(**settings, **placeholders))
    except ValueError as exc:
        raise ConfigError(f"{origin}: {exc}") from exc
    return settings
