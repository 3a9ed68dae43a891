"""Batches for a training rank, made in loader processes beside the step.

Each of a rank's ``loader_workers`` torch DataLoader processes is one slot of the stream
(``capfilt/train/stream.py``): it reads its own pieces, decodes the JPEGs, applies BLIP's
augmentation (random resized crop, scale 0.5-1, and a horizontal flip), resizes to uint8,
tokenises, and hands whole batches over shared memory. The DataLoader takes batches from its
processes in turn, so batch ``i`` of a rank comes from slot ``i mod loader_workers``; a resumed
run rotates the processes so that this still holds.

Why DataLoader processes and not Ray Data: the same code runs in one process on a laptop and in
every Ray Train worker; the order is a function of (seed, ranks, loader processes), which Ray
Data's streaming split does not promise; and a resumed run restarts mid-epoch at the row it had
reached, which a Ray Data iterator cannot. Normalising to float runs where the step runs (on a
GPU, a quarter of the bytes cross the bus).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from capfilt.images.decode import ImageRejected, decode_image
from capfilt.images.transform import ImageTransform
from capfilt.train.sources import Piece, Row, TrainingDataError, read_piece, split_pieces
from capfilt.train.stream import Place, Position, SlotStream, seeded
from capfilt.train.text import TextEncoding

AUGMENTATIONS = ("blip", "none")
# BLIP's train transform: RandomResizedCrop(scale=(0.5, 1.0)) and a horizontal flip.
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


@dataclass
class TrainBatch:
    """One rank's share of a global batch, and where its slot stands after it."""

    pixels: torch.Tensor  # uint8 (n, 3, height, width)
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    texts: list[str]
    slot: int
    position: Position
    skipped: Counter = field(default_factory=Counter)  # (source index, reason) -> rows

    def pin_memory(self) -> TrainBatch:
        self.pixels = self.pixels.pin_memory()
        self.input_ids = self.input_ids.pin_memory()
        self.attention_mask = self.attention_mask.pin_memory()
        return self


@dataclass(frozen=True)
class StreamSpec:
    """What a rank's loader needs; plain data, so it travels to loader processes."""

    pieces: tuple[Piece, ...]
    transform: ImageTransform
    text: TextEncoding
    batch_size: int  # per rank
    seed: int
    augment: str = "blip"
    buffer: int = 512
    loader_workers: int = 2
    cache_mib: float = 0  # decoded pixels each reader keeps when there is no augmentation

    def __post_init__(self):
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment {self.augment!r}: use one of {', '.join(AUGMENTATIONS)}")

    @property
    def decode_at_least(self) -> tuple[int, int]:
        """The smallest decoded size that still gives the model full-resolution pixels: a crop
        keeps at least half the area (0.6 of a side), so twice the model's longer side."""
        side = 2 * max(self.transform.height, self.transform.width)
        return side, side

    @property
    def per_rank(self) -> int:
        """Slots per rank: one in-process reader when ``loader_workers`` is 0."""
        return max(1, self.loader_workers)


class RankStream(IterableDataset):
    """A rank's batches; in a DataLoader process, that process's slot's batches."""

    def __init__(self, spec: StreamSpec, rank: int, world: int,
                 positions: dict[int, Position] | None = None, first: int = 0):
        super().__init__()
        self.spec = spec
        self.rank = rank
        self.world = world
        self.positions = positions or {}
        self.first = first  # which of the rank's slots the first process serves (resume)
        self.pieces = split_pieces(list(spec.pieces), world * spec.per_rank)

    def __iter__(self) -> Iterator[TrainBatch]:
        info = get_worker_info()
        local = ((info.id if info else 0) + self.first) % self.spec.per_rank
        slot = self.rank * self.spec.per_rank + local
        return slot_batches(self.spec, self.pieces, slot, self.world * self.spec.per_rank,
                            self.positions.get(slot, Position()))


def slot_batches(spec: StreamSpec, pieces: list[Piece], slot: int, slots: int,
                 start: Position) -> Iterator[TrainBatch]:
    """Whole batches of one slot, forever; rows that cannot be trained on are counted."""
    stream = SlotStream(pieces, slot, slots, spec.seed, spec.buffer, read_piece)
    pixels, texts, skipped = [], [], Counter()
    # A run of unusable rows longer than the whole set means this reader would never fill a
    # batch again (every row it is dealt fails): say so rather than spin.
    limit, unusable = sum(p.count for p in pieces), 0
    decoded = DecodedPixels(spec.cache_mib if spec.augment == "none" else 0)
    for row, place, after in stream.rows(start):
        sample = make_sample(row, place, spec, slot, decoded)
        if isinstance(sample, str):
            skipped[(row.source, sample)] += 1
            unusable += 1
            if unusable > limit:
                raise TrainingDataError(f"reader {slot} found no usable row in {unusable} rows "
                                        f"running; skipped so far: {dict(skipped)}")
            continue
        unusable = 0
        pixels.append(sample[0])
        texts.append(sample[1])
        if len(texts) == spec.batch_size:
            ids, mask = spec.text(texts)
            yield TrainBatch(torch.stack(pixels), ids, mask, texts, slot, after, skipped)
            pixels, texts, skipped = [], [], Counter()


class DecodedPixels:
    """A reader's decoded pixels of rows it has seen, up to ``mib``: without augmentation a
    row's pixels are the same in every epoch (decoding was a quarter of a demo captioner step).
    Bounded, so a large set fills it and then decodes as usual."""

    def __init__(self, mib: float):
        self.left = int(mib * 2**20)
        self.pixels: dict[tuple, torch.Tensor] = {}

    def get(self, row: Row) -> torch.Tensor | None:
        return self.pixels.get(row.place)

    def put(self, row: Row, pixels: torch.Tensor) -> None:
        size = pixels.numel() * pixels.element_size()
        if row.place and size <= self.left:
            self.pixels[row.place] = pixels
            self.left -= size


def make_sample(row: Row, place: Place, spec: StreamSpec, slot: int,
                decoded: DecodedPixels | None = None) -> tuple[torch.Tensor, str] | str:
    """(uint8 pixels, one caption) for a row, or the reason it is skipped."""
    if row.skip:
        return row.skip
    captions = [c for c in row.captions if c and c.strip()]
    if not captions:
        return "no_caption"
    rng = seeded(spec.seed, "row", place.epoch, slot, place.window, place.index)
    pixels = decoded.get(row) if decoded else None
    if pixels is None:
        try:
            image = decode_image(row.image, at_least=spec.decode_at_least)
        except ImageRejected as exc:
            return exc.reason
        if spec.augment == "blip":
            image = random_resized_crop(image, rng)
        pixels = spec.transform.resize(image)
        if decoded:
            decoded.put(row, pixels)
    return pixels, rng.choice(captions)


def random_resized_crop(image: Image.Image, rng) -> Image.Image:
    """torchvision's RandomResizedCrop parameters (scale 0.5-1) and a horizontal flip, seeded."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            box = (left, top, left + w, top + h)
            break
    else:  # torchvision's fallback: a centre crop, its ratio clamped to the range
        ratio = width / height
        w, h = width, height
        if ratio < CROP_RATIO[0]:
            h = int(round(width / CROP_RATIO[0]))
        elif ratio > CROP_RATIO[1]:
            w = int(round(height * CROP_RATIO[1]))
        left, top = (width - w) // 2, (height - h) // 2
        box = (left, top, left + w, top + h)
    image = image.crop(box)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def rank_loader(spec: StreamSpec, rank: int, world: int, done_steps: int,
                positions: dict[int, Position] | None, pin_memory: bool = False) -> DataLoader:
    """The DataLoader of one rank, resumed after ``done_steps`` steps at ``positions``."""
    dataset = RankStream(spec, rank, world, positions, first=done_steps % spec.per_rank)
    workers = spec.loader_workers
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=2 if workers else None, persistent_workers=False,
                      worker_init_fn=yield_to_the_step if workers else None)


# Niceness of the decoding processes. Where cores are short (a CPU machine), the step's threads
# come first and decoding fills the gaps between them; where cores are free (a GPU machine's
# host), it changes nothing.
LOADER_NICENESS = 10


def yield_to_the_step(worker_id: int) -> None:
    os.nice(LOADER_NICENESS)
    # One thread of tokenising per process: the processes are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
