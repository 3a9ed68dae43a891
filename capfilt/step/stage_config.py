"""What a CapFilt worker is asked to run: plain data that pickles to Ray actors.

Kept apart from the modules that run it so that the round's driver, which only plans and hands
out shards, never imports torch or transformers (it starts in about a second, not twelve).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from capfilt.captioning.guards import CaptionGuards
from capfilt.captioning.settings import SamplingConfig
from capfilt.scoring.selection import Policy, check_choice, check_whole


@dataclass(frozen=True)
class StageConfig:
    """What the step computes: the models, how captions are written and which texts are kept.
    Plain data, so it pickles to Ray actors; where it runs is a ``Placement``."""

    captioner: str
    filter: str
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    policy: Policy = field(default_factory=Policy)
    seed: int = 0
    dtype: str = "float32"
    itm_token: str = "enc"
    attention: str = "sdpa"  # "eager": Hugging Face's own BLIP attention modules
    guards: CaptionGuards = field(default_factory=CaptionGuards)

    def __post_init__(self):
        """Settings a worker would only trip on after loading its models: refused here."""
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"--seed {self.seed!r}: use a whole number")
        check_choice("--dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check_choice("--itm-token", self.itm_token, ("enc", "cls"))
        check_choice("attention", self.attention, ("sdpa", "eager"))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Placement:
    """Where a worker runs the step and how it decodes images: chosen by the worker pool
    (``workers/worker_pool.py``) from the node the worker lands on, not by the round.

    ``decode_processes`` > 0 decodes in that many processes (GPU workers: decode threads take
    the GIL from the model loop), else in ``decode_threads`` threads. ``jpeg_decoder``
    "torchvision" decodes and resizes JPEGs with torch on ``device`` (nvJPEG on a GPU), the
    rest in those threads or processes (``capfilt/images/torch_jpeg.py``); the pool never picks
    it yet: whether it is faster is for a GPU to measure."""

    device: str = "cpu"
    decode_threads: int = 2
    decode_processes: int = 0
    jpeg_decoder: str = "pil"

    def __post_init__(self):
        check_whole("decode_threads", self.decode_threads, 1)
        check_whole("decode_processes", self.decode_processes, 0)
        check_choice("jpeg_decoder", self.jpeg_decoder, ("pil", "torchvision"))

