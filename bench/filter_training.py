"""Which web captions the filter calls a match, for other lengths of its two trainings.

    python bench/filter_training.py RUN [--settings 300:900 300:300 2000:900] [--out FILE.json]

RUN is a finished ``bench/alt_text_demo.py`` run (web: complete, partial and wrong captions).
BLIP's filter keeps much true but terse alt-text: its ITM head was pre-trained on millions of
such pairs before a short fine-tune on COCO. The demo's is pre-trained for 300 steps and
fine-tuned for 900. For each PRETRAIN:FINETUNE pair this pre-trains a model from RUN's blank
one on the web and clean sets (as round 0 does), fine-tunes its filter on the clean set, and
scores the first ``--images`` web images' own captions with both, reporting the share of each
kind (complete, partial, wrong) at ITM >= the round's threshold. The pair RUN itself used is
read from RUN's round 0; the others train into ``RUN/variants/filter-training/``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from alt_text_demo import itm_scores
from bootstrap_variants import ROOT, machine

sys.path.insert(0, str(ROOT))

from pipelines.bootstrap import train_step  # noqa: E402
from pipelines.bootstrap_config import load_bootstrap_config  # noqa: E402

KINDS = ("correct", "partial", "wrong")


def models_for(run: Path, pretrain: int, finetune: int) -> dict[str, Path]:
    """The pre-trained and fine-tuned filters for one pair: RUN's round 0 where it trained
    that long, the others trained here."""
    cfg = load_bootstrap_config(run / "bootstrap.toml")
    own = (cfg.pretrain.config.steps, cfg.finetune_filter.config.steps)
    variants = run / "variants" / "filter-training"
    base = (run / "round-0" / "pretrain" if pretrain == own[0]
            else variants / f"pretrain-{pretrain}")
    tuned = (run / "round-0" / "filter" if (pretrain, finetune) == own
             else variants / f"pretrain-{pretrain}" / f"finetune-{finetune}")
    if not (base / "filter").exists():
        step = replace(cfg.pretrain, config=replace(cfg.pretrain.config, steps=pretrain))
        train_step(step, "pretrain", cfg.init, [*cfg.web, *cfg.clean], base, cfg.vision_init)
    if not (tuned / "filter").exists():
        step = replace(cfg.finetune_filter,
                       config=replace(cfg.finetune_filter.config, steps=finetune))
        train_step(step, "filter", str(base), list(cfg.clean), tuned)
    return {"pre-trained": base / "filter", "fine-tuned": tuned / "filter"}


def web_rows(run: Path, images: int) -> list[dict]:
    """The first ``images`` web rows (key, jpg, caption), each with its caption's kind."""
    import pyarrow.parquet as pq

    truth = pq.read_table(run / "world" / "truth" / "web_noise.parquet", columns=["key", "kind"])
    kinds = dict(zip(truth.column("key").to_pylist(), truth.column("kind").to_pylist()))
    rows = pq.read_table(run / "world" / "web", columns=["key", "jpg", "caption"]).slice(
        0, images).to_pylist()
    return [r | {"kind": kinds[r["key"]] if kinds[r["key"]] in KINDS else "wrong"}
            for r in rows]


def kept_by_kind(model: Path, rows: list[dict], threshold: float) -> dict[str, float]:
    """Share of each kind of web caption in ``rows`` at ITM >= threshold."""
    itm = itm_scores(model, rows, lambda r: [r["caption"]])
    kept, seen = dict.fromkeys(KINDS, 0), dict.fromkeys(KINDS, 0)
    for row, scores in zip(rows, itm):
        seen[row["kind"]] += 1
        kept[row["kind"]] += scores[0] >= threshold
    return {kind: round(kept[kind] / seen[kind], 3) for kind in KINDS if seen[kind]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--settings", nargs="+", default=["300:900", "300:300", "2000:900"],
                        help="PRETRAIN:FINETUNE steps")
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--out", type=Path, help="write the figures here (JSON; .md beside)")
    args = parser.parse_args()
    run = args.run.resolve()
    threshold = load_bootstrap_config(run / "bootstrap.toml").round["threshold"]
    began = time.perf_counter()
    rows = web_rows(run, args.images)
    results, scored = [], set()
    for setting in args.settings:
        pretrain, finetune = (int(n) for n in setting.split(":"))
        models = models_for(run, pretrain, finetune)
        for stage, model in models.items():
            steps = (pretrain, finetune if stage == "fine-tuned" else 0)
            if steps in scored:  # the pre-trained model of an earlier pair
                continue
            scored.add(steps)
            row = {"pretrain_steps": steps[0], "finetune_steps": steps[1], "model": stage,
                   **kept_by_kind(model, rows, threshold)}
            results.append(row)
            print(json.dumps(row), flush=True)
    lines = ["| pre-training steps | fine-tuning steps | complete kept | partial kept "
             "| wrong kept |", "|---|---|---|---|---|"]
    for row in results:
        lines.append(f"| {row['pretrain_steps']} | {row['finetune_steps']} | "
                     + " | ".join(f"{row[k]:.3f}" for k in KINDS) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=ROOT).stdout.strip()
        report = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": machine(),
                  "run": str(run), "images": args.images, "threshold": threshold,
                  "seconds": round(time.perf_counter() - began, 1), "results": results}
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
