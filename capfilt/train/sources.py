"""What training reads: sources, their pieces, and the captions each row offers.

A source is img2dataset shards (parquet or webdataset tars; a glob, folder or list entry, any
fsspec URL) or a finished round folder with a view of its rows. BLIP's Table 1 ablation is read
off one CapFilt round through its views:

- ``kept``: the kept captions, web and synthetic (CapFilt: filter and captioner);
- ``kept_web``: the kept web captions only (filter only);
- ``web_and_synthetic``: the web caption and every synthetic one, unfiltered (captioner only;
  captions a caption guard set aside are no captions, and are left out);
- ``web``: the web caption alone (no CapFilt).

A source is cut into pieces, the unit the stream shuffles and hands to loader processes: a
parquet row group (img2dataset writes 100 rows a group, a round 100 too) or a whole tar. Row
counts come from parquet footers (for a tar, from img2dataset's metadata parquet beside it), so
listing a web-scale set reads no image.

Listed as pairs (``list_pieces(..., pairs=True)``, BLIP's way), a round's row becomes one row per
caption its view offers, all with the image's bytes and place; an image with none offers no
sample. Counting pairs reads the round's caption columns (text only, never an image).
"""

from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass, replace

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.shards.bounded_reads import open_regular, read_parquet, read_regular
from capfilt.shards.input_rows import SUCCESS, text_column
from capfilt.shards.reader import InputError, ShardReadError, expand_inputs
from capfilt.shards.tar_rows import tar_samples, webdataset_rows

log = logging.getLogger(__name__)

VIEWS = ("kept", "kept_web", "web_and_synthetic", "web")
ROUND_COLUMNS = ["key", "jpg", "web_caption", "synthetic_captions", "kept_captions",
                 "kept_sources"]
# Read where a round has it: rounds before caption guards wrote no synthetic_guard column.
ROUND_OPTIONAL = ["synthetic_guard"]
# What ``round_captions`` reads: the round's columns but its images.
CAPTION_COLUMNS = [c for c in ROUND_COLUMNS + ROUND_OPTIONAL if c not in ("key", "jpg")]


class TrainingDataError(ValueError):
    """A data source that cannot be trained on (missing, empty, unknown view)."""


@dataclass(frozen=True)
class Source:
    """A round folder (with a view) or img2dataset shards (a glob, folder or list entry)."""

    path: str
    view: str | None = None

    @classmethod
    def parse(cls, text: str) -> Source:
        """``ROUND_DIR`` or ``ROUND_DIR@view`` for a round; anything else names shards."""
        path, sep, view = text.rpartition("@")
        if not sep or "/" in view:  # an '@' inside a path or URL, not a view
            path, view = text, ""
        fs = fsspec.core.url_to_fs(path)[0]
        is_round = fs.exists(_join(path, "manifest.json"))
        if not is_round and fs.exists(_join(path, "plan.json")):
            raise TrainingDataError(f"{path}: this round has not finished (no manifest.json)")
        if view and not is_round:
            raise TrainingDataError(f"{text}: a view (@{view}) needs a round folder with a manifest")
        if is_round:
            view = view or "kept"
            if view not in VIEWS:
                raise TrainingDataError(f"{text}: unknown view {view!r}; use one of {', '.join(VIEWS)}")
            return cls(path, view)
        return cls(path)

    def __str__(self) -> str:
        return f"{self.path}@{self.view}" if self.view else self.path


@dataclass(frozen=True)
class Piece:
    """Rows ``offset, offset + stride, ...`` of one row group (parquet) or one tar.

    ``rows`` is the count the metadata gives; a stride above 1 splits a piece between loader
    processes when a set has fewer pieces than there are processes reading it.
    """

    url: str
    source: int  # index into the job's sources
    view: str | None
    group: int | None  # parquet row group; None for a tar
    rows: int  # samples: rows, or (image, caption) pairs when ``pairs``
    stride: int = 1
    offset: int = 0
    pairs: bool = False

    @property
    def count(self) -> int:
        return max(0, -(-(self.rows - self.offset) // self.stride))


def list_pieces(sources: list[Source], pairs: bool = False) -> list[Piece]:
    """Every piece of every source, in a fixed order, counted from metadata; with ``pairs``,
    a round's pieces count its (image, caption) pairs."""
    pieces: list[Piece] = []
    for index, source in enumerate(sources):
        found = _source_pieces(index, source, pairs)
        if not found:
            raise TrainingDataError(f"{source}: no rows to train on")
        pieces += found
    return pieces


def _source_pieces(index: int, source: Source, pairs: bool) -> list[Piece]:
    if source.view is not None:
        fs, root = fsspec.core.url_to_fs(source.path)
        files = sorted(fs.glob(_join(root, "shards", "*.parquet")))
        if not files:
            raise TrainingDataError(f"{source.path}: round folder has no shards/*.parquet")
        urls = [fs.unstrip_protocol(f) if "://" in source.path else f for f in files]
    else:
        try:
            urls = expand_inputs([source.path])
        except InputError as exc:
            raise TrainingDataError(str(exc)) from exc
    tars = {url[: -len(".tar")] for url in urls if url.endswith(".tar")}
    pieces = []
    for url in urls:
        if url.endswith(".tar"):
            pieces.append(Piece(url, index, None, None, _tar_rows(url)))
        elif url[: -len(".parquet")] not in tars:  # not img2dataset's metadata beside a tar
            needed = ROUND_COLUMNS if source.view else ["jpg"]
            counts = (_pair_counts(url, source.view) if pairs and source.view
                      else _row_groups(url, needed))
            for group, rows in enumerate(counts):
                pieces.append(Piece(url, index, source.view, group, rows,
                                    pairs=pairs and source.view is not None))
    return [p for p in pieces if p.count]


def _pair_counts(url: str, view: str) -> list[int]:
    """(image, caption) pairs per row group of a round shard under ``view``."""
    _row_groups(url, ROUND_COLUMNS)  # the same one-line error for a file that is no round's
    try:
        with open_regular(url) as (handle, size):
            file = pq.ParquetFile(handle)
            names = set(file.schema_arrow.names)
            columns = [c for c in CAPTION_COLUMNS if c in names]
            groups = range(file.metadata.num_row_groups)
            return [sum(len(round_captions(row, view)) for row in
                        read_parquet(url, file, size, [g], columns).to_pylist()) for g in groups]
    except ShardReadError as exc:
        raise TrainingDataError(str(exc)) from exc


def _row_groups(url: str, needed: list[str]) -> list[int]:
    try:
        with open_regular(url) as (handle, _):
            file = pq.ParquetFile(handle)
            meta, names = file.metadata, set(file.schema_arrow.names)
    except ShardReadError as exc:
        raise TrainingDataError(str(exc)) from exc
    except (pa.ArrowInvalid, OSError) as exc:
        raise TrainingDataError(f"{url}: not a readable parquet file ({exc})") from exc
    missing = [c for c in needed if c not in names]
    if missing:
        raise TrainingDataError(f"{url}: no {', '.join(missing)} column (columns: "
                                f"{', '.join(sorted(names))})")
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def _tar_rows(url: str) -> int:
    """Rows of an img2dataset tar from its metadata parquet (successful rows are the ones in
    the tar); without one, the tar's headers are read once."""
    sidecar = url[: -len(".tar")] + ".parquet"
    try:
        with open_regular(sidecar) as (handle, _):
            status = pq.read_table(handle, columns=["status"]).column("status").to_pylist()
        return sum(1 for s in status if s == SUCCESS)
    except (KeyError, pa.ArrowInvalid, ShardReadError):
        log.warning("%s: no usable img2dataset metadata beside it; counting its samples", url)
    try:
        return sum(1 for _ in tar_samples(url, read_regular(url)))
    except ShardReadError as exc:
        raise TrainingDataError(str(exc)) from exc


def split_pieces(pieces: list[Piece], parts: int) -> list[Piece]:
    """At least ``parts`` pieces: each split by row stride when there are fewer."""
    if len(pieces) >= parts:
        return pieces
    factor = -(-parts // len(pieces))
    return [replace(p, stride=factor, offset=k) for p in pieces for k in range(factor)]


@dataclass
class Row:
    """One training row: its key, image bytes (or None), captions, and why it cannot be used."""

    key: str
    image: bytes | None
    captions: list[str]
    skip: str | None = None
    source: int = -1  # index of the job's source it came from
    place: tuple = ()  # (file, row group, row): the same row in every epoch


def read_piece(piece: Piece) -> list[Row]:
    """The rows of a piece, in file order (``piece.count`` of them, or fewer for a short tar).

    A piece that cannot be read (a shard deleted, truncated or corrupted after it was listed)
    gives its rows as skipped (``unreadable_shard``), so one bad file never ends a training.
    """
    try:
        rows = _read_rows(piece)
        if piece.pairs:
            rows = _pairs(rows, piece)
    except (OSError, EOFError, tarfile.TarError, pa.ArrowException, ShardReadError,
            TrainingDataError, KeyError) as exc:
        where = piece.url if piece.group is None else f"{piece.url} row group {piece.group}"
        log.warning("%s: unreadable, its %d rows skipped (%s)", where, piece.count, exc)
        rows = [Row("", None, [], "unreadable_shard") for _ in range(piece.rows)]
    rows = rows[piece.offset::piece.stride]
    for n, row in enumerate(rows):
        row.source = piece.source
        row.place = row.place or (piece.url, piece.group, piece.offset + n * piece.stride)
    return rows


def _pairs(rows: list[Row], piece: Piece) -> list[Row]:
    """One row per caption, each keeping its image's place (decoded once, cached once)."""
    return [Row(row.key, row.image, [caption], row.skip, place=(piece.url, piece.group, n))
            for n, row in enumerate(rows) for caption in row.captions]


def _read_rows(piece: Piece) -> list[Row]:
    if piece.group is None:
        table, _ = webdataset_rows(piece.url, read_regular(piece.url))
        rows = _shard_rows(table, piece.url)
    else:
        with open_regular(piece.url) as (handle, size):
            file = pq.ParquetFile(handle)
            names = set(file.schema_arrow.names)
            wanted = (ROUND_COLUMNS + ROUND_OPTIONAL if piece.view
                      else ["key", "jpg", "caption", "status"])
            table = read_parquet(piece.url, file, size, [piece.group],
                                 [c for c in wanted if c in names])
        rows = _round_rows(table, piece.view) if piece.view else _shard_rows(table, piece.url)
    return rows


def _shard_rows(table: pa.Table, url: str) -> list[Row]:
    if "jpg" not in table.column_names:
        raise TrainingDataError("a training shard has no jpg column")
    n = table.num_rows
    keys = _strings(table, "key", n, url)
    captions = _strings(table, "caption", n, url)
    status = _strings(table, "status", n, url, default=SUCCESS)
    rows = []
    for key, image, caption, state in zip(keys, table.column("jpg").to_pylist(), captions, status):
        skip = None if state == SUCCESS else (state or "failed")
        rows.append(Row(key or "", image, [caption or ""], skip))
    return rows


def _round_rows(table: pa.Table, view: str) -> list[Row]:
    return [Row(row["key"], row["jpg"], round_captions(row, view)) for row in table.to_pylist()]


def _strings(table: pa.Table, name: str, n: int, url: str, default: str | None = None) -> list:
    """A text column as the round reads it (any string or binary type, bad UTF-8 replaced)."""
    if name not in table.column_names:
        return [default] * n
    return text_column(url, name, table.column(name)).to_pylist()


def round_captions(row: dict, view: str) -> list[str]:
    """The captions a round's output row offers under ``view`` (see the module docstring)."""
    if view == "kept":
        return list(row["kept_captions"] or [])
    if view == "kept_web":
        return [c for c, s in zip(row["kept_captions"] or [], row["kept_sources"] or [])
                if s == "web"]
    if view == "web_and_synthetic":  # every synthetic caption but those a guard set aside
        reasons = row.get("synthetic_guard") or []
        synthetic = [c for i, c in enumerate(row["synthetic_captions"] or [])
                     if i >= len(reasons) or reasons[i] is None]
        return [row["web_caption"] or ""] + synthetic
    if view == "web":
        return [row["web_caption"] or ""]
    raise TrainingDataError(f"unknown view {view!r}")


def source_rows(pieces: list[Piece], sources: list[Source]) -> list[dict]:
    """Rows per source as the metadata counts them (for manifests)."""
    counts = [0] * len(sources)
    for piece in pieces:
        counts[piece.source] += piece.count
    return [{"source": str(s), "rows": c} for s, c in zip(sources, counts)]


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])

