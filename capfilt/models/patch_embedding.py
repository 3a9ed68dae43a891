"""A ViT's patch embedding (a convolution whose stride is its kernel) as one matrix product.

On an H100 cuDNN ran BLIP-base's patch embedding at 1,024 images of 384 px in 21 ms per
tower (bench/results/gpu-nvidia-h100-80gb-hbm3-2026-11-27-profile.txt): 33 TFLOP/s, against
several hundred for a matrix product of the same work. The patches do not overlap, so the
convolution is a reshape of the pixels and a product with the flattened kernel. Same weights,
same output shape; equal to the convolution within rounding (``tests/test_patch_embedding.py``).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def _as_product(self: nn.Conv2d, pixels: torch.Tensor) -> torch.Tensor:
    rows, channels, height, width = pixels.shape
    side = self.kernel_size[0]
    if height % side or width % side:  # the convolution drops the edge; keep its answer
        return nn.Conv2d.forward(self, pixels)
    across, down = width // side, height // side
    patches = pixels.reshape(rows, channels, down, side, across, side)
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(rows, down * across, channels * side * side)
    out = F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)
    # (rows, patches, width) seen as the convolution's (rows, width, down, across): a view,
    # which the model's flatten(2).transpose(1, 2) turns back into (rows, patches, width)
    return out.transpose(1, 2).unflatten(2, (down, across))


def patches_as_products(model: nn.Module) -> int:
    """Give every non-overlapping square-patch ``nn.Conv2d`` named ``patch_embedding`` in
    ``model`` the matrix-product forward; returns how many."""
    count = 0
    for name, module in model.named_modules():
        if (name.rsplit(".", 1)[-1] == "patch_embedding" and isinstance(module, nn.Conv2d)
                and module.kernel_size == module.stride and module.kernel_size[0] == module.kernel_size[1]
                and module.padding == (0, 0) and module.dilation == (1, 1) and module.groups == 1):
            module.forward = types.MethodType(_as_product, module)
            count += 1
    return count
