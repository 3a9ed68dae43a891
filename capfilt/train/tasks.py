"""The three training tasks as modules whose forward maps a batch to its losses.

- ``pretrain``: ITC + ITM + LM on a ``BlipPair`` (shared weights, one vision pass), as BLIP's
  ``blip_pretrain.py``;
- ``captioner``: LM on ``BlipForConditionalGeneration``, prompt prepended and masked;
- ``filter``: ITC + ITM on ``BlipForImageTextRetrieval``, as BLIP's ``blip_retrieval.py``.

A batch is pixel values, the texts as token ids (tokenised by the loader with the task's
``text_encoding``) and the raw texts, one per image. ITM's first token is BLIP's [ENC], the
token the scorer uses at CapFilt time; the decoder's is [DEC].

With ``Objectives(momentum=True)`` ITC is BLIP's: momentum encoders, a queue of their features
and momentum distillation (``momentum.py``, ``objectives.itc_distilled``); without it, ITC is
in-batch (over the global batch under DDP). Where capfilt differs from BLIP, and why:

- positives: BLIP's pre-training targets are one-hot (an image's own text); its retrieval
  fine-tune marks as positive every text of the same image id, in the batch and in the queue
  (``idx_queue``). capfilt has no image ids; an identical text is the positive relation
  instead, in the batch for both tasks, and in the queue for the filter (its queue keeps text
  ids where BLIP's keeps image ids). Two captions of one image that differ in words are
  negatives here, and a repeated web caption ("image", "photo") is no negative of itself;
- the text is padded to the batch's longest (35 tokens at most) where BLIP pads to a fixed
  length (30 in pre-training, 35 in retrieval): the same outputs, masked;
- ``negative_mix`` (0 = BLIP) blends uniform draws into the hard-negative weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipProcessor,
)

from capfilt.scoring.blip_itm import enc_token_id
from capfilt.train.blip_pair import BlipPair, export_models
from capfilt.train.momentum import MomentumEncoders
from capfilt.train.objectives import (
    alpha_at,
    distributed,
    full_precision,
    gather_no_grad,
    gather_with_grad,
    hard_negatives,
    itc_distilled,
    itc_loss,
    itc_loss_across_ranks,
    itm_loss,
    lm_labels,
    lm_loss,
    longest_across_ranks,
    pad_to,
    text_ids,
)
from capfilt.train.text import TextEncoding

TASKS = ("pretrain", "captioner", "filter")
CAPTION_PROMPT = "a picture of "
TEMP_RANGE = (0.001, 0.5)
# blip_pretrain.py draws ITM negatives from softmax(sim) + 1e-4; blip_retrieval.py adds nothing.
PRETRAIN_NEGATIVE_FLOOR = 1e-4


@dataclass(frozen=True)
class Objectives:
    """BLIP's ITC and ITM settings (``TrainConfig`` carries them; ``from_config``).

    ``momentum``: momentum encoders (``momentum_decay``), a queue of ``queue_size`` of their
    features and distillation with weight ``alpha`` (ramped over the first epochs). Off, ITC is
    in-batch. ``negative_all_rank``: under torch.distributed, ITM negatives are drawn from the
    gathered global batch instead of each rank's own rows. ``seed`` seeds the queue's random
    start.
    """

    momentum: bool = False
    momentum_decay: float = 0.995
    queue_size: int = 57600
    alpha: float = 0.4
    negative_all_rank: bool = False
    seed: int = 0

    @classmethod
    def from_config(cls, config) -> Objectives:
        return cls(momentum=config.momentum, momentum_decay=config.momentum_decay,
                   queue_size=config.queue_size, alpha=config.alpha,
                   negative_all_rank=config.negative_all_rank, seed=config.seed)


def _captioning(captioner: BlipForConditionalGeneration, image_embeds, ids, mask,
                prompt_length: int) -> torch.Tensor:
    dec_ids = ids.clone()
    dec_ids[:, 0] = captioner.config.text_config.bos_token_id
    labels = lm_labels(dec_ids, mask, prompt_length)
    image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=ids.device)
    logits = captioner.text_decoder(input_ids=dec_ids, attention_mask=mask,
                                    encoder_hidden_states=image_embeds,
                                    encoder_attention_mask=image_mask,
                                    use_cache=False).logits  # training keeps no KV cache
    return lm_loss(logits, labels)


class _ContrastiveMatching(nn.Module):
    """ITC and ITM on a ``BlipForImageTextRetrieval``, shared by the pretrain and filter tasks:
    a subclass gives ``filter`` (the online model) and ``temp`` (ITC's temperature).

    ``recipe`` picks where ITM's negatives come from with momentum on: "pretrain"
    (blip_pretrain.py) draws from the ITC similarities of online features against the
    batch's momentum features, + 1e-4; "retrieval" (blip_retrieval.py) from online against
    online features. Under ``negative_all_rank`` both draw as blip_retrieval.py does from the
    gathered global batch (BLIP's pre-training has no such option). ``ramp_epochs``: the
    epochs over which alpha ramps up (pretrain.py 2, train_retrieval.py 1).
    """

    recipe = "retrieval"
    ramp_epochs = 1.0

    def _setup(self, processor: BlipProcessor, online: BlipForImageTextRetrieval,
               objectives: Objectives, negative_mix: float, queue_ids: bool) -> None:
        self.objectives = objectives
        self.negative_mix = negative_mix
        self.negative_all_rank = objectives.negative_all_rank
        self.text_encoding = TextEncoding(processor.tokenizer)
        self.enc_id = enc_token_id(processor.tokenizer, online.config.text_config)
        self.pad_id = processor.tokenizer.pad_token_id
        self.last_alpha = 0.0  # the distillation weight of the last forward, for logs
        self.momentum = (MomentumEncoders(online, objectives.momentum_decay, objectives.queue_size,
                                          objectives.seed, with_ids=queue_ids)
                         if objectives.momentum else None)

    def alpha_at(self, progress: float) -> float:
        """The distillation weight after ``progress`` epochs (0 with momentum off)."""
        if self.momentum is None:
            return 0.0
        return alpha_at(self.objectives.alpha, progress, self.ramp_epochs)

    def _itc_itm(self, pixel_values, image_embeds, input_ids, attention_mask, texts,
                 generator, progress: float) -> dict[str, torch.Tensor]:
        model, temp = self.filter, self.temp
        device = input_ids.device
        with torch.no_grad():
            temp.clamp_(*TEMP_RANGE)
        image_feat = F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)
        text_out = model.text_encoder(input_ids=input_ids,
                                      attention_mask=attention_mask).last_hidden_state
        text_feat = F.normalize(model.text_proj(text_out[:, 0, :]), dim=-1)
        ids = text_ids(texts).to(device)
        positive = ids[:, None] == ids[None, :]
        batch = len(texts)

        floor, sim_t2i = 0.0, None
        if self.momentum is None:
            if distributed():  # Ray Train: ITC over the global batch
                loss_itc, sim_i2t = itc_loss_across_ranks(image_feat, text_feat, temp, texts)
            else:
                loss_itc, sim_i2t = itc_loss(image_feat, text_feat, temp, positive)
        else:
            alpha = self.last_alpha = self.alpha_at(progress)
            self.momentum.update(model)
            image_feat_m, text_feat_m = self.momentum.features(pixel_values, input_ids,
                                                               attention_mask)
            queue_positive = (ids[:, None] == self.momentum.id_queue[None, :]
                              if self.momentum.with_ids else None)
            itc = itc_distilled(image_feat, text_feat, image_feat_m, text_feat_m,
                                *self.momentum.queues(), temp, positive, alpha, queue_positive)
            self.momentum.enqueue(image_feat_m, text_feat_m, ids)
            loss_itc = itc.loss
            if self.recipe == "pretrain":
                sim_i2t, sim_t2i = itc.sim_i2t[:, :batch], itc.sim_t2i[:, :batch]
                floor = PRETRAIN_NEGATIVE_FLOOR
            else:
                with torch.no_grad(), full_precision(device):
                    sim_i2t = image_feat.float() @ text_feat.float().t() / temp.float()

        enc_ids = input_ids.clone()
        enc_ids[:, 0] = self.enc_id
        if self.negative_all_rank and distributed():
            neg_ids, neg_mask, neg_images, enc_ids, mask = self._negatives_from_all_ranks(
                image_feat, text_feat, temp, ids, image_embeds, enc_ids, attention_mask, generator)
        else:
            neg_text, neg_image = hard_negatives(sim_i2t.detach(), positive, generator,
                                                 self.negative_mix, sim_t2i=sim_t2i, floor=floor)
            mask = attention_mask
            neg_ids, neg_mask, neg_images = enc_ids[neg_text], mask[neg_text], image_embeds[neg_image]

        all_ids = torch.cat([enc_ids, neg_ids, enc_ids])
        all_mask = torch.cat([mask, neg_mask, mask])
        all_images = torch.cat([image_embeds, image_embeds, neg_images])
        image_mask = torch.ones(all_images.shape[:2], dtype=torch.long, device=device)
        fused = model.text_encoder(input_ids=all_ids, attention_mask=all_mask,
                                   encoder_hidden_states=all_images,
                                   encoder_attention_mask=image_mask).last_hidden_state
        labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(device)
        return {"itc": loss_itc, "itm": itm_loss(model.itm_head(fused[:, 0, :]), labels)}

    def _negatives_from_all_ranks(self, image_feat, text_feat, temp, ids, image_embeds, enc_ids,
                                  attention_mask, generator):
        """blip_retrieval.py's ``negative_all_rank``: this rank's images and texts against
        every rank's (features and token ids gathered without gradient, image embeddings with
        it, so a negative image's gradient goes back to the rank that encoded it)."""
        device = enc_ids.device
        with torch.no_grad(), full_precision(device):
            image_world = gather_no_grad(image_feat.detach().float())
            text_world = gather_no_grad(text_feat.detach().float())
            sim_i2t = image_feat.detach().float() @ text_world.t() / temp.detach().float()
            sim_t2i = text_feat.detach().float() @ image_world.t() / temp.detach().float()
        positive = ids[:, None] == gather_no_grad(ids)[None, :]
        neg_text, neg_image = hard_negatives(sim_i2t, positive, generator, self.negative_mix,
                                             sim_t2i=sim_t2i)
        images_world = gather_with_grad(image_embeds)
        length = longest_across_ranks(enc_ids.shape[1], device)
        enc_ids = pad_to(enc_ids, length, self.pad_id)
        mask = pad_to(attention_mask, length, 0)
        ids_world, mask_world = gather_no_grad(enc_ids), gather_no_grad(mask)
        return ids_world[neg_text], mask_world[neg_text], images_world[neg_image], enc_ids, mask


class PretrainTask(_ContrastiveMatching):
    """BLIP pre-training: ITC, ITM with hard negatives and LM over one shared model.

    As blip_pretrain.py: the LM loss is not distilled (only ITC uses the momentum encoders);
    ITM negatives per rank, from the online-against-momentum similarities + 1e-4.
    """

    name = "pretrain"
    recipe = "pretrain"
    ramp_epochs = 2.0

    def __init__(self, pair: BlipPair, processor: BlipProcessor, negative_mix: float = 0.0,
                 objectives: Objectives = Objectives()):
        super().__init__()
        self.pair = pair
        self._setup(processor, pair.filter, objectives, negative_mix, queue_ids=False)

    @property
    def filter(self) -> BlipForImageTextRetrieval:
        """The online ITC/ITM model (the pair's filter half)."""
        return self.pair.filter

    @property
    def temp(self) -> nn.Parameter:
        return self.pair.temp

    def online_models(self) -> tuple[nn.Module, ...]:
        return self.pair.filter, self.pair.captioner

    def forward(self, pixel_values, input_ids, attention_mask, texts: list[str], generator=None,
                progress: float = 0.0) -> dict[str, torch.Tensor]:
        image_embeds = self.pair.filter.vision_model(pixel_values=pixel_values)[0]
        losses = self._itc_itm(pixel_values, image_embeds, input_ids, attention_mask, texts,
                               generator, progress)
        losses["lm"] = _captioning(self.pair.captioner, image_embeds, input_ids, attention_mask, 0)
        return losses

    def export(self, folder: Path, processor: BlipProcessor) -> dict[str, Path]:
        return self.pair.save(folder, processor)


class CaptionerTask(nn.Module):
    """Fine-tune the captioner: LM on "a picture of " + caption, prompt tokens masked.

    BLIP's caption fine-tune (blip_decoder) has no momentum encoder: ``texts``, ``generator``
    and ``progress`` are accepted for the common signature and not used.
    """

    name = "captioner"

    def __init__(self, captioner: BlipForConditionalGeneration, processor: BlipProcessor,
                 prompt: str = CAPTION_PROMPT):
        super().__init__()
        self.captioner = captioner
        self.prompt = prompt
        self.text_encoding = TextEncoding(processor.tokenizer, prefix=prompt)
        # BLIP: len(tokenizer(prompt).input_ids) - 1, i.e. [CLS] + prompt words.
        self.prompt_length = len(processor.tokenizer(prompt).input_ids) - 1

    def online_models(self) -> tuple[nn.Module, ...]:
        return (self.captioner,)

    def forward(self, pixel_values, input_ids, attention_mask, texts: list[str], generator=None,
                progress: float = 0.0) -> dict[str, torch.Tensor]:
        image_embeds = self.captioner.vision_model(pixel_values=pixel_values)[0]
        return {"lm": _captioning(self.captioner, image_embeds, input_ids, attention_mask,
                                  self.prompt_length)}

    def export(self, folder: Path, processor: BlipProcessor) -> dict[str, Path]:
        return export_models(folder, processor, captioner=self.captioner)


class FilterTask(_ContrastiveMatching):
    """Fine-tune the filter: ITC + ITM with hard negatives on the retrieval model.

    As blip_retrieval.py: momentum distillation against a queue whose entries carry an id
    (here the text's, there the image's) so a queued feature of the same text is a positive;
    ITM negatives from online-against-online similarities, per rank or, with
    ``negative_all_rank``, from the global batch.
    """

    name = "filter"
    recipe = "retrieval"
    ramp_epochs = 1.0

    def __init__(self, filter_model: BlipForImageTextRetrieval, processor: BlipProcessor,
                 temp: float = 0.07, negative_mix: float = 0.0,
                 objectives: Objectives = Objectives()):
        super().__init__()
        self.filter = filter_model
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self._setup(processor, filter_model, objectives, negative_mix, queue_ids=True)

    def online_models(self) -> tuple[nn.Module, ...]:
        return (self.filter,)

    def forward(self, pixel_values, input_ids, attention_mask, texts: list[str], generator=None,
                progress: float = 0.0) -> dict[str, torch.Tensor]:
        image_embeds = self.filter.vision_model(pixel_values=pixel_values)[0]
        return self._itc_itm(pixel_values, image_embeds, input_ids, attention_mask, texts,
                             generator, progress)

    def export(self, folder: Path, processor: BlipProcessor) -> dict[str, Path]:
        return export_models(folder, processor, filter=self.filter)
