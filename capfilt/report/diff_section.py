"""The report's "Changes since the parent round" section: the round diff as HTML.

Every text (captions, keys, folders, reasons, settings) is escaped; a diff that cannot be made
(the parent read other inputs, or its files are gone) is one escaped sentence, never a report
that fails to be written.
"""

from __future__ import annotations

import json
from collections import Counter
from html import escape

from capfilt.rounds.diff import RoundDiff, diff_rounds
from manifests import ManifestError, RoundManifest
from manifests.lineage import parent_folder

EXAMPLES = 4
TEXT_LIMIT = 200
HEADING = "<h2>Changes since the parent round</h2>"


def _shown(text, limit: int = TEXT_LIMIT) -> str:
    text = str(text)
    return escape(text) if len(text) <= limit else escape(text[:limit]) + "&hellip;"


def _number(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _percent(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def parent_diff_section(round_dir: str, manifest: RoundManifest) -> str:
    """The section for a round with a parent over the same inputs; "" without a parent."""
    parent = parent_folder(round_dir, manifest.parent)
    if not parent:
        return ""
    try:
        diff = diff_rounds(parent, round_dir, examples=EXAMPLES)
    except (ManifestError, ValueError, OSError) as exc:
        return f"{HEADING}<p>Not compared with the parent {_shown(parent)}: {_shown(exc)}</p>"
    return diff_html(diff)


def _reasons(counts: Counter) -> str:
    parts = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return "; ".join(f"{_shown(reason)}: {n}" for reason, n in parts) or "-"


def diff_html(diff: RoundDiff) -> str:
    """Round A (the parent) -> round B (this round) as tables, a warning and examples."""
    a, b = diff.a, diff.b
    parts = [HEADING, f"<p>Round {a.round} ({_shown(a.folder)}) &rarr; round {b.round}, "
             f"{diff.shards_compared} input shards compared.</p>"]
    if diff.warning:
        parts.append(f'<p style="color:#9a3b38;font-weight:bold">Warning: '
                     f"{_shown(diff.warning, 1000)}</p>")
    if diff.note:
        parts.append(f"<p>{_shown(diff.note)}</p>")
    if diff.settings_changed:
        rows = "".join(f"<tr><td>{_shown(name)}</td><td>{_shown(json.dumps(x))}</td>"
                       f"<td>{_shown(json.dumps(y))}</td></tr>"
                       for name, (x, y) in diff.settings_changed.items())
        parts.append(f"<table><tr><th>setting</th><th>round {a.round}</th>"
                     f"<th>round {b.round}</th></tr>{rows}</table>")
    web, syn, rows = diff.web, diff.synthetic, diff.rows
    flips = [
        ("web captions kept &rarr; dropped", sum(web["kept_to_dropped"].values()),
         _reasons(web["kept_to_dropped"])),
        ("web captions dropped &rarr; kept", sum(web["dropped_to_kept"].values()),
         _reasons(web["dropped_to_kept"])),
        ("web captions unchanged", web["kept_both"] + web["dropped_both"],
         f"kept in both: {web['kept_both']}; dropped in both: {web['dropped_both']}"),
        ("images with fewer kept synthetic captions", syn["images_fewer"],
         "texts lost: " + _reasons(syn["texts_lost"])),
        ("images with more kept synthetic captions", syn["images_more"],
         "texts gained: " + _reasons(syn["texts_gained"])),
        ("rows scored &rarr; rejected", sum(rows["scored_to_rejected"].values()),
         _reasons(rows["scored_to_rejected"])),
        ("rows rejected &rarr; scored", sum(rows["rejected_to_scored"].values()),
         _reasons(rows["rejected_to_scored"])),
    ]
    body = "".join(f"<tr><th>{label}</th><td>{n}</td><td>{why}</td></tr>"
                   for label, n, why in flips)
    parts.append(f"<table><tr><th></th><th>count</th><th>why</th></tr>{body}</table>")
    da, db = a.diversity, b.diversity
    sides = [
        ("web texts kept", a.kept_web, b.kept_web),
        ("synthetic texts kept", a.kept_synthetic, b.kept_synthetic),
        ("synthetic share of kept texts", _percent(a.synthetic_share), _percent(b.synthetic_share)),
        ("images without kept text", a.images_without_kept, b.images_without_kept),
        (f"distinct-1 ({da.sample} kept synthetic captions each)",
         _number(da.distinct_1), _number(db.distinct_1)),
        ("distinct-2", _number(da.distinct_2), _number(db.distinct_2)),
        (f"self-BLEU-4 ({da.self_bleu_sample} each)", _number(da.self_bleu_4),
         _number(db.self_bleu_4)),
    ]
    body = "".join(f"<tr><th>{label}</th><td>{x}</td><td>{y}</td></tr>" for label, x, y in sides)
    parts.append(f"<table><tr><th></th><th>round {a.round}</th><th>round {b.round}</th></tr>"
                 f"{body}</table>")
    parts.append(_examples(diff))
    return "\n".join(parts)


def _examples(diff: RoundDiff) -> str:
    items = []
    for flip, label in (("web_kept_to_dropped", "kept &rarr; dropped"),
                        ("web_dropped_to_kept", "dropped &rarr; kept")):
        for e in diff.examples[flip]:
            items.append(f"<li>web {label} ({_shown(e['reason'])}): <b>{_shown(e['key'])}</b> "
                         f"{_shown(e['caption'])} <span class=\"score\">ITM "
                         f"{_number(e['itm_a'])} &rarr; {_number(e['itm_b'])}</span></li>")
    for kind, label in (("synthetic_fewer", "fewer"), ("synthetic_more", "more")):
        for e in diff.examples[kind]:
            before = " | ".join(_shown(t) for t in e["kept_a"]) or "none"
            after = " | ".join(_shown(t) for t in e["kept_b"]) or "none"
            items.append(f"<li>synthetic {label} ({_shown(e['reason'])}): "
                         f"<b>{_shown(e['key'])}</b> kept {before} &rarr; {after}</li>")
    return f"<p>Examples:</p><ul>{''.join(items)}</ul>" if items else ""
