"""Host-device copies that leave the GPU's queue running.

A plain ``tensor.to("cuda")`` from ordinary host memory waits for every kernel queued before
it, and ``bool(tensor)`` on a CUDA tensor waits for the tensor: the GPU then idles while Python
launches the next kernels. In the model loop that happened at each decoding step and at each
filter chunk. Copies from pinned memory run in the queue's order without stopping the host.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a CPU-to-GPU copy goes through pinned memory, non-blocking."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class LaterFlag:
    """A one-element device tensor copied to the host in the queue's order; ``value()`` waits
    only for the work queued before the copy, not for what the host launched after it."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.device.type != "cuda":
            self._host, self._done = tensor, None
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._done = torch.cuda.Event()
        self._done.record()

    def value(self) -> bool:
        if self._done is not None:
            self._done.synchronize()
        return bool(self._host)
