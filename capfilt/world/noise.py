"""The web set's captions: 40% of them wrong, in an exact, stated mix.

``NOISE_MIX`` (the default of ``WorldSpec.noise``):

    correct    0.60  the true caption
    partial    0.00  true but incomplete, as most real alt-text is: some attributes only
                     ("a red ring", "a small square and a large cross", "a triangle on a
                     black background"); true, so never counted wrong, but never a whole scene
    swapped    0.12  the true caption of another web image whose scene differs
    attribute  0.12  a true caption of the scene with exactly one attribute changed
                     (shape, colour, size, position of a lone object, or background)
    spam       0.08  advert boilerplate ("buy cheap watches online today")
    filename   0.04  a camera file name, digits as words ("dsc 0 4 1 7 jpg")
    generic    0.04  a caption that says nothing ("untitled picture")

``assign_kinds`` deals the kinds out exactly: counts by largest remainder, then shuffled, so
6,000 web images get exactly 3,600 correct captions, 720 swapped ones, and so on. All noise
text is made of fixed word lists (``noise_words``), digits 0-9 included, so a tokenizer built
from ``vocabulary()`` spells every caption as whole words. No noise text parses as a scene.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields

from capfilt.world.grammar import WHERE, describe, words
from capfilt.world.scene import Scene, SceneObject, change_one_attribute, random_scene

SPAM_OPENERS = ("buy cheap", "best", "discount", "free", "top rated", "cheap", "new")
SPAM_PRODUCTS = ("watches", "shoes", "phones", "sunglasses", "handbags", "tickets", "loans",
                 "perfume", "jewelry", "vitamins")
SPAM_CLOSERS = ("online", "today", "for sale", "on sale now", "with free shipping",
                "click here", "at low prices", "limited offer")
SPAM_LINES = (
    "click here for free shipping",
    "subscribe to our newsletter",
    "all rights reserved",
    "follow us for more",
    "sign up now and save",
    "visit our store today",
    "lowest prices guaranteed",
    "shop now",
)
FILENAME_PREFIXES = ("img", "dsc", "dscn", "dcim", "pict", "photo", "image", "scan")
FILENAME_EXTENSIONS = ("jpg", "jpeg", "png")
DIGITS = tuple("0123456789")
GENERIC = (
    "image",
    "photo",
    "picture",
    "untitled",
    "untitled picture",
    "untitled image",
    "an image",
    "a photo",
    "stock photo",
    "no description available",
    "image not found",
    "photo of the day",
)


@dataclass(frozen=True)
class NoiseMix:
    """Fractions of the web set's captions by kind; they sum to 1."""

    correct: float = 0.60
    swapped: float = 0.12
    attribute: float = 0.12
    spam: float = 0.08
    filename: float = 0.04
    generic: float = 0.04
    partial: float = 0.0

    def __post_init__(self) -> None:
        values = list(self.as_dict().values())
        if min(values) < 0 or abs(sum(values) - 1.0) > 1e-9:
            raise ValueError(f"noise fractions must be >= 0 and sum to 1, got {self.as_dict()}")

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @property
    def wrong(self) -> float:
        return 1.0 - self.correct - self.partial


NOISE_KINDS = tuple(f.name for f in fields(NoiseMix))
# Kinds whose caption is true of its image (a partial one states less than all of it).
TRUE_KINDS = ("correct", "partial")
NOISE_MIX = NoiseMix()


def noise_counts(n: int, mix: NoiseMix = NOISE_MIX) -> dict[str, int]:
    """How many of ``n`` captions are of each kind: largest remainder, ties in kind order."""
    shares = {kind: n * p for kind, p in mix.as_dict().items()}
    counts = {kind: int(share) for kind, share in shares.items()}
    by_remainder = sorted(NOISE_KINDS, key=lambda k: (-(shares[k] - counts[k]),
                                                      NOISE_KINDS.index(k)))
    for kind in by_remainder[: n - sum(counts.values())]:
        counts[kind] += 1
    return counts


def assign_kinds(n: int, mix: NoiseMix, rng: random.Random) -> list[str]:
    """A kind for each of ``n`` captions, in exactly the proportions of ``noise_counts``."""
    kinds = [kind for kind, count in noise_counts(n, mix).items() for _ in range(count)]
    rng.shuffle(kinds)
    return kinds


def spam_text(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return rng.choice(SPAM_LINES)
    return f"{rng.choice(SPAM_OPENERS)} {rng.choice(SPAM_PRODUCTS)} {rng.choice(SPAM_CLOSERS)}"


def filename_text(rng: random.Random) -> str:
    digits = " ".join(rng.choice(DIGITS) for _ in range(rng.randint(3, 5)))
    return f"{rng.choice(FILENAME_PREFIXES)} {digits} {rng.choice(FILENAME_EXTENSIONS)}"


def generic_text(rng: random.Random) -> str:
    return rng.choice(GENERIC)


# What a partial caption keeps of each object, and whether it names the background.
PARTIAL_FORMS = (
    ("colour", "shape"),
    ("size", "shape"),
    ("colour", "shape", "position"),
    ("shape", "background"),
)


def _partial_object(obj: SceneObject, form: tuple[str, ...]) -> str:
    text = "a " + " ".join(getattr(obj, name) for name in ("size", "colour", "shape")
                           if name in form)
    return f"{text} {WHERE[obj.position]}" if "position" in form else text


def partial_caption(scene: Scene, form: tuple[str, ...]) -> str:
    """``scene`` stated with only the attributes named in ``form`` (of size, colour, shape,
    position for each object, and background), in the grammar's words and order."""
    objects = " and ".join(_partial_object(o, form) for o in scene.objects)
    return f"{objects} on a {scene.background} background" if "background" in form else objects


def partial_text(scene: Scene, rng: random.Random) -> str:
    """A true caption of ``scene`` that leaves attributes out (``PARTIAL_FORMS``), as alt-text
    does; it never states a whole scene, so ``parse`` reads none."""
    return partial_caption(scene, rng.choice(PARTIAL_FORMS))


def web_caption(kind: str, index: int, scenes: list[Scene], true_captions: list[str],
                rng: random.Random) -> str:
    """The web caption of image ``index`` of a web set, given its noise kind.

    A swapped caption is the true caption of another image of the set whose scene differs
    (a scene drawn at random stands in when every image shows the same scene)."""
    scene = scenes[index]
    if kind == "correct":
        return true_captions[index]
    if kind == "partial":
        return partial_text(scene, rng)
    if kind == "swapped":
        for _ in range(64):
            other = rng.randrange(len(scenes))
            if scenes[other] != scene:
                return true_captions[other]
        others = [i for i, s in enumerate(scenes) if s != scene]
        if others:
            return true_captions[rng.choice(others)]
        other_scene = scene
        while other_scene == scene:
            other_scene = random_scene(rng)
        return describe(other_scene, rng)
    if kind == "attribute":
        return describe(change_one_attribute(scene, rng), rng)
    if kind == "spam":
        return spam_text(rng)
    if kind == "filename":
        return filename_text(rng)
    if kind == "generic":
        return generic_text(rng)
    raise ValueError(f"unknown noise kind {kind!r} (kinds: {', '.join(NOISE_KINDS)})")


def noise_words() -> set[str]:
    """Every word the spam, file-name and generic captions can contain."""
    out = set(DIGITS) | set(FILENAME_PREFIXES) | set(FILENAME_EXTENSIONS)
    for phrase in SPAM_OPENERS + SPAM_PRODUCTS + SPAM_CLOSERS + SPAM_LINES + GENERIC:
        out.update(words(phrase))
    return out
