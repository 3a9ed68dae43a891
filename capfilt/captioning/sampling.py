"""Logit processing and per-row sampling for the captioner's own decoding loop.

Hugging Face's ``generate`` draws every row of a batch from one random stream, so a caption
would change with its batch mates. Here each row draws from its own generator, with the same
logit processing ``generate`` applies (repetition penalty, minimum length, top-k, top-p).

With top-k set, only the top-k tokens (and those tied with the k-th) can be drawn, so
``sample_candidates`` works on them alone: two sorts of the whole vocabulary per step were 8% of
an H100's time at 1,024 images (bench/README.md). It draws the same tokens as
``sample_rows(top_k_top_p(...))``, up to the rounding of sums over fewer terms.
"""

from __future__ import annotations

import torch

from capfilt.models.transfer import to_device


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> None:
    """In place, as transformers' RepetitionPenaltyLogitsProcessor: every token seen so far."""
    if penalty == 1.0:
        return
    score = torch.gather(logits, 1, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    logits.scatter_(1, seen, score)


def top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    """Mask (to -inf) what top-k then nucleus top-p would never sample, as transformers does."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, descending=False, stable=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[:, -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove.scatter(1, sorted_index, remove), float("-inf"))
    return logits


def row_uniforms(rows: list[torch.Generator], steps: int, device) -> torch.Tensor:
    """(rows, steps) uniforms, row ``i`` from its own generator, drawn once before decoding:
    one host-to-device copy instead of a Python call per row at every step. A CPU generator
    gives the same numbers drawn together or one at a time (``tests/test_captioner.py``)."""
    return to_device(torch.stack([torch.rand(steps, generator=g) for g in rows]),
                     torch.device(device))


def sample_rows(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row, by inverse CDF on that row's uniform (``row_uniforms``' column)."""
    probs = logits.float().softmax(dim=-1)
    sorted_probs, sorted_index = torch.sort(probs, dim=-1, descending=True, stable=True)
    cdf = sorted_probs.cumsum(dim=-1)
    pick = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(1).contiguous())
    pick = pick.clamp_(max=probs.shape[-1] - 1)
    return torch.gather(sorted_index, 1, pick).squeeze(1)


# Candidates kept beyond top-k for tokens tied with the k-th; more ties than this: the caller
# decodes again over the whole vocabulary (``sample_candidates``' second result).
TIE_ROOM = 64


def sample_candidates(logits: torch.Tensor, top_k: int, top_p: float,
                      uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token per row, per row whether its candidates held all ties of its k-th logit).

    The candidates are put in token order, the order the whole vocabulary has, so that ties
    break as the full sorts break them (by token id); then the same top-k mask, nucleus and
    inverse CDF as ``top_k_top_p`` and ``sample_rows``.
    """
    width = min(logits.shape[-1], top_k + TIE_ROOM)
    values, index = torch.topk(logits, width, dim=-1)  # ties come in no stated order
    kth = values[:, top_k - 1 : top_k]
    held = (values[:, -1] < kth[:, 0] if width < logits.shape[-1]
            else torch.ones(len(logits), dtype=torch.bool, device=logits.device))
    index, order = index.sort(dim=-1)
    values = values.gather(1, order)
    values = values.masked_fill(values < kth, float("-inf"))
    pick = sample_rows(top_k_top_p(values, None, top_p), uniform)
    return index.gather(1, pick.unsqueeze(1)).squeeze(1), held
