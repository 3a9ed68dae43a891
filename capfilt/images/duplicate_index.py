"""Which rows of a round show an image seen earlier in it: copies and near-copies.

"Earlier" is the order of the inputs (shard index, then row), so the same inputs give the same
marks whichever worker runs which shard first, and reruns stay byte-identical. A copy has the
same bytes (sha256); a near-copy is not a copy but has a difference hash within
``NEAR_DISTANCE`` bits and a mean colour within ``NEAR_COLOUR`` levels of an earlier image
that is itself neither. Each row names the first
image it repeats.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

EXACT, NEAR = "exact", "near"
MODES = ("off", "exact", "near")  # near: near-copies are rejected too, not only marked
# Bits two difference hashes of one picture may differ by: re-encoding at another JPEG quality
# or resizing moves a few bits; two different pictures differ by about half of the 64.
NEAR_DISTANCE = 4
# Levels (of 255) each channel of the mean colour may move: re-encoding moves it by one or two,
# a recoloured drawing of the same layout (same difference hash) by tens.
NEAR_COLOUR = 8
# A hash with fewer bits set than this comes from a nearly flat image (all white, one colour),
# which would match every other flat image: such images are compared by their bytes only.
MIN_DHASH_BITS = 4
# Pigeonhole: two hashes within NEAR_DISTANCE bits agree on at least one of NEAR_DISTANCE + 1
# disjoint bit ranges, so only images sharing a range (and a colour cell) are compared.
_BANDS = [(start, min(64, start + 13)) for start in range(0, 64, 13)]
# Mean colours are filed in cells of this many levels a channel; a lookup visits the cells
# within NEAR_COLOUR of the colour (one or two a channel).
_CELL = 16
MARKS_SCHEMA = pa.schema([("shard", pa.int32()), ("key", pa.string()), ("kind", pa.string()),
                          ("first_shard", pa.int32()), ("first_key", pa.string()),
                          ("distance", pa.int8())])


@dataclass(frozen=True)
class Mark:
    kind: str  # EXACT | NEAR
    first_shard: int
    first_key: str
    distance: int  # bits between the difference hashes; 0 for a copy

    def message(self) -> str:
        """The reject row's message for a row dropped as this kind of duplicate."""
        if self.kind == EXACT:
            return f"same image bytes as key {self.first_key!r} in shard {self.first_shard:05d}"
        return (f"looks like key {self.first_key!r} in shard {self.first_shard:05d} "
                f"(difference hashes {self.distance} bits apart)")


def find_duplicates(hashes: dict[int, pa.Table]) -> pa.Table:
    """``MARKS_SCHEMA`` rows for every repeat among ``hashes`` (shard index -> the shard's
    ``capfilt.images.fingerprints.HASHES_SCHEMA`` table), in input order."""
    if not hashes:
        return MARKS_SCHEMA.empty_table()
    table = pa.concat_tables([
        hashes[shard].append_column("shard", pa.array([shard] * hashes[shard].num_rows,
                                                      pa.int32()))
        for shard in sorted(hashes)])
    table = table.append_column("position", pa.array(range(table.num_rows), pa.int64()))
    # Copies: the first position of each sha256, in Arrow (no Python object per image).
    first = table.group_by("sha256", use_threads=False).aggregate([("position", "min")])
    table = table.join(first, "sha256").sort_by("position")
    repeat = pc.not_equal(table.column("position"), table.column("position_min"))
    copies = table.filter(repeat)
    firsts = table.take(copies.column("position_min"))  # row i of ``table`` is position i
    marks = list(zip(copies.column("position").to_pylist(), copies.column("shard").to_pylist(),
                     copies.column("key").to_pylist(), [EXACT] * copies.num_rows,
                     firsts.column("shard").to_pylist(), firsts.column("key").to_pylist(),
                     [0] * copies.num_rows))
    marks += _near_copies(table.filter(pc.invert(repeat)))
    marks = [mark[1:] for mark in sorted(marks)]
    columns = list(zip(*marks)) if marks else [[] for _ in MARKS_SCHEMA]
    return pa.table([pa.array(list(column), field.type)
                     for column, field in zip(columns, MARKS_SCHEMA)], schema=MARKS_SCHEMA)


def _near_copies(unique: pa.Table) -> list[tuple]:
    """(position, *mark) of the images (distinct bytes, in input order) that look like an
    earlier one."""
    marks = []
    originals: list[tuple[int, str, int, int]] = []  # (shard, key, dhash, colour)
    cells: dict[int, int | list[int]] = {}  # (band, band bits, colour cell) -> originals
    columns = ("position", "shard", "key", "dhash", "colour")
    for position, shard, key, code, colour in zip(*(unique.column(c).to_pylist()
                                                    for c in columns)):
        if code is None:
            continue
        code &= (1 << 64) - 1
        if code.bit_count() < MIN_DHASH_BITS:
            continue
        match = _nearest_earlier(code, colour, originals, cells)
        if match is not None:
            first_shard, first_key = originals[match[0]][:2]
            marks.append((position, shard, key, NEAR, first_shard, first_key, match[1]))
            continue
        for cell in _cells(code, _colour_cells(colour, own=True)):
            found = cells.get(cell)
            cells[cell] = len(originals) if found is None else (
                [*found, len(originals)] if isinstance(found, list) else [found, len(originals)])
        originals.append((shard, key, code, colour))
    return marks


def marks_by_shard(marks: pa.Table, kinds: tuple[str, ...]) -> dict[int, dict[str, Mark]]:
    """The marks of ``kinds`` grouped by shard: shard index -> {key: Mark}."""
    grouped: dict[int, dict[str, Mark]] = {}
    for row in marks.to_pylist():
        if row["kind"] in kinds:
            grouped.setdefault(row["shard"], {})[row["key"]] = Mark(
                row["kind"], row["first_shard"], row["first_key"], row["distance"])
    return grouped


def _nearest_earlier(code: int, colour: int, originals: list,
                     cells: dict) -> tuple[int, int] | None:
    """(index, distance) of the earliest original that looks the same, or None."""
    best = None
    for cell in _cells(code, _colour_cells(colour, own=False)):
        found = cells.get(cell)
        for index in (found if isinstance(found, list) else () if found is None else (found,)):
            if best is not None and index >= best[0]:
                continue
            distance = (code ^ originals[index][2]).bit_count()
            if distance <= NEAR_DISTANCE and _same_colour(colour, originals[index][3]):
                best = (index, distance)
    return best


def _colour_cells(colour: int, own: bool) -> list[int]:
    """The colour's own cell, or every cell within ``NEAR_COLOUR`` of it."""
    channels = [(colour >> shift) & 255 for shift in (16, 8, 0)]
    if own:
        spans = [(v // _CELL,) for v in channels]
    else:
        spans = [range(max(0, v - NEAR_COLOUR) // _CELL, min(255, v + NEAR_COLOUR) // _CELL + 1)
                 for v in channels]
    return [(r << 8) | (g << 4) | b for r in spans[0] for g in spans[1] for b in spans[2]]


def _cells(code: int, colours: list[int]) -> list[int]:
    """Keys of the (band, band bits, colour cell) cells of ``code`` in ``colours``."""
    return [(band << 32) | (((code >> start) & ((1 << (end - start)) - 1)) << 12) | colour
            for band, (start, end) in enumerate(_BANDS) for colour in colours]


def _same_colour(a: int, b: int) -> bool:
    return all(abs(((a >> shift) & 255) - ((b >> shift) & 255)) <= NEAR_COLOUR
               for shift in (16, 8, 0))
