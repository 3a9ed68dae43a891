"""BLIP's momentum encoders and feature queues (salesforce/BLIP blip_pretrain.py and
blip_retrieval.py).

A ``MomentumEncoders`` holds copies of the online model's vision encoder, ``vision_proj``, text
encoder and ``text_proj``, never trained by gradient (``requires_grad`` False) but moved each
step towards the online weights, ``m = decay * m + (1 - decay) * online`` (BLIP's
``_momentum_update``, called inside forward before the momentum features are computed). Its
features of each global batch go into two queues (projection dim x queue size, random
normalised at the start) at a pointer that wraps around; ITC compares online features with the
batch's momentum features and the queue (``objectives.itc_distilled``).

The copies and queues are registered (parameters and buffers), so they are in the task's
``state_dict`` and a training checkpoint resumes them; the tasks export only the online models
to Hugging Face folders. The online model is passed to ``update`` rather than held, so its
weights are not registered twice.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from capfilt.train.objectives import NO_TEXT_ID, gather_no_grad

# What BLIP keeps a momentum copy of (``model_pairs``), by their Hugging Face names.
MOMENTUM_PARTS = ("vision_model", "vision_proj", "text_encoder", "text_proj")


class MomentumEncoders(nn.Module):
    """Momentum copies of a ``BlipForImageTextRetrieval``'s ITC parts and the feature queues.

    ``with_ids`` adds ``id_queue``, the text id (``objectives.text_ids``) of each queued
    feature, BLIP's ``idx_queue`` for the retrieval fine-tune (there keyed by image id).
    """

    def __init__(self, online: nn.Module, decay: float = 0.995, queue_size: int = 57600,
                 seed: int = 0, with_ids: bool = False):
        super().__init__()
        if not 0 <= decay < 1:
            raise ValueError(f"momentum decay {decay}: must be in [0, 1)")
        if queue_size < 1:
            raise ValueError(f"queue size {queue_size}: must be at least 1")
        for name in MOMENTUM_PARTS:
            part = copy.deepcopy(getattr(online, name))
            part.requires_grad_(False)
            setattr(self, name, part)
        self.decay = decay
        self.queue_size = queue_size
        dim = self.vision_proj.out_features
        # Its own generator: every rank starts from the same queue without a global seed.
        generator = torch.Generator().manual_seed(seed)
        for name in ("image_queue", "text_queue"):
            start = torch.randn(dim, queue_size, generator=generator)
            self.register_buffer(name, F.normalize(start, dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.with_ids = with_ids
        if with_ids:
            self.register_buffer("id_queue",
                                 torch.full((queue_size,), NO_TEXT_ID, dtype=torch.long))

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        """``m = decay * m + (1 - decay) * online`` for every parameter of the four parts."""
        for name in MOMENTUM_PARTS:
            mine = dict(getattr(self, name).named_parameters())
            theirs = dict(getattr(online, name).named_parameters())
            if mine.keys() != theirs.keys():
                raise ValueError(f"momentum {name} does not match the online model's")
            for key, param_m in mine.items():
                param_m.mul_(self.decay).add_(theirs[key].detach().to(param_m.dtype),
                                              alpha=1 - self.decay)

    @torch.no_grad()
    def features(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised momentum image and text features (rows x dim, float32)."""
        image_embeds = self.vision_model(pixel_values=pixel_values)[0]
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)
        text_out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        text_feat = F.normalize(self.text_proj(text_out.last_hidden_state[:, 0, :]).float(), dim=-1)
        return image_feat, text_feat

    def queues(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the two queues, safe to use in a graph while ``enqueue`` overwrites them."""
        return self.image_queue.clone(), self.text_queue.clone()

    @torch.no_grad()
    def enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor,
                ids: torch.Tensor | None = None) -> None:
        """Write the momentum features of the whole global batch (gathered from every rank in
        rank order under torch.distributed) at the pointer, and move it on, modulo the queue
        size (BLIP's ``_dequeue_and_enqueue``; like BLIP, the queue size must divide by the
        global batch)."""
        image_all, text_all = gather_no_grad(image_feat_m), gather_no_grad(text_feat_m)
        batch = image_all.shape[0]
        if self.queue_size % batch:
            raise ValueError(f"queue size {self.queue_size} does not divide by the global batch "
                             f"{batch}: BLIP's queue takes whole batches")
        ptr = int(self.queue_ptr)
        self.image_queue[:, ptr:ptr + batch] = image_all.t().to(self.image_queue.dtype)
        self.text_queue[:, ptr:ptr + batch] = text_all.t().to(self.text_queue.dtype)
        if self.with_ids:
            if ids is None:
                raise ValueError("this queue keeps text ids: pass them")
            self.id_queue[ptr:ptr + batch] = gather_no_grad(ids)
        self.queue_ptr[0] = (ptr + batch) % self.queue_size
