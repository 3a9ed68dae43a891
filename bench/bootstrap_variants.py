"""Two ways on from a finished demo, per seed: the round's captions by beam search instead of
nucleus sampling (BLIP's Table 2), and a second bootstrap round (CapFilt of the web data by
round 1's fine-tuned captioner and filter, then pre-training again from scratch).

    python bench/bootstrap_variants.py RUN0 RUN1 RUN2 [--out FILE.json]

Each RUN is a folder that ``capfilt demo --seed N --output RUN`` finished. A variant runs the
bootstrap in RUN itself, so that its finished round-0 models are reused (a finished step is
skipped only when its settings, paths included, are the same); the demo's own later steps are
set aside first and put back after, and the variant's are left in ``RUN/variants/VARIANT``:

- ``beam``: the demo's bootstrap with ``method = "beam"`` (3 beams) in ``[round]``; all four
  rows of Table 1 are trained again, so "no CapFilt" and "filter only" (whose data does not
  depend on the captions) show how far a retrained row moves on its own;
- ``round2``: ``rounds = 2`` without the ablation rows; round 1's captioner and filter are
  fine-tuned on the clean set, CapFilt the web data as round 2, and a new model is pre-trained
  on round 2's kept pairs plus the clean set.

Prints, per seed and as means, the rows beside the demo's own, with each round's filter and
synthetic captions judged against the world's hidden truth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from capfilt.world.audit import audit_round  # noqa: E402
from pipelines.bootstrap import run_bootstrap  # noqa: E402
from pipelines.bootstrap_config import load_bootstrap_config  # noqa: E402

METRICS = ("i2t_r1", "t2i_r1", "bleu4", "caption_accuracy")
HEADERS = ("TR@1", "IR@1", "BLEU-4", "caption acc.")


def variant_toml(text: str, variant: str) -> str:
    """The demo's ``bootstrap.toml`` changed for ``variant``."""
    if variant == "beam":
        return text.replace("[round]\n", '[round]\nmethod = "beam"\nnum_beams = 3\n', 1)
    text = re.sub(r"(?m)^rounds = \d+$", "rounds = 2", text)
    return re.sub(r"(?m)^ablation = true$", "ablation = false", text)


# What each variant makes that the demo made too (set aside while it runs), and what it leaves.
SET_ASIDE = {"beam": ["round-1", "ablation", "table.md", "table.json", "manifest.json"],
             "round2": ["table.md", "table.json", "manifest.json"]}
MADE = {"beam": SET_ASIDE["beam"],
        "round2": ["round-1/captioner", "round-1/filter", "round-2", "table.md", "table.json",
                   "manifest.json"]}


def audit(run: Path, number: int) -> dict:
    result = audit_round(run / f"round-{number}" / "capfilt", run / "world" / "truth")
    return {"filter": result["filter"], "synthetic": result["synthetic"],
            "noise_ratio": result["noise_ratio"]}


def run_variant(run: Path, variant: str) -> dict:
    demo = json.loads((run / "demo.json").read_text())
    aside, kept = run / "demo-steps", run / "variants" / variant
    if aside.exists():
        raise SystemExit(f"{aside} is left from a stopped run: move its contents back first")
    if kept.exists():
        raise SystemExit(f"{kept} exists: remove it to measure {variant} again")
    aside.mkdir()
    for name in SET_ASIDE[variant]:
        (aside / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(run / name, aside / name)
    config = run / f"bootstrap-{variant}.toml"
    config.write_text(variant_toml((run / "bootstrap.toml").read_text(), variant))
    began = time.perf_counter()
    try:
        manifest = run_bootstrap(load_bootstrap_config(config))
        rounds = [1] if variant == "beam" else [1, 2]
        audits = {f"round-{n}": audit(run, n) for n in rounds}
    finally:
        for name in MADE[variant]:
            if (run / name).exists():
                (kept / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(run / name, kept / name)
        for name in SET_ASIDE[variant]:
            os.replace(aside / name, run / name)
        shutil.rmtree(aside)
        kept.mkdir(parents=True, exist_ok=True)
        os.replace(config, kept / "bootstrap.toml")
    return {"seed": demo["seed"], "demo_table": demo["table"], "table": manifest.results["table"],
            "audit": audits, "seconds": round(time.perf_counter() - began, 1)}


def row_means(results: list[dict], key: str) -> dict:
    names = [row["row"] for row in results[0][key]]
    return {name: {m: {"values": [r[key][i][m] for r in results]} for m in METRICS}
            for i, name in enumerate(names)}


def summarise(results: list[dict]) -> dict:
    out = {"seeds": [r["seed"] for r in results], "rows": row_means(results, "table"),
           "demo_rows": row_means(results, "demo_table")}
    for rows in (out["rows"], out["demo_rows"]):
        for metrics in rows.values():
            for cell in metrics.values():
                v = cell["values"]
                cell.update(mean=sum(v) / len(v), spread=max(v) - min(v))
    out["audit"] = {r["seed"]: r["audit"] for r in results}
    out["seconds"] = {r["seed"]: r["seconds"] for r in results}
    return out


def markdown(variant: str, summary: dict) -> str:
    lines = [f"### {variant}", "", "| row | " + " | ".join(HEADERS) + " |",
             "|---|" + "---|" * len(HEADERS)]
    for label, rows in (("", summary["rows"]), ("demo: ", summary["demo_rows"])):
        for name, metrics in rows.items():
            cells = [f"{metrics[m]['mean']:.3f} ± {metrics[m]['spread'] / 2:.3f}"
                     for m in METRICS]
            lines.append(f"| {label}{name} | " + " | ".join(cells) + " |")
    lines += ["", f"mean ± half the spread (max - min) over seeds {summary['seeds']}"]
    for seed, rounds in summary["audit"].items():
        for name, a in rounds.items():
            f, s = a["filter"], a["synthetic"]
            lines.append(f"seed {seed} {name}: filter dropped {f['wrong_web_dropped']} of the "
                         f"wrong web captions, kept {f['right_web_kept']} of the right ones; "
                         f"synthetic captions right {s['correct']} ({s['kept_correct']} of the "
                         f"kept); noise ratio of the kept {a['noise_ratio']['kept']}")
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    simd = "AVX-512" if "avx512f" in cpuinfo else "AVX2" if "avx2" in cpuinfo else "no AVX2"
    return f"{model[1] if model else platform.processor()}, {os.cpu_count()} cores, {simd}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--variants", nargs="+", default=["beam", "round2"],
                        choices=["beam", "round2"])
    parser.add_argument("--out", type=Path, help="write the summary as JSON here (.md beside)")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    report = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": machine(),
              "runs": [str(r) for r in args.runs], "variants": {}}
    text = ""
    for variant in args.variants:
        results = [run_variant(run.resolve(), variant) for run in args.runs]
        report["variants"][variant] = summarise(results)
        text += markdown(variant, report["variants"][variant]) + "\n"
        print(markdown(variant, report["variants"][variant]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
