"""The CapFilt step on rows of real img2dataset shards, without Ray."""

from dataclasses import replace

import pyarrow as pa
import torch

from capfilt.images.decode import decode_image
from capfilt.scoring.selection import Policy
from capfilt.shards.input_rows import INPUT_SCHEMA
from capfilt.shards.reader import read_shard
from capfilt.shards.samples import draw_shape, jpeg_bytes
from capfilt.step.stage import CapFiltStage
from tests.conftest import NO_GUARDS, make_stage


def rows(*items) -> pa.Table:
    base = {"url": None, "caption": "a red circle", "status": "success", "error_message": None}
    return pa.Table.from_pylist([{**base, **item} for item in items], schema=INPUT_SCHEMA)


GOOD = jpeg_bytes(draw_shape("circle", "red"))


def test_a_bad_image_becomes_a_reject_row_and_the_batch_goes_on(loaded):
    stage = make_stage(loaded)
    out, rejects = stage(rows(
        {"key": "ok-1", "jpg": GOOD},
        {"key": "broken", "jpg": b"\x89PNG\r\n\x1a\n not really"},
        {"key": "ok-2", "jpg": GOOD, "caption": "   "},
        {"key": "failed", "jpg": None, "status": "failed_to_download",
         "error_message": "HTTP Error 404: Not Found"},
    ))
    assert out.column("key").to_pylist() == ["ok-1", "ok-2"]
    assert rejects.column("key").to_pylist() == ["broken", "failed"]
    assert rejects.column("reason").to_pylist() == ["undecodable_image", "failed_to_download"]
    assert rejects.column("message").to_pylist()[1] == "HTTP Error 404: Not Found"
    first, blank = out.to_pylist()
    assert first["web_caption"] == "a red circle" and 0 <= first["web_itm"] <= 1
    assert len(first["synthetic_captions"]) == len(first["synthetic_itm"]) == 1
    assert blank["web_caption"] is None and blank["web_itm"] is None
    assert (first["width"], first["height"]) == (64, 64)


def test_vision_encoders_run_once_per_image(loaded, img2dataset_parquet):
    table = read_shard(str(img2dataset_parquet / "00000.parquet")).table
    decodable = sum(1 for s in table.column("status").to_pylist() if s == "success")
    calls = {"captioner": [], "filter": []}
    originals = {}
    for role in calls:
        vision = loaded[role].model.vision_model
        originals[role] = vision.forward

        def counting(pixel_values=None, _role=role, **kwargs):
            calls[_role].append(pixel_values.shape[0])
            return originals[_role](pixel_values=pixel_values, **kwargs)

        vision.forward = counting
    try:
        out, _ = make_stage(loaded, policy=Policy())(table)
    finally:
        for role, forward in originals.items():
            loaded[role].model.vision_model.forward = forward
    assert out.num_rows == decodable > 0
    # Two texts per image are scored (web + synthetic), yet one vision pass per image.
    assert sum(calls["captioner"]) == decodable and sum(calls["filter"]) == decodable


def test_policy_only_changes_the_decision_not_the_scores(loaded):
    table = rows({"key": "a", "jpg": GOOD}, {"key": "b", "jpg": GOOD, "caption": "spam spam"})
    everything, _ = make_stage(loaded, policy=Policy(threshold=0.0), guards=NO_GUARDS)(table)
    nothing, _ = make_stage(loaded, policy=Policy(threshold=1.0), guards=NO_GUARDS)(table)
    assert everything.drop(["kept_captions", "kept_sources"]).equals(
        nothing.drop(["kept_captions", "kept_sources"]))
    assert all(len(k) == 2 for k in everything.column("kept_captions").to_pylist())
    assert all(k == [] for k in nothing.column("kept_captions").to_pylist())


def test_decoded_pixels_wait_as_uint8_and_normalise_to_the_processors_input(loaded):
    """The CPU half keeps a quarter of float32's bytes per image, stacked per batch; the batch
    normalised on the model's device equals BLIP's transform of each image, bit for bit."""
    stage = make_stage(loaded)
    second = jpeg_bytes(draw_shape("square", "blue"))
    prepared = stage.prepare(rows({"key": "a", "jpg": GOOD}, {"key": "b", "jpg": second}))
    assert prepared.caption_pixels.dtype == torch.uint8 and len(prepared) == 2
    caption_pixels, filter_pixels = stage.device_pixels(prepared)
    expected = torch.stack([stage.caption_transform(decode_image(b)) for b in (GOOD, second)])
    assert caption_pixels.dtype == torch.float32
    assert torch.equal(caption_pixels, expected)
    assert filter_pixels is caption_pixels  # one transform: copied and normalised once
    later, = stage.device_pixels(prepared.slice(1, 2))[:1]
    assert torch.equal(later, expected[1:])


def test_a_filter_with_its_own_transform_gets_its_own_pixels_also_after_a_split(loaded):
    """Captioner and filter at different sizes: each model's batch is its own, and a batch
    split (as after running out of memory) gives the unsplit batch's captions and, within float
    tolerance (a CPU matrix product's sums depend on the batch's size), its scores."""
    stage = make_stage(loaded)
    stage = CapFiltStage(stage.captioner, stage.scorer, stage.policy, stage.caption_transform,
                         replace(stage.filter_transform, height=24, width=24), guards=NO_GUARDS)
    table = rows(*({"key": f"k{i}", "jpg": jpeg_bytes(draw_shape(shape, colour))}
                   for i, (shape, colour) in enumerate([("circle", "red"), ("square", "blue"),
                                                        ("triangle", "green")])))
    prepared = stage.prepare(table)
    caption_pixels, filter_pixels = stage.device_pixels(prepared.slice(1, 3))
    assert caption_pixels.shape[-2:] == (32, 32) and filter_pixels.shape[-2:] == (24, 24)
    images = [decode_image(b) for b in table.column("jpg").to_pylist()[1:]]
    assert torch.equal(filter_pixels, torch.stack([stage.filter_transform(i) for i in images]))
    whole, _ = stage.compute(prepared)
    stage.max_rows = 1
    split, _ = stage.compute(prepared)
    scores = ("web_itm", "web_itc", "synthetic_itm", "synthetic_itc")
    assert split.drop_columns(list(scores)) == whole.drop_columns(list(scores))
    for column in scores:
        got, want = split.column(column).to_pylist(), whole.column(column).to_pylist()
        assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-5)
