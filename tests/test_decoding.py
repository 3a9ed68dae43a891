"""Decoding in processes (GPU workers) gives what decoding in threads gives, and survives a
decoding process that dies."""

import os
import signal
from dataclasses import replace

import pyarrow as pa
import pytest
import torch

from capfilt.decoding import ProcessDecoder, ThreadDecoder
from capfilt.image_transform import ImageTransform
from capfilt.images import ImageRejected
from capfilt.sample_shards import draw_shape, jpeg_bytes
from capfilt.shard_reader import INPUT_SCHEMA

BASE = {"url": None, "caption": "c", "status": "success", "error_message": None}


def batch() -> list[dict]:
    images = [jpeg_bytes(draw_shape(shape, colour)) for shape, colour in
              [("circle", "red"), ("square", "blue"), ("triangle", "green"), ("circle", "blue")]]
    items = [{"key": f"k{i}", "jpg": data} for i, data in enumerate(images)]
    items.insert(1, {"key": "broken", "jpg": b"\xff\xd8\xff not a jpeg"})
    items.insert(3, {"key": "failed", "jpg": None, "status": "failed_to_download",
                     "error_message": "HTTP Error 404"})
    return pa.Table.from_pylist([{**BASE, **i} for i in items], schema=INPUT_SCHEMA).to_pylist()


def same(a, b) -> bool:
    if isinstance(a, ImageRejected):
        return isinstance(b, ImageRejected) and (a.reason, str(a)) == (b.reason, str(b))
    return a == b


@pytest.fixture(scope="module")
def transforms(loaded):
    caption = ImageTransform.from_processor(loaded["captioner"].processor.image_processor)
    return caption, replace(caption, height=24, width=20)


def test_processes_decode_as_threads_do_and_outlive_a_killed_process(transforms):
    caption, filter_ = transforms
    rows = batch()
    expected = ThreadDecoder(caption, filter_, threads=2)(rows, pin=False)
    decoder = ProcessDecoder(caption, filter_, processes=2)
    try:
        got = decoder(rows, pin=False)
        assert [o.reason if isinstance(o, ImageRejected) else o for o in got.outcomes] == [
            (64, 64), "undecodable_image", (64, 64), "failed_to_download", (64, 64), (64, 64)]
        assert all(same(a, b) for a, b in zip(got.outcomes, expected.outcomes))
        assert torch.equal(got.caption_pixels, expected.caption_pixels)
        assert got.filter_pixels.shape == (4, 3, 24, 20)
        assert torch.equal(got.filter_pixels, expected.filter_pixels)

        os.kill(next(iter(decoder.pool._processes)), signal.SIGKILL)  # a decoder that died
        again = decoder(rows, pin=False)
        assert all(same(a, b) for a, b in zip(again.outcomes, expected.outcomes))
        assert torch.equal(again.caption_pixels, expected.caption_pixels)

        assert decoder([], pin=False).outcomes == []

        decoder.filter = caption  # one transform: one block, one batch for both models
        shared = decoder(rows, pin=False)
        assert shared.filter_pixels is shared.caption_pixels
        assert torch.equal(shared.caption_pixels, expected.caption_pixels)
    finally:
        decoder.close()
