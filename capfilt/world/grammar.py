"""True captions of the demo world, and reading them back.

Every caption states every attribute of every object and the background, lower case, in one of
five phrasings (``TEMPLATES``). An object reads "a {size} {colour} {shape} {where}", where is
"on the left", "on the right" or "in the center"; two objects are joined with "and", the left
one first. Examples:

    a small red ring on the left on a white background
    there is a large blue square in the center, black background
    a gray background with a small green cross on the left and a large yellow triangle on the right

The longest caption has 19 words. ``parse`` is the exact inverse of ``describe`` (it forgives
case, surrounding spaces, spaces around commas and a final full stop), so a generated caption
can be checked attribute by attribute. ``words`` splits a caption into words the way a BERT
basic tokenizer does (a comma is a word of its own).
"""

from __future__ import annotations

import random
import re

from capfilt.world.scene import BACKGROUNDS, COLOURS, SHAPES, SIZES, Scene, SceneObject

WHERE = {
    "left": "on the left",
    "right": "on the right",
    "center": "in the center",
}
TEMPLATES = (
    "{objects} on a {background} background",
    "there is {objects}, {background} background",
    "a {background} background with {objects}",
    "{objects} against a {background} background",
    "{objects}, the background is {background}",
)


def describe_object(obj: SceneObject) -> str:
    return f"a {obj.size} {obj.colour} {obj.shape} {WHERE[obj.position]}"


def describe(scene: Scene, rng: random.Random | None = None, template: int | None = None) -> str:
    """A true caption of ``scene``: template ``template``, or one drawn with ``rng``."""
    if template is None:
        template = (rng or random.Random(0)).randrange(len(TEMPLATES))
    objects = " and ".join(describe_object(o) for o in scene.objects)
    return TEMPLATES[template].format(objects=objects, background=scene.background)


def _alternatives(values) -> str:
    return "|".join(re.escape(v) for v in values)


_OBJECT = (
    f"a ({_alternatives(SIZES)}) ({_alternatives(COLOURS)}) ({_alternatives(SHAPES)}) "
    f"({_alternatives(WHERE.values())})"
)
_OBJECTS = re.compile(f"{_OBJECT}(?: and {_OBJECT})?")
_POSITION_OF = {phrase: position for position, phrase in WHERE.items()}


def _template_pattern(template: str) -> re.Pattern:
    pattern = re.escape(template)
    pattern = pattern.replace(re.escape("{objects}"), f"(?P<objects>{_OBJECTS.pattern})")
    pattern = pattern.replace(re.escape("{background}"),
                              f"(?P<background>{_alternatives(BACKGROUNDS)})")
    return re.compile(pattern)


_TEMPLATE_PATTERNS = tuple(_template_pattern(t) for t in TEMPLATES)


def normalise(caption: str) -> str:
    """Lower case, single spaces, ", " between clauses, no final full stop."""
    text = " ".join(caption.lower().split())
    text = re.sub(r"\s*,\s*", ", ", text).strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def parse(caption: str) -> Scene | None:
    """The scene a caption states, or None when it does not state a whole, possible scene."""
    text = normalise(caption)
    for pattern in _TEMPLATE_PATTERNS:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        parts = _OBJECTS.fullmatch(match.group("objects")).groups()
        objects = tuple(
            SceneObject(shape=parts[i + 2], colour=parts[i + 1], size=parts[i],
                        position=_POSITION_OF[parts[i + 3]])
            for i in (0, 4) if parts[i] is not None
        )
        try:
            return Scene(objects, match.group("background"))
        except ValueError:  # e.g. two objects both on the left
            return None
    return None


def caption_is_correct(caption: str, scene: Scene) -> bool:
    """True iff the caption states exactly ``scene``: every attribute, objects in any order."""
    return parse(caption) == scene


def words(caption: str) -> list[str]:
    """The words of a caption, commas as words of their own."""
    return caption.replace(",", " , ").split()


def grammar_words() -> set[str]:
    """Every word a true caption can contain."""
    out = set(SHAPES) | set(COLOURS) | set(SIZES) | set(BACKGROUNDS) | {"a", "and"}
    for phrase in WHERE.values():
        out.update(phrase.split())
    for template in TEMPLATES:
        out.update(words(template.format(objects="", background="")))
    return out
