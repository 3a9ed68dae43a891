"""Training pairs from round folders and img2dataset shards, and the batches built from them.

Every image comes with the captions it may be trained on; a step samples one of them per image,
as BLIP-2 does with its two kept captions. A round folder offers views of its rows, which is
how BLIP's Table 1 ablation is read off one CapFilt round:

- ``kept``: the kept captions, web and synthetic (CapFilt: filter and captioner);
- ``kept_web``: the kept web captions only (filter only);
- ``web_and_synthetic``: the web caption and every synthetic one, unfiltered (captioner only);
- ``web``: the web caption alone (no CapFilt).

Batches are a pure function of (seed, step): a resumed run sees the very batches, captions and
crops that an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from dataclasses import dataclass, field

import fsspec
import pyarrow.parquet as pq
import torch
from PIL import Image

from capfilt.image_transform import ImageTransform
from capfilt.images import ImageRejected, decode_image
from capfilt.shard_reader import SUCCESS, expand_inputs, read_shard

VIEWS = ("kept", "kept_web", "web_and_synthetic", "web")
AUGMENTATIONS = ("blip", "none")
# BLIP's train transform: RandomResizedCrop(scale=(0.5, 1.0)) and a horizontal flip.
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


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
        path, _, view = text.partition("@")
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


@dataclass
class SourceCount:
    """What one source gave: rows read, images used, and why the others were not."""

    source: str
    rows: int = 0
    images: int = 0
    captions: int = 0
    skipped: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {"source": self.source, "rows": self.rows, "images": self.images,
                "captions": self.captions, "skipped": dict(sorted(self.skipped.items()))}


@dataclass
class TrainingData:
    """Images (encoded bytes) and the captions each may be trained on."""

    keys: list[str] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    captions: list[tuple[str, ...]] = field(default_factory=list)
    counts: list[SourceCount] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: str, image: bytes, captions: list[str], count: SourceCount) -> None:
        captions = [c for c in captions if c and c.strip()]
        if not captions:
            count.skipped["no_caption"] += 1
            return
        try:
            decode_image(image)
        except ImageRejected as exc:
            count.skipped[exc.reason] += 1
            return
        self.keys.append(key)
        self.images.append(image)
        self.captions.append(tuple(captions))
        count.images += 1
        count.captions += len(captions)


def load_training_data(sources: list[Source]) -> TrainingData:
    """Read every source whole; each input row is used or counted as skipped with its reason."""
    data = TrainingData()
    for source in sources:
        count = SourceCount(str(source))
        if source.view is None:
            _add_shards(data, source, count)
        else:
            _add_round(data, source, count)
        data.counts.append(count)
    if not data.keys:
        raise TrainingDataError("no image with a caption in " + ", ".join(map(str, sources)))
    return data


def _add_shards(data: TrainingData, source: Source, count: SourceCount) -> None:
    for url in expand_inputs([source.path]):
        table = read_shard(url).table.to_pylist()
        for row in table:
            count.rows += 1
            if row["status"] != SUCCESS:
                count.skipped[row["status"] or "failed"] += 1
                continue
            data.add(row["key"], row["jpg"], [row["caption"] or ""], count)


def _add_round(data: TrainingData, source: Source, count: SourceCount) -> None:
    fs, root = fsspec.core.url_to_fs(source.path)
    files = sorted(fs.glob(_join(root, "shards", "*.parquet")))
    if not files:
        raise TrainingDataError(f"{source.path}: round folder has no shards/*.parquet")
    for file in files:
        with fs.open(file, "rb") as handle:
            rows = pq.read_table(handle).to_pylist()
        for row in rows:
            count.rows += 1
            data.add(row["key"], row["jpg"], round_captions(row, source.view), count)


def round_captions(row: dict, view: str) -> list[str]:
    """The captions a round's output row offers under ``view`` (see the module docstring)."""
    if view == "kept":
        return list(row["kept_captions"])
    if view == "kept_web":
        return [c for c, s in zip(row["kept_captions"], row["kept_sources"]) if s == "web"]
    if view == "web_and_synthetic":
        return [row["web_caption"] or ""] + list(row["synthetic_captions"])
    if view == "web":
        return [row["web_caption"] or ""]
    raise TrainingDataError(f"unknown view {view!r}")


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _rng(seed: int, *parts) -> random.Random:
    text = ":".join(str(p) for p in (seed, *parts))
    return random.Random(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big"))


def batch_indices(step: int, batch_size: int, size: int, seed: int) -> list[int]:
    """The images of global batch ``step``: consecutive slices of one permutation per epoch."""
    start = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), size)
        order = list(range(size))
        _rng(seed, "epoch", epoch).shuffle(order)
        out += order[offset : offset + batch_size - len(out)]
    return out


def batches_for(data: TrainingData, processor, config) -> "BatchMaker":
    """The batches of ``config`` (a ``TrainConfig``) with the processor's eval transform."""
    transform = ImageTransform.from_processor(processor.image_processor)
    return BatchMaker(data, transform, config.batch_size, config.seed, config.augment)


# Decoded pixels (float32, as the model takes them) kept per process, so per rank under DDP,
# when training without augmentation: the demo world's 5,000 pictures (48 px) take 132 MiB; at
# 384 px this holds about 600 pictures, the rest are decoded at each step as with augmentation.
CACHE_MIB = 1024


class BatchMaker:
    """(step, rank, world) -> pixel values and one caption per image for that rank's share.

    Without augmentation an image's pixels are the same at every step, so they are decoded once
    and kept while they fit in ``cache_mib`` (decoding was a quarter of a demo captioner step).
    """

    def __init__(self, data: TrainingData, transform: ImageTransform, batch_size: int,
                 seed: int, augment: str = "blip", cache_mib: float = CACHE_MIB):
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment {augment!r}: use one of {', '.join(AUGMENTATIONS)}")
        if batch_size > len(data):
            raise TrainingDataError(
                f"batch size {batch_size} is larger than the {len(data)} training images"
            )
        self.data = data
        self.transform = transform
        self.batch_size = batch_size
        self.seed = seed
        self.augment = augment
        self._cache: dict[int, torch.Tensor] = {}
        self._cache_left = int(cache_mib * 2**20) if augment == "none" else 0

    @property
    def cached(self) -> int:
        """How many images' pixels are held decoded."""
        return len(self._cache)

    def __call__(self, step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, list[str]]:
        indices = batch_indices(step, self.batch_size, len(self.data), self.seed)[rank::world]
        pixels, texts = [], []
        for index in indices:
            rng = _rng(self.seed, "item", step, index)
            pixels.append(self._pixels(index, rng))
            texts.append(rng.choice(self.data.captions[index]))
        return torch.stack(pixels), texts

    def _pixels(self, index: int, rng: random.Random) -> torch.Tensor:
        if index in self._cache:
            return self._cache[index]
        image = decode_image(self.data.images[index])
        if self.augment == "blip":
            image = random_resized_crop(image, rng)
        pixels = self.transform(image)
        size = pixels.numel() * pixels.element_size()
        if size <= self._cache_left:
            self._cache[index] = pixels
            self._cache_left -= size
        return pixels


def random_resized_crop(image: Image.Image, rng: random.Random) -> Image.Image:
    """torchvision's RandomResizedCrop parameters (scale 0.5-1) and a horizontal flip, seeded."""
    width, height = image.size
    area = width * height
    box = (0, 0, width, height)
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
    image = image.crop(box)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image

