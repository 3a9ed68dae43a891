"""CPU benchmark of the BLIP-2 captioner (capfilt/captioning/language_model.py): one seeded
``generate`` per caption, as it wrote captions before (``one_by_one``, the reference of
tests/test_lm_captioner.py), against one ``generate`` per batch, on the same small random BLIP-2
(ViT at 224 px, Q-Former with 32 queries, OPT language model, BERT's 30,524-token vocabulary).

Prints images/s of each way, their ratio within each repeat (median reported: a shared VM's
speed drifts between minutes) and whether the two wrote the same captions (texts and ``ended``);
``--out`` writes them as JSON with the date, the commit and the machine.

    python bench/lm_captioner.py --out bench/results/lm-captioner-cpu-$(date +%F).json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from capfilt.captioning.language_model import LanguageModelCaptioner  # noqa: E402
from capfilt.captioning.settings import SamplingConfig  # noqa: E402
from capfilt.models.loading import load_model  # noqa: E402
from capfilt.models.tiny import tiny_vocabulary  # noqa: E402
from tests.test_lm_captioner import one_by_one, tinted_images  # noqa: E402


def small_blip2(folder: Path) -> Path:
    """A random BLIP-2 with an OPT language model, written to ``folder``."""
    from transformers import (
        BertTokenizer,
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
    )

    words = tiny_vocabulary()[:-2]
    vocab = words + [f"[unused{i}]" for i in range(30522 - len(words))]
    (folder / "vocab").mkdir(parents=True)
    (folder / "vocab" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer.from_pretrained(folder / "vocab")
    processor = Blip2Processor(BlipImageProcessor(size={"height": 224, "width": 224}),
                               tokenizer, num_query_tokens=32)
    tokenizer = processor.tokenizer
    config = Blip2Config(
        vision_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                           num_attention_heads=6, image_size=224, patch_size=16,
                           initializer_range=0.02),
        qformer_config=dict(vocab_size=len(tokenizer), hidden_size=384, num_hidden_layers=2,
                            num_attention_heads=6, intermediate_size=1536,
                            encoder_hidden_size=384),
        text_config=dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=512,
                         ffn_dim=2048, num_hidden_layers=4, num_attention_heads=8,
                         word_embed_proj_dim=512, max_position_embeddings=128,
                         bos_token_id=tokenizer.cls_token_id,
                         eos_token_id=tokenizer.sep_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        num_query_tokens=32, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).eval().save_pretrained(folder / "captioner")
    processor.save_pretrained(folder / "captioner")
    return folder / "captioner"


def timed(caption, batches) -> tuple[float, list]:
    """(seconds, captions) of ``caption`` over every batch."""
    start, captions = time.perf_counter(), []
    for pixels, keys in batches:
        captions += caption(pixels, keys)
    return time.perf_counter() - start, captions


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=ROOT).stdout.strip()


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines()
             if line.startswith("model name")]
    simd = "AVX-512" if "avx512f" in info else "AVX2" if "avx2" in info else "no AVX2"
    name = names[0] if names else platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} cores, {simd}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="images per batch")
    parser.add_argument("--captions", type=int, default=4, help="captions per image")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3,
                        help="times both ways run, back to back, each ratio within one repeat")
    parser.add_argument("--out", default=None, help="write the figures here as JSON")
    args = parser.parse_args()
    sampling = SamplingConfig(num_captions=args.captions, max_new_tokens=args.max_new_tokens)
    pixels = tinted_images(args.images, 224)
    keys = [f"{i:06d}" for i in range(args.images)]
    batches = [(pixels[i : i + args.batch], keys[i : i + args.batch])
               for i in range(0, args.images, args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = small_blip2(Path(tmp))
        captioner = LanguageModelCaptioner(load_model(str(folder), "captioner"), sampling, 0)
        captioner(*batches[0])  # warm-up: first calls allocate
        runs, same = [], True
        for _ in range(args.repeats):
            alone, reference = timed(lambda p, k: one_by_one(captioner, p, k), batches)
            together, batched = timed(captioner.captions, batches)
            same &= batched == reference
            runs.append({"one_by_one_images_per_s": round(args.images / alone, 3),
                         "batched_images_per_s": round(args.images / together, 3),
                         "speed_up": round(alone / together, 2)})
            print(json.dumps(runs[-1]), flush=True)
    texts = [c.text for group in batched for c in group]
    figures = {
        "date": date.today().isoformat(), "commit": commit(), "machine": machine(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "model": "random BLIP-2: ViT 6x384 at 224 px, Q-Former 2x384 with 32 queries, OPT "
                 f"4x512, vocabulary {captioner.model.config.text_config.vocab_size}",
        "images": args.images, "batch": args.batch, "captions_per_image": args.captions,
        "sampling": sampling.to_dict(), "repeats": runs,
        "median_speed_up": statistics.median(r["speed_up"] for r in runs),
        "captions_per_repeat": len(texts), "identical_in_every_repeat": same,
        "captions_ended": sum(c.ended for group in batched for c in group),
    }
    for key, value in figures.items():
        print(f"{key}: {json.dumps(value)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
