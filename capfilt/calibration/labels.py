"""An audited sample of a round's texts (right or wrong for their image), joined with the scores
the round gave those texts: what ``capfilt calibrate`` measures thresholds against.

A labels file is CSV or parquet with the columns ``key`` (the image), ``label`` (right/wrong,
true/false or 1/0) and which text of the image is meant: ``caption`` (the text itself, web or
synthetic) or ``source`` (``web``, or ``synthetic`` where the image has one synthetic caption).
Where both columns are there, a row's caption wins and its source picks among equal texts.
Labels that match no scored text are counted by reason, never dropped unseen.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt.rounds.folder import GUARD_COLUMN, read_columns, shard_path
from capfilt.scoring.selection import SYNTHETIC, WEB
from manifests import read_manifest

SCORES = ("itm", "itc")
RIGHT = {"right": True, "true": True, "1": True, "wrong": False, "false": False, "0": False}
COLUMNS = ["key", "web_caption", "web_itm", "web_itc", "synthetic_captions", "synthetic_itm",
           "synthetic_itc"]

# Why a label matched no scored text (the keys of ``Joined.unmatched``).
NO_KEY = "key not in the round"
NO_CAPTION = "caption not among the texts of its image"
NO_WEB = "source web, but the image has no web caption"
NO_SYNTHETIC = "source synthetic, but the image has no synthetic caption"
SEVERAL_SYNTHETIC = ("source synthetic, but the image has several synthetic captions "
                     "(give the caption)")
TWICE = "text labelled more than once (the first label counts)"
KEY_TWICE = "key in more than one row of the round"
GUARDED = "caption set aside unscored by a caption guard"


class LabelError(ValueError):
    """A labels file that cannot be used: one line naming the file, the row and the fix."""


@dataclass(frozen=True)
class Label:
    """One audited text: which image, which of its texts, and whether it is right."""

    key: str
    right: bool
    caption: str | None = None
    source: str | None = None


@dataclass
class Joined:
    """Labelled texts with their scores; a score the round lacks (no ITM from a CLIP filter)
    is None. ``unmatched`` counts the labels that matched no text, by reason."""

    right: list[bool] = field(default_factory=list)
    source: list[str] = field(default_factory=list)
    scores: dict[str, list[float | None]] = field(default_factory=lambda: {s: [] for s in SCORES})
    unmatched: Counter = field(default_factory=Counter)
    labels: int = 0


def read_labels(path: str) -> list[Label]:
    """The labels in a CSV or parquet file (by its extension); a file the user must fix raises
    ``LabelError`` with one line."""
    lower = path.lower()
    if lower.endswith(".csv"):
        rows, columns = _csv_rows(path)
    elif lower.endswith((".parquet", ".pq")):
        rows, columns = _parquet_rows(path)
    else:
        raise LabelError(f"--labels {path}: use a .csv or .parquet file")
    for needed in ("key", "label"):
        if needed not in columns:
            raise LabelError(f"--labels {path}: no {needed!r} column (columns: "
                             f"{', '.join(map(str, columns)) or 'none'})")
    if "caption" not in columns and "source" not in columns:
        raise LabelError(f"--labels {path}: no 'caption' or 'source' column to say which text "
                         "of each image is labelled")
    return [_label(path, number, row) for number, row in rows]


def _csv_rows(path: str):
    try:
        with fsspec.open(path, "rt", encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [(number, {k.strip(): v for k, v in row.items() if k is not None})
                    for number, row in enumerate(reader, start=2)]
    except FileNotFoundError as exc:
        raise LabelError(f"--labels {path}: no such file") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise LabelError(f"--labels {path}: not a readable CSV file ({exc})") from exc
    return rows, columns


def _parquet_rows(path: str):
    try:
        with fsspec.open(path, "rb") as handle:
            table = pq.read_table(io.BytesIO(handle.read()))
    except FileNotFoundError as exc:
        raise LabelError(f"--labels {path}: no such file") from exc
    except (pa.ArrowException, OSError) as exc:
        raise LabelError(f"--labels {path}: not a readable parquet file ({exc})") from exc
    return list(enumerate(table.to_pylist(), start=1)), table.column_names


def _label(path: str, number: int, row: dict) -> Label:
    where = f"--labels {path} row {number}"
    key = _text(row.get("key"))
    if key is None:
        raise LabelError(f"{where}: no key")
    right = _right(row.get("label"))
    if right is None:
        raise LabelError(f"{where}: label {row.get('label')!r}: use right/wrong, true/false "
                         "or 1/0")
    caption = row.get("caption") if row.get("caption") not in (None, "") else None
    if caption is not None and not isinstance(caption, str):
        raise LabelError(f"{where}: caption {caption!r} is not text")
    source = _text(row.get("source"))
    if source is not None:
        source = source.lower()
        if source not in (WEB, SYNTHETIC):
            raise LabelError(f"{where}: source {row.get('source')!r}: use web or synthetic")
    if caption is None and source is None:
        raise LabelError(f"{where}: neither a caption nor a source says which text is labelled")
    return Label(key=key, right=right, caption=caption, source=source)


def _text(value) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _right(value) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return RIGHT.get(value.strip().lower())
    return None


def join_labels(round_dir: str, labels: list[Label]) -> Joined:
    """Each label's text and scores in the round's finished shards, read shard by shard and
    only for the labelled keys."""
    wanted: dict[str, list[Label]] = {}
    for label in labels:
        wanted.setdefault(label.key, []).append(label)
    keys = pa.array(sorted(wanted), type=pa.string())
    found: dict[str, dict] = {}
    twice: set[str] = set()
    manifest = read_manifest(round_dir)
    for shard in manifest.shards:
        if shard.status != "done":
            continue
        table = _read_shard(shard_path(round_dir, shard.index))
        table = table.filter(pc.is_in(table.column("key"), value_set=keys))
        for row in table.to_pylist():
            if row["key"] in found:
                twice.add(row["key"])
            found[row["key"]] = row
    joined = Joined(labels=len(labels))
    seen: set[tuple] = set()
    for label in labels:
        if label.key in twice:
            joined.unmatched[KEY_TWICE] += 1
            continue
        row = found.get(label.key)
        if row is None:
            joined.unmatched[NO_KEY] += 1
            continue
        text, problem = _which_text(row, label)
        if problem:
            joined.unmatched[problem] += 1
            continue
        if (label.key, text) in seen:
            joined.unmatched[TWICE] += 1
            continue
        seen.add((label.key, text))
        source, index = text
        joined.right.append(label.right)
        joined.source.append(source)
        for score in SCORES:
            value = row[f"web_{score}"] if source == WEB else row[f"synthetic_{score}"][index]
            joined.scores[score].append(None if value is None else float(value))
    return joined


def _read_shard(url: str) -> pa.Table:
    try:
        return read_columns(url, COLUMNS + [GUARD_COLUMN])
    except ValueError as exc:
        raise LabelError(str(exc)) from exc


def _which_text(row: dict, label: Label) -> tuple[tuple[str, int], str | None]:
    """(source, index among the synthetic captions) of the labelled text, or why none is."""
    web = row["web_caption"] if row["web_itm"] is not None or row["web_itc"] is not None else None
    synthetic = row["synthetic_captions"] or []
    guarded = row.get(GUARD_COLUMN) or [None] * len(synthetic)
    if label.caption is not None:
        places = ([(WEB, 0)] if web == label.caption else []) + [
            (SYNTHETIC, i) for i, text in enumerate(synthetic) if text == label.caption]
        if label.source is not None:
            places = [p for p in places if p[0] == label.source] or places
        # A scored copy of the text before one a guard set aside.
        places.sort(key=lambda p: p[0] == SYNTHETIC and guarded[p[1]] is not None)
        if not places:
            return (WEB, 0), NO_CAPTION
        place = places[0]
        unscored = place[0] == SYNTHETIC and guarded[place[1]] is not None
        return place, GUARDED if unscored else None
    if label.source == WEB:
        return ((WEB, 0), None) if web is not None else ((WEB, 0), NO_WEB)
    if len(synthetic) != 1:
        return (SYNTHETIC, 0), SEVERAL_SYNTHETIC if synthetic else NO_SYNTHETIC
    return (SYNTHETIC, 0), GUARDED if guarded[0] is not None else None
