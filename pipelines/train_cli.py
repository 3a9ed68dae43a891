"""``capfilt pretrain``, ``capfilt finetune`` and ``capfilt eval``."""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.eval_settings import EvalJob, EvalSettings

TRAIN_EXAMPLES = """examples:
  capfilt pretrain --init scratch:models/blank --data web/ rounds/r1@kept clean/ --output m1/pre
  capfilt finetune --as captioner --init m1/pre --data clean/ --output m1/captioner
  capfilt finetune --as filter --init m1/pre --data clean/ --output m1/filter
  capfilt eval --captioner m1/captioner/captioner --filter m1/filter/filter --data test/
"""


def add_training_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--init", help="scratch:FOLDER (config + processor), a folder with "
                         "filter/ and captioner/, or a Hugging Face checkpoint folder or id")
    command.add_argument("--data", nargs="+", help="img2dataset shards (paths, globs, folders) "
                         "and round folders, ROUND or ROUND@VIEW (kept, kept_web, "
                         "web_and_synthetic, web)")
    command.add_argument("--output", help="folder for checkpoints, models and the manifest")
    length = command.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (default 1000)")
    length.add_argument("--epochs", type=float,
                        help="passes over the samples instead (BLIP trains each row 20)")
    command.add_argument("--samples", choices=("images", "pairs"), default="images",
                         help="a round's several kept texts: images, one drawn per image per "
                         "epoch (BLIP-2); pairs, each (image, text) its own sample (BLIP)")
    command.add_argument("--batch-size", type=int, default=64)
    command.add_argument("--lr", type=float, default=1e-5)
    command.add_argument("--min-lr", type=float, default=0.0)
    command.add_argument("--warmup-steps", type=int, default=0)
    command.add_argument("--weight-decay", type=float, default=0.05)
    command.add_argument("--augment", choices=("blip", "none"), default="blip",
                         help="blip: random resized crop (scale 0.5-1) and horizontal flip")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--negative-mix", type=float, default=0.0,
                         help="ITM negatives: share drawn uniformly instead of by similarity "
                         "(BLIP: 0; models trained from scratch need about 0.5)")
    blip = command.add_argument_group("BLIP's objectives (pretrain and the filter)")
    blip.add_argument("--no-momentum", dest="momentum", action="store_false",
                      help="no momentum encoders, queue or distillation: ITC within the batch")
    blip.add_argument("--momentum-decay", type=float, default=0.995)
    blip.add_argument("--queue-size", type=int, default=57600,
                      help="momentum features kept for ITC; divisible by the batch size")
    blip.add_argument("--alpha", type=float, default=0.4,
                      help="momentum distillation weight, ramped up over the first epochs")
    blip.add_argument("--negative-all-rank", action="store_true",
                      help="ITM hard negatives from every worker's share (BLIP's retrieval "
                      "fine-tune), not each worker's own")
    engine = command.add_argument_group("engine")
    engine.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 autocast on CUDA, float32 elsewhere")
    engine.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute activations in the backward pass (less GPU memory)")
    engine.add_argument("--loader-workers", type=int, default=2,
                        help="decoding processes per training process (0: decode in it)")
    engine.add_argument("--shuffle-buffer", type=int, default=512,
                        help="rows each decoding process shuffles together (held encoded)")
    command.add_argument("--checkpoint-every", type=int, default=0)
    command.add_argument("--log-every", type=int, default=10)
    command.add_argument("--workers", type=int, default=1,
                         help="more than 1: Ray Train (DDP) workers")
    command.add_argument("--device", default="cpu")
    command.add_argument("--address", default=None, help="Ray cluster to join (Ray Train)")
    command.add_argument("--dry-run", action="store_true", help="print the settings and stop")


def add_training_commands(commands) -> None:
    pretrain = commands.add_parser(
        "pretrain", help="pre-train BLIP (ITC + ITM + LM, shared weights) on shards and rounds",
        description="Pre-train with BLIP's three losses on one model whose text encoder and "
        "decoder share all but self-attention; writes OUT/filter and OUT/captioner.",
        epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_training_arguments(pretrain)
    pretrain.add_argument("--vision-init", default=None,
                          help="timm:NAME or timm:NAME@FILE: the vision tower from a timm ViT")
    pretrain.set_defaults(task="pretrain")
    finetune = commands.add_parser(
        "finetune", help="fine-tune the captioner (LM) or the filter (ITC + ITM) on a clean set",
        description="Fine-tune as BLIP does for CapFilt: the captioner with the LM loss on "
        "'a picture of ' + caption (prompt masked), the filter with ITC + ITM.",
        epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    finetune.add_argument("--as", dest="task", choices=("captioner", "filter"), required=True)
    add_training_arguments(finetune)
    finetune.set_defaults(vision_init=None)
    bootstrap = commands.add_parser(
        "bootstrap", help="run BLIP's bootstrap: pre-train, fine-tune, CapFilt, pre-train again",
        description="Run the rounds a bootstrap TOML describes (see pipelines/bootstraps/ for "
        "BLIP-base and BLIP-2 style settings). Each step writes its manifest and is skipped when "
        "run again. Example: capfilt bootstrap runs/demo/bootstrap.toml",
    )
    bootstrap.add_argument("bootstrap_config", metavar="CONFIG")
    evaluate = commands.add_parser(
        "eval", help="retrieval recall@1/5/10 and caption BLEU-4 on a test set",
        description="Retrieval: ITC for all pairs, ITM re-ranking of the top k. Captions: "
        "BLEU-4 against the references, and with --judge a task accuracy.",
        epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("--filter", default=None)
    evaluate.add_argument("--captioner", default=None)
    evaluate.add_argument("--data", nargs="+", required=True, help="test shards")
    evaluate.add_argument("--output", default=None, help="write the eval manifest here (JSON)")
    evaluate.add_argument("--k", type=int, default=EvalSettings.k,
                          help="texts re-ranked by ITM per image")
    evaluate.add_argument("--num-beams", type=int, default=EvalSettings.num_beams)
    evaluate.add_argument("--max-new-tokens", type=int, default=EvalSettings.max_new_tokens)
    evaluate.add_argument("--limit", type=int, default=None, help="first N test images only")
    evaluate.add_argument("--prompt", default=EvalJob.prompt,
                          help="caption prompt (default BLIP's); '' for a pre-trained model")
    evaluate.add_argument("--judge", default=None,
                          help="world:TRUTH_DIR: caption accuracy against the demo world's truth")


def train_job(args):
    from capfilt.train.loop import TrainConfig
    from pipelines.train import TrainJob

    missing = [f"--{n}" for n in ("init", "data", "output") if getattr(args, n) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    config = TrainConfig(
        steps=0 if args.epochs else args.steps or 1000, epochs=args.epochs or 0.0,
        samples=args.samples, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, seed=args.seed,
        augment=args.augment, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
        momentum=args.momentum, momentum_decay=args.momentum_decay, queue_size=args.queue_size,
        alpha=args.alpha, negative_all_rank=args.negative_all_rank, precision=args.precision,
        grad_checkpointing=args.grad_checkpointing, loader_workers=args.loader_workers,
        shuffle_buffer=args.shuffle_buffer,
    )
    return TrainJob(task=args.task, init=args.init, data=tuple(args.data), output=args.output,
                    config=config, vision_init=args.vision_init, workers=args.workers,
                    device=args.device, address=args.address, negative_mix=args.negative_mix)


def command_train(args) -> int:
    from capfilt.train.progress import NOT_LOSSES
    from pipelines.train import run_training

    job = train_job(args)
    if args.dry_run:
        print(json.dumps(job.parameters(), indent=2))
        return 0
    manifest = run_training(job)
    last = manifest.results["last"] or {}
    losses = ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k not in NOT_LOSSES)
    print(f"{manifest.kind}: {manifest.results['steps']} steps, {manifest.results['epochs']} "
          f"epochs of {manifest.results['rows']} rows; last losses {losses}; "
          f"{manifest.timings['wall_seconds']:.0f}s")
    for output in manifest.outputs:
        print(f"  {output['role']}: {output['path']}")
    return 0


def command_eval(args) -> int:
    from pipelines.evaluate import run_eval

    if not (args.filter or args.captioner):
        raise ValueError("give --filter, --captioner or both")
    manifest = run_eval(EvalJob(filter=args.filter, captioner=args.captioner,
                                data=tuple(args.data), output=args.output, k=args.k,
                                num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                                limit=args.limit, judge=args.judge, prompt=args.prompt))
    json.dump(manifest.results["metrics"], sys.stdout, indent=2)
    print()
    return 0


def command_bootstrap(args) -> int:
    from pipelines.bootstrap import format_table, run_bootstrap
    from pipelines.bootstrap_config import load_bootstrap_config

    manifest = run_bootstrap(load_bootstrap_config(args.bootstrap_config))
    print(format_table(manifest.results["table"]), end="")
    print(f"{manifest.kind}: {manifest.status}, {manifest.timings['wall_seconds']:.0f}s")
    return 0


TRAIN_COMMANDS = {"pretrain": command_train, "finetune": command_train, "eval": command_eval,
                  "bootstrap": command_bootstrap}


def register(commands) -> dict:
    """Add pretrain, finetune, bootstrap and eval; return their handlers."""
    add_training_commands(commands)
    return TRAIN_COMMANDS
