"""The order in which a training job sees its rows: a pure function of the seed and the slots.

A *slot* is one reader: loader process ``j`` of training rank ``r`` is slot
``r * per_rank + j``. In epoch ``e`` the pieces are shuffled (seeded by ``e``) and dealt to the
slots in turn, so each rank reads only its own part of the data. A slot's rows in that epoch are
cut into windows of ``buffer`` rows; each window is read whole and shuffled (a bounded shuffle:
a window's rows are the only ones held). When a slot's pieces are exhausted it goes on into the
next epoch, so every slot yields rows forever and every rank takes the same number of rows per
step whatever the sizes of its pieces; the training loop decides when to stop. A slot holds its
window's rows not yet handed out and the last piece it read (windows cross piece boundaries):
about ``buffer`` + one row group of encoded images (a whole tar, for webdataset input).

A slot's place is a ``Position`` (epoch, window, offset into the shuffled window). A batch
carries the position after its last row; a checkpoint stores every slot's, and a resumed slot
re-reads that one window and goes on from the offset: the rows, crops and captions of an
uninterrupted run, with no pass over the rows before it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from capfilt.train.sources import Piece, Row


@dataclass(frozen=True)
class Position:
    """Where a slot resumes: the row at ``offset`` of shuffled window ``window`` of ``epoch``."""

    epoch: int = 0
    window: int = 0
    offset: int = 0

    def to_list(self) -> list[int]:
        return [self.epoch, self.window, self.offset]


@dataclass(frozen=True)
class Place:
    """Where a row came from in the stream, which seeds its caption choice and its crop."""

    epoch: int
    window: int
    index: int


def seeded(seed: int, *parts) -> random.Random:
    """A generator that depends on the seed and ``parts`` only (not on Python's hash seed)."""
    text = ":".join(str(p) for p in (seed, *parts))
    return random.Random(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big"))


class SlotStream:
    """The endless, seeded sequence of rows one slot reads."""

    def __init__(self, pieces: list[Piece], slot: int, slots: int, seed: int, buffer: int,
                 read: Callable[[Piece], list[Row]]):
        if len(pieces) < slots:
            raise ValueError(f"{len(pieces)} pieces for {slots} readers: split them first")
        self.pieces = pieces
        self.slot = slot
        self.slots = slots
        self.seed = seed
        self.buffer = buffer
        self.read = read
        self._cache: tuple[Piece, list[Row]] | None = None

    def epoch_pieces(self, epoch: int) -> list[Piece]:
        """This slot's pieces in ``epoch``: every piece shuffled, then dealt to the slots."""
        order = list(self.pieces)
        seeded(self.seed, "pieces", epoch).shuffle(order)
        return order[self.slot :: self.slots]

    def window_order(self, epoch: int, window: int, size: int) -> list[int]:
        order = list(range(size))
        seeded(self.seed, "window", epoch, self.slot, window).shuffle(order)
        return order

    def rows(self, start: Position = Position()) -> Iterator[tuple[Row, Place, Position]]:
        """(row, where it came from, the position after it), from ``start`` on, forever."""
        epoch, window, offset = start.epoch, start.window, start.offset
        while True:
            pieces = self.epoch_pieces(epoch)
            total = sum(p.count for p in pieces)
            while window * self.buffer < total:
                rows = self._window_rows(pieces, window * self.buffer,
                                         min(total, (window + 1) * self.buffer))
                order = self.window_order(epoch, window, len(rows))
                for index in range(offset, len(order)):
                    row, rows[order[index]] = rows[order[index]], None  # hold only what is left
                    yield row, Place(epoch, window, index), Position(epoch, window, index + 1)
                window, offset = window + 1, 0
            epoch, window, offset = epoch + 1, 0, 0

    def _window_rows(self, pieces: list[Piece], start: int, stop: int) -> list[Row]:
        """Rows ``start:stop`` of the slot's epoch, by the metadata's counts; a row the file
        turns out not to have (a tar shorter than its metadata says) is skipped as
        ``missing_row``."""
        out: list[Row] = []
        first = 0
        for piece in pieces:
            last = first + piece.count
            if last > start and first < stop:
                rows = self._read(piece)
                for n in range(max(start, first) - first, min(stop, last) - first):
                    out.append(rows[n] if n < len(rows)
                               else Row("", None, [], "missing_row", piece.source))
            first = last
            if first >= stop:
                break
        return out

    def _read(self, piece: Piece) -> list[Row]:
        # Windows cross piece boundaries: keep the last piece for the next window.
        if self._cache is None or self._cache[0] != piece:
            self._cache = (piece, self.read(piece))
        return self._cache[1]
