"""The captioner a checkpoint calls for, chosen by its own class (from its config)."""

from __future__ import annotations

from capfilt.captioning.blip_decoder import Captioner
from capfilt.captioning.language_model import LanguageModelCaptioner
from capfilt.captioning.settings import SamplingConfig
from capfilt.models.loading import MODEL_CLASSES, LoadedModel


def make_captioner(loaded: LoadedModel, sampling: SamplingConfig, seed: int):
    """BLIP's ``Captioner`` (its decoder, batched) or ``LanguageModelCaptioner`` (BLIP-2,
    InstructBLIP: a language model over the Q-Former's queries)."""
    if isinstance(loaded.model, MODEL_CLASSES["captioner"]):
        return Captioner(loaded, sampling, seed)
    return LanguageModelCaptioner(loaded, sampling, seed)
