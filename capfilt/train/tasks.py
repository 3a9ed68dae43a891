"""The three training tasks as modules whose forward maps a batch to its losses.

- ``pretrain``: ITC + ITM + LM on a ``BlipPair`` (shared weights, one vision pass);
- ``captioner``: LM on ``BlipForConditionalGeneration``, prompt prepended and masked;
- ``filter``: ITC + ITM on ``BlipForImageTextRetrieval``.

A batch is pixel values and one text per image. ITM's first token is BLIP's [ENC], the token
the scorer uses at CapFilt time; the decoder's is [DEC].
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipProcessor,
)

from capfilt.scorer import MAX_TEXT_TOKENS, enc_token_id
from capfilt.train.blip_pair import BlipPair, export_models
from capfilt.train.objectives import (
    distributed,
    hard_negatives,
    itc_loss,
    itc_loss_across_ranks,
    itm_loss,
    lm_labels,
    lm_loss,
    same_text,
)

TASKS = ("pretrain", "captioner", "filter")
CAPTION_PROMPT = "a picture of "
TEMP_RANGE = (0.001, 0.5)


class _Text:
    """Tokenisation shared by the tasks: BLIP pads/truncates text to 35 tokens."""

    def __init__(self, processor: BlipProcessor, max_tokens: int = MAX_TEXT_TOKENS):
        self.tokenizer = processor.tokenizer
        self.max_tokens = max_tokens

    def __call__(self, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(texts, padding="longest", truncation=True,
                                max_length=self.max_tokens, return_tensors="pt")
        return tokens.input_ids.to(device), tokens.attention_mask.to(device)


def _contrastive_and_matching(model: BlipForImageTextRetrieval, temp: nn.Parameter,
                              image_embeds, ids, mask, texts, enc_id, generator,
                              negative_mix: float) -> dict:
    image_feat = F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)
    text_out = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    text_feat = F.normalize(model.text_proj(text_out[:, 0, :]), dim=-1)
    with torch.no_grad():
        temp.clamp_(*TEMP_RANGE)
    positive = same_text(texts).to(ids.device)
    if distributed():  # Ray Train: ITC over the global batch (objectives.itc_loss_across_ranks)
        loss_itc, sim = itc_loss_across_ranks(image_feat, text_feat, temp, texts)
    else:
        loss_itc, sim = itc_loss(image_feat, text_feat, temp, positive)
    neg_text, neg_image = hard_negatives(sim.detach(), positive, generator, negative_mix)
    enc_ids = ids.clone()
    enc_ids[:, 0] = enc_id
    all_ids = torch.cat([enc_ids, enc_ids[neg_text], enc_ids])
    all_mask = torch.cat([mask, mask[neg_text], mask])
    all_images = torch.cat([image_embeds, image_embeds, image_embeds[neg_image]])
    image_mask = torch.ones(all_images.shape[:2], dtype=torch.long, device=ids.device)
    fused = model.text_encoder(input_ids=all_ids, attention_mask=all_mask,
                               encoder_hidden_states=all_images,
                               encoder_attention_mask=image_mask).last_hidden_state
    batch = ids.shape[0]
    labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(ids.device)
    return {"itc": loss_itc, "itm": itm_loss(model.itm_head(fused[:, 0, :]), labels)}


def _captioning(captioner: BlipForConditionalGeneration, image_embeds, ids, mask,
                prompt_length: int) -> torch.Tensor:
    dec_ids = ids.clone()
    dec_ids[:, 0] = captioner.config.text_config.bos_token_id
    labels = lm_labels(dec_ids, mask, prompt_length)
    image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=ids.device)
    logits = captioner.text_decoder(input_ids=dec_ids, attention_mask=mask,
                                    encoder_hidden_states=image_embeds,
                                    encoder_attention_mask=image_mask).logits
    return lm_loss(logits, labels)


class PretrainTask(nn.Module):
    """BLIP pre-training: ITC, ITM with hard negatives and LM over one shared model."""

    name = "pretrain"

    def __init__(self, pair: BlipPair, processor: BlipProcessor, negative_mix: float = 0.0):
        super().__init__()
        self.pair = pair
        self.negative_mix = negative_mix
        self.text = _Text(processor)
        self.enc_id = enc_token_id(processor.tokenizer, pair.config.text_config)

    def forward(self, pixel_values, texts: list[str], generator=None) -> dict[str, torch.Tensor]:
        image_embeds = self.pair.filter.vision_model(pixel_values=pixel_values)[0]
        ids, mask = self.text(texts, pixel_values.device)
        losses = _contrastive_and_matching(self.pair.filter, self.pair.temp, image_embeds, ids,
                                           mask, texts, self.enc_id, generator,
                                           self.negative_mix)
        losses["lm"] = _captioning(self.pair.captioner, image_embeds, ids, mask, 0)
        return losses

    def export(self, folder: Path, processor: BlipProcessor) -> dict[str, Path]:
        return self.pair.save(folder, processor)


class CaptionerTask(nn.Module):
    """Fine-tune the captioner: LM on "a picture of " + caption, prompt tokens masked."""

    name = "captioner"

    def __init__(self, captioner: BlipForConditionalGeneration, processor: BlipProcessor,
                 prompt: str = CAPTION_PROMPT):
        super().__init__()
        self.captioner = captioner
        self.text = _Text(processor)
        self.prompt = prompt
        # BLIP: len(tokenizer(prompt).input_ids) - 1, i.e. [CLS] + prompt words.
        self.prompt_length = len(processor.tokenizer(prompt).input_ids) - 1

    def forward(self, pixel_values, texts: list[str], generator=None) -> dict[str, torch.Tensor]:
        image_embeds = self.captioner.vision_model(pixel_values=pixel_values)[0]
        ids, mask = self.text([self.prompt + text for text in texts], pixel_values.device)
        return {"lm": _captioning(self.captioner, image_embeds, ids, mask, self.prompt_length)}

    def export(self, folder: Path, processor: BlipProcessor) -> dict[str, Path]:
        return export_models(folder, processor, captioner=self.captioner)


class FilterTask(nn.Module):
    """Fine-tune the filter: ITC + ITM with hard negatives on the retrieval model."""

    name = "filter"

    def __init__(self, filter_model: BlipForImageTextRetrieval, processor: BlipProcessor,
                 temp: float = 0.07, negative_mix: float = 0.0):
        super().__init__()
        self.filter = filter_model
        self.negative_mix = negative_mix
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.text = _Text(processor)
        self.enc_id = enc_token_id(processor.tokenizer, filter_model.config.text_config)

    def forward(self, pixel_values, texts: list[str], generator=None) -> dict[str, torch.Tensor]:
        image_embeds = self.filter.vision_model(pixel_values=pixel_values)[0]
        ids, mask = self.text(texts, pixel_values.device)
        return _contrastive_and_matching(self.filter, self.temp, image_embeds, ids, mask,
                                         texts, self.enc_id, generator, self.negative_mix)

    def export(self, folder: Path, processor: BlipProcessor) -> dict[str, Path]:
        return export_models(folder, processor, filter=self.filter)
