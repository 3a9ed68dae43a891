"""Judge a CapFilt round of the demo world against its hidden truth (never read by the pipeline).

Figures: the filter's precision and recall on web captions, what share of each noise kind it
kept, how many synthetic captions state their image correctly (all, and kept), and the noise
ratio of the captions each Table 1 training view offers.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from capfilt.train.data import VIEWS, round_captions
from capfilt.world.build import load_scenes, load_web_noise
from capfilt.world.grammar import caption_is_correct

COLUMNS = ["key", "web_caption", "synthetic_captions", "kept_captions", "kept_sources"]


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def audit_round(round_dir: str | Path, truth: str | Path) -> dict:
    scenes = load_scenes(truth)
    noise = load_web_noise(truth)
    rows = pq.read_table(Path(round_dir) / "shards", columns=COLUMNS).to_pylist()
    kinds, kept_kinds = Counter(), Counter()
    synthetic = synthetic_right = kept_synthetic = kept_synthetic_right = 0
    view_total, view_wrong = Counter(), Counter()
    for row in rows:
        scene = scenes[row["key"]]
        kind = noise[row["key"]]
        kinds[kind] += 1
        kept_web = "web" in row["kept_sources"]
        kept_kinds[kind] += kept_web
        right = {}
        for text in row["synthetic_captions"]:
            right[text] = caption_is_correct(text, scene)
            synthetic += 1
            synthetic_right += right[text]
        for text, source in zip(row["kept_captions"], row["kept_sources"]):
            if source == "synthetic":
                kept_synthetic += 1
                kept_synthetic_right += right.get(text, caption_is_correct(text, scene))
        for view in VIEWS:
            for text in round_captions(row, view):
                if not text:
                    continue
                view_total[view] += 1
                wrong = (kind != "correct") if text == row["web_caption"] else not right.get(
                    text, caption_is_correct(text, scene))
                view_wrong[view] += wrong
    wrong_total = sum(n for k, n in kinds.items() if k != "correct")
    wrong_kept = sum(n for k, n in kept_kinds.items() if k != "correct")
    right_kept = kept_kinds["correct"]
    return {
        "images": len(rows),
        "filter": {
            "wrong_web_dropped": _ratio(wrong_total - wrong_kept, wrong_total),
            "right_web_kept": _ratio(right_kept, kinds["correct"]),
            "precision": _ratio(right_kept, right_kept + wrong_kept),
            "recall": _ratio(right_kept, kinds["correct"]),
        },
        "web_kept_by_kind": {k: {"kept": kept_kinds[k], "of": kinds[k]} for k in sorted(kinds)},
        "synthetic": {
            "correct": _ratio(synthetic_right, synthetic),
            "kept_correct": _ratio(kept_synthetic_right, kept_synthetic),
            "kept": kept_synthetic, "of": synthetic,
        },
        "noise_ratio": {view: _ratio(view_wrong[view], view_total[view]) for view in VIEWS},
    }
