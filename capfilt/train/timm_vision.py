"""Start BLIP's vision tower from a timm ViT, as the BLIP paper starts from ImageNet ViTs.

timm's ``VisionTransformer`` and Hugging Face's ``BlipVisionModel`` are the same network under
other names (BLIP's own code built its ViT from timm's): fused qkv in the same order, pre-norm
blocks, exact GELU, a final norm. Only the LayerNorm epsilon differs by default (timm and the
original BLIP: 1e-6; ``BlipVisionConfig``: 1e-5), so configs made here carry timm's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LAYER_KEYS = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
TOP_KEYS = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}


def check_timm_vit(model: nn.Module) -> None:
    """Refuse timm ViT variants BLIP's tower cannot express, naming the feature."""
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise ValueError(f"{type(model).__name__} is not a timm VisionTransformer")
    problems = []
    if getattr(model, "cls_token", None) is None:
        problems.append("no class token")
    if getattr(model, "num_reg_tokens", 0):
        problems.append("register tokens")
    if not isinstance(model.norm_pre, nn.Identity):
        problems.append("a pre-norm before the blocks")
    block = model.blocks[0]
    if not isinstance(block.ls1, nn.Identity):
        problems.append("layer scale")
    if not isinstance(getattr(block.attn, "q_norm", nn.Identity()), nn.Identity):
        problems.append("qk-norm")
    if not isinstance(block.mlp.act, nn.GELU) or block.mlp.act.approximate != "none":
        problems.append(f"activation {block.mlp.act}")
    if problems:
        raise ValueError("this timm ViT has " + ", ".join(problems) + ": BLIP's ViT has none")


def blip_vision_config(model: nn.Module, image_size: int) -> dict:
    """``BlipVisionConfig`` fields for a tower shaped like ``model`` at ``image_size`` pixels."""
    check_timm_vit(model)
    block = model.blocks[0]
    return dict(
        hidden_size=model.embed_dim,
        intermediate_size=block.mlp.fc1.out_features,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=block.attn.num_heads,
        patch_size=model.patch_embed.patch_size[0],
        image_size=image_size,
        layer_norm_eps=block.norm1.eps,
        hidden_act="gelu",
        initializer_range=0.02,
    )


def blip_state_dict(model: nn.Module, image_size: int) -> dict[str, torch.Tensor]:
    """timm's weights under ``BlipVisionModel`` names, position embeddings resized if needed."""
    check_timm_vit(model)
    source = model.state_dict()
    out = {}
    for timm_key, blip_key in TOP_KEYS.items():
        out[blip_key] = source[timm_key]
    for index in range(len(model.blocks)):
        for timm_part, blip_part in LAYER_KEYS.items():
            for kind in ("weight", "bias"):
                out[f"encoder.layers.{index}.{blip_part}.{kind}"] = (
                    source[f"blocks.{index}.{timm_part}.{kind}"]
                )
    grid = image_size // model.patch_embed.patch_size[0]
    out["embeddings.position_embedding"] = resize_positions(out["embeddings.position_embedding"], grid)
    return out


def resize_positions(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """BLIP's ``interpolate_pos_embed``: bicubic over the patch grid, class position kept."""
    patches = pos_embed[:, 1:, :]
    old = int(round(patches.shape[1] ** 0.5))
    if old == grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid_in = patches.reshape(1, old, old, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(grid_in.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1, :], resized], dim=1)


def load_timm_into(vision_model: nn.Module, timm_model: nn.Module) -> None:
    """Copy a timm ViT's weights into a ``BlipVisionModel``; every key must match."""
    image_size = vision_model.config.image_size
    vision_model.load_state_dict(blip_state_dict(timm_model, image_size), strict=True)
