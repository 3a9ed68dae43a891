"""The filter for a BLIP-2 checkpoint (``Blip2ForImageTextRetrieval``): Q-Former ITM and ITC.

BLIP-2's ITM runs the 32 learned queries together with the text over the image and averages
the ITM logits over the queries; its ITC is the best cosine between any query's feature and the
text's [CLS] feature. The vision tower and the image-only query pass run once per image (the
transformers forward reruns them for every pair); the scores equal that forward's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from capfilt.models.loading import LoadedModel
from capfilt.scoring.blip_itm import _regroup, cut_texts

# LAVIS's Blip2Qformer truncates text at 32 tokens.
BLIP2_TEXT_TOKENS = 32


class Blip2Scorer:
    """Images and their texts -> per-pair ITM probability and ITC cosine, as ``Scorer``."""

    def __init__(self, loaded: LoadedModel, max_text_tokens: int = BLIP2_TEXT_TOKENS,
                 text_batch_size: int = 256):
        self.model = loaded.model
        self.tokenizer = loaded.processor.tokenizer
        self.device = loaded.device
        self.max_text_tokens = max_text_tokens
        self.text_batch_size = text_batch_size

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor,
                 texts: list[list[str]]) -> tuple[list[list[float]], list[list[float]]]:
        owners = [i for i, group in enumerate(texts) for _ in group]
        flat = [text for group in texts for text in group]
        if not flat:
            return [[] for _ in texts], [[] for _ in texts]
        m = self.model
        vision_dtype = m.vision_model.embeddings.patch_embedding.weight.dtype
        image_embeds = m.vision_model(pixel_values=pixel_values.to(self.device, vision_dtype))[0]
        image_embeds = image_embeds.to(m.query_tokens.dtype)  # the Q-Former stays in fp32
        queries = m.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_out = m.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                              encoder_attention_mask=_ones(image_embeds))[0]
        image_feat = F.normalize(m.vision_projection(query_out).float(), dim=-1)
        itm_parts, itc_parts = [], []
        for start in range(0, len(flat), self.text_batch_size):
            index = torch.tensor(owners[start : start + self.text_batch_size], device=self.device)
            chunk = flat[start : start + self.text_batch_size]
            itm, itc = self._score_chunk(chunk, image_embeds[index], image_feat[index])
            itm_parts.append(itm)
            itc_parts.append(itc)
        return (_regroup(torch.cat(itm_parts).tolist(), texts),
                _regroup(torch.cat(itc_parts).tolist(), texts))

    def _score_chunk(self, chunk: list[str], embeds: torch.Tensor, image_feat: torch.Tensor):
        m = self.model
        tokens = self.tokenizer(cut_texts(chunk, self.max_text_tokens), padding="longest", truncation=True,
                                max_length=self.max_text_tokens, return_tensors="pt").to(self.device)
        text_out = m.qformer(query_embeds=m.embeddings(input_ids=tokens.input_ids), query_length=0,
                             attention_mask=tokens.attention_mask)[0]
        text_feat = F.normalize(m.text_projection(text_out[:, 0, :]).float(), dim=-1)
        itc = torch.einsum("pqd,pd->pq", image_feat, text_feat).max(dim=1).values
        queries = m.query_tokens.expand(len(chunk), -1, -1)
        mask = torch.cat([_ones(queries), tokens.attention_mask], dim=1)
        fused = m.qformer(
            query_embeds=m.embeddings(input_ids=tokens.input_ids, query_embeds=queries),
            query_length=queries.shape[1], attention_mask=mask, encoder_hidden_states=embeds,
            encoder_attention_mask=_ones(embeds),
        )[0]
        logits = m.itm_head(fused[:, : queries.shape[1], :]).mean(dim=1)
        return logits.float().softmax(dim=-1)[:, 1].cpu(), itc.cpu()


def _ones(hidden: torch.Tensor) -> torch.Tensor:
    return torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)

