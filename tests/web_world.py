"""Real img2dataset output for the tests: images served on 127.0.0.1, downloaded by img2dataset.

Nothing leaves this machine: the HTTP server binds the loopback address and img2dataset runs
as its own command, exactly as a user runs it (without torch, which it does not need:
``tests/torch_free.py``).
"""

from __future__ import annotations

import functools
import http.server
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.shards.samples import COLOURS, SHAPES, draw_shape, jpeg_bytes
from tests.torch_free import torch_hidden_env


@contextmanager
def serve_folder(folder: Path):
    """An HTTP server for ``folder`` on 127.0.0.1 and a free port; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def make_site(folder: Path, images: int) -> list[tuple[str, str]]:
    """Write ``images`` drawn JPEGs plus a broken file; return (file name, caption) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    colours = list(COLOURS)
    for i in range(images):
        # Every (shape, colour) once before any repeats: twelve images, twelve drawings.
        shape = SHAPES[i % len(SHAPES)]
        colour = colours[(i + i // len(colours)) % len(colours)]
        (folder / f"{i:03d}.jpg").write_bytes(jpeg_bytes(draw_shape(shape, colour)))
        pairs.append((f"{i:03d}.jpg", f"a {colour} {shape}"))
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    pairs.append(("broken.jpg", "a broken file"))
    pairs.append(("missing.jpg", "a missing file"))
    return pairs


def img2dataset_download(site: Path, work: Path, output_format: str, per_shard: int,
                         images: int) -> Path:
    """Run the real ``img2dataset`` command over a site of drawn images; return its output
    folder."""
    return download_site(site, make_site(site, images), work, output_format, per_shard)


def download_site(site: Path, pairs: list[tuple[str, str]], work: Path, output_format: str,
                  per_shard: int) -> Path:
    """Serve ``site`` and download its (file name, caption) ``pairs`` with the real
    ``img2dataset`` command, ``per_shard`` rows a shard, in the order given."""
    out = work / f"img2dataset-{output_format}"
    with serve_folder(site) as base:
        urls = work / f"urls-{output_format}.parquet"
        pq.write_table(
            pa.table({"url": [f"{base}/{name}" for name, _ in pairs],
                      "caption": [caption for _, caption in pairs]}),
            urls,
        )
        command = [
            str(Path(sys.executable).parent / "img2dataset"),
            f"--url_list={urls}", "--input_format=parquet", "--url_col=url",
            "--caption_col=caption", f"--output_format={output_format}",
            f"--output_folder={out}", "--processes_count=1", "--thread_count=4",
            f"--number_sample_per_shard={per_shard}", "--image_size=64",
            "--resize_mode=no", "--enable_wandb=False", "--retries=0", "--timeout=5",
        ]
        env = {**torch_hidden_env(work / "no-torch"), "NO_ALBUMENTATIONS_UPDATE": "1"}
        subprocess.run(command, check=True, env=env, capture_output=True, timeout=300)
    return out


@contextmanager
def write_url_list(work: Path):
    """Serve 6 small drawn images, an 800x600 one, a broken and a missing file; yield a url
    list (parquet: url, caption) that is valid while the server runs."""
    from capfilt.shards.samples import draw_shape

    pairs = make_site(work / "site", 6)
    draw_shape("circle", "red", size=600).resize((800, 600)).save(work / "site" / "big.jpg")
    pairs.append(("big.jpg", "a big red circle"))
    with serve_folder(work / "site") as base:
        urls = work / "urls.parquet"
        pq.write_table(pa.table({"url": [f"{base}/{name}" for name, _ in pairs],
                                 "caption": [caption for _, caption in pairs]}), urls)
        yield urls
