"""BLIP's three losses: image-text contrastive, matching with hard negatives, captioning LM.

Each takes tensors and returns a scalar; the modules in ``tasks.py`` wire them to the models.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE = -100
LABEL_SMOOTHING = 0.1


def same_text(texts: list[str]) -> torch.Tensor:
    """``[i, j]`` true when text j equals text i: another image's identical caption is no negative."""
    ids = {text: n for n, text in enumerate(dict.fromkeys(texts))}
    index = torch.tensor([ids[text] for text in texts])
    return index.unsqueeze(0) == index.unsqueeze(1)


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor,
             positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch contrastive loss on normalised features; returns (loss, image-to-text sims).

    ``positive[i, j]`` marks text j as a right caption of image i (its own, or the same text
    written for another image); the target spreads evenly over them, as BLIP's idx targets do.
    """
    sim_i2t = image_feat @ text_feat.t() / temp
    loss_i2t = _soft_cross_entropy(sim_i2t, positive)
    loss_t2i = _soft_cross_entropy(sim_i2t.t(), positive.t())
    return (loss_i2t + loss_t2i) / 2, sim_i2t


class _GatherWithGrad(torch.autograd.Function):
    """Every rank's rows, in rank order; gradients flow back to the rank that owns each row
    (BLIP's ``GatherLayer``: all-reduce the gradient, keep one's own slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows : (dist.get_rank() + 1) * rows]


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def itc_loss_across_ranks(image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor,
                          texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``itc_loss`` over the whole global batch under DDP: this rank's images against every
    rank's texts and this rank's texts against every rank's images, the features gathered with
    their gradients. BLIP compares a rank's rows with its own batch and a queue of 57,600
    momentum features that every rank feeds; capfilt has no momentum encoder and no queue, so
    it gathers the global batch instead, as BLIP-2's Q-Former does (BLIP-2 gathers without
    gradients; here they flow back to the rank that computed the features). A text equal to
    an image's own (on any rank) is a positive. Returns (loss, this rank's own image-to-text
    block of similarities), the block from which hard negatives are drawn. Ranks must hold
    equally many rows."""
    world, rank = dist.get_world_size(), dist.get_rank()
    all_texts: list = [None] * world
    dist.all_gather_object(all_texts, list(texts))
    flat = [t for part in all_texts for t in part]
    if any(len(part) != len(texts) for part in all_texts):
        raise ValueError(f"ranks hold {[len(p) for p in all_texts]} rows: ITC across ranks "
                         "needs a global batch that divides by the number of workers")
    image_all, text_all = _GatherWithGrad.apply(image_feat), _GatherWithGrad.apply(text_feat)
    own = slice(rank * len(texts), (rank + 1) * len(texts))
    positive = same_text(flat)[own].to(image_feat.device)
    loss_i2t = _soft_cross_entropy(image_feat @ text_all.t() / temp, positive)
    loss_t2i = _soft_cross_entropy(text_feat @ image_all.t() / temp, positive)
    return (loss_i2t + loss_t2i) / 2, (image_feat @ text_all[own].t() / temp)


def _soft_cross_entropy(sim: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    targets = positive.float() / positive.float().sum(dim=1, keepdim=True)
    return -(F.log_softmax(sim, dim=1) * targets).sum(dim=1).mean()


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
