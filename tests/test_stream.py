"""The training stream: every row once per epoch, each reader its own pieces, a bounded shuffle,
a resume at the very row, loader processes, skip reasons, tars, rounds and fsspec URLs."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections import Counter
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from capfilt.images.transform import ImageTransform
from capfilt.models.tiny import tiny_processor
from capfilt.shards.samples import IMG2DATASET_SCHEMA
from capfilt.train.loader import StreamSpec, rank_loader, slot_batches
from capfilt.train.sources import (
    Source,
    TrainingDataError,
    list_pieces,
    read_piece,
    split_pieces,
)
from capfilt.train.stream import Position, SlotStream
from capfilt.train.text import TextEncoding

SHARDS, PER_SHARD, GROUP = 5, 40, 10  # 200 rows in 20 row groups


def jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (value % 256, (value * 7) % 256, 90)).save(buffer, "JPEG")
    return buffer.getvalue()


def shard_rows(shard: int) -> list[dict]:
    rows = []
    for i in range(PER_SHARD):
        n = shard * PER_SHARD + i
        data = jpeg(n)
        rows.append(dict(key=f"{n:05d}", url=None, caption=f"caption {n}", jpg=data,
                         status="success", error_message=None, width=16, height=16,
                         original_width=16, original_height=16, exif=None,
                         sha256=hashlib.sha256(data).hexdigest()))
    return rows


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stream")
    for shard in range(SHARDS):
        table = pa.Table.from_pylist(shard_rows(shard), schema=IMG2DATASET_SCHEMA)
        pq.write_table(table, folder / f"{shard:05d}.parquet", row_group_size=GROUP)
    return folder


def spec_for(pieces, batch=8, buffer=32, workers=0, augment="blip", seed=0) -> StreamSpec:
    processor = tiny_processor(32)
    return StreamSpec(pieces=tuple(pieces),
                      transform=ImageTransform.from_processor(processor.image_processor),
                      text=TextEncoding(processor.tokenizer), batch_size=batch, seed=seed,
                      augment=augment, buffer=buffer, loader_workers=workers)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_pieces_are_row_groups_counted_from_footers(shards):
    pieces = list_pieces([Source.parse(str(shards))])
    assert len(pieces) == SHARDS * PER_SHARD // GROUP
    assert all(p.count == GROUP for p in pieces)
    assert [r.key for r in read_piece(pieces[3])] == [f"{n:05d}" for n in range(30, 40)]


def test_each_epoch_deals_every_row_once_and_each_reader_reads_only_its_pieces(shards):
    pieces = list_pieces([Source.parse(str(shards))])
    slots, per_epoch = 3, SHARDS * PER_SHARD
    seen, reads = [], Counter()

    def recording(piece):
        reads[piece] += 1
        return read_piece(piece)

    epochs = {0: Counter(), 1: Counter()}
    for slot in range(slots):
        stream = SlotStream(pieces, slot, slots, seed=5, buffer=16, read=recording)
        own = {p for e in (0, 1, 2) for p in stream.epoch_pieces(e)}  # 2: read to see its end
        reads.clear()
        for row, place, _ in stream.rows():
            if place.epoch == 2:
                break
            epochs[place.epoch][row.key] += 1
            seen.append((slot, row.key))
        assert set(reads) <= own  # a reader never opens another reader's piece
    for counts in epochs.values():
        assert sorted(counts) == [f"{n:05d}" for n in range(per_epoch)]
        assert set(counts.values()) == {1}
    # The pieces are dealt anew each epoch: slot 0 does not read the same rows twice.
    first = SlotStream(pieces, 0, slots, seed=5, buffer=16, read=read_piece)
    assert first.epoch_pieces(0) != first.epoch_pieces(1)


def test_the_shuffle_is_bounded_by_the_buffer_and_seeded(shards):
    pieces = list_pieces([Source.parse(str(shards))])
    stream = SlotStream(pieces, 0, 1, seed=1, buffer=16, read=read_piece)
    rows = take(stream.rows(), 64)
    file_order = [int(r.key) for r in read_piece(stream.epoch_pieces(0)[0])]
    keys = [int(row.key) for row, _, _ in rows]
    assert keys[:10] != file_order  # shuffled within the window
    # Each window of 16 holds exactly the slot's next 16 rows in file order, shuffled.
    order = [int(r.key) for p in stream.epoch_pieces(0) for r in read_piece(p)]
    for w in range(4):
        assert sorted(keys[16 * w:16 * (w + 1)]) == sorted(order[16 * w:16 * (w + 1)])
    again = [row.key for row, _, _ in take(SlotStream(pieces, 0, 1, 1, 16, read_piece).rows(), 64)]
    other = [row.key for row, _, _ in take(SlotStream(pieces, 0, 1, 2, 16, read_piece).rows(), 64)]
    assert again == [r.key for r, _, _ in rows] and other != again


def test_a_stream_resumed_at_a_position_continues_as_the_uninterrupted_one(shards):
    pieces = list_pieces([Source.parse(str(shards))])
    straight = take(SlotStream(pieces, 1, 2, 3, 24, read_piece).rows(), 250)
    for cut in (0, 23, 24, 101, 130):  # inside windows, at their edges, past an epoch
        position = straight[cut][2]
        resumed = take(SlotStream(pieces, 1, 2, 3, 24, read_piece).rows(position), 250 - cut - 1)
        assert [r.key for r, _, _ in resumed] == [r.key for r, _, _ in straight[cut + 1:]]
    assert straight[130][1].epoch == 1  # 100 rows a slot an epoch: the cut at 130 is in epoch 1


def test_fewer_pieces_than_readers_are_split_by_rows(shards):
    pieces = list_pieces([Source.parse(str(shards / "00000.parquet"))])[:2]
    split = split_pieces(pieces, 5)
    assert len(split) == 6 and sum(p.count for p in split) == 2 * GROUP
    keys = sorted(r.key for p in split for r in read_piece(p))
    assert keys == sorted(r.key for p in pieces for r in read_piece(p))


def test_loader_processes_serve_their_slots_in_turn_and_resume_at_the_step(shards):
    pieces = list_pieces([Source.parse(str(shards))])
    spec = spec_for(pieces, workers=2)
    loader = iter(rank_loader(spec, rank=1, world=2, done_steps=0, positions=None))
    got = take(loader, 7)
    assert [b.slot for b in got] == [2, 3, 2, 3, 2, 3, 2]  # rank 1's slots, alternately
    # Each process's batches are its slot's, computed here in this process.
    split = split_pieces(pieces, 4)
    direct = {slot: take(slot_batches(spec, split, slot, 4, Position()), 4) for slot in (2, 3)}
    for step, batch in enumerate(got):
        expected = direct[batch.slot][step // 2]
        assert batch.texts == expected.texts
        assert torch.equal(batch.pixels, expected.pixels)
        assert batch.pixels.dtype == torch.uint8 and batch.input_ids.shape[0] == 8
    # Resume after 3 steps: the positions the batches carried, the processes rotated.
    positions = {got[1].slot: got[1].position, got[2].slot: got[2].position}
    resumed = take(iter(rank_loader(spec, 1, 2, done_steps=3, positions=positions)), 4)
    for a, b in zip(resumed, got[3:]):
        assert a.slot == b.slot and a.texts == b.texts and torch.equal(a.pixels, b.pixels)


def test_the_first_batch_reads_only_the_pieces_it_needs(shards):
    pieces = list_pieces([Source.parse(str(shards))])
    reads = []

    def recording(piece):
        reads.append(piece)
        return read_piece(piece)

    stream = SlotStream(pieces, 0, 1, seed=0, buffer=16, read=recording)
    take(stream.rows(), 8)
    assert len(reads) == 2  # 16 rows of 200: two row groups of 10, not the whole set


def test_img2dataset_rows_that_failed_are_skipped_with_their_reasons(img2dataset_parquet,
                                                                     img2dataset_webdataset):
    for folder in (img2dataset_parquet, img2dataset_webdataset):
        pieces = list_pieces([Source.parse(str(folder))])
        spec = spec_for(pieces, batch=4, buffer=64, augment="none")
        batches = take(slot_batches(spec, split_pieces(pieces, 1), 0, 1, Position()), 6)
        skipped = Counter()
        keys = Counter()
        for batch in batches:
            skipped.update(batch.skipped)
            keys.update(batch.texts)
        # 12 drawn images, each with its own caption, once per epoch; 6 batches of 4 = two
        # epochs.
        assert len(keys) == 12 and set(keys.values()) == {2}
        if folder == img2dataset_parquet:  # the broken and the missing file, each epoch
            assert sum(skipped.values()) >= 2 and all(src == 0 for src, _ in skipped)
            assert {reason for _, reason in skipped} <= {"failed_to_download", "failed_to_resize"}
        else:  # the tar holds only successes; the metadata beside it counted them
            assert sum(p.count for p in pieces) == 12


def test_a_round_folder_streams_its_view(tmp_path, shards):
    from capfilt.rounds.folder import ROW_GROUP_ROWS

    round_dir = tmp_path / "round"
    (round_dir / "shards").mkdir(parents=True)
    rows = [{"key": f"{n}", "jpg": jpeg(n), "web_caption": f"web {n}",
             "synthetic_captions": [f"synthetic {n}"], "kept_captions": [f"synthetic {n}"],
             "kept_sources": ["synthetic"]} for n in range(2 * ROW_GROUP_ROWS + 5)]
    pq.write_table(pa.Table.from_pylist(rows), round_dir / "shards" / "00000.parquet",
                   row_group_size=ROW_GROUP_ROWS)
    (round_dir / "manifest.json").write_text("{}")
    for view, first in (("kept", ["synthetic 0"]), ("web", ["web 0"]), ("kept_web", []),
                        ("web_and_synthetic", ["web 0", "synthetic 0"])):
        pieces = list_pieces([Source.parse(f"{round_dir}@{view}")])
        assert [p.count for p in pieces] == [100, 100, 5]
        assert read_piece(pieces[0])[0].captions == first


def test_fsspec_urls_stream(shards):
    fs = fsspec.filesystem("memory")
    for path in sorted(shards.glob("*.parquet"))[:2]:
        fs.pipe(f"/train/{path.name}", path.read_bytes())
    pieces = list_pieces([Source.parse("memory://train/*.parquet")])
    assert len(pieces) == 8 and pieces[0].url.startswith("memory://")
    batch = next(iter(rank_loader(spec_for(pieces), 0, 1, 0, None)))
    assert len(batch.texts) == 8 and all(t.startswith("caption ") for t in batch.texts)


def test_a_reader_resumed_at_the_end_of_its_epoch_goes_on_into_the_next(shards):
    pieces = list_pieces([Source.parse(str(shards / "00000.parquet"))])  # 40 rows
    spec = spec_for(pieces, batch=10, buffer=16, augment="none")
    straight = take(slot_batches(spec, pieces, 0, 1, Position()), 8)
    assert straight[3].position == Position(0, 2, 8)  # the last row of epoch 0
    resumed = take(slot_batches(spec, pieces, 0, 1, straight[3].position), 4)
    assert [b.texts for b in resumed] == [b.texts for b in straight[4:]]


def test_bad_rows_and_unreadable_pieces_are_skipped_with_reasons(tmp_path):
    rows = shard_rows(0)[:20]
    rows[3]["jpg"] = b"not a jpeg at all"
    rows[4]["caption"] = None
    rows[5]["key"] = None
    pq.write_table(pa.Table.from_pylist(rows, schema=IMG2DATASET_SCHEMA), tmp_path / "a.parquet",
                   row_group_size=GROUP)
    pq.write_table(pa.Table.from_pylist(shard_rows(1)[:20], schema=IMG2DATASET_SCHEMA),
                   tmp_path / "b.parquet", row_group_size=GROUP)
    pieces = list_pieces([Source.parse(str(tmp_path))])
    (tmp_path / "b.parquet").write_bytes(b"truncated after listing")
    spec = spec_for(pieces, batch=4, buffer=8, augment="none")
    skipped = Counter()
    for batch in take(slot_batches(spec, pieces, 0, 1, Position()), 8):  # two epochs of 17
        skipped.update(batch.skipped)
    assert skipped == {(0, "undecodable_image"): 2, (0, "no_caption"): 2,
                       (0, "unreadable_shard"): 40}


def test_data_without_a_usable_row_is_refused_not_spun_on(tmp_path):
    rows = shard_rows(0)[:5]
    for row in rows:
        row["status"] = "failed_to_download"
    pq.write_table(pa.Table.from_pylist(rows, schema=IMG2DATASET_SCHEMA), tmp_path / "bad.parquet")
    pieces = list_pieces([Source.parse(str(tmp_path / "bad.parquet"))])
    with pytest.raises(TrainingDataError, match="no usable row"):
        next(slot_batches(spec_for(pieces, batch=2), pieces, 0, 1, Position()))
    pq.write_table(pa.Table.from_pylist([], schema=IMG2DATASET_SCHEMA), tmp_path / "empty.parquet")
    with pytest.raises(TrainingDataError, match="no rows to train on"):
        list_pieces([Source.parse(str(tmp_path / "empty.parquet"))])
    pq.write_table(pa.table({"key": ["a"], "text": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(TrainingDataError, match="other.parquet: no jpg column"):
        list_pieces([Source.parse(str(tmp_path / "other.parquet"))])


def test_a_tar_without_metadata_is_counted_as_its_samples_are_grouped(tmp_path):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for n in range(3):
            for extension, data in (("jpg", jpeg(n)), ("txt", f"caption {n}".encode())):
                info = tarfile.TarInfo(f"./v1.2/{n:05d}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pieces = list_pieces([Source.parse(str(tmp_path / "00000.tar"))])
    assert [p.count for p in pieces] == [3]
    assert sorted(r.captions[0] for r in read_piece(pieces[0])) == [
        "caption 0", "caption 1", "caption 2"]


def test_unaugmented_pixels_kept_decoded_are_the_ones_decoding_gives(shards):
    from dataclasses import replace

    from capfilt.train.loader import DecodedPixels, make_sample

    pieces = list_pieces([Source.parse(str(shards / "00000.parquet"))])  # 40 rows
    plain = spec_for(pieces, batch=10, buffer=16, augment="none")
    kept = replace(plain, cache_mib=1)
    a = take(slot_batches(plain, pieces, 0, 1, Position()), 8)  # two epochs
    b = take(slot_batches(kept, pieces, 0, 1, Position()), 8)
    for x, y in zip(a, b):
        assert x.texts == y.texts and torch.equal(x.pixels, y.pixels)
    # Bounded: room for 3 pictures holds 3, and a fourth is decoded, not kept.
    one = 3 * 32 * 32
    decoded = DecodedPixels(3 * one / 2**20)
    stream = SlotStream(pieces, 0, 1, 0, 16, read_piece)
    for row, place, _ in take(stream.rows(), 5):
        make_sample(row, place, plain, 0, decoded)
    assert len(decoded.pixels) == 3


def test_large_jpegs_decode_scaled_down_to_what_the_model_needs():
    """A 640x480 photo for a 32 px model is decoded at 1/4 by libjpeg: the pixels the model gets
    stay within a few levels of a full decode followed by the same resize."""
    import numpy as np

    from capfilt.images.decode import decode_image

    y, x = np.mgrid[0:480, 0:640]
    pixels = np.stack([x * 255 // 640, y * 255 // 480, (x + y) * 255 // 1120], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=92)
    spec = spec_for([])
    small = decode_image(buffer.getvalue(), at_least=spec.decode_at_least)
    assert small.size == (160, 120) and spec.decode_at_least == (64, 64)  # 1/4: 1/8 is < 64
    full = decode_image(buffer.getvalue())
    got, want = spec.transform.resize(small), spec.transform.resize(full)
    assert (got.int() - want.int()).abs().float().mean() < 2.0


def test_a_round_read_as_pairs_gives_each_kept_text_its_own_sample(tmp_path):
    """BLIP's pre-training reads web and synthetic annotation files one after the other: an
    image with two kept texts is two samples an epoch, one with none is no sample."""
    from capfilt.rounds.folder import ROW_GROUP_ROWS

    round_dir = tmp_path / "round"
    (round_dir / "shards").mkdir(parents=True)
    rows = []
    for n in range(ROW_GROUP_ROWS + 30):
        kept = [[], [f"web {n}"], [f"web {n}", f"synthetic {n}"]][n % 3]
        rows.append({"key": f"{n}", "jpg": jpeg(n), "web_caption": f"web {n}",
                     "synthetic_captions": [f"synthetic {n}"], "kept_captions": kept,
                     "kept_sources": ["web", "synthetic"][: len(kept)]})
    pq.write_table(pa.Table.from_pylist(rows), round_dir / "shards" / "00000.parquet",
                   row_group_size=ROW_GROUP_ROWS)
    (round_dir / "manifest.json").write_text("{}")
    source = Source.parse(f"{round_dir}@kept")
    assert [p.count for p in list_pieces([source])] == [100, 30]  # images
    pieces = list_pieces([source], pairs=True)
    expected = Counter((r["key"], c) for r in rows for c in r["kept_captions"])
    assert [p.count for p in pieces] == [99, 30]  # 34 images with none, 33 with one, 33 two
    read = [row for p in pieces for row in read_piece(p)]
    assert Counter((r.key, r.captions[0]) for r in read) == expected
    assert all(len(r.captions) == 1 and r.image == jpeg(int(r.key)) for r in read)
    # The two samples of an image share its place, so it is decoded and cached once.
    places = {}
    for r in read:
        places.setdefault(r.key, set()).add(r.place)
    assert {len(p) for p in places.values()} == {1}
    assert len(set.union(*places.values())) == len(places)
    # An epoch of the stream deals every pair once, shuffled apart.
    stream = SlotStream(pieces, 0, 1, seed=3, buffer=64, read=read_piece)
    epoch = [(r.key, r.captions[0]) for r, place, _ in take(stream.rows(), sum(expected.values()))]
    assert Counter(epoch) == expected
    assert epoch != sorted(epoch, key=lambda kc: int(kc[0]))
    # The other views read as pairs too: web_and_synthetic offers two texts for every image.
    both = list_pieces([Source.parse(f"{round_dir}@web_and_synthetic")], pairs=True)
    assert [p.count for p in both] == [200, 60]
