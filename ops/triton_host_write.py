"""A step's results written into pinned host memory by a kernel, instead of a copy.

A step's sampled tokens (and log-probs, when asked for) reach the host through a copy into
pinned host buffers. On the compute stream the copy engine's hand-off left the device idle
about 5 µs either side of it in batch 32's step; on the readback stream (the default,
runtime/runner.py) the copy waits on an event from the compute stream instead, and the next
graph's start then came 21-45 µs after the input kernel in about half the steps
(benchmarks/RESULTS.md, fortieth session). With LORASERVE_READBACK_KERNEL=1 (opt-in) a kernel
on the compute stream stores the results straight into mapped pinned host memory: no copy
engine and no second stream in the step.

The kernel copies 32-bit words (bytes where a tensor's size is not a multiple of four), so one
kernel serves every result dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.sizes import cdiv, next_pow2

BLOCK_MAX = 1024


@triton.jit(do_not_specialize=["n"])
def _host_write_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=keep), mask=keep)


def _words(t: torch.Tensor) -> torch.Tensor:
    """`t`'s bytes as 32-bit words, or as bytes where they do not divide into words."""
    flat = t.reshape(-1).view(torch.uint8)
    return flat.view(torch.int32) if flat.numel() % 4 == 0 else flat


def write_to_host(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[...] = src[...]: `src` on the device (contiguous), `dst` a contiguous tensor of the
    same shape and dtype in pinned host memory (on the CPU, under the Triton interpreter: any
    host tensor). One launch on the current stream; `dst` holds the values once the work
    enqueued so far on that stream has run."""
    if src.shape != dst.shape or src.dtype != dst.dtype:
        raise ValueError(f"host buffer {tuple(dst.shape)} {dst.dtype} does not match the result "
                         f"{tuple(src.shape)} {src.dtype}")
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("write_to_host takes contiguous tensors")
    if src.numel() == 0:
        return
    s, d = _words(src), _words(dst)
    n = s.numel()
    block = min(BLOCK_MAX, next_pow2(n))
    _host_write_kernel[(cdiv(n, block),)](s, d, n, BLOCK=block)
