"""``capfilt convert-blip``: an original BLIP .pth checkpoint to a Hugging Face folder."""

from __future__ import annotations

import argparse


def command_convert(args: argparse.Namespace) -> int:
    # Imported here: torch and transformers take seconds, and every command's parser is
    # built from this module (``capfilt --help`` should not wait for them).
    from capfilt.models.convert_blip import convert_checkpoint

    conversion = convert_checkpoint(args.checkpoint, args.kind, args.out, args.processor_from)
    print(f"{args.kind}: {len(conversion.state_dict)} tensors -> {args.out}")
    for reason, keys in sorted(conversion.dropped.items()):
        print(f"  dropped {len(keys)}: {reason}")
    return 0


def register(commands) -> dict:
    """Add ``capfilt convert-blip``; return its handler by name."""
    parser = commands.add_parser(
        "convert-blip", help="convert an original salesforce/BLIP .pth to a Hugging Face folder",
        description="Convert model_base_capfilt_large.pth, model_large_caption.pth, "
        "model_base_retrieval_coco.pth, ... (loaded with torch.load(weights_only=True) only) "
        "into a folder that --captioner or --filter take. The config and processor come from "
        "--processor-from. Example: capfilt convert-blip model_large_caption.pth --kind "
        "captioner --out models/captioner --processor-from Salesforce/blip-image-captioning-large",
    )
    parser.add_argument("checkpoint")
    parser.add_argument("--kind", required=True, choices=["captioner", "filter"])
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--processor-from", required=True, metavar="DIR_OR_ID",
                        help="Hugging Face folder or id of the same architecture: config, "
                        "tokenizer and image processor")
    return {"convert-blip": command_convert}
