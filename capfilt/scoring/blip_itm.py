"""The filter: BLIP's ITM match probability and ITC cosine for every (image, text) pair.

The vision encoder runs once per image; each text is paired with its own image's embeddings
(Hugging Face's ``use_itm_head=True`` path would rerun the vision tower per pair, and
``use_itm_head=False`` returns the whole image-by-text matrix instead of per-pair values).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from capfilt.models.attention import image_kv_once, uses_sdpa
from capfilt.models.loading import LoadedModel
from capfilt.models.transfer import to_device

# BLIP pads ITM text to 35 tokens; longer web captions are truncated there.
MAX_TEXT_TOKENS = 35
ITM_FIRST_TOKENS = ("enc", "cls")
# A tokenizer's time grows with the whole text, though only the first tokens are kept: a 5 MB
# caption took seconds. Texts are cut first, at this many characters per kept token. English
# runs about 4 characters (space included) to a BERT or CLIP token, and a word piece is never
# longer than its word, so 35 tokens of real text end long before 35 x 16 = 560 characters;
# the cut only shortens what truncation would drop.
CHARS_PER_TOKEN = 16
CPU_TEXT_BATCH, GPU_TEXT_BATCH = 256, 1024


def enc_token_id(tokenizer, text_config) -> int:
    """BLIP's [ENC]: in the tokenizer if it knows it, else the id after [DEC] (30523 in BLIP)."""
    known = tokenizer.convert_tokens_to_ids("[ENC]")
    if known is not None and known != tokenizer.unk_token_id:
        return known
    candidate = text_config.bos_token_id + 1
    if candidate >= text_config.vocab_size:
        raise ValueError("this checkpoint has no [ENC] token; score with itm_token='cls'")
    return candidate


class Scorer:
    """Images and their texts -> per-pair ITM probability and ITC cosine.

    ``itm_token``: BLIP trained and ran its ITM head on text starting with [ENC] ("enc", the
    default, which the paper's 0.5 threshold was set with); Hugging Face's
    ``BlipForImageTextRetrieval`` keeps [CLS] ("cls"). ITC always uses [CLS], as both do.
    """

    def __init__(self, loaded: LoadedModel, max_text_tokens: int = MAX_TEXT_TOKENS,
                 text_batch_size: int | None = None, itm_token: str = "enc"):
        if itm_token not in ITM_FIRST_TOKENS:
            raise ValueError(f"itm_token {itm_token!r}: use 'enc' or 'cls'")
        self.model = loaded.model
        self.tokenizer = loaded.processor.tokenizer
        self.itm_first_id = (
            enc_token_id(self.tokenizer, self.model.config.text_config)
            if itm_token == "enc" else None
        )
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.max_text_tokens = max_text_tokens
        # Texts per pass: on a GPU the passes are launch-bound below a thousand or so; a
        # chunk's gathered image K/V (texts x 577 tokens x width) bounds it on a CPU.
        self.text_batch_size = text_batch_size or (
            GPU_TEXT_BATCH if self.device.type == "cuda" else CPU_TEXT_BATCH)

    @torch.inference_mode()
    def __call__(
        self, pixel_values: torch.Tensor, texts: list[list[str]]
    ) -> tuple[list[list[float]], list[list[float]]]:
        """``texts[i]`` are the texts of image ``i``; returns (itm, itc) in the same nesting."""
        owners = [i for i, group in enumerate(texts) for _ in group]
        flat = [text for group in texts for text in group]
        if not flat:
            return [[] for _ in texts], [[] for _ in texts]
        image_embeds = self.model.vision_model(pixel_values=pixel_values.to(self.device, self.dtype))[0]
        image_feat = F.normalize(self.model.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)
        # Tokenised while a GPU runs the vision tower; each chunk's tensors then cross without
        # waiting for the queue (capfilt.models.transfer), so nothing drains it before the last
        # chunk.
        ids = self.tokenizer(cut_texts(flat, self.max_text_tokens), truncation=True,
                             max_length=self.max_text_tokens).input_ids
        # Length buckets: texts sorted by token count (stable), chunked, each chunk padded to
        # its own longest, scores put back in the texts' order at the end. Web alt-text runs
        # from a few tokens to the 35-token cut; unsorted, a chunk pads to its longest text.
        order = sorted(range(len(flat)), key=lambda k: len(ids[k]))
        itm_parts, itc_parts = [], []
        for start in range(0, len(flat), self.text_batch_size):
            picked = order[start : start + self.text_batch_size]
            chunk_owners = [owners[k] for k in picked]
            chunk_ids = [ids[k] for k in picked]
            tokens, mask = (to_device(t, self.device) for t in
                            pad_right(chunk_ids, self.tokenizer.pad_token_id))
            padded = len(chunk_ids[0]) < len(chunk_ids[-1])  # sorted: shortest first
            mask = padding_bias(mask, self.dtype) if padded else None
            index = to_device(torch.tensor(chunk_owners), self.device)
            if uses_sdpa(self.model):  # the image tokens' cross-attention K/V once per image
                # only this chunk's images are projected, each once
                mine = sorted(set(chunk_owners))
                local = {owner: n for n, owner in enumerate(mine)}
                images = image_embeds[to_device(torch.tensor(mine), self.device)]
                per_image = to_device(torch.tensor([local[o] for o in chunk_owners]), self.device)
                with image_kv_once(self.model.text_encoder, images, per_image) as per_text:
                    itm, itc = self._score_chunk(tokens, mask, per_text, image_feat[index])
            else:
                itm, itc = self._score_chunk(tokens, mask, image_embeds[index], image_feat[index])
            itm_parts.append(itm)
            itc_parts.append(itc)
        # one copy to the host for the batch, in the texts' order
        sorted_scores = torch.stack([torch.cat(itm_parts), torch.cat(itc_parts)])
        scores = torch.empty_like(sorted_scores)
        scores[:, to_device(torch.tensor(order), self.device)] = sorted_scores
        itm_flat, itc_flat = scores.tolist()
        return _regroup(itm_flat, texts), _regroup(itc_flat, texts)

    def _score_chunk(self, tokens: torch.Tensor, mask: torch.Tensor | None, embeds: torch.Tensor,
                     image_feat: torch.Tensor):
        # Masks as transformers would make them, made here: given a 2D mask, transformers first
        # asks whether it masks anything (``mask.all()``), which waits for the GPU's queue.
        # Every image token is attended, so the image mask is None (what an all-ones mask
        # becomes there), and ``mask`` is None or ``padding_bias``'s 4D mask.
        text_out = self.model.text_encoder(input_ids=tokens, attention_mask=mask).last_hidden_state
        text_feat = F.normalize(self.model.text_proj(text_out[:, 0, :]).float(), dim=-1)
        itc = (image_feat * text_feat).sum(dim=-1)
        itm_ids = tokens
        if self.itm_first_id is not None:
            itm_ids = itm_ids.clone()
            itm_ids[:, 0] = self.itm_first_id
        fused = self.model.text_encoder(
            input_ids=itm_ids,
            attention_mask=mask,
            encoder_hidden_states=embeds,
        ).last_hidden_state
        itm = self.model.itm_head(fused[:, 0, :]).float().softmax(dim=-1)[:, 1]
        return itm, itc


def cut_texts(texts: list[str], max_tokens: int) -> list[str]:
    """``texts`` cut to ``CHARS_PER_TOKEN`` characters per token kept, before tokenising."""
    return [text[: max_tokens * CHARS_PER_TOKEN] for text in texts]


def padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(texts, 1, tokens, tokens) additive mask from a 2D padding mask: 0 where a token is
    seen, the dtype's minimum where it is padding; transformers' ``eager_mask`` for BLIP."""
    rows, width = mask.shape
    seen = mask.bool()[:, None, None, :].expand(rows, 1, width, width)
    return torch.where(seen, torch.zeros((), device=mask.device, dtype=dtype), torch.finfo(dtype).min)


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids, attention mask), padded on the right to the longest row: what
    the tokenizer's ``padding="longest"`` gives for one chunk (BERT pads on the right)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def _regroup(values: list[float], like: list[list[str]]) -> list[list[float]]:
    out, position = [], 0
    for group in like:
        out.append(values[position : position + len(group)])
        position += len(group)
    return out
