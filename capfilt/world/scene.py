"""What a picture of the demo world shows: one or two shapes on a plain background.

Decisions, chosen so a tiny BLIP trained from scratch on a laptop can tell every value apart:

- shapes: ring, square, triangle, cross (four outlines that stay distinct at 10 px). A filled
  circle was the fourth until it was measured: seed 0's CapFilt round (48 px) wrote 3,000
  synthetic captions with 858 shape errors, and circle was in 803 of the 1,075 shape confusions (with
  square 482, with cross 277): it looks like a square with its corners cut, or a cross with its
  gaps filled. A ring (hollow) differs from all three at its centre. Shape errors in 200 sampled
  test captions of a captioner trained on the clean set alone (400 steps, seed-0 worlds):

      width, lr           with the circle   with the ring
      96, 1e-3                  96                65
      96, 3e-3 (demo)           -                 46
      128, 3e-3                 74                37

- colours: red, green, blue, yellow, purple (five hues far apart in RGB; orange was dropped,
  a tiny captioner confused it with yellow more than any other pair);
- sizes: small and large (about 0.2 and 0.38 of the image side across);
- positions: left, right, center. One object may stand at any of them; two objects stand side
  by side (left and right), so they never overlap. Position errors a 96-wide, two-layer
  captioner made in 200 test captions: with five positions (top and bottom too; 64 px, patch
  16, 900 steps on 1,000 clean pictures) 105; with these three (600 steps on 2,000) still 71
  to 89 at 64 px, patch 16 (a center object straddles the 4 x 4 patch grid's middle line and
  was read as left or right); on a 3 x 3 grid, where each position has its own patch column
  (48 px with patch 16, the demo's setting, or 96 px with patch 32), 3;
- backgrounds: white, gray, black, none of them an object colour.

That gives 360 one-object scenes and 4,800 two-object ones. A ``Scene`` keeps its objects in a
canonical order (left before right), so two scenes that show the same thing compare equal
whatever order their objects were given in.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

SHAPES = ("ring", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "center")
BACKGROUNDS = ("white", "gray", "black")
# Where two objects may stand: never both at the same place, never overlapping.
PAIRS = (("left", "right"),)
# The attributes of one object, in the order captions state them.
OBJECT_ATTRIBUTES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}


@dataclass(frozen=True)
class SceneObject:
    """One shape in a picture."""

    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for name, values in OBJECT_ATTRIBUTES.items():
            if getattr(self, name) not in values:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {values}")

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size,
                "position": self.position}


@dataclass(frozen=True)
class Scene:
    """One or two objects on a background; objects kept in canonical (position) order."""

    objects: tuple[SceneObject, ...]
    background: str

    def __post_init__(self) -> None:
        objects = tuple(sorted(self.objects, key=lambda o: POSITIONS.index(o.position)))
        object.__setattr__(self, "objects", objects)
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background {self.background!r} is not one of {BACKGROUNDS}")
        if len(objects) == 2:
            if tuple(o.position for o in objects) not in PAIRS:
                raise ValueError(f"two objects must stand at one of {PAIRS}, not "
                                 f"{objects[0].position} and {objects[1].position}")
        elif len(objects) != 1:
            raise ValueError(f"a scene has one or two objects, not {len(objects)}")

    def to_dict(self) -> dict:
        return {"objects": [o.to_dict() for o in self.objects], "background": self.background}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        return cls(tuple(SceneObject(**o) for o in data["objects"]), data["background"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Scene:
        return cls.from_dict(json.loads(text))


def random_scene(rng: random.Random, two_object_fraction: float = 0.5) -> Scene:
    """A scene drawn uniformly: one object with probability ``1 - two_object_fraction``."""
    if rng.random() < two_object_fraction:
        positions = rng.choice(PAIRS)
    else:
        positions = (rng.choice(POSITIONS),)
    objects = tuple(
        SceneObject(rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(SIZES), p)
        for p in positions
    )
    return Scene(objects, rng.choice(BACKGROUNDS))


def attributes(scene: Scene) -> dict[str, str]:
    """Every attribute of a scene by name: ``background``, ``object1.shape``, ..."""
    out = {"background": scene.background}
    for i, obj in enumerate(scene.objects, 1):
        for name in OBJECT_ATTRIBUTES:
            out[f"object{i}.{name}"] = getattr(obj, name)
    return out


def differing_attributes(a: Scene, b: Scene) -> list[str] | None:
    """Names of the attributes in which two scenes differ; None if their object counts differ."""
    if len(a.objects) != len(b.objects):
        return None
    left, right = attributes(a), attributes(b)
    return [name for name in left if left[name] != right[name]]


def attribute_kinds(scene: Scene) -> tuple[str, ...]:
    """The kinds of attribute a one-attribute change can touch (a pair's positions are fixed:
    moving one object of a pair would put both at the same place)."""
    if len(scene.objects) == 2:
        return ("shape", "colour", "size", "background")
    return ("shape", "colour", "size", "position", "background")


def change_attribute(scene: Scene, kind: str, rng: random.Random) -> Scene:
    """The scene with one attribute of kind ``kind`` (of one random object, unless it is the
    background) changed to another value, drawn uniformly."""
    if kind == "background":
        return Scene(scene.objects, rng.choice([b for b in BACKGROUNDS if b != scene.background]))
    if kind not in attribute_kinds(scene):
        raise ValueError(f"cannot change {kind!r} of a {len(scene.objects)}-object scene")
    index = rng.randrange(len(scene.objects))
    obj = scene.objects[index]
    old = getattr(obj, kind)
    new = rng.choice([v for v in OBJECT_ATTRIBUTES[kind] if v != old])
    changed = SceneObject(**{**obj.to_dict(), kind: new})
    objects = scene.objects[:index] + (changed,) + scene.objects[index + 1:]
    return Scene(objects, scene.background)


def change_one_attribute(scene: Scene, rng: random.Random) -> Scene:
    """The scene with exactly one attribute changed: the kind of attribute is drawn uniformly
    (shape, colour, size, position for one object, background), then the object and value."""
    return change_attribute(scene, rng.choice(attribute_kinds(scene)), rng)


def one_attribute_variants(scene: Scene) -> list[Scene]:
    """Every scene that differs from ``scene`` in exactly one attribute."""
    out = [Scene(scene.objects, b) for b in BACKGROUNDS if b != scene.background]
    for index, obj in enumerate(scene.objects):
        for kind in attribute_kinds(scene):
            if kind == "background":
                continue
            for value in OBJECT_ATTRIBUTES[kind]:
                if value != getattr(obj, kind):
                    changed = SceneObject(**{**obj.to_dict(), kind: value})
                    out.append(Scene(scene.objects[:index] + (changed,)
                                     + scene.objects[index + 1:], scene.background))
    return out
