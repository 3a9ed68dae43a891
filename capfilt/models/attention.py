"""Scaled-dot-product attention for BLIP, and the image's cross-attention keys and values
computed once per image however many texts are scored against it.

Hugging Face's BLIP attention (vision ``BlipAttention``, text ``BlipTextSelfAttention``) is
eager: scores, softmax and the weighted sum as separate kernels, with the attention matrix
materialised. ``use_sdpa(model)`` gives each such module a forward that calls
``torch.nn.functional.scaled_dot_product_attention`` instead (a fused kernel on GPU), with the
same weights, masks, KV cache and outputs (within float tolerance: ``tests/test_attention.py``).

``image_kv_once(text_encoder, image_embeds, owners)``: while it is active, cross-attention
takes its keys and values from ``image_embeds`` (one row per image) and gathers them for the
texts by ``owners``; the text encoder is then called with a broadcast view in place of the
per-text image embeddings. The key and value projections of the image tokens (577 of them
for BLIP at 384 px) run once per image instead of once per text.

``captions_share_image(text_decoder, per_image)``: while it is active, the decoder is called
with one row of image embeddings per image and ``per_image`` consecutive caption rows for each;
cross-attention folds the queries of an image's captions into one attention call over that
image's keys and values. The image's K/V are projected, cached and read once per image, not
once per caption (BLIP-2's recipe writes 10 captions per image).
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer, EncoderDecoderCache
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention


def _vision_forward(self, hidden_states: torch.Tensor, **kwargs):
    bsz, length, dim = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(bsz, length, 3, self.num_heads, self.head_dim)
    query, key, value = qkv.permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(
        query, key, value, dropout_p=self.dropout.p if self.training else 0.0, scale=self.scale)
    return self.projection(out.transpose(1, 2).reshape(bsz, length, dim)), None


def _heads(self, states: torch.Tensor) -> torch.Tensor:
    return states.view(*states.shape[:-1], -1, self.attention_head_size).transpose(1, 2)


def _text_forward(self, hidden_states: torch.Tensor, attention_mask=None,
                  encoder_hidden_states=None, encoder_attention_mask=None, cache=None, **kwargs):
    cache = cache if cache is not None else kwargs.pop("past_key_values", None)
    query = _heads(self, self.query(hidden_states))
    cross = encoder_hidden_states is not None
    mask = encoder_attention_mask if cross else attention_mask
    current = None
    updated = False
    if cache is not None:
        if isinstance(cache, EncoderDecoderCache):
            updated = cache.is_updated.get(self.layer_idx)
            current = cache.cross_attention_cache if cross else cache.self_attention_cache
        else:
            current = cache
    if cross and cache is not None and updated:
        key, value = current.layers[self.layer_idx].keys, current.layers[self.layer_idx].values
    else:
        shared = getattr(self, "_capfilt_image_kv", None) if cross else None
        if shared is not None:  # once per image, then gathered for the texts
            images, owners = shared
            key = _heads(self, self.key(images))[owners]
            value = _heads(self, self.value(images))[owners]
        else:
            source = encoder_hidden_states if cross else hidden_states
            key, value = _heads(self, self.key(source)), _heads(self, self.value(source))
        if cache is not None and cross:
            _store_as_is(current, key, value, self.layer_idx)
            if isinstance(cache, EncoderDecoderCache):
                cache.is_updated[self.layer_idx] = True
        elif cache is not None:
            key, value = current.update(key, value, self.layer_idx, kwargs=kwargs)
    if mask is not None:
        mask = mask.to(query.dtype)
    group = getattr(self, "_capfilt_per_image", None) if cross else None
    if group:  # (images * group, heads, q, d) -> (images, heads, group * q, d)
        rows, heads, length, dim = query.shape
        query = query.view(rows // group, group, heads, length, dim).transpose(1, 2)
        query = query.reshape(rows // group, heads, group * length, dim)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=self.dropout.p if self.training else 0.0)
    if group:
        out = out.view(rows // group, heads, group, length, dim).transpose(1, 2)
        out = out.reshape(rows, heads, length, dim)
    out = out.transpose(1, 2).reshape(*hidden_states.shape[:-1], self.all_head_size)
    return out, None


def _store_as_is(cache, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> None:
    """Cross-attention K/V into the cache without a copy: a ``DynamicLayer`` grows by
    concatenation, which would copy them once (2 x 0.9 GB per layer for 1,024 BLIP-base images
    at 384 px). They are written once and only read after."""
    cache.update(key[..., :0, :], value[..., :0, :], layer_idx)  # creates the layer, empty
    layer = cache.layers[layer_idx]
    if type(layer) is DynamicLayer:  # not its subclasses (sliding, quantised): they need update
        layer.keys, layer.values = key, value
    else:  # another layer kind: its own update
        cache.update(key, value, layer_idx)


def use_sdpa(model: torch.nn.Module) -> int:
    """Give every BLIP attention module in ``model`` an SDPA forward; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, BlipAttention):
            module.forward = types.MethodType(_vision_forward, module)
        elif isinstance(module, BlipTextSelfAttention):
            module.forward = types.MethodType(_text_forward, module)
        else:
            continue
        count += 1
    model._capfilt_sdpa = count > 0
    return count


def uses_sdpa(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "_capfilt_sdpa", False))


def _cross_attention(text_model: torch.nn.Module) -> list[BlipTextSelfAttention]:
    return [m for name, m in text_model.named_modules()
            if isinstance(m, BlipTextSelfAttention) and "crossattention" in name]


@contextmanager
def captions_share_image(text_decoder: torch.nn.Module, per_image: int):
    """Decode ``per_image`` captions per image against one row of image embeddings each
    (rows grouped by image, in order). Needs ``use_sdpa`` on the model."""
    modules = _cross_attention(text_decoder)
    for module in modules:
        module._capfilt_per_image = per_image
    try:
        yield
    finally:
        for module in modules:
            module._capfilt_per_image = None


@contextmanager
def image_kv_once(text_encoder: torch.nn.Module, image_embeds: torch.Tensor,
                  owners: torch.Tensor):
    """Cross-attention K/V from ``image_embeds`` (per image), gathered by ``owners`` (per text).

    Yields the ``encoder_hidden_states`` to pass: a broadcast view with one row per text, read
    only for its shape. Needs ``use_sdpa`` on the model (the eager forward would read the view).
    """
    modules = _cross_attention(text_encoder)
    for module in modules:
        module._capfilt_image_kv = (image_embeds, owners)
    try:
        yield image_embeds[:1].expand(len(owners), -1, -1)
    finally:
        for module in modules:
            module._capfilt_image_kv = None

