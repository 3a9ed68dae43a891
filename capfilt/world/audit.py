"""Judge a CapFilt round of the demo world against its hidden truth (never read by the pipeline).

Figures: the filter's precision and recall on web captions (a partial caption, true but
incomplete, counts as neither right nor wrong there: its kept share is its own figure), what
share of each noise kind it kept (and of the one-attribute errors, by attribute), how many
synthetic captions state their image correctly (all, and kept) and what the wrong ones get
wrong, and the noise ratio of the captions each Table 1 training view offers; and how many
synthetic captions each caption guard set aside, and how many of those stated their image
correctly (the guards' defaults are meant to set aside none of them).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from capfilt.train.sources import VIEWS, round_captions
from capfilt.world.build import load_scenes, load_web_noise
from capfilt.world.grammar import parse
from capfilt.world.noise import TRUE_KINDS
from capfilt.world.scene import Scene, differing_attributes

COLUMNS = ["key", "web_caption", "synthetic_captions", "kept_captions", "kept_sources",
           "synthetic_guard"]


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def caption_error(caption: str, scene: Scene) -> str:
    """What a caption gets wrong about ``scene``: ``right``, ``unparsed`` (not in the grammar),
    ``count`` (one object for two or two for one), or the attributes it states wrongly, joined
    with ``+`` in alphabetical order (``shape``, ``colour+size``...)."""
    stated = parse(caption)
    if stated is None:
        return "unparsed"
    if stated == scene:
        return "right"
    differing = differing_attributes(stated, scene)
    if differing is None:
        return "count"
    return "+".join(sorted({name.rsplit(".", 1)[-1] for name in differing}))


def _kept_of(kept: Counter, of: Counter) -> dict:
    return {k: {"kept": kept[k], "of": of[k]} for k in sorted(of, key=lambda k: (-of[k], k))}


def audit_round(round_dir: str | Path, truth: str | Path) -> dict:
    scenes = load_scenes(truth)
    noise = load_web_noise(truth)
    rows = pq.read_table(Path(round_dir) / "shards", columns=COLUMNS).to_pylist()
    kinds, kept_kinds = Counter(), Counter()
    view_total, view_wrong = Counter(), Counter()
    attribute_of, attribute_kept = Counter(), Counter()
    synthetic_errors, synthetic_errors_kept = Counter(), Counter()
    guarded, guarded_right = Counter(), Counter()
    for row in rows:
        scene = scenes[row["key"]]
        kind = noise[row["key"]]
        kinds[kind] += 1
        kept_web = "web" in row["kept_sources"]
        kept_kinds[kind] += kept_web
        if kind == "attribute":
            error = caption_error(row["web_caption"], scene)
            attribute_of[error] += 1
            attribute_kept[error] += kept_web
        errors = {}  # each synthetic caption parsed once
        kept_texts = Counter(t for t, src in zip(row["kept_captions"], row["kept_sources"])
                             if src == "synthetic")
        for text, reason in zip(row["synthetic_captions"], row["synthetic_guard"]):
            if text not in errors:
                errors[text] = caption_error(text, scene)
            error = errors[text]
            synthetic_errors[error] += 1
            if reason is not None:
                guarded[reason] += 1
                guarded_right[reason] += error == "right"
            elif kept_texts[text] > 0:
                kept_texts[text] -= 1
                synthetic_errors_kept[error] += 1
        for view in VIEWS:
            for text in round_captions(row, view):
                if not text:
                    continue
                view_total[view] += 1
                if text == row["web_caption"]:
                    view_wrong[view] += kind not in TRUE_KINDS
                else:
                    error = errors[text] if text in errors else caption_error(text, scene)
                    view_wrong[view] += error != "right"
    # Partial captions are true, so not wrong; but not the whole truth either, so not counted
    # among the right ones the filter should keep: they have their own line.
    wrong_total = sum(n for k, n in kinds.items() if k not in TRUE_KINDS)
    wrong_kept = sum(n for k, n in kept_kinds.items() if k not in TRUE_KINDS)
    right_kept = kept_kinds["correct"]
    synthetic, kept_synthetic = sum(synthetic_errors.values()), sum(synthetic_errors_kept.values())
    return {
        "images": len(rows),
        "filter": {
            "wrong_web_dropped": _ratio(wrong_total - wrong_kept, wrong_total),
            "right_web_kept": _ratio(right_kept, kinds["correct"]),
            "precision": _ratio(right_kept, right_kept + wrong_kept),
            "recall": _ratio(right_kept, kinds["correct"]),
            "partial_web_kept": _ratio(kept_kinds["partial"], kinds["partial"]),
        },
        "web_kept_by_kind": {k: {"kept": kept_kinds[k], "of": kinds[k]} for k in sorted(kinds)},
        "attribute_errors_kept": _kept_of(attribute_kept, attribute_of),
        "synthetic": {
            "correct": _ratio(synthetic_errors["right"], synthetic),
            "kept_correct": _ratio(synthetic_errors_kept["right"], kept_synthetic),
            "kept": kept_synthetic, "of": synthetic,
            "by_error": _kept_of(synthetic_errors_kept, synthetic_errors),
        },
        "noise_ratio": {view: _ratio(view_wrong[view], view_total[view]) for view in VIEWS},
        "guarded": {reason: {"right": guarded_right[reason], "of": guarded[reason]}
                    for reason in sorted(guarded)},
    }
