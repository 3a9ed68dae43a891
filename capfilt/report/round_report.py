"""The round report: one self-contained HTML file (inline SVG plots, embedded thumbnails).

No script runs in it: every caption and URL is escaped, and the page's Content-Security-Policy
forbids scripts outright, so a hostile caption stays text.
"""

from __future__ import annotations

import base64
import io
import random
from collections import Counter
from dataclasses import dataclass
from html import escape

from capfilt.images.decode import ImageRejected, decode_image
from capfilt.report.calibration_section import calibration_section
from capfilt.report.diff_section import parent_diff_section
from capfilt.report.svg_plots import bars, histogram
from capfilt.rounds.folder import GUARD_COLUMN, read_columns, shard_path
from capfilt.scoring.selection import Policy
from manifests import ManifestError, RoundManifest, read_manifest
from manifests.lineage import parent_folder
from manifests.store import write_text_atomic

SCORE_COLUMNS = ["key", "url", "web_caption", "web_itm", "web_itc", "synthetic_captions",
                 "synthetic_itm", "synthetic_itc", "kept_captions", "kept_sources"]
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
EDGE = 0.05  # "just above / below the threshold" means within this much of it
MAX_ROUNDS_BACK = 20
# Characters of any one text (caption, URL, key, message) shown: a 5 MB caption is stored whole
# in its shard, but would make the report as large.
TEXT_LIMIT = 300


@dataclass
class Sample:
    shard: int
    row: int
    why: str
    record: dict


def _shown(text: str, limit: int = TEXT_LIMIT) -> str:
    """``text`` escaped for HTML, cut at ``limit`` characters with an ellipsis saying so."""
    if len(text) <= limit:
        return escape(text)
    return escape(text[:limit]) + "&hellip;"


def build_report(round_dir: str, samples: int = 24, seed: int = 0) -> str:
    """The report of the round in ``round_dir`` as an HTML string."""
    manifest = read_manifest(round_dir)
    policy = Policy(**manifest.parameters.get("policy", {}))
    threshold = policy.threshold
    rows = {}
    for shard in manifest.shards:
        if shard.status == "done":
            rows[shard.index] = read_columns(shard_path(round_dir, shard.index),
                                      SCORE_COLUMNS + [GUARD_COLUMN]).to_pylist()
    chosen = choose_samples(rows, threshold, samples, seed)
    images = _thumbnails(round_dir, chosen)
    body = [
        f"<h1>CapFilt round {manifest.round}</h1>",
        _summary(manifest),
        "<h2>Scores</h2>",
        _score_plots(rows, threshold, policy),
        calibration_section(round_dir, manifest),
        "<h2>What was kept</h2>",
        _kept_plots(manifest, rows),
        "<h2>Caption lengths</h2>",
        _length_plot(rows),
        "<h2>Rejected rows</h2>",
        _rejects_table(manifest),
        _lineage(manifest, round_dir),
        parent_diff_section(round_dir, manifest),
        "<h2>Samples</h2>",
        _grid(chosen, images, threshold),
    ]
    return PAGE.format(csp=CSP, title=escape(f"capfilt round {manifest.round}"),
                       body="\n".join(body))


def write_report(round_dir: str, **options) -> str:
    url = f"{round_dir.rstrip('/')}/report.html"
    write_text_atomic(url, build_report(round_dir, **options))
    return url


def choose_samples(rows: dict[int, list[dict]], threshold: float, size: int,
                   seed: int) -> list[Sample]:
    """Edge cases first (just above / just below the threshold, web dropped while a synthetic
    caption was kept), then random rows; every row when there are no more than ``size``."""
    located = [(s, i, r) for s, shard_rows in sorted(rows.items()) for i, r in enumerate(shard_rows)]
    quota = max(1, size // 4)
    picked: dict[tuple[int, int], Sample] = {}

    def take(candidates, why):
        for s, i, record in candidates[:quota]:
            picked.setdefault((s, i), Sample(s, i, why, record))

    with_web = [c for c in located if c[2]["web_itm"] is not None]
    above = sorted((c for c in with_web if threshold <= c[2]["web_itm"] < threshold + EDGE),
                   key=lambda c: c[2]["web_itm"])
    below = sorted((c for c in with_web if threshold - EDGE <= c[2]["web_itm"] < threshold),
                   key=lambda c: -c[2]["web_itm"])
    swapped = [c for c in located
               if "web" not in c[2]["kept_sources"] and "synthetic" in c[2]["kept_sources"]
               and c[2]["web_caption"] is not None]
    take(above, "just above the threshold")
    take(below, "just below the threshold")
    take(swapped, "web dropped, synthetic kept")
    rest = [c for c in located if (c[0], c[1]) not in picked]
    random.Random(seed).shuffle(rest)
    for s, i, record in rest[: max(0, size - len(picked))]:
        picked[(s, i)] = Sample(s, i, "random", record)
    return list(picked.values())


def _thumbnails(round_dir: str, chosen: list[Sample]) -> dict[tuple[int, int], str]:
    wanted: dict[int, list[int]] = {}
    for sample in chosen:
        wanted.setdefault(sample.shard, []).append(sample.row)
    out = {}
    for shard, indices in wanted.items():
        column = read_columns(shard_path(round_dir, shard), ["jpg"]).column("jpg")
        for index in indices:
            out[(shard, index)] = _thumbnail(column[index].as_py())
    return out


def _thumbnail(data: bytes | None) -> str:
    try:
        image = decode_image(data)
    except ImageRejected:
        return ""
    image.thumbnail((160, 160))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _summary(manifest: RoundManifest) -> str:
    t = manifest.totals
    kept = t.kept_by_source
    texts = t.texts_by_source
    cells = [
        ("status", manifest.status),
        ("shards", f"{t.shards_done} done, {t.shards_failed} failed"),
        ("rows in", t.rows_in),
        ("images scored", t.rows_out),
        ("rows rejected", t.rows_rejected),
        ("web captions kept", f"{kept.get('web', 0)} of {texts.get('web', 0)}"),
        ("synthetic captions kept", f"{kept.get('synthetic', 0)} of {texts.get('synthetic', 0)}"),
        ("synthetic captions guarded", _guarded(t.guarded_by_reason)),
        ("images left without text", t.images_without_kept),
        ("repeated images", _repeats(manifest.duplicates)),
        ("captioner", next((m.source for m in manifest.models if m.role == "captioner"), "")),
        ("filter", next((m.source for m in manifest.models if m.role == "filter"), "")),
        ("policy", ", ".join(f"{k}={v}" for k, v in manifest.parameters.get("policy", {}).items())),
        ("wall time", f"{manifest.timings.get('wall_seconds', 0):.1f} s"),
        ("time in the models", _model_share(manifest.timings)),
    ]
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{_shown(str(v))}</td></tr>" for k, v in cells)
    return f'<table class="summary">{rows}</table>'


def _repeats(duplicates: dict | None) -> str:
    """Copies set aside (captioned and scored once) and near-copies found, or "not looked for"."""
    if not duplicates:
        return "not looked for (--dedup off)"
    near = "rejected" if duplicates["near_dropped"] else "listed in duplicates.parquet"
    return (f"{duplicates['exact']} copies rejected as duplicate_image, {duplicates['near']} "
            f"near-copies {near}, of {duplicates['images']} images")


def _guarded(reasons: dict[str, int]) -> str:
    """Synthetic captions the caption guards set aside unscored, in all and by reason."""
    if not reasons:
        return "0"
    each = ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items()))
    return f"{sum(reasons.values())} ({each})"


def _model_share(timings: dict) -> str:
    """The models' share of the shards' time: well below 1, the workers wait on input."""
    shard, model = timings.get("shard_seconds", 0), timings.get("model_seconds")
    if not shard or model is None:  # nothing ran in this call, or an older manifest
        return "-"
    return f"{model:.1f} s of {shard:.1f} s in shards ({model / shard:.0%})"


def _score_plots(rows, threshold: float, policy: Policy) -> str:
    flat = [r for shard_rows in rows.values() for r in shard_rows]
    itm = {"web": [r["web_itm"] for r in flat if r["web_itm"] is not None],
           "synthetic": [v for r in flat for v in r["synthetic_itm"] if v is not None]}
    itc = {"web": [r["web_itc"] for r in flat if r["web_itc"] is not None],
           "synthetic": [v for r in flat for v in r["synthetic_itc"] if v is not None]}
    marker = threshold if policy.mode in ("threshold", "both") else None
    return '<div class="plots">' + histogram(
        itm, 0.0, 1.0, 20, "ITM match probability", marker, f"threshold {threshold:g}"
    ) + histogram(itc, -1.0, 1.0, 20, "ITC cosine") + "</div>"


def _kept_plots(manifest: RoundManifest, rows) -> str:
    per_shard = {}
    for shard in manifest.shards:
        if shard.status == "done":
            texts = sum(shard.texts_by_source.values())
            per_shard[f"{shard.index:05d}"] = sum(shard.kept_by_source.values()) / max(1, texts)
    kept, texts = manifest.totals.kept_by_source, manifest.totals.texts_by_source
    per_source = {s: kept.get(s, 0) / max(1, texts.get(s, 0)) for s in ("web", "synthetic")}
    return ('<div class="plots">' + bars(per_shard, "kept fraction of texts, per shard")
            + bars(per_source, "kept fraction, per caption source", colour="#3b73b9") + "</div>")


def _length_plot(rows) -> str:
    flat = [r for shard_rows in rows.values() for r in shard_rows]
    lengths = {
        "web": [min(40, len(r["web_caption"].split())) for r in flat if r["web_caption"]],
        "synthetic": [min(40, len(c.split())) for r in flat for c in r["synthetic_captions"]],
    }
    return '<div class="plots">' + histogram(lengths, 0, 40, 20, "caption length (words)") + "</div>"


def _rejects_table(manifest: RoundManifest) -> str:
    reasons = Counter(manifest.totals.rejects_by_reason)
    failed = [s for s in manifest.shards if s.status != "done"]
    if not reasons and not failed:
        return "<p>None: every input row was scored.</p>"
    lines = "".join(f"<tr><td>{_shown(reason)}</td><td>{count}</td></tr>"
                    for reason, count in reasons.most_common())
    shards = "".join(f"<li>shard {s.index:05d} ({_shown(s.input)}): {_shown(s.error or '')}</li>"
                     for s in failed)
    return (f'<table><tr><th>reason</th><th>rows</th></tr>{lines}</table>'
            + (f"<p>Failed shards:</p><ul>{shards}</ul>" if shards else ""))


def _lineage(manifest: RoundManifest, round_dir: str) -> str:
    chain = [(round_dir, manifest)]
    parent = parent_folder(round_dir, manifest.parent)
    while parent and len(chain) < MAX_ROUNDS_BACK:
        try:
            earlier = read_manifest(parent)
        except ManifestError:
            break
        chain.append((parent, earlier))
        parent = parent_folder(parent, earlier.parent)
    if len(chain) == 1:
        return ""
    head = "".join(f"<th>round {m.round}</th>" for _, m in reversed(chain))

    def row(label, value):
        return f"<tr><th>{escape(label)}</th>" + "".join(
            f"<td>{escape(str(value(m)))}</td>" for _, m in reversed(chain)) + "</tr>"

    def kept(m, source):
        texts = max(1, m.totals.texts_by_source.get(source, 0))
        return f"{m.totals.kept_by_source.get(source, 0) / texts:.1%}"

    body = (row("images scored", lambda m: m.totals.rows_out)
            + row("rows rejected", lambda m: m.totals.rows_rejected)
            + row("web kept", lambda m: kept(m, "web"))
            + row("synthetic kept", lambda m: kept(m, "synthetic"))
            + row("images without text", lambda m: m.totals.images_without_kept))
    return f"<h2>Rounds of this bootstrap</h2><table><tr><th></th>{head}</tr>{body}</table>"


def _grid(chosen: list[Sample], images: dict, threshold: float) -> str:
    cards = []
    for sample in chosen:
        r = sample.record
        kept = set(r["kept_captions"])
        lines = []
        if r["web_caption"] is not None:
            lines.append(_caption_line("web", r["web_caption"], r["web_itm"], r["web_itc"],
                                       "web" in r["kept_sources"] and r["web_caption"] in kept))
        reasons = r.get(GUARD_COLUMN) or [None] * len(r["synthetic_captions"])
        for text, itm, itc, reason in zip(r["synthetic_captions"], r["synthetic_itm"],
                                          r["synthetic_itc"], reasons):
            lines.append(_caption_line("synthetic", text, itm, itc,
                                       text in kept and reason is None, reason))
        src = images.get((sample.shard, sample.row), "")
        picture = f'<img src="{src}" alt="">' if src else '<div class="noimg">no image</div>'
        cards.append(
            f'<figure class="card">{picture}<figcaption>'
            f'<div class="why">{escape(sample.why)} &middot; {_shown(r["key"])}</div>'
            f'<ul>{"".join(lines)}</ul>'
            f'<div class="url">{_shown(r["url"] or "")}</div></figcaption></figure>'
        )
    return f'<div class="grid">{"".join(cards)}</div>'


def _caption_line(source: str, text: str, itm: float | None, itc: float | None, kept: bool,
                  guarded: str | None = None) -> str:
    mark = "kept" if kept else "dropped"
    itm_text = "-" if itm is None else f"{itm:.3f}"
    score = (f"guarded: {_shown(guarded)}" if guarded is not None
             else f"ITM {itm_text} &middot; ITC {itc:.3f}")
    return (f'<li class="{mark} {source}"><span class="badge">{"&#10003;" if kept else "&#10007;"}'
            f'</span> <b>{source}</b> {_shown(text)} '
            f'<span class="score">{score}</span></li>')


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; font-size: 13px; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 16px; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 12px; }}
.card {{ margin: 0; border: 1px solid #ddd; padding: 8px; display: flex; gap: 8px; }}
.card img, .noimg {{ width: 120px; height: 120px; object-fit: contain; background: #eee; }}
.card ul {{ list-style: none; padding: 0; margin: 4px 0; font-size: 12px; }}
.kept {{ color: #1d6b38; }} .dropped {{ color: #9a3b38; text-decoration: line-through; }}
.score {{ color: #666; font-size: 11px; }} .why {{ font-size: 11px; color: #555; }}
.url {{ font-size: 10px; color: #888; word-break: break-all; }}
</style></head>
<body>
{body}
</body></html>
"""
