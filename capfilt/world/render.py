"""Drawing a scene: small pictures (48 to 96 px) whose attributes stay unambiguous under jitter.

Geometry, as fractions of the image side: object centres at left (0.25, 0.5), right
(0.75, 0.5) and center (0.5, 0.5), each moved by up to
±0.03; half-extents 0.10 (small) and 0.19 (large), scaled by 0.94-1.06. Two objects stand 0.5
apart, less 0.06 of jitter, and together reach at most 2 x 0.19 x 1.06 = 0.40: they never
touch. Object colours move by up to ±12 per channel, backgrounds by ±4 (no visible tint). The
picture is drawn at twice the size and box-averaged down (smooth edges), then every channel of
every pixel gets uniform noise in ±6. JPEGs are written at quality 90 without chroma
subsampling (4:4:4), so even a small triangle keeps its colour: the pixel at every object's
solid point (its centre; for a ring, the middle of its band) of the default world decodes
nearest its own palette colour. Everything random comes from the ``rng`` passed in, so a
picture is a function of its seed.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageDraw

from capfilt.world.scene import Scene, SceneObject

COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 190),
}
BACKGROUND_RGB = {"white": (245, 245, 240), "gray": (128, 128, 128), "black": (25, 25, 25)}
CENTRES = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "center": (0.5, 0.5),
}
HALF_EXTENT = {"small": 0.10, "large": 0.19}
RING_WIDTH = 0.45  # of the half-extent: the hole is 0.55 of the ring's radius
POSITION_JITTER = 0.03
SIZE_JITTER = 0.06
COLOUR_JITTER = 12
BACKGROUND_JITTER = 4
PIXEL_NOISE = 6
SUPERSAMPLE = 2
JPEG_QUALITY = 90
# Byte b of a random string becomes b mod (2 * PIXEL_NOISE + 1): noise in 0..12, offset by -6.
_NOISE_TABLE = bytes(b % (2 * PIXEL_NOISE + 1) for b in range(256))


@dataclass(frozen=True)
class Placement:
    """Where one object is drawn: centre and half-extent, as fractions of the image side."""

    obj: SceneObject
    x: float
    y: float
    half: float

    def box(self) -> tuple[float, float, float, float]:
        return (self.x - self.half, self.y - self.half, self.x + self.half, self.y + self.half)

    def solid_point(self) -> tuple[float, float]:
        """A point well inside the drawn shape: its centre, or the middle of a ring's band."""
        if self.obj.shape == "ring":
            return (self.x + (1 - RING_WIDTH / 2) * self.half, self.y)
        return (self.x, self.y)


def place(scene: Scene, rng: random.Random) -> list[Placement]:
    """The jittered centre and half-extent of every object of ``scene``."""
    out = []
    for obj in scene.objects:
        x, y = CENTRES[obj.position]
        x += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        y += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        half = HALF_EXTENT[obj.size] * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
        out.append(Placement(obj, x, y, half))
    return out


def _jitter(rgb: tuple[int, int, int], amount: int, rng: random.Random) -> tuple[int, ...]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def _draw(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, h: float, fill) -> None:
    if shape == "ring":
        draw.ellipse((x - h, y - h, x + h, y + h), outline=fill, width=max(1, round(RING_WIDTH * h)))
    elif shape == "square":
        draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], fill=fill)
    elif shape == "cross":
        arm = 0.36 * h
        draw.rectangle((x - h, y - arm, x + h, y + arm), fill=fill)
        draw.rectangle((x - arm, y - h, x + arm, y + h), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """A ``size`` x ``size`` RGB picture of ``scene``."""
    rng = rng or random.Random(0)
    side = size * SUPERSAMPLE
    placed = place(scene, rng)  # first, so place(scene, same seed) says where render drew
    image = Image.new("RGB", (side, side), _jitter(BACKGROUND_RGB[scene.background],
                                                   BACKGROUND_JITTER, rng))
    draw = ImageDraw.Draw(image)
    for p in placed:
        fill = _jitter(COLOUR_RGB[p.obj.colour], COLOUR_JITTER, rng)
        _draw(draw, p.obj.shape, p.x * side, p.y * side, p.half * side, fill)
    image = image.reduce(SUPERSAMPLE)  # a box average, faster than resize
    noise = Image.frombytes("RGB", (size, size),
                            rng.randbytes(size * size * 3).translate(_NOISE_TABLE))
    return ImageChops.add(image, noise, scale=1.0, offset=-PIXEL_NOISE)


def jpeg_bytes(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    # subsampling=0 is 4:4:4: small shapes keep their colour.
    image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()
