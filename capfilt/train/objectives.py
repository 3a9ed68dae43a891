"""BLIP's three losses: image-text contrastive, matching with hard negatives, captioning LM.

Each takes tensors and returns a scalar; the modules in ``tasks.py`` wire them to the models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
LABEL_SMOOTHING = 0.1


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor,
             positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch contrastive loss on normalised features; returns (loss, image-to-text sims).

    ``positive[i, j]`` marks text j as a right caption of image i (its own, or the same text
    written for another image); the target spreads evenly over them, as BLIP's idx targets do.
    """
    sim_i2t = image_feat @ text_feat.t() / temp
    targets = positive.float() / positive.float().sum(dim=1, keepdim=True)
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets).sum(dim=1).mean()
    targets_t = positive.t().float() / positive.t().float().sum(dim=1, keepdim=True)
    loss_t2i = -(F.log_softmax(sim_i2t.t(), dim=1) * targets_t).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2, sim_i2t


def hard_negatives(sim_i2t: torch.Tensor, positive: torch.Tensor,
                   generator: torch.Generator | None = None,
                   uniform_mix: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One negative text per image and one negative image per text, drawn by similarity.

    BLIP samples from softmax(similarity) with the positives' weight set to zero, so a more
    similar wrong pair is more likely to be chosen. ``uniform_mix`` (0 in BLIP) blends that
    with a uniform draw: a model trained from scratch, with no BERT and no ImageNet ViT behind
    it, never gets past the base rate on only hard negatives. A row whose every candidate is
    positive (a batch of one text) falls back to any other index. Returns (text index per
    image, image index per text).
    """
    with torch.no_grad():
        picks = []
        for sim, pos in ((sim_i2t, positive), (sim_i2t.t(), positive.t())):
            weights = F.softmax(sim.float(), dim=1)
            if uniform_mix:
                weights = (1 - uniform_mix) * weights + uniform_mix / weights.shape[1]
            weights = weights.masked_fill(pos, 0.0)
            empty = weights.sum(dim=1) <= 0
            if bool(empty.any()):
                others = ~torch.eye(*weights.shape, dtype=torch.bool, device=weights.device)
                weights[empty] = others[empty].float()
            picks.append(torch.multinomial(weights, 1, generator=generator).squeeze(1))
    return picks[0], picks[1]


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary matching cross-entropy over the ITM head's two logits."""
    return F.cross_entropy(logits.float(), labels)


def lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int = 0) -> torch.Tensor:
    """Targets for the decoder: pad positions and the first ``prompt_length`` tokens ignored."""
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    labels[:, :prompt_length] = IGNORE
    return labels


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = LABEL_SMOOTHING) -> torch.Tensor:
    """Next-token cross-entropy with label smoothing (BLIP: 0.1); logits predict position+1."""
    shifted = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    return F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
        ignore_index=IGNORE, label_smoothing=smoothing,
    )
