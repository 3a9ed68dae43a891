"""Logit processing and per-row sampling for the captioner's own decoding loop.

Hugging Face's ``generate`` draws every row of a batch from one random stream, so a caption
would change with its batch mates. Here each row draws from its own generator, with the same
logit processing ``generate`` applies (repetition penalty, minimum length, top-k, top-p).
"""

from __future__ import annotations

import torch


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
    return torch.stack([torch.rand(steps, generator=g) for g in rows]).to(device)


def sample_rows(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row, by inverse CDF on that row's uniform (``row_uniforms``' column)."""
    probs = logits.float().softmax(dim=-1)
    sorted_probs, sorted_index = torch.sort(probs, dim=-1, descending=True, stable=True)
    cdf = sorted_probs.cumsum(dim=-1)
    pick = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(1).contiguous())
    pick = pick.clamp_(max=probs.shape[-1] - 1)
    return torch.gather(sorted_index, 1, pick).squeeze(1)
