"""BLIP's three losses: image-text contrastive, matching with hard negatives, captioning LM.

Each takes tensors and returns a scalar; the modules in ``tasks.py`` wire them to the models.
The contrastive loss comes in two forms: in-batch (``itc_loss``, ``itc_loss_across_ranks``),
used with momentum off, and BLIP's own (``itc_distilled``): online features against the
momentum encoders' batch features and a queue of earlier ones, with momentum distillation.
Similarities are computed in float32 even under autocast: logits of up to 1/temp = 14 (and
1/0.001 at the clamp) over a queue of 57,600 lose too much in bfloat16.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE = -100
LABEL_SMOOTHING = 0.1


# An id no text gets (``text_ids`` are non-negative): BLIP fills its idx queue with -100.
NO_TEXT_ID = -1


def same_text(texts: list[str]) -> torch.Tensor:
    """``[i, j]`` true when text j equals text i: another image's identical caption is no negative."""
    ids = {text: n for n, text in enumerate(dict.fromkeys(texts))}
    index = torch.tensor([ids[text] for text in texts])
    return index.unsqueeze(0) == index.unsqueeze(1)


def text_ids(texts: list[str]) -> torch.Tensor:
    """A non-negative int64 per text, equal for equal texts, the same in every process (blake2b
    of the UTF-8 bytes, not Python's salted ``hash``): tensors that ranks can all-gather and a
    queue can hold, where BLIP uses image ids. ``ids[:, None] == ids[None, :]`` is ``same_text``
    but for collisions, which among n texts happen with probability about n**2 / 2**64 (1e-7
    for a million texts in a batch and a queue)."""
    values = [int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
              & (2**63 - 1) for text in texts]
    return torch.tensor(values, dtype=torch.long)


@contextmanager
def full_precision(device: torch.device):
    """Autocast off (float32 math) for the block, whatever the caller's autocast."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor,
             positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch contrastive loss on normalised features; returns (loss, image-to-text sims).

    ``positive[i, j]`` marks text j as a right caption of image i (its own, or the same text
    written for another image); the target spreads evenly over them, as BLIP's idx targets do.
    """
    with full_precision(image_feat.device):
        sim_i2t = image_feat.float() @ text_feat.float().t() / temp.float()
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


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows along dim 0, in rank order, gradients flowing back to their owner
    (BLIP's ``all_gather_with_grad``); ``x`` itself in one process. Ranks' shapes must match."""
    return _GatherWithGrad.apply(x) if distributed() else x


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows along dim 0, in rank order, without gradient (BLIP's
    ``concat_all_gather``); ``x`` itself in one process. Ranks' shapes must match."""
    if not distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def pad_to(ids: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """``ids`` (rows x tokens) right-padded with ``value`` to ``length`` tokens."""
    return F.pad(ids, (0, length - ids.shape[1]), value=value)


def longest_across_ranks(length: int, device: torch.device) -> int:
    """The largest ``length`` any rank holds (texts are padded to their own batch's longest;
    gathering them needs one length)."""
    if not distributed():
        return length
    value = torch.tensor([length], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


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
    with full_precision(image_feat.device):
        image_feat, text_feat, temp = image_feat.float(), text_feat.float(), temp.float()
        image_all, text_all = image_all.float(), text_all.float()
        loss_i2t = _soft_cross_entropy(image_feat @ text_all.t() / temp, positive)
        loss_t2i = _soft_cross_entropy(text_feat @ image_all.t() / temp, positive)
        return (loss_i2t + loss_t2i) / 2, (image_feat @ text_all[own].t() / temp)


def _soft_cross_entropy(sim: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    return _cross_entropy_to(sim, hard_targets(positive))


def _cross_entropy_to(sim: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(F.log_softmax(sim, dim=1) * targets).sum(dim=1).mean()


def hard_targets(positive: torch.Tensor) -> torch.Tensor:
    """Each row's target spread evenly over its positives (BLIP: ``pos_idx / pos_idx.sum(1)``)."""
    positive = positive.float()
    return positive / positive.sum(dim=1, keepdim=True)


def alpha_at(alpha: float, progress: float, ramp_epochs: float) -> float:
    """BLIP's distillation weight: ``alpha`` reached linearly over the first ``ramp_epochs``
    epochs (pretrain.py: 2, ``(epoch*len + i) / (2*len)``; train_retrieval.py: 1, ``i/len``
    in epoch 0), ``progress`` the epochs done so far."""
    return alpha * min(1.0, max(0.0, progress) / ramp_epochs)


@dataclass
class DistilledItc:
    """``itc_distilled``'s result: the loss, the online-against-momentum similarities
    ([batch, queue] columns, /temp, float32, detached) and the targets they were trained to."""

    loss: torch.Tensor
    sim_i2t: torch.Tensor
    sim_t2i: torch.Tensor
    targets_i2t: torch.Tensor
    targets_t2i: torch.Tensor


def itc_distilled(image_feat: torch.Tensor, text_feat: torch.Tensor,
                  image_feat_m: torch.Tensor, text_feat_m: torch.Tensor,
                  image_queue: torch.Tensor, text_queue: torch.Tensor, temp: torch.Tensor,
                  positive: torch.Tensor, alpha: float,
                  queue_positive: torch.Tensor | None = None) -> DistilledItc:
    """BLIP's ITC with momentum distillation (blip_pretrain.py, blip_retrieval.py).

    Online features (rows x dim, normalised) are compared with the momentum encoders' features
    of the same batch followed by the queue (dim x queue_size): ``sim = feat @ [feat_m.T,
    queue] / temp``. The targets are ``alpha * softmax(momentum feat_m @ [feat_m.T, queue] /
    temp) + (1 - alpha) * hard``, where ``hard`` spreads evenly over the positives: ``positive``
    (rows x rows) in the batch part and ``queue_positive`` (rows x queue_size, or none) in the
    queue part. Targets carry no gradient; the queues are read as they are (pass clones if they
    will be changed before backward).
    """
    with torch.no_grad(), full_precision(image_feat.device):
        temp_now = temp.detach().float()
        image_m_all = torch.cat([image_feat_m.float().t(), image_queue.float()], dim=1)
        text_m_all = torch.cat([text_feat_m.float().t(), text_queue.float()], dim=1)
        queue_part = (queue_positive if queue_positive is not None else
                      torch.zeros(positive.shape[0], image_queue.shape[1], dtype=torch.bool,
                                  device=positive.device))
        hard_i2t = hard_targets(torch.cat([positive, queue_part], dim=1))
        hard_t2i = hard_targets(torch.cat([positive.t(), queue_part], dim=1))
        targets_i2t = alpha * F.softmax(image_feat_m.float() @ text_m_all / temp_now, dim=1) \
            + (1 - alpha) * hard_i2t
        targets_t2i = alpha * F.softmax(text_feat_m.float() @ image_m_all / temp_now, dim=1) \
            + (1 - alpha) * hard_t2i
    with full_precision(image_feat.device):
        sim_i2t = image_feat.float() @ text_m_all / temp.float()
        sim_t2i = text_feat.float() @ image_m_all / temp.float()
        loss = (_cross_entropy_to(sim_i2t, targets_i2t) + _cross_entropy_to(sim_t2i, targets_t2i)) / 2
    return DistilledItc(loss, sim_i2t.detach(), sim_t2i.detach(), targets_i2t, targets_t2i)


def negative_weights(sim: torch.Tensor, positive: torch.Tensor, uniform_mix: float = 0.0,
                     floor: float = 0.0) -> torch.Tensor:
    """How likely each candidate is to be drawn as a row's negative: ``softmax(sim) + floor``
    (BLIP's pre-training adds 1e-4, its retrieval fine-tune nothing), blended with a uniform
    draw by ``uniform_mix``, positives set to zero. A row whose every candidate is positive (a
    batch of one text) falls back to every other index."""
    weights = F.softmax(sim.float(), dim=1) + floor
    if uniform_mix:
        weights = (1 - uniform_mix) * weights + uniform_mix / weights.shape[1]
    weights = weights.masked_fill(positive, 0.0)
    empty = weights.sum(dim=1) <= 0
    if bool(empty.any()):
        others = ~torch.eye(*weights.shape, dtype=torch.bool, device=weights.device)
        weights[empty] = others[empty].float()
    return weights


def hard_negatives(sim_i2t: torch.Tensor, positive: torch.Tensor,
                   generator: torch.Generator | None = None,
                   uniform_mix: float = 0.0, *, sim_t2i: torch.Tensor | None = None,
                   floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One negative text per image and one negative image per text, drawn by similarity.

    BLIP samples from softmax(similarity) with the positives' weight set to zero, so a more
    similar wrong pair is more likely to be chosen. ``sim_i2t`` is images (rows) against
    candidate texts; ``sim_t2i`` texts (rows) against candidate images, by default
    ``sim_i2t.t()`` (BLIP's pre-training compares online features with the momentum ones, so
    its two are not transposes of each other). The candidates may be more than the rows (the
    gathered global batch): ``positive`` is rows x candidates, for both directions when
    ``sim_t2i`` is given (the relation is "same text"), else transposed for images. ``floor``
    and ``uniform_mix`` see ``negative_weights``; ``uniform_mix`` (0 in BLIP) helps a model
    trained from scratch, with no BERT and no ImageNet ViT behind it, which never gets past
    the base rate on only hard negatives. The draw runs where ``generator`` lives (a CPU
    generator draws on the CPU whatever the device of the similarities). Returns (text index
    per image, image index per text), on the similarities' device.
    """
    if sim_t2i is None:
        sim_t2i, positive_t2i = sim_i2t.t(), positive.t()
    else:
        positive_t2i = positive
    device = sim_i2t.device
    with torch.no_grad():
        picks = []
        for sim, pos in ((sim_i2t, positive), (sim_t2i, positive_t2i)):
            weights = negative_weights(sim, pos, uniform_mix, floor)
            if generator is not None and generator.device != weights.device:
                weights = weights.to(generator.device)
            picks.append(torch.multinomial(weights, 1, generator=generator).squeeze(1).to(device))
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
