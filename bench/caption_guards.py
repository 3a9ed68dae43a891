"""Caption guards on the demo world: how many synthetic captions each guard sets aside, and
that no right caption is among them.

1. **The grammar**: every right caption the world's grammar writes (5,160 scenes, 5 templates
   each), spelt as the demo's captioner spells it (the world's tokenizer, decoded as
   capfilt/captioning/blip_decoder.py decodes) and ending where it ends: within the demo round's
   ``max_new_tokens`` or not. The default guards must set none aside.
2. **A demo round** (``--demo RUN``, a finished ``capfilt demo`` folder): ``capfilt run`` over
   the demo's web set with the models and sampling of its CapFilt round and the default guards,
   audited against the world's hidden truth (capfilt/world/audit.py): captions set aside per
   reason and how many of them were right, and whether the captions are the demo round's own
   (the guards change no caption).

    python bench/caption_guards.py [--demo runs/demo] [--out bench/results/caption-guards-DATE.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

from capfilt.captioning.guards import Caption, CaptionGuards, guard, repeat_share, word_share
from capfilt.models.tiny import tiny_processor
from capfilt.world import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, TEMPLATES, Scene
from capfilt.world import SceneObject, describe, parse, vocabulary

DEMO_MAX_NEW_TOKENS = 24  # the [round] max_new_tokens pipelines/demo.py writes


def every_scene() -> list[Scene]:
    """The world's 360 one-object and 4,800 two-object scenes."""
    objects = [SceneObject(shape, colour, size, position) for shape, colour, size, position
               in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS)]
    left = [o for o in objects if o.position == "left"]
    right = [o for o in objects if o.position == "right"]
    groups = [(o,) for o in objects] + list(itertools.product(left, right))
    return [Scene(group, background) for group in groups for background in BACKGROUNDS]


def grammar_check(max_new_tokens: int, guards: CaptionGuards) -> dict:
    """The guards over every right caption, as the demo's captioner would write it."""
    tokenizer = tiny_processor(words=vocabulary()).tokenizer
    reasons, longest = Counter(), 0
    worst_repeat, least_words, respelt_wrong = 0.0, 1.0, 0
    captions = 0
    for scene in every_scene():
        for template in range(len(TEMPLATES)):
            ids = tokenizer(describe(scene, template=template), add_special_tokens=False).input_ids
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            respelt_wrong += parse(text) != scene
            longest = max(longest, len(ids))
            tokens = text.split()
            worst_repeat = max(worst_repeat, repeat_share(tokens, guards.repeat_ngram))
            least_words = min(least_words, word_share(tokens))
            # The end token is one more step: a caption ends if it and [SEP] fit the limit.
            reason = guard(Caption(text, ended=len(ids) + 1 <= max_new_tokens), guards)
            reasons[reason or "passed"] += 1
            captions += 1
    return {"right_captions": captions, "respelt_not_right": respelt_wrong,
            "max_new_tokens": max_new_tokens, "longest_tokens": longest,
            "largest_repeat_share": round(worst_repeat, 4),
            "smallest_word_share": round(least_words, 4), "by_reason": dict(reasons)}


def demo_round(demo: Path, work: Path) -> dict:
    """``capfilt run`` with the demo round's models and settings, default guards, audited."""
    from capfilt.world.audit import audit_round
    from manifests import read_manifest
    from pipelines.cli import main

    source = demo / "round-1" / "capfilt"
    theirs = read_manifest(str(source))
    p, sampling = theirs.parameters, theirs.parameters["sampling"]
    out = work / "round"
    started = time.perf_counter()
    code = main(["run", "--input", *[i.path for i in theirs.inputs], "--output", str(out),
                 "--captioner", p["captioner"], "--filter", p["filter"], "--workers", "1",
                 "--seed", str(p["seed"]), "--batch-size", str(p["batch_size"]),
                 "--num-captions", str(sampling["num_captions"]),
                 "--max-new-tokens", str(sampling["max_new_tokens"])])
    if code != 0:
        raise SystemExit(f"capfilt run exited {code}")
    seconds = time.perf_counter() - started
    audit = audit_round(out, demo / "world" / "truth")
    ours = read_manifest(str(out))
    same = _same_captions(source, out)
    return {"demo": str(demo), "images": audit["images"], "seconds": round(seconds, 1),
            "max_new_tokens": sampling["max_new_tokens"],
            "guarded_by_reason": ours.totals.guarded_by_reason,
            "guarded_right_by_reason": audit["guarded"],
            "synthetic": {k: audit["synthetic"][k] for k in ("correct", "kept_correct", "kept",
                                                               "of")},
            "demo_round_synthetic_kept": theirs.totals.kept_by_source.get("synthetic"),
            "captions_as_in_the_demo_round": same, "guarded_examples": _guarded(out)}


def _guarded(folder: Path, most: int = 10) -> list[dict]:
    """The first ``most`` captions set aside, with their reasons."""
    import pyarrow.parquet as pq

    rows = pq.read_table(folder / "shards", columns=["key", "synthetic_captions",
                                                      "synthetic_guard"]).to_pylist()
    found = [{"key": row["key"], "reason": reason, "caption": text} for row in rows
             for text, reason in zip(row["synthetic_captions"], row["synthetic_guard"]) if reason]
    return found[:most]


def _same_captions(a: Path, b: Path) -> dict:
    import pyarrow.parquet as pq

    def captions(folder: Path) -> dict:
        table = pq.read_table(folder / "shards", columns=["key", "synthetic_captions"])
        return dict(zip(table.column("key").to_pylist(),
                        table.column("synthetic_captions").to_pylist()))

    first, second = captions(a), captions(b)
    return {"same": sum(first[k] == second.get(k) for k in first), "of": len(first)}


def machine() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return f"{os.cpu_count()}-core CPU, {'AVX-512' if 'avx512f' in flags else 'AVX2'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", help="a finished `capfilt demo` folder: run its round again "
                        "with the guards and audit it")
    parser.add_argument("--work", help="folder for that round (default: a temporary one)")
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args()
    guards = CaptionGuards()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    result = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": machine(),
              "guards": guards.to_dict(),
              "grammar": grammar_check(DEMO_MAX_NEW_TOKENS, guards),
              "grammar_at_max_new_tokens_16": grammar_check(16, guards)["by_reason"]}
    if args.demo:
        with tempfile.TemporaryDirectory() as scratch:
            result["demo_round"] = demo_round(Path(args.demo).resolve(),
                                              Path(args.work or scratch))
    text = json.dumps(result, indent=2) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
