"""Weights pulled into L2 while latency-bound kernels run (CUDA sm_90+, decode graphs only).

At decode a layer alternates between weight-bound projections and kernels that read little and
wait on latency (rotary + K/V store, attention, the norms, SiLU*up): while those run, HBM sits
mostly idle. A prefetch launched on a stream of its own right after a projection asks the memory
system to bring the first bytes of the next projection's weight into L2
(`cp.async.bulk.prefetch.L2`, one 64 KB request a thread, nothing waited on), so the next GEMM
finds them there instead of reading all of its weight from HBM.

LORASERVE_L2_PREFETCH names how many MB of each weight to prefetch, as group:MB pairs (o, gate_up,
down, qkv; qkv's is the next layer's, after down), read when a decode forward is captured;
default PREFETCH_MB, "0": none. The prefetches join the capture's origin stream only at the end
of the forward: nothing waits on them.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch
import triton
import triton.language as tl

CHUNK_BYTES = 64 * 1024  # one prefetch request
_CHUNKS_PER_PROGRAM = 32
GROUPS = ("o", "gate_up", "down", "qkv")
PREFETCH_MB: dict[str, float] = {}


@triton.jit
def _l2_prefetch_kernel(ptr, num_chunks, CHUNK: tl.constexpr, PER_PROGRAM: tl.constexpr):
    idx = tl.program_id(0) * PER_PROGRAM + tl.arange(0, PER_PROGRAM)
    idx = tl.minimum(idx, num_chunks - 1)  # the grid's last program repeats the last chunk
    addrs = (ptr.to(tl.pointer_type(tl.int8)) + idx.to(tl.int64) * CHUNK).to(tl.int64)
    sizes = tl.full((PER_PROGRAM,), CHUNK, tl.int32)
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;",
        "=r,l,r", [addrs, sizes], dtype=tl.int32, is_pure=False, pack=1,
    )


def prefetch_mb() -> dict[str, float]:
    """LORASERVE_L2_PREFETCH as {group: MB} (default PREFETCH_MB; "0" or "": none)."""
    raw = os.environ.get("LORASERVE_L2_PREFETCH")
    if raw is None:
        return dict(PREFETCH_MB)
    raw = raw.strip()
    if raw in ("", "0"):
        return {}
    out = {}
    for part in raw.split(","):
        name, _, mb = part.partition(":")
        name = name.strip()
        if name not in GROUPS or not mb:
            raise ValueError(f"LORASERVE_L2_PREFETCH: {part!r} is not group:MB with a group of "
                             f"{GROUPS}")
        try:
            out[name] = float(mb)
        except ValueError:
            raise ValueError(f"LORASERVE_L2_PREFETCH: {part!r}: {mb!r} is not a number") from None
        if out[name] < 0:
            raise ValueError(f"LORASERVE_L2_PREFETCH: {part!r}: MB must be >= 0")
    return out


def l2_prefetch(weight: torch.Tensor, nbytes: int) -> None:
    """Launch the prefetch of weight's first `nbytes` (whole 64 KB requests, at most the
    tensor's bytes) on the current stream. weight: contiguous, on CUDA sm_90+."""
    if not weight.is_contiguous():
        raise ValueError("l2_prefetch: weight must be contiguous")
    total = weight.numel() * weight.element_size()
    chunks = min(total, nbytes) // CHUNK_BYTES
    if chunks <= 0:
        return
    grid = (triton.cdiv(chunks, _CHUNKS_PER_PROGRAM),)
    _l2_prefetch_kernel[grid](weight, chunks, CHUNK=CHUNK_BYTES,
                              PER_PROGRAM=_CHUNKS_PER_PROGRAM, num_warps=1)


class _Prefetcher:
    """A device's prefetch stream and the fork events of one captured forward."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)
        # reused: a wait takes the event's latest record at the time it is issued
        self.fork = torch.cuda.Event()
        self.join = torch.cuda.Event()
        for event in (self.fork, self.join):  # created now: not inside a graph capture
            event.record(self.stream)
        self.pending = False


_local = threading.local()


def prepare(device: torch.device) -> None:
    """Create this thread's prefetch stream for CUDA `device` ahead of a graph capture, and
    compile and load the kernel with a prefetch of a small buffer (a graph capture cannot)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return
    _prefetcher(device)
    if not prefetch_mb():
        return
    scratch = torch.empty(CHUNK_BYTES, dtype=torch.uint8, device=device)
    l2_prefetch(scratch, CHUNK_BYTES)


def _prefetcher(device: torch.device) -> _Prefetcher:
    by_device = _local.__dict__.setdefault("by_device", {})
    if device not in by_device:
        by_device[device] = _Prefetcher(device)
    return by_device[device]


def enabled(x: torch.Tensor) -> bool:
    """Whether a forward over x prefetches: on CUDA sm_90+, inside a decode graph capture
    (ops.lora.capture_paths(fold=True)), with some group's MB above zero."""
    from ops.lora import in_decode_capture

    if not (x.is_cuda and torch.cuda.is_current_stream_capturing() and in_decode_capture()):
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    return any(mb > 0 for mb in prefetch_mb().values())


@contextlib.contextmanager
def forward(x: torch.Tensor):
    """Around a forward's layers over x: inside, `after` prefetches when `enabled(x)`; on the
    way out the prefetches join the current stream (a graph capture must end with every
    forked stream joined; nothing before that point waits on them)."""
    if not enabled(x):
        yield
        return
    _local.plan = (x.device, prefetch_mb())
    try:
        yield
    finally:
        _local.plan = None
        p = _prefetcher(x.device)
        if p.pending:
            p.join.record(p.stream)
            torch.cuda.current_stream(x.device).wait_event(p.join)
            p.pending = False


def after(weight: torch.Tensor, group: str) -> None:
    """Inside `forward`, when it prefetches: fork a prefetch of `group`'s MB of weight after the
    current stream's work so far."""
    plan = getattr(_local, "plan", None)
    if plan is None or plan[1].get(group, 0) <= 0:
        return
    p = _prefetcher(plan[0])
    p.fork.record(torch.cuda.current_stream(plan[0]))
    p.stream.wait_event(p.fork)
    with torch.cuda.stream(p.stream):
        l2_prefetch(weight, int(plan[1][group] * 2**20))
    p.pending = True
