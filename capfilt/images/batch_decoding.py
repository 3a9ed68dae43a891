"""A batch's images decoded once and resized for both models, in threads or in processes.

Threads suit a CPU worker: the models use the cores, and decoding is a small share. On a GPU
worker the model loop is one Python thread launching thousands of kernels per batch, and
decode threads take the GIL from it between launches: at 1,024 images per batch on an H100,
the loop ran 1.8 s a batch inside a shard against 1.3 s alone (bench/README.md). There,
``ProcessDecoder`` decodes in worker processes into shared memory, and the model process only
copies the finished batch into pinned memory.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import torch

from capfilt.images.decode import ImageRejected, decode_image
from capfilt.images.transform import ImageTransform
from capfilt.shards.input_rows import SUCCESS

log = logging.getLogger(__name__)
# A decoding process's /proc/self/oom_score_adj: the most killable (a process may raise its own).
OOM_SCORE_ADJ = 1000


@dataclass
class Decoded:
    """Per input row its (width, height) or its ``ImageRejected``; the accepted rows' pixels,
    stacked (uint8, one tensor when both models share the transform)."""

    outcomes: list = field(default_factory=list)
    caption_pixels: torch.Tensor | None = None
    filter_pixels: torch.Tensor | None = None


def decode_row(row: dict, caption: ImageTransform, filter_: ImageTransform):
    """(caption pixels, filter pixels, (width, height)), or the ``ImageRejected``."""
    if row["status"] != SUCCESS:
        # img2dataset's own status (failed_to_download, failed_to_resize) is the reason.
        return ImageRejected(row["status"] or "failed", row["error_message"] or "no image")
    try:
        image = decode_image(row["jpg"])
    except ImageRejected as exc:
        return exc
    caption_pixels = caption.resize(image)
    filter_pixels = caption_pixels if filter_ == caption else filter_.resize(image)
    return caption_pixels, filter_pixels, image.size


def stack_pixels(images: list[torch.Tensor], pin: bool) -> torch.Tensor:
    """One uint8 batch; in page-locked memory when it goes to a GPU, so the copy is direct
    and does not hold up the host."""
    batch = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype, pin_memory=pin)
    return torch.stack(images, out=batch)


class ThreadDecoder:
    def __init__(self, caption: ImageTransform, filter_: ImageTransform, threads: int):
        self.caption, self.filter = caption, filter_
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads))

    def __call__(self, rows: list[dict], pin: bool) -> Decoded:
        decoded = Decoded()
        caption, filter_ = [], []
        for outcome in self.pool.map(lambda row: decode_row(row, self.caption, self.filter), rows):
            if isinstance(outcome, ImageRejected):
                decoded.outcomes.append(outcome)
                continue
            caption.append(outcome[0])
            filter_.append(outcome[1])
            decoded.outcomes.append(outcome[2])
        if caption:
            decoded.caption_pixels = stack_pixels(caption, pin)
            decoded.filter_pixels = (decoded.caption_pixels if self.filter == self.caption
                                     else stack_pixels(filter_, pin))
        return decoded

    def close(self) -> None:
        self.pool.shutdown()


class ProcessDecoder:
    """``processes`` worker processes (spawned: the parent may hold a CUDA context) decode
    contiguous parts of the batch into a shared-memory block per model, reused from batch to
    batch: calls take turns (a worker decodes one shard's next batch and another's first at
    once, from two threads).

    A worker that dies (a decoder crash on some file, or the kernel's OOM killer, which picks
    decoding processes first) breaks the pool: the pool is restarted and that part is decoded
    again one image per task, so only the image that kills a worker again is rejected
    (``decoder_crashed``). Workers that keep dying on one image after another are not the
    images' fault (memory, a full ``/dev/shm``): that raises instead. A batch whose block
    ``/dev/shm`` cannot hold (containers often give it 64 MB) is decoded in threads, with a
    warning.
    """

    MAX_CRASHES = 2  # per part; more and the processes, not the images, are failing

    def __init__(self, caption: ImageTransform, filter_: ImageTransform, processes: int):
        self.caption, self.filter = caption, filter_
        self.processes = max(1, processes)
        self.pool = self._start()
        self.blocks: list[SharedMemory] = []
        self.fallback: ThreadDecoder | None = None
        self.turn = threading.Lock()  # one batch at a time in the shared blocks

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_decoding_process)

    def __call__(self, rows: list[dict], pin: bool) -> Decoded:
        if not rows:
            return Decoded()
        with self.turn:
            return self._decode_batch(rows, pin)

    def _decode_batch(self, rows: list[dict], pin: bool) -> Decoded:
        shared = self.filter == self.caption
        shapes = [(len(rows), 3, t.height, t.width) for t in
                  ((self.caption,) if shared else (self.caption, self.filter))]
        if not self._hold([int(np.prod(shape)) for shape in shapes]):
            if self.fallback is None:
                log.warning("/dev/shm cannot hold a batch of %d images: decoding in threads",
                            len(rows))
                self.fallback = ThreadDecoder(self.caption, self.filter, self.processes)
            return self.fallback(rows, pin)
        outcomes = self._decode(rows, [(b.name, s) for b, s in zip(self.blocks, shapes)])
        decoded = Decoded(outcomes)
        accepted = [i for i, o in enumerate(outcomes) if not isinstance(o, ImageRejected)]
        if accepted:
            index = torch.tensor(accepted)
            pixels = []
            for block, shape in zip(self.blocks, shapes):
                source = torch.from_numpy(np.ndarray(shape, np.uint8, block.buf))
                batch = torch.empty((len(accepted), *shape[1:]), dtype=torch.uint8, pin_memory=pin)
                pixels.append(torch.index_select(source, 0, index, out=batch))
            decoded.caption_pixels, decoded.filter_pixels = pixels[0], pixels[-1]
        return decoded

    def _hold(self, sizes: list[int]) -> bool:
        """Blocks of at least ``sizes`` bytes in ``self.blocks`` (kept if big enough); False
        if ``/dev/shm`` has not the room."""
        if len(self.blocks) == len(sizes) and all(
                b.size >= n for b, n in zip(self.blocks, sizes)):
            return True
        self._release()
        if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free < sum(sizes):
            return False
        self.blocks = [SharedMemory(create=True, size=max(1, n)) for n in sizes]
        return True

    def _release(self) -> None:
        for block in self.blocks:
            block.close()
            block.unlink()
        self.blocks = []

    def _decode(self, rows: list[dict], blocks: list) -> list:
        slots = list(enumerate(rows))
        size = -(-len(slots) // self.processes)
        parts = [slots[i : i + size] for i in range(0, len(slots), size)]
        try:
            futures = self._submit(blocks, parts)
        except BrokenProcessPool:  # a worker died after the last batch
            self._restart()
            futures = self._submit(blocks, parts)
        outcomes: dict[int, object] = {}
        broken = []
        for part, future in zip(parts, futures):
            try:
                outcomes.update(future.result())
            except BrokenProcessPool:
                broken.append(part)
        if broken:
            self._restart()
        for part in broken:
            outcomes.update(self._one_by_one(blocks, part))
        return [_outcome(outcomes[i]) for i in range(len(rows))]

    def _submit(self, blocks: list, parts: list[list]) -> list:
        return [self.pool.submit(_decode_part, self.transforms, blocks, part) for part in parts]

    def close(self) -> None:
        self.pool.shutdown()
        self._release()
        if self.fallback is not None:
            self.fallback.close()

    @property
    def transforms(self) -> tuple[ImageTransform, ImageTransform]:
        return self.caption, self.filter

    def _restart(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._start()

    def _one_by_one(self, blocks: list, part: list) -> dict:
        outcomes, crashes = {}, 0
        for slot, row in part:
            try:
                outcomes.update(self._submit(blocks, [[(slot, row)]])[0].result())
            except BrokenProcessPool:
                crashes += 1
                if crashes > self.MAX_CRASHES:
                    raise RuntimeError(
                        f"decoding processes died on {crashes} images of {len(part)}: not the "
                        "images' fault (is memory or /dev/shm full?)") from None
                outcomes[slot] = ("decoder_crashed", "decoding this image killed the decoding process")
                self._restart()
        return outcomes


def _start_decoding_process() -> None:
    """One torch thread (the pool is the parallelism); first in line for the kernel's OOM
    killer, so that an image too big for the memory left costs a decoding process, which the
    pool replaces and which rejects that image (``decoder_crashed``), not the worker that holds
    the models."""
    torch.set_num_threads(1)
    try:
        with open("/proc/self/oom_score_adj", "w") as adj:
            adj.write(str(OOM_SCORE_ADJ))
    except OSError:  # not Linux, or not allowed here: the kernel chooses as it would
        pass


def _outcome(value):
    """A worker's (reason, message) back into ``ImageRejected``; sizes pass through."""
    if isinstance(value[0], str):
        return ImageRejected(*value)
    return tuple(value)


def _decode_part(transforms: tuple, blocks: list, part: list) -> dict:
    """Decode ``part`` (slot, row) into the shared blocks; {slot: size or (reason, message)}.
    One image at a time per process (``torch.set_num_threads(1)``): the pool is the parallelism."""
    caption, filter_ = transforms
    # Attaching registers the block with the resource tracker again, the parent's (spawned
    # processes share it), which holds each name once; the parent unlinks and unregisters it.
    opened = [SharedMemory(name=name) for name, _ in blocks]
    arrays = [np.ndarray(shape, np.uint8, block.buf) for block, (_, shape) in zip(opened, blocks)]
    results = {}
    try:
        for slot, row in part:
            outcome = decode_row(row, caption, filter_)
            if isinstance(outcome, ImageRejected):
                results[slot] = (outcome.reason, str(outcome))
                continue
            arrays[0][slot] = outcome[0].numpy()
            if len(arrays) > 1:
                arrays[1][slot] = outcome[1].numpy()
            results[slot] = outcome[2]
        return results
    finally:
        del arrays
        for block in opened:
            block.close()
