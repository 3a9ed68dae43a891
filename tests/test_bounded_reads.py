"""Every read and every decode is bounded: shards that are not regular files, compressed tars
that decompress far beyond their size, and images whose pixels cost more memory than the
limit. Each read runs in a child process with a memory and time limit, so that unbounded code
fails the test instead of taking the machine."""

import gzip
import io
import os
import resource
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.images.decode import ImageRejected, decode_cost, decode_image
from capfilt.shards.bounded_reads import MAX_COMPRESSION_RATIO
from capfilt.shards.reader import ShardReadError, read_shard
from capfilt.shards.samples import draw_shape, jpeg_bytes, write_sample_shards

ROOT = Path(__file__).resolve().parents[1]
CHILD_MEMORY = 3 << 30  # address space: pyarrow and numpy start in well under this
GOOD = jpeg_bytes(draw_shape("circle", "red"))


def run_limited(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python with a limit on its address space and its time."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, timeout=timeout,
                          preexec_fn=limit, capture_output=True, text=True)


def read_in_child(path: Path) -> str:
    """The one line ``read_shard`` fails with, read in a limited child."""
    done = run_limited(f"""
        from capfilt.shards.reader import ShardReadError, read_shard
        try:
            read_shard({str(path)!r})
        except ShardReadError as exc:
            print("refused:", exc)
        else:
            print("read")
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


@pytest.fixture
def special_files(tmp_path):
    """A parquet-named symlink to /dev/zero and a tar-named FIFO with no writer."""
    zero = tmp_path / "zero.parquet"
    zero.symlink_to("/dev/zero")
    fifo = tmp_path / "fifo.tar"
    os.mkfifo(fifo)
    return zero, fifo


def test_shards_that_are_not_regular_files_are_refused(special_files, tmp_path):
    zero, fifo = special_files
    for path in (zero, fifo):
        line = read_in_child(path)
        assert line == f"refused: {path}: not a regular file (a device, FIFO or socket)"
    folder = tmp_path / "folder.parquet"
    folder.mkdir()
    with pytest.raises(ShardReadError, match="not a regular file"):
        read_shard(str(folder))


def test_a_symlink_to_a_regular_file_is_read(tmp_path):
    [real] = write_sample_shards(tmp_path / "real", shards=1, rows=4)
    link = tmp_path / "link.parquet"
    link.symlink_to(real)
    assert read_shard(str(link)).table.num_rows == 4


def test_training_reader_refuses_them_at_listing_and_skips_them_at_reading(special_files,
                                                                          tmp_path):
    zero, fifo = special_files
    [shard] = write_sample_shards(tmp_path / "in", shards=1, rows=4)
    done = run_limited(f"""
        import os
        from capfilt.train.sources import Source, TrainingDataError, list_pieces, read_piece
        for path in ({str(zero)!r}, {str(fifo)!r}):
            try:
                list_pieces([Source(path)])
            except TrainingDataError as exc:
                print("refused:", exc)
        [piece] = list_pieces([Source({str(shard)!r})])
        os.replace({str(fifo)!r}, {str(shard)!r})  # replaced by a FIFO after listing
        print("skipped:", sorted({{r.skip for r in read_piece(piece)}}))
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        f"refused: {zero}: not a regular file (a device, FIFO or socket)",
        f"refused: {fifo}: not a regular file (a device, FIFO or socket)",
        "skipped: ['unreadable_shard']",
    ]


def gzip_tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return gzip.compress(buffer.getvalue())


def test_a_compressed_tar_is_read_within_its_ratio(tmp_path):
    path = tmp_path / "small.tar"
    path.write_bytes(gzip_tar([("a.jpg", GOOD), ("a.txt", b"a red circle")]))
    rows = read_shard(str(path)).table.to_pylist()
    assert [(r["key"], r["caption"]) for r in rows] == [("a", "a red circle")]


def test_a_decompression_bomb_tar_is_refused(tmp_path):
    path = tmp_path / "bomb.tar"
    path.write_bytes(gzip_tar([("a.jpg", GOOD), ("a.txt", b"x" * (64 << 20))]))
    assert len(path.read_bytes()) * MAX_COMPRESSION_RATIO < 64 << 20
    line = read_in_child(path)
    assert line.startswith(f"refused: {path}: compressed tar decompresses to more than ")
    assert "times its" in line


def peak_decode_in_child(path: Path) -> tuple[str, int]:
    """(outcome, peak resident MiB grown while decoding) for the image file at ``path``.

    The peak is the child's VmHWM: getrusage's ru_maxrss keeps the peak of the process it was
    forked from (pytest's, with torch and models: hundreds of MB), which hides the decode's."""
    done = run_limited(f"""
        from capfilt.images.decode import ImageRejected, decode_image
        def peak_kib():
            with open("/proc/self/status") as status:
                return next(int(l.split()[1]) for l in status if l.startswith("VmHWM:"))
        data = open({str(path)!r}, "rb").read()
        before = peak_kib()
        try:
            outcome = "x".join(map(str, decode_image(data).size))
        except ImageRejected as exc:
            outcome = exc.reason
        print(outcome, (peak_kib() - before) // 1024)
    """, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    outcome, grown = done.stdout.split()
    return outcome, int(grown)


@pytest.fixture(scope="module")
def sixteen_bit_png(tmp_path_factory):
    """A 16-bit greyscale PNG of 8000x8000 (64 Mpx, the pixel limit) in about 140 KB."""
    path = tmp_path_factory.mktemp("png") / "grey16.png"
    Image.fromarray(np.full((8000, 8000), 40000, np.uint16)).save(path)
    return path


def test_a_16_bit_png_at_the_pixel_limit_is_refused_before_decoding(sixteen_bit_png):
    assert sixteen_bit_png.stat().st_size < 200_000
    outcome, grown = peak_decode_in_child(sixteen_bit_png)
    assert (outcome, grown < 64) == ("image_too_large", True)
    with pytest.raises(ImageRejected, match="would take .* MiB to decode"):
        decode_image(sixteen_bit_png.read_bytes())


def test_a_16_bit_png_under_the_limit_decodes_within_its_cost(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((4000, 4000), 40000, np.uint16)).save(path)
    with Image.open(path) as image:
        cost = decode_cost(image.mode, image.size)
    outcome, grown = peak_decode_in_child(path)
    assert outcome == "4000x4000"
    assert grown <= cost / 2**20 * 1.1
    pixel = decode_image(path.read_bytes()).getpixel((0, 0))
    assert pixel == (155, 155, 155)  # 40000 of 65535, as before


def test_a_sparse_tar_member_larger_than_its_archive_is_refused(tmp_path):
    """GNU tar stores a sparse file's holes as a map: 10 KB of tar declared a 3 GB member,
    which tarfile fills with zeros in memory when the member is read."""
    folder = tmp_path / "files"
    folder.mkdir()
    with open(folder / "a.jpg", "wb") as hole:
        hole.truncate(3 << 30)
    (folder / "a.txt").write_text("a red circle")
    path = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "-cf", str(path), "a.jpg", "a.txt"], cwd=folder, check=True)
    assert path.stat().st_size < 100_000
    line = read_in_child(path)
    assert line.startswith(f"refused: {path}: member a.jpg declares 3,221,225,472 bytes")


@pytest.fixture(scope="module")
def dictionary_bomb(tmp_path_factory):
    """A parquet row group of 30,000 rows that share one random 100 KB image through parquet's
    dictionary encoding: 100 KB on disk, 3 GB once its column is decoded. Written from Arrow's
    own dictionary array, so the test never holds the 3 GB either."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.parquet"
    value = b"\xff\xd8" + os.urandom(100_000)
    images = pa.DictionaryArray.from_arrays(pa.array(np.zeros(30_000, np.int32)),
                                            pa.array([value], pa.binary()))
    table = pa.table({"key": [str(i) for i in range(30_000)], "jpg": images})
    pq.write_table(table, path, compression="zstd", store_schema=False)
    return path


def test_a_parquet_that_decodes_far_beyond_its_size_is_refused(dictionary_bomb):
    assert dictionary_bomb.stat().st_size * MAX_COMPRESSION_RATIO < 3_000_000_000
    line = read_in_child(dictionary_bomb)
    assert line.startswith(f"refused: {dictionary_bomb}: decodes to more than ")
    done = run_limited(f"""
        from capfilt.train.sources import Source, list_pieces, read_piece
        [piece] = list_pieces([Source({str(dictionary_bomb)!r})])
        print(piece.rows, sorted({{r.skip for r in read_piece(piece)}}))
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["30000", "['unreadable_shard']"]


def test_a_parquet_whose_footer_declares_far_more_than_its_size_is_refused_unread(tmp_path):
    path = tmp_path / "zeros.parquet"
    pq.write_table(pa.table({"key": [str(i) for i in range(20)],
                             "jpg": pa.array([bytes(1 << 20)] * 20, pa.binary())}),
                   path, compression="zstd", use_dictionary=False)
    assert path.stat().st_size * MAX_COMPRESSION_RATIO < 20 << 20
    with pytest.raises(ShardReadError, match="declares 20,9[0-9,]+ bytes of data, more than"):
        read_shard(str(path))
