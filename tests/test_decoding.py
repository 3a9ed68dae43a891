"""Decoding in processes (GPU workers) gives what decoding in threads gives, and survives a
decoding process that dies."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from PIL import Image

from capfilt.images.batch_decoding import ProcessDecoder, ThreadDecoder
from capfilt.images.decode import ImageRejected
from capfilt.images.transform import ImageTransform
from capfilt.shards.input_rows import INPUT_SCHEMA
from capfilt.shards.samples import draw_shape, jpeg_bytes

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


def outcome_summary(got, expected) -> dict:
    """What the child scripts below print of a decoded batch: each row's size or reason, and
    whether its pixels equal those of ``expected`` (decoded in threads)."""
    return {"outcomes": [o.reason if isinstance(o, ImageRejected) else list(o)
                         for o in got.outcomes],
            "same": torch.equal(got.caption_pixels, expected.caption_pixels)
            and torch.equal(got.filter_pixels, expected.filter_pixels)}


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


def test_two_threads_decoding_at_once_each_get_their_own_batch(transforms):
    """A worker decodes one shard's next batch and the next shard's first batch at once, from
    two threads, through the one set of shared blocks; the second batch is larger, so an
    unguarded decoder would also reallocate the blocks under the first."""
    caption, filter_ = transforms
    shades = [(shape, colour, shade) for shade in (0, 500, 900)
              for shape, colour in [("triangle", "red"), ("square", "green"), ("circle", "blue")]]
    items = [{"key": f"o{i}", "jpg": jpeg_bytes(draw_shape(shape, colour, shade=shade))}
             for i, (shape, colour, shade) in enumerate(shades)]
    batches = {"first": batch(), "second": pa.Table.from_pylist(
        [{**BASE, **i} for i in items], schema=INPUT_SCHEMA).to_pylist()}
    expected = {name: ThreadDecoder(caption, filter_, threads=2)(rows, pin=False)
                for name, rows in batches.items()}
    decoder = ProcessDecoder(caption, filter_, processes=2)
    try:
        def decode_again(rows):
            return [decoder(rows, pin=False) for _ in range(6)]

        with ThreadPoolExecutor(max_workers=2) as both:
            decoded = dict(zip(batches, both.map(decode_again, batches.values())))
        for name, runs in decoded.items():
            for got in runs:
                assert torch.equal(got.caption_pixels, expected[name].caption_pixels), name
                assert torch.equal(got.filter_pixels, expected[name].filter_pixels), name
    finally:
        decoder.close()


SMALL_SHM_CHILD = """
import json, logging, sys
from capfilt.images.batch_decoding import ProcessDecoder, ThreadDecoder
from capfilt.images.transform import ImageTransform
from tests.test_decoding import batch, outcome_summary


def main():
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    caption = ImageTransform(224, 224, "bicubic", (0.5,) * 3, (0.25,) * 3)
    filter_ = ImageTransform(24, 20, "bicubic", (0.5,) * 3, (0.25,) * 3)
    rows = batch()
    expected = ThreadDecoder(caption, filter_, threads=2)(rows, pin=False)
    decoder = ProcessDecoder(caption, filter_, processes=2)
    try:
        got = decoder(rows, pin=False)
        print(json.dumps({"threads": decoder.fallback is not None,
                          "pool_started": bool(decoder.pool._processes),
                          **outcome_summary(got, expected)}))
    finally:
        decoder.close()


if __name__ == "__main__":  # decoding processes are spawned: they import this file
    main()
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="mounting a small /dev/shm needs root and unshare (util-linux)")
def test_a_dev_shm_too_small_for_the_batch_sends_decoding_to_threads(tmp_path):
    """A real 256 KiB /dev/shm (a tmpfs mounted over it in a private mount namespace, as a
    container's 64 MB is to a large batch): the 6 x 224 x 224 block does not fit."""
    root = Path(__file__).resolve().parent.parent
    script = tmp_path / "child.py"
    script.write_text(SMALL_SHM_CHILD)
    run = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs -o size=256k tmpfs /dev/shm && exec "$0" "$1"', sys.executable,
         str(script)], capture_output=True, text=True, timeout=120, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)})
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen == {"threads": True, "pool_started": False, "same": True, "outcomes": [
        [64, 64], "undecodable_image", [64, 64], "failed_to_download", [64, 64], [64, 64]]}
    assert "/dev/shm cannot hold a batch of 6 images: decoding in threads" in run.stderr


def huge_png_row() -> dict:
    """A 7000 x 7000 PNG: 156 KB of file, 147 MB of pixels once decoded (under the 64 Mpx limit,
    and PNG, unlike JPEG, has no draft mode to decode it smaller)."""
    buffer = io.BytesIO()
    Image.new("RGB", (7000, 7000), (200, 30, 30)).save(buffer, "PNG", compress_level=9)
    return {**BASE, "key": "huge", "jpg": buffer.getvalue()}


OOM_CHILD = """
import json, sys
from pathlib import Path


def main(cgroup, limit_file, usage_file, headroom):
    # Imported here: each decoding process imports this file, and it needs none of it.
    import torch
    from capfilt.images.batch_decoding import ProcessDecoder, ThreadDecoder
    from capfilt.images.transform import ImageTransform
    from tests.test_decoding import batch, huge_png_row, outcome_summary

    caption = ImageTransform(64, 64, "bicubic", (0.5,) * 3, (0.25,) * 3)
    filter_ = ImageTransform(24, 20, "bicubic", (0.5,) * 3, (0.25,) * 3)
    rows = batch()
    huge = huge_png_row()
    weights = torch.ones(2**27)  # 512 MiB, as a worker's models: the process the kernel would pick
    expected = ThreadDecoder(caption, filter_, threads=1)(rows, pin=False)
    decoder = ProcessDecoder(caption, filter_, processes=1)
    try:
        decoder(rows, pin=False)  # the decoding process is up, torch imported
        usage = int((cgroup / usage_file).read_text())
        (cgroup / limit_file).write_text(str(usage + headroom))
        adj = [Path(f"/proc/{pid}/oom_score_adj").read_text().strip()
               for pid in decoder.pool._processes]
        got = decoder(rows[:2] + [huge] + rows[2:], pin=False)
        print(json.dumps({"adj": adj, "weights": float(weights.sum()) == 2**27,
                          **outcome_summary(got, expected)}))
    finally:
        decoder.close()


if __name__ == "__main__":  # decoding processes are spawned: they import this file
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))
"""


def memory_cgroup(name: str) -> tuple[Path, str, str] | None:
    """A new memory cgroup (v1 or v2) and its limit and usage files; None where this process
    may not make one (no root, no memory controller)."""
    for folder, limit, usage in ((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes",
                                  "memory.usage_in_bytes"),
                                 (Path("/sys/fs/cgroup"), "memory.max", "memory.current")):
        if not (folder / "cgroup.procs").exists():
            continue
        try:
            (folder / name).mkdir()
        except OSError:
            continue
        if (folder / name / limit).exists():
            return folder / name, limit, usage
        (folder / name).rmdir()
    return None


def remove_cgroup(cgroup: Path) -> None:
    """Remove a cgroup made above once it is empty: the child's orphans (multiprocessing's
    resource tracker, a decoding process) may outlive it briefly; they are killed."""
    deadline = time.monotonic() + 30
    while pids := (cgroup / "cgroup.procs").read_text().split():
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{cgroup} still holds {pids}")
        time.sleep(0.1)
    cgroup.rmdir()


def test_an_image_whose_decoding_is_killed_is_rejected_alone(tmp_path):
    """A real out-of-memory kill: the child, holding 512 MiB as a worker holds its models, runs
    in a memory cgroup whose limit, set once its decoding process is up, leaves 96 MiB; a
    7000 x 7000 PNG needs 147 MB to decode. The kernel kills the decoding process (its
    oom_score_adj is 1000; at 0 the kernel kills the child, the largest), the pool restarts,
    the PNG kills the next process too and alone is rejected."""
    made = memory_cgroup(f"capfilt-test-{os.getpid()}")
    if made is None:
        pytest.skip("making a memory cgroup needs root and a memory controller")
    cgroup, limit, usage = made
    root = Path(__file__).resolve().parent.parent
    script = tmp_path / "child.py"
    script.write_text(OOM_CHILD)
    try:
        run = subprocess.run(
            ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), sys.executable,
             str(script), str(cgroup), limit, usage, str(96 * 2**20)],
            capture_output=True, text=True, timeout=180, cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)})
    finally:
        remove_cgroup(cgroup)
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen == {"adj": ["1000"], "weights": True, "same": True, "outcomes": [
        [64, 64], "undecodable_image", "decoder_crashed", [64, 64], "failed_to_download",
        [64, 64], [64, 64]]}
