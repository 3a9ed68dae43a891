"""The demo world: scenes, captions and their parser, web noise, and the shards it writes."""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from dataclasses import replace

import pytest
from PIL import Image

from capfilt.shards.reader import expand_inputs, read_shard
from capfilt.world import (
    NOISE_KINDS,
    NOISE_MIX,
    TEMPLATES,
    Scene,
    SceneObject,
    WorldSpec,
    build_world,
    caption_is_correct,
    describe,
    differing_attributes,
    load_scenes,
    load_test_groups,
    load_web_noise,
    noise_counts,
    one_attribute_variants,
    parse,
    random_scene,
    read_spec,
    render,
    vocabulary,
    words,
)
from capfilt.world.audit import caption_error
from capfilt.world.build import world_rng
from capfilt.world.noise import NoiseMix, filename_text, generic_text, partial_text, spam_text
from capfilt.world.scene import COLOURS, SHAPES, SIZES
from capfilt.world.render import COLOUR_RGB, place

# Every noise kind, partial captions included (the default mix has none).
SPEC = WorldSpec(seed=3, n_clean=40, n_web=200, n_test=42, rows_per_shard=64,
                 noise=NoiseMix(correct=0.4, partial=0.2))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world") / "w", SPEC)


def shard_rows(folder) -> list[dict]:
    return [r for s in expand_inputs([str(folder)]) for r in read_shard(s).table.to_pylist()]


def nearest_colour(pixel) -> str:
    return min(COLOUR_RGB, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOUR_RGB[c], pixel)))


def files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


# Scenes and captions

def test_describe_and_parse_round_trip_for_every_template():
    rng = random.Random(0)
    for _ in range(300):
        scene = random_scene(rng)
        for template in range(len(TEMPLATES)):
            caption = describe(scene, template=template)
            assert parse(caption) == scene, caption
            assert caption_is_correct(caption, scene)
            assert len(words(caption)) <= 20
            assert caption == caption.lower()
    assert len(TEMPLATES) >= 4


def test_a_one_attribute_change_makes_a_caption_wrong():
    rng = random.Random(1)
    for _ in range(40):
        scene = random_scene(rng)
        variants = one_attribute_variants(scene)
        assert len(variants) == len(set(variants)) and scene not in variants
        for variant in variants:
            assert differing_attributes(scene, variant) is not None
            assert len(differing_attributes(scene, variant)) == 1
            assert not caption_is_correct(describe(variant, rng), scene)


def test_caption_error_names_what_a_caption_gets_wrong():
    one = Scene((SceneObject("ring", "red", "small", "left"),), "white")
    two = Scene((SceneObject("ring", "red", "small", "left"),
                 SceneObject("cross", "blue", "large", "right")), "black")
    assert caption_error("a small red ring on the left on a white background", one) == "right"
    assert caption_error("a small red cross on the left on a white background", one) == "shape"
    assert caption_error("a large blue ring on the left on a white background", one) == "colour+size"
    assert caption_error("there is a small red ring in the center, gray background",
                         one) == "background+position"
    assert caption_error("a small red ring on the left", one) == "unparsed"
    assert caption_error("a small red ring on the left on a black background", two) == "count"
    assert caption_error("a small red ring on the left and a large blue square on the right on a "
                         "black background", two) == "shape"


def test_parse_is_order_insensitive_forgiving_of_spacing_and_strict_on_content():
    scene = Scene((SceneObject("square", "blue", "large", "right"),
                   SceneObject("ring", "red", "small", "left")), "white")
    assert [o.position for o in scene.objects] == ["left", "right"]  # canonical order
    assert parse("a large blue square on the right and a small red ring on the left "
                 "on a white background") == scene
    assert parse("  There is a small red ring on the left and a large blue square on the "
                 "right , white background.") == scene
    for wrong in (
        "a small red ring on the left",  # no background
        "a small red ring on the left and a large blue square on the left on a white background",
        "a small red ring at the top on a white background",  # no such position
        "a small pink circle on the left on a white background",
        "a red ring on the left on a white background",  # no size
        "a small red ring on the left on a white background and more",
        "",
    ):
        assert parse(wrong) is None, wrong


def test_scenes_validate_and_serialise():
    rng = random.Random(2)
    for _ in range(50):
        scene = random_scene(rng)
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
        assert Scene.from_json(scene.to_json()) == scene
    with pytest.raises(ValueError):
        Scene((SceneObject("ring", "red", "small", "left"),) * 2, "white")
    with pytest.raises(ValueError):
        Scene((SceneObject("ring", "red", "small", "left"),), "red")
    with pytest.raises(ValueError):
        SceneObject("hexagon", "red", "small", "left")


def test_noise_texts_do_not_parse_and_use_the_vocabulary():
    rng = random.Random(4)
    vocab = set(vocabulary())
    assert set("0123456789") | {","} <= vocab
    for make in (spam_text, filename_text, generic_text):
        for _ in range(100):
            text = make(rng)
            assert parse(text) is None and set(words(text)) <= vocab


def test_noise_counts_are_exact():
    for n in (0, 1, 7, 101, 200, 6000):
        counts = noise_counts(n, NOISE_MIX)
        assert sum(counts.values()) == n
        for kind, p in NOISE_MIX.as_dict().items():
            assert abs(counts[kind] - n * p) < 1
    assert noise_counts(6000) == {"correct": 3600, "swapped": 720, "attribute": 720,
                                  "spam": 480, "filename": 240, "generic": 240, "partial": 0}
    assert abs(NOISE_MIX.wrong - 0.40) < 1e-9
    assert abs(NoiseMix(correct=0.3, partial=0.3).wrong - 0.40) < 1e-9


def test_partial_captions_are_true_but_never_a_whole_scene():
    """Alt-text that says less than the picture: every attribute it names is the scene's, in
    the grammar's words and order, and it never parses as a scene."""
    rng = random.Random(5)
    vocab = set(vocabulary())
    for _ in range(300):
        scene = random_scene(rng, 0.5)
        text = partial_text(scene, rng)
        assert parse(text) is None and set(words(text)) <= vocab
        stated = text.removesuffix(f" on a {scene.background} background").split(" and ")
        assert len(stated) == len(scene.objects)
        for phrase, obj in zip(stated, scene.objects):
            named = phrase.split()
            assert named[0] == "a" and obj.shape in named
            kept = [w for w in named[1:] if w in (obj.size, obj.colour, obj.shape)]
            assert kept == [v for v in (obj.size, obj.colour, obj.shape) if v in named]
            assert not set(named) & (set(SIZES + COLOURS + SHAPES) - {obj.size, obj.colour,
                                                                        obj.shape})


# Pictures

def test_two_objects_never_overlap_and_colours_stay_unambiguous():
    rng = random.Random(5)
    for i in range(300):
        scene = random_scene(rng, two_object_fraction=1.0 if i % 2 else 0.0)
        placed = place(scene, random.Random(i))
        assert all(0 <= c <= 1 for p in placed for c in p.box())
        if len(placed) == 2:
            a, b = (p.box() for p in placed)
            assert a[2] < b[0] or a[3] < b[1]  # left of, or above
        image = render(scene, 64, random.Random(i))
        assert image.size == (64, 64) and image.mode == "RGB"
        for p in placed:
            x, y = p.solid_point()
            pixel = image.getpixel((int(x * 64), int(y * 64)))
            assert nearest_colour(pixel) == p.obj.colour
    scene = random_scene(rng)
    one, two = (render(scene, 64, random.Random(i)).tobytes() for i in (1, 2))
    assert one != two


# The built world

def test_same_spec_same_bytes_other_seed_other_bytes(world, tmp_path):
    again = build_world(tmp_path / "again", SPEC)
    assert files(again.root) == files(world.root)
    other = build_world(tmp_path / "other", replace(SPEC, seed=4))
    assert files(other.web)["00000.parquet"] != files(world.web)["00000.parquet"]
    assert files(other.truth) != files(world.truth)


def test_rebuilding_reuses_the_same_world_and_refuses_another(world):
    before = {p: p.stat().st_mtime_ns for p in world.root.rglob("*")}
    assert build_world(world.root, SPEC) == world
    assert {p: p.stat().st_mtime_ns for p in world.root.rglob("*")} == before
    assert read_spec(world.root) == SPEC
    with pytest.raises(FileExistsError):
        build_world(world.root, replace(SPEC, seed=9))


def test_shards_read_back_with_the_right_rows(world):
    sets = {"clean": SPEC.n_clean, "web": SPEC.n_web, "test": SPEC.n_test}
    keys = []
    for name, count in sets.items():
        folder = getattr(world, name)
        rows = shard_rows(folder)
        assert len(rows) == count
        assert all(r["status"] == "success" and r["key"].startswith(f"{name}-") for r in rows)
        keys += [r["key"] for r in rows]
        image = Image.open(io.BytesIO(rows[0]["jpg"]))
        assert image.format == "JPEG" and image.size == (64, 64)
    assert len(expand_inputs([str(world.web)])) == 4  # 200 rows, 64 a shard
    assert len(keys) == len(set(keys))
    assert set(load_scenes(world.truth)) == set(keys)
    for folder in (world.clean, world.web, world.test):
        assert world.truth not in (folder, *folder.parents) and folder not in world.truth.parents
        assert not any("truth" in p or "world.json" in p for p in expand_inputs([str(folder)]))
    meta = json.loads(world.world_json.read_text())
    assert meta["counts"]["web_noise"] == noise_counts(SPEC.n_web, SPEC.noise)


def test_clean_and_test_captions_are_true(world):
    scenes = load_scenes(world.truth)
    for folder in (world.clean, world.test):
        for row in shard_rows(folder):
            assert caption_is_correct(row["caption"], scenes[row["key"]]), row["caption"]


def test_every_object_keeps_its_colour_through_jpeg(world):
    scenes = load_scenes(world.truth)
    for name in ("clean", "web", "test"):
        for row in shard_rows(world.of(name)):
            index = int(row["key"].rsplit("-", 1)[1]) - 1
            image = Image.open(io.BytesIO(row["jpg"])).convert("RGB")
            for p in place(scenes[row["key"]], world_rng(SPEC, name, index)):
                x, y = p.solid_point()
                pixel = image.getpixel((int(x * 64), int(y * 64)))
                assert nearest_colour(pixel) == p.obj.colour, (row["key"], p.obj)


def test_web_noise_is_exact_and_of_the_stated_kind(world):
    scenes = load_scenes(world.truth)
    kinds = load_web_noise(world.truth)
    assert Counter(kinds.values()) == Counter(noise_counts(SPEC.n_web, SPEC.noise))
    assert set(Counter(kinds.values())) == set(NOISE_KINDS)
    for row in shard_rows(world.web):
        caption, scene, kind = row["caption"], scenes[row["key"]], kinds[row["key"]]
        read = parse(caption)
        if kind == "correct":
            assert read == scene
        elif kind == "swapped":
            assert read is not None and read != scene
        elif kind == "attribute":
            assert read is not None and len(differing_attributes(read, scene)) == 1
        elif kind == "partial":
            assert read is None and caption.split()[0] == "a", caption
        else:
            assert read is None, (kind, caption)


def test_every_caption_is_spelt_with_the_vocabulary(world):
    vocab = set(vocabulary())
    assert len(vocab) == len(vocabulary())
    seen = set()
    for folder in (world.clean, world.web, world.test):
        for row in shard_rows(folder):
            seen.update(words(row["caption"]))
    assert seen <= vocab
    assert {"ring", "background", "jpg", "7", ","} <= seen


def test_test_scenes_are_distinct_with_one_attribute_distractors(world):
    scenes = load_scenes(world.truth)
    groups = load_test_groups(world.truth)
    test = [scenes[k] for k in sorted(groups)]
    assert len(test) == SPEC.n_test and len(set(test)) == len(test)
    members: dict[int, list[Scene]] = {}
    for key, group in groups.items():
        members.setdefault(group, []).append(scenes[key])
    assert len(members) >= SPEC.n_test // SPEC.test_group_size
    assert sum(len(m) == SPEC.test_group_size for m in members.values()) >= len(members) - 2
    for group in members.values():
        base, *variants = group
        for variant in variants:
            assert len(differing_attributes(base, variant)) == 1


def test_the_audit_counts_partial_web_captions_apart_from_right_and_wrong(world, tmp_path):
    """A round over the world's web set, written as a filter that kept every true web caption
    (complete or partial) and the first four wrong ones, and a captioner that wrote each
    image's true caption: partial captions are neither in the filter's recall nor against its
    precision, have their own kept share, and are no noise in what a row trains on."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from capfilt.world.audit import audit_round
    from capfilt.world.build import load_scenes

    noise, scenes = load_web_noise(world.truth), load_scenes(world.truth)
    wrong_kept = [k for k, kind in sorted(noise.items()) if kind not in ("correct", "partial")][:4]
    rows = []
    for row in shard_rows(world.web):
        key, web = row["key"], row["caption"]
        true = describe(scenes[key], template=0)
        keep_web = noise[key] in ("correct", "partial") or key in wrong_kept
        rows.append({"key": key, "web_caption": web, "synthetic_captions": [true],
                     "synthetic_guard": [None],
                     "kept_captions": [web, true] if keep_web else [true],
                     "kept_sources": ["web", "synthetic"] if keep_web else ["synthetic"]})
    (tmp_path / "round" / "shards").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "round" / "shards" / "00000.parquet")

    audit = audit_round(tmp_path / "round", world.truth)
    counts = noise_counts(SPEC.n_web, SPEC.noise)
    wrong = SPEC.n_web - counts["correct"] - counts["partial"]
    assert audit["filter"] == {
        "wrong_web_dropped": round((wrong - 4) / wrong, 4), "right_web_kept": 1.0,
        "precision": round(counts["correct"] / (counts["correct"] + 4), 4), "recall": 1.0,
        "partial_web_kept": 1.0}
    assert audit["web_kept_by_kind"]["partial"] == {"kept": counts["partial"],
                                                    "of": counts["partial"]}
    kept_web = counts["correct"] + counts["partial"] + 4
    assert audit["noise_ratio"]["kept_web"] == round(4 / kept_web, 4)
    assert audit["synthetic"]["kept_correct"] == 1.0
