"""How captions are written: the sampler's settings, plain data that pickles to Ray actors.

Importing it loads neither torch nor transformers, so the round's driver can check them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from capfilt.scoring.selection import check_choice, check_number, check_whole


@dataclass(frozen=True)
class SamplingConfig:
    """How captions are written. Defaults are BLIP's CapFilt settings.

    Lengths count new tokens, after the prompt; BLIP's max_length 20 / min_length 5 counted
    the 4 prompt tokens too. ``top_k`` 50 is what BLIP's code got from transformers 4.15.
    """

    method: str = "nucleus"  # "nucleus" | "beam"
    num_captions: int = 1
    prompt: str = "a picture of "
    top_p: float = 0.9
    top_k: int | None = 50
    repetition_penalty: float = 1.1
    max_new_tokens: int = 16
    min_new_tokens: int = 1
    num_beams: int = 3

    def __post_init__(self):
        """The bounds of ``manifests/round.schema.json``'s sampling, checked before any work."""
        check_choice("--method", self.method, ("nucleus", "beam"))
        check_whole("--num-captions", self.num_captions, 0)
        if not isinstance(self.prompt, str):
            raise ValueError(f"--prompt {self.prompt!r}: use a string")
        check_number("--top-p", self.top_p, 0, 1, low_open=True)
        if self.top_k is not None:
            check_whole("--top-k", self.top_k, 0)
        check_number("--repetition-penalty", self.repetition_penalty, 0, low_open=True)
        check_whole("--max-new-tokens", self.max_new_tokens, 1)
        check_whole("--min-new-tokens", self.min_new_tokens, 0)
        check_whole("--num-beams", self.num_beams, 1)
        if self.method == "beam" and self.num_captions > self.num_beams:
            raise ValueError(f"--num-captions {self.num_captions}: beam search returns at most "
                             f"--num-beams ({self.num_beams}) captions per image")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"--min-new-tokens {self.min_new_tokens} is larger than "
                             f"--max-new-tokens {self.max_new_tokens}")

    def to_dict(self) -> dict:
        return asdict(self)
