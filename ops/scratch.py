"""Scratch buffers that captured CUDA graphs keep pointers to: they only grow, an outgrown one
stays alive, and none is allocated inside a capture (the warm-up forwards before a capture
allocate them)."""

from __future__ import annotations

from typing import Any

import torch


def outgrow(device: torch.device, have: Any, outgrown: list, what: str) -> None:
    """Before a larger scratch replaces `have` (None: the first one): raise RuntimeError inside
    a CUDA graph capture on `device`, else keep `have` alive in `outgrown`."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{what} for this size must exist before a CUDA graph capture (run "
                           "the forward once first)")
    if have is not None:
        outgrown.append(have)
