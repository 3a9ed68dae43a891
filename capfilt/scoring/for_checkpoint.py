"""The scorer a filter checkpoint calls for, chosen by its own class (from its config)."""

from __future__ import annotations

from transformers import Blip2ForImageTextRetrieval, CLIPModel

from capfilt.models.loading import LoadedModel
from capfilt.scoring.blip2_itm import Blip2Scorer
from capfilt.scoring.blip_itm import Scorer
from capfilt.scoring.clip import ClipScorer


def make_scorer(loaded: LoadedModel, itm_token: str = "enc"):
    """BLIP's ``Scorer``, ``Blip2Scorer`` or ``ClipScorer``: all map (pixels, texts per image)
    to (itm, itc) per text. ``itm_token`` is BLIP's choice of first ITM token only."""
    if isinstance(loaded.model, Blip2ForImageTextRetrieval):
        return Blip2Scorer(loaded)
    if isinstance(loaded.model, CLIPModel):
        return ClipScorer(loaded)
    return Scorer(loaded, itm_token=itm_token)
