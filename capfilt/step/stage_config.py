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
    """Everything a worker needs to build the step; plain data, so it pickles to Ray actors."""

    captioner: str
    filter: str
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    policy: Policy = field(default_factory=Policy)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    itm_token: str = "enc"
    decode_threads: int = 2
    decode_processes: int = 0  # > 0: decode in processes, not threads (GPU workers)
    attention: str = "sdpa"  # "eager": Hugging Face's own BLIP attention modules
    guards: CaptionGuards = field(default_factory=CaptionGuards)

    def __post_init__(self):
        """Settings a worker would only trip on after loading its models: refused here."""
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"--seed {self.seed!r}: use a whole number")
        check_choice("--dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check_choice("--itm-token", self.itm_token, ("enc", "cls"))
        check_choice("attention", self.attention, ("sdpa", "eager"))
        check_whole("decode_threads", self.decode_threads, 1)
        check_whole("decode_processes", self.decode_processes, 0)

    def to_dict(self) -> dict:
        return asdict(self)


# Measured on a 16-core H100 node, BLIP-base at batch 1,024 (bench/README.md, one run each):
# in threads, 16 decoded 738 images/s inside a shard and slowed the model loop to 2.24 s a
# batch (1.46 s alone), 6 threads 1,234 images/s and 1.73 s; in processes, the shard ran at
# 597 images/s with 6 and 559 with 12 (492 with 6 threads, same code and lease).
MAX_GPU_DECODERS = 6


def gpu_decoders(cpus: float, gpus: int) -> int:
    """Decoding processes for a worker that has one of ``gpus`` GPUs on a node of ``cpus`` cores."""
    return max(2, min(MAX_GPU_DECODERS, int(cpus // max(1, gpus))))
