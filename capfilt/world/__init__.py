"""The demo world: a synthetic image-caption world in which BLIP's CapFilt can be run in
miniature on a laptop, and checked, because every picture's truth is known.

Pictures show one or two coloured shapes on a plain background (``scene``), drawn at 64 px
(``render``); captions come from a small grammar that ``parse`` reads back (``grammar``); the
web set's captions are wrong in a stated, exact mix (``noise``); ``build_world`` writes clean,
web and test sets as img2dataset parquet shards and the hidden truth beside them (``build``).
Pure Python, PIL and pyarrow: no torch, no ray.
"""

from capfilt.world.build import (
    WorldPaths,
    WorldSpec,
    build_world,
    draw_test_scenes,
    load_scenes,
    load_test_groups,
    load_web_noise,
    read_spec,
)
from capfilt.world.grammar import TEMPLATES, caption_is_correct, describe, parse, words
from capfilt.world.noise import NOISE_KINDS, NOISE_MIX, NoiseMix, noise_counts
from capfilt.world.render import render
from capfilt.world.scene import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    differing_attributes,
    one_attribute_variants,
    random_scene,
)
from capfilt.world.vocab import vocabulary

__all__ = [
    "BACKGROUNDS", "COLOURS", "NOISE_KINDS", "NOISE_MIX", "POSITIONS", "SHAPES", "SIZES",
    "TEMPLATES", "NoiseMix", "Scene", "SceneObject", "WorldPaths", "WorldSpec", "build_world",
    "caption_is_correct", "describe", "differing_attributes", "draw_test_scenes", "load_scenes",
    "load_test_groups", "load_web_noise", "noise_counts", "one_attribute_variants", "parse",
    "random_scene", "read_spec", "render", "vocabulary", "words",
]
