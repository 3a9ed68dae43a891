"""CLIP as the filter's scorer, for BLIP-2's recipe: rank the web caption and the synthetic
captions by CLIP image-text similarity and keep the best two (BLIP-2 §3.4).

CLIP has no image-text matching head: ``itm`` is None for every text, ``itc`` is the cosine
of CLIP's projected image and text embeddings. Only ``--policy topk --rank-by itc`` uses it
(the plan refuses a threshold on a probability CLIP does not give).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from capfilt.models.loading import LoadedModel
from capfilt.scoring.blip_itm import _regroup, cut_texts


class ClipScorer:
    """Images and their texts -> (None, cosine) per pair, as ``Scorer``'s (itm, itc)."""

    def __init__(self, loaded: LoadedModel, text_batch_size: int = 256):
        self.model = loaded.model
        self.tokenizer = loaded.processor.tokenizer
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.max_text_tokens = self.model.config.text_config.max_position_embeddings
        self.text_batch_size = text_batch_size

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor,
                 texts: list[list[str]]) -> tuple[list[list[None]], list[list[float]]]:
        owners = [i for i, group in enumerate(texts) for _ in group]
        flat = [text for group in texts for text in group]
        if not flat:
            return [[] for _ in texts], [[] for _ in texts]
        image = self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype))
        image = F.normalize(_tensor(image).float(), dim=-1)
        cosines = []
        for start in range(0, len(flat), self.text_batch_size):
            chunk = cut_texts(flat[start : start + self.text_batch_size], self.max_text_tokens)
            tokens = self.tokenizer(chunk, padding="longest", truncation=True,
                                    max_length=self.max_text_tokens,
                                    return_tensors="pt").to(self.device)
            text = self.model.get_text_features(input_ids=tokens.input_ids,
                                                attention_mask=tokens.attention_mask)
            text = F.normalize(_tensor(text).float(), dim=-1)
            index = torch.tensor(owners[start : start + self.text_batch_size], device=self.device)
            cosines.append((image[index] * text).sum(dim=-1).cpu())
        itc = _regroup(torch.cat(cosines).tolist(), texts)
        return [[None] * len(group) for group in texts], itc


def _tensor(output) -> torch.Tensor:
    """transformers 5 may return a model output whose pooled features are the embeddings."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
