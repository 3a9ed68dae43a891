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
# disjoint bit ranges, so only images sharing a range are compared.
_BANDS = [(start, min(64, start + 13)) for start in range(0, 64, 13)]
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
    ``capfilt.image_hashes.HASHES_SCHEMA`` table), in input order."""
    first_copy: dict[bytes, tuple[int, str]] = {}
    originals: list[tuple[int, str, int, int]] = []  # (shard, key, dhash, colour): by look
    bands: list[dict[int, list[int]]] = [{} for _ in _BANDS]
    marks = []
    for shard in sorted(hashes):
        table = hashes[shard]
        for key, digest, code, colour in zip(table.column("key").to_pylist(),
                                             table.column("sha256").to_pylist(),
                                             table.column("dhash").to_pylist(),
                                             table.column("colour").to_pylist()):
            if digest in first_copy:
                first_shard, first_key = first_copy[digest]
                marks.append((shard, key, EXACT, first_shard, first_key, 0))
                continue
            first_copy[digest] = (shard, key)
            if code is None or _bits(code) < MIN_DHASH_BITS:
                continue
            code &= (1 << 64) - 1
            match = _nearest_earlier(code, colour, originals, bands)
            if match is not None:
                index, distance = match
                first_shard, first_key = originals[index][:2]
                marks.append((shard, key, NEAR, first_shard, first_key, distance))
                continue
            for band, (start, end) in zip(bands, _BANDS):
                band.setdefault(_band(code, start, end), []).append(len(originals))
            originals.append((shard, key, code, colour))
    columns = list(zip(*marks)) if marks else [[] for _ in MARKS_SCHEMA]
    return pa.table([pa.array(list(column), field.type)
                     for column, field in zip(columns, MARKS_SCHEMA)], schema=MARKS_SCHEMA)


def marks_by_shard(marks: pa.Table, kinds: tuple[str, ...]) -> dict[int, dict[str, Mark]]:
    """The marks of ``kinds`` grouped by shard: shard index -> {key: Mark}."""
    grouped: dict[int, dict[str, Mark]] = {}
    for row in marks.to_pylist():
        if row["kind"] in kinds:
            grouped.setdefault(row["shard"], {})[row["key"]] = Mark(
                row["kind"], row["first_shard"], row["first_key"], row["distance"])
    return grouped


def _nearest_earlier(code: int, colour: int, originals: list,
                     bands: list) -> tuple[int, int] | None:
    """(index, distance) of the earliest original that looks the same, or None."""
    best = None
    for band, (start, end) in zip(bands, _BANDS):
        for index in band.get(_band(code, start, end), ()):
            if best is not None and index >= best[0]:
                continue
            distance = _bits(code ^ originals[index][2])
            if distance <= NEAR_DISTANCE and _same_colour(colour, originals[index][3]):
                best = (index, distance)
    return best


def _same_colour(a: int, b: int) -> bool:
    return all(abs(((a >> shift) & 255) - ((b >> shift) & 255)) <= NEAR_COLOUR
               for shift in (16, 8, 0))


def _band(code: int, start: int, end: int) -> int:
    return (code >> start) & ((1 << (end - start)) - 1)


def _bits(code: int) -> int:
    return bin(code & ((1 << 64) - 1)).count("1")
