"""BLIP's pre-training model as two Hugging Face models that share weights the way BLIP does.

One ``BlipForImageTextRetrieval`` (vision tower, text encoder, projections, ITM head) and one
``BlipForConditionalGeneration`` (the image-grounded decoder) over the same vision tower. The
decoder shares every text weight with the encoder except its self-attention layers (BLIP's
``tie_encoder_decoder_weights(..., skip_key='/attention')``; their Table 3 shows that sharing
all but self-attention trains best). Exporting saves each half as its own checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipProcessor,
)

from capfilt.models.loading import from_pretrained_checked

# What the decoder layer keeps for itself: BLIP skips modules whose name holds '/attention'.
OWN_LAYER_PARTS = ("attention",)
SHARED_LAYER_PARTS = ("crossattention", "intermediate", "output")


def tie_text_weights(encoder: nn.Module, decoder_bert: nn.Module) -> None:
    """Make ``decoder_bert`` use ``encoder``'s embeddings, cross-attention and feed-forward."""
    decoder_bert.embeddings = encoder.embeddings
    if len(encoder.encoder.layer) != len(decoder_bert.encoder.layer):
        raise ValueError("text encoder and decoder have different numbers of layers")
    for enc_layer, dec_layer in zip(encoder.encoder.layer, decoder_bert.encoder.layer):
        for part in SHARED_LAYER_PARTS:
            setattr(dec_layer, part, getattr(enc_layer, part))


class BlipPair(nn.Module):
    """The filter half and the captioner half of one BLIP model, with BLIP's sharing.

    ``temp`` is ITC's learnable temperature (BLIP: 0.07, clamped to [0.001, 0.5]); the Hugging
    Face checkpoints have no slot for it, so it lives in training checkpoints only.
    """

    def __init__(self, filter_model: BlipForImageTextRetrieval,
                 captioner: BlipForConditionalGeneration, share: bool = True, temp: float = 0.07):
        super().__init__()
        self.filter = filter_model
        self.captioner = captioner
        self.shared = share
        if share:
            captioner.vision_model = filter_model.vision_model
            tie_text_weights(filter_model.text_encoder, captioner.text_decoder.bert)
            # The LM head's output matrix is the (now shared) word embedding, as in BLIP.
            head = captioner.text_decoder.cls.predictions.decoder
            head.weight = captioner.text_decoder.bert.embeddings.word_embeddings.weight
        self.temp = nn.Parameter(torch.tensor(float(temp)))

    @classmethod
    def from_config(cls, config: BlipConfig, seed: int = 0) -> BlipPair:
        """A new model, randomly initialised (BLIP's text side starts from BERT; ours may not)."""
        torch.manual_seed(seed)
        return cls(BlipForImageTextRetrieval(config), BlipForConditionalGeneration(config))

    @classmethod
    def from_pretrained(cls, filter_source: str, captioner_source: str | None = None) -> BlipPair:
        """Continue from a BLIP checkpoint: the filter's weights are the shared ones.

        With only a filter, the decoder's own parts (self-attention, LM head transform) start
        fresh; with a captioner, they are taken from it.
        """
        filter_model = from_pretrained_checked(BlipForImageTextRetrieval, filter_source, "filter")
        if captioner_source is None:
            captioner = BlipForConditionalGeneration(filter_model.config)
        else:
            captioner = from_pretrained_checked(BlipForConditionalGeneration, captioner_source,
                                                "captioner")
        return cls(filter_model, captioner)

    @property
    def config(self) -> BlipConfig:
        return self.filter.config

    def save(self, folder: str | Path, processor: BlipProcessor) -> dict[str, Path]:
        """Write ``folder/filter`` and ``folder/captioner`` as Hugging Face checkpoints."""
        return export_models(folder, processor, filter=self.filter, captioner=self.captioner)


def export_models(folder: str | Path, processor: BlipProcessor, **models: nn.Module) -> dict[str, Path]:
    """Save each model with the processor under ``folder/<role>``; return the paths."""
    paths = {}
    for role, model in models.items():
        path = Path(folder) / role
        model.save_pretrained(path)
        processor.save_pretrained(path)
        paths[role] = path
    return paths
