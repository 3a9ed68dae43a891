"""Writing a demo world: clean, web and test sets as img2dataset parquet, and the hidden truth.

```
world/
  world.json               the spec, the counts, the attribute sets; written last
  clean/00000.parquet      the small clean set (this world's COCO): true captions
  web/00000.parquet ...    the large web set: captions noisy in the mix of spec.noise
  test/00000.parquet       held-out test set: true captions, hard distractors
  truth/scenes.parquet     key, set, scene_json, group: what every image shows
  truth/web_noise.parquet  key, kind, true_caption, web_caption: every web caption's kind
```

Shards have img2dataset's columns (``IMG2DATASET_SCHEMA``), every row a success with a
64 px JPEG (quality 90), its sha256 and size. Keys are unique across sets: ``clean-000001``,
``web-000001``, ``test-000001``. The truth lies outside the shard folders, so reading the
shards (as CapFilt does) never sees it; only evaluation reads it.

The test set is built so that retrieval is not saturated: it is made of groups of
``test_group_size`` scenes (default 4), a random base scene and variants of it that each differ
from the base in exactly one attribute (a different kind of attribute for each variant where
the scene has enough kinds). Every test scene is distinct. ``truth/scenes.parquet`` gives each
test image its group number (-1 for other sets). Clean and web scenes are drawn uniformly and
may repeat; they may also show a test scene, in another picture.

Every random draw comes from a ``random.Random`` seeded by a string made of the spec's seed,
the set and the image index, so a world is a function of its spec: the same spec writes
byte-identical files. Measured on the 2-core development VM, single process: the default
spec (1,000 clean, 6,000 web, 500 test, 64 px) takes 3.1-3.5 s of CPU, 3.1 s of wall time when
the machine is quiet and up to 6-7 s when other jobs share its cores.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.shards.samples import IMG2DATASET_ROW_GROUP, IMG2DATASET_SCHEMA
from capfilt.world.grammar import describe
from capfilt.world.noise import NoiseMix, assign_kinds, noise_counts, web_caption
from capfilt.world.render import JPEG_QUALITY, jpeg_bytes, render
from capfilt.world.scene import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    attribute_kinds,
    change_attribute,
    random_scene,
)

WORLD_FORMAT = "capfilt-world/1"
SETS = ("clean", "web", "test")
SCENES_SCHEMA = pa.schema([("key", pa.string()), ("set", pa.string()),
                           ("scene_json", pa.string()), ("group", pa.int64())])
WEB_NOISE_SCHEMA = pa.schema([("key", pa.string()), ("kind", pa.string()),
                              ("true_caption", pa.string()), ("web_caption", pa.string())])


@dataclass(frozen=True)
class WorldSpec:
    """Everything a world is a function of."""

    seed: int = 0
    n_clean: int = 1000
    n_web: int = 6000
    n_test: int = 500
    image_size: int = 64
    rows_per_shard: int = 1000
    two_object_fraction: float = 0.5
    test_group_size: int = 4
    noise: NoiseMix = field(default_factory=NoiseMix)

    def __post_init__(self) -> None:
        if min(self.n_clean, self.n_web, self.n_test) < 0:
            raise ValueError("set sizes must be >= 0")
        if self.rows_per_shard < 1 or self.test_group_size < 1 or self.image_size < 8:
            raise ValueError("rows_per_shard and test_group_size must be >= 1, image_size >= 8")
        if not 0.0 <= self.two_object_fraction <= 1.0:
            raise ValueError("two_object_fraction must lie in [0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> WorldSpec:
        return cls(**{**data, "noise": NoiseMix(**data.get("noise", {}))})


@dataclass(frozen=True)
class WorldPaths:
    """Where a world's parts lie."""

    root: Path

    @property
    def clean(self) -> Path:
        return self.root / "clean"

    @property
    def web(self) -> Path:
        return self.root / "web"

    @property
    def test(self) -> Path:
        return self.root / "test"

    @property
    def truth(self) -> Path:
        return self.root / "truth"

    @property
    def world_json(self) -> Path:
        return self.root / "world.json"

    def of(self, set_name: str) -> Path:
        """The shard folder of set ``clean``, ``web`` or ``test``."""
        if set_name not in SETS:
            raise ValueError(f"unknown set {set_name!r} (sets: {', '.join(SETS)})")
        return self.root / set_name


def world_rng(spec: WorldSpec, *parts: object) -> random.Random:
    """The random stream of one part of a world. Image ``i`` of set ``s`` (counted from 0; its
    key is ``s-{i+1:06d}``) is drawn, then captioned, from ``world_rng(spec, s, i)``, so
    ``render.place`` with that stream says where each object of the image lies."""
    return random.Random(":".join(["capfilt-world", str(spec.seed), *map(str, parts)]))


def _key(set_name: str, index: int) -> str:
    return f"{set_name}-{index + 1:06d}"


def draw_test_scenes(spec: WorldSpec) -> list[tuple[Scene, int]]:
    """The test set's scenes with their group numbers: groups of a base scene and variants
    differing from it in one attribute each, all scenes distinct."""
    rng = world_rng(spec, "test", "scenes")
    used: set[Scene] = set()
    out: list[tuple[Scene, int]] = []
    group = 0
    misses = 0
    while len(out) < spec.n_test:
        base = random_scene(rng, spec.two_object_fraction)
        if base in used:
            misses += 1
            if misses > 100 * spec.n_test + 1000:
                raise ValueError(f"cannot draw {spec.n_test} distinct test scenes")
            continue
        members = [base]
        kinds = list(attribute_kinds(base))
        rng.shuffle(kinds)
        for i in range(20 * spec.test_group_size):
            if len(members) >= min(spec.test_group_size, spec.n_test - len(out)):
                break
            variant = change_attribute(base, kinds[i % len(kinds)], rng)
            if variant not in used and variant not in members:
                members.append(variant)
        used.update(members)
        out += [(scene, group) for scene in members]
        group += 1
    return out


def _image_row(spec: WorldSpec, set_name: str, index: int, scene: Scene) -> tuple[dict, str]:
    """The shard row of one image (caption: its true caption) and that true caption."""
    rng = world_rng(spec, set_name, index)
    image = render(scene, spec.image_size, rng)
    caption = describe(scene, rng)
    data = jpeg_bytes(image, JPEG_QUALITY)
    key = _key(set_name, index)
    row = {
        "key": key, "url": f"http://world.example/{set_name}/{key}.jpg", "caption": caption,
        "jpg": data, "status": "success", "error_message": None,
        "width": spec.image_size, "height": spec.image_size,
        "original_width": spec.image_size, "original_height": spec.image_size,
        "exif": None, "sha256": hashlib.sha256(data).hexdigest(),
    }
    return row, caption


def _write_shards(folder: Path, rows: list[dict], rows_per_shard: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for shard, start in enumerate(range(0, max(len(rows), 1), rows_per_shard)):
        table = pa.Table.from_pylist(rows[start:start + rows_per_shard], schema=IMG2DATASET_SCHEMA)
        name = f"{shard:05d}.parquet"
        # img2dataset's row groups: the pieces a training stream shuffles and deals out.
        pq.write_table(table, folder / name, row_group_size=IMG2DATASET_ROW_GROUP)
        names.append(name)
    return names


def read_spec(folder: str | Path) -> WorldSpec:
    """The spec of the world built in ``folder``."""
    data = json.loads((Path(folder) / "world.json").read_text())
    return WorldSpec.from_dict(data["spec"])


def build_world(folder: str | Path, spec: WorldSpec = WorldSpec()) -> WorldPaths:
    """Write the world of ``spec`` into ``folder``; return where its parts lie.

    ``world.json`` is written last. A folder that already holds the world of the same spec is
    left as it is; one that holds another world, or parts of a world without ``world.json``
    (an interrupted build), is an error: nothing is deleted here.
    """
    paths = WorldPaths(Path(folder))
    if paths.world_json.exists():
        existing = read_spec(paths.root)
        if existing == spec:
            return paths
        raise FileExistsError(f"{paths.root} holds another world ({existing}); "
                              "choose another folder or remove it")
    leftovers = [p for d in (*map(paths.of, SETS), paths.truth) if d.exists() for p in d.iterdir()]
    if leftovers:
        raise FileExistsError(f"{paths.root} holds files but no world.json (an interrupted "
                              f"build?), e.g. {leftovers[0]}; remove them or choose another folder")

    scene_rows: list[dict] = []
    shards: dict[str, list[str]] = {}

    def write_set(set_name: str, scenes: list[Scene], groups: list[int] | None = None):
        rows, captions = [], []
        for index, scene in enumerate(scenes):
            row, caption = _image_row(spec, set_name, index, scene)
            rows.append(row)
            captions.append(caption)
            scene_rows.append({"key": row["key"], "set": set_name, "scene_json": scene.to_json(),
                               "group": -1 if groups is None else groups[index]})
        return rows, captions

    scene_rng = world_rng(spec, "clean", "scenes")
    clean_scenes = [random_scene(scene_rng, spec.two_object_fraction) for _ in range(spec.n_clean)]
    rows, _ = write_set("clean", clean_scenes)
    shards["clean"] = _write_shards(paths.clean, rows, spec.rows_per_shard)

    scene_rng = world_rng(spec, "web", "scenes")
    web_scenes = [random_scene(scene_rng, spec.two_object_fraction) for _ in range(spec.n_web)]
    rows, true_captions = write_set("web", web_scenes)
    kinds = assign_kinds(spec.n_web, spec.noise, world_rng(spec, "web", "kinds"))
    noise_rows = []
    for index, (row, kind) in enumerate(zip(rows, kinds)):
        rng = world_rng(spec, "web-noise", index)
        caption = web_caption(kind, index, web_scenes, true_captions, rng)
        row["caption"] = caption
        noise_rows.append({"key": row["key"], "kind": kind,
                           "true_caption": true_captions[index], "web_caption": caption})
    shards["web"] = _write_shards(paths.web, rows, spec.rows_per_shard)

    tests = draw_test_scenes(spec)
    rows, _ = write_set("test", [s for s, _ in tests], [g for _, g in tests])
    shards["test"] = _write_shards(paths.test, rows, spec.rows_per_shard)

    paths.truth.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(scene_rows, schema=SCENES_SCHEMA),
                   paths.truth / "scenes.parquet")
    pq.write_table(pa.Table.from_pylist(noise_rows, schema=WEB_NOISE_SCHEMA),
                   paths.truth / "web_noise.parquet")

    world = {
        "format": WORLD_FORMAT,
        "spec": spec.to_dict(),
        "counts": {"clean": spec.n_clean, "web": spec.n_web, "test": spec.n_test,
                   "test_groups": len({g for _, g in tests}),
                   "web_noise": noise_counts(spec.n_web, spec.noise)},
        "shards": shards,
        "attributes": {"shapes": SHAPES, "colours": COLOURS, "sizes": SIZES,
                       "positions": POSITIONS, "backgrounds": BACKGROUNDS},
        "truth": ["truth/scenes.parquet", "truth/web_noise.parquet"],
    }
    tmp = paths.world_json.with_name("world.json.tmp")
    tmp.write_text(json.dumps(world, indent=2) + "\n")
    tmp.replace(paths.world_json)
    return paths


def load_scenes(truth_folder: str | Path) -> dict[str, Scene]:
    """What every image of every set shows, by key."""
    table = pq.read_table(Path(truth_folder) / "scenes.parquet", columns=["key", "scene_json"])
    return {k: Scene.from_json(s) for k, s in zip(table.column("key").to_pylist(),
                                                  table.column("scene_json").to_pylist())}


def load_web_noise(truth_folder: str | Path) -> dict[str, str]:
    """The noise kind of every web caption, by key ("correct", "swapped", ...)."""
    table = pq.read_table(Path(truth_folder) / "web_noise.parquet", columns=["key", "kind"])
    return dict(zip(table.column("key").to_pylist(), table.column("kind").to_pylist()))


def load_test_groups(truth_folder: str | Path) -> dict[str, int]:
    """The hard-distractor group of every test image, by key."""
    table = pq.read_table(Path(truth_folder) / "scenes.parquet", columns=["key", "set", "group"])
    return {k: g for k, s, g in zip(*(table.column(c).to_pylist() for c in ("key", "set", "group")))
            if s == "test"}
