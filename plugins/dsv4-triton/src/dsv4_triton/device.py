"""Where the Triton kernels run: CUDA devices, or the CPU under Triton's interpreter.

Kept free of triton and torch imports: every ``refuse`` calls it, and plugin discovery must stay cheap.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["INTERPRET_ENV", "interpreted", "refuse_device"]

#: Triton's switch for its interpreter: kernels run as NumPy programs on the host (no GPU needed).
INTERPRET_ENV = "TRITON_INTERPRET"


def interpreted() -> bool:
    """Whether Triton runs its kernels in the interpreter (``TRITON_INTERPRET`` read as Triton reads it).

    Triton decides when a kernel module is imported, so the variable must be set before the first
    kernel of this plugin runs.
    """
    return os.environ.get(INTERPRET_ENV, "").lower() in ("1", "true", "on", "yes")


def refuse_device(device: torch.device) -> str | None:
    """``None`` on a CUDA device, or on the CPU under the interpreter; else the reason."""
    if device.type == "cuda" or (device.type == "cpu" and interpreted()):
        return None
    return (f"Triton kernels need a CUDA device, not {device.type!r} "
            f"(set {INTERPRET_ENV}=1 to run them on the CPU in Triton's interpreter)")
