"""The captioner a checkpoint calls for, chosen by its own class (from its config)."""

from __future__ import annotations

from capfilt.captioner import Captioner
from capfilt.captioner_lm import LanguageModelCaptioner
from capfilt.models import MODEL_CLASSES, LoadedModel
from capfilt.stage_config import SamplingConfig


def make_captioner(loaded: LoadedModel, sampling: SamplingConfig, seed: int):
    """BLIP's ``Captioner`` (its decoder, batched) or ``LanguageModelCaptioner`` (BLIP-2,
    InstructBLIP: a language model over the Q-Former's queries)."""
    if isinstance(loaded.model, MODEL_CLASSES["captioner"]):
        return Captioner(loaded, sampling, seed)
    return LanguageModelCaptioner(loaded, sampling, seed)
