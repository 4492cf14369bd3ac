"""Host data crossing to the model's device: one copy, through pinned memory, without a host sync."""

from __future__ import annotations

import torch

__all__ = ["to_device"]


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device``: ``host`` itself on the CPU; on CUDA a pinned copy sent
    asynchronously (pageable memory would make the copy wait for the host, and the host for it).

    The pinned staging copy comes from torch's caching host allocator, which keeps it until the transfer
    has completed, so a pageable ``host`` may be changed or freed as soon as this returns.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return host.to(dev)
    return host.pin_memory().to(dev, non_blocking=True)
