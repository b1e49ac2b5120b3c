"""L2 prefetch of the next projection's weight from the layer kernel ahead of it (opt-in, decode
graphs on sm_90+).

At decode batches a step reads every weight once, and the device streams weights only while a
GEMM runs: during the layer's own kernels (rotary + K/V store, decode attention, the norms,
SiLU*up) the memory bus idles. Here a layer kernel that runs before a projection issues bulk L2
prefetches (`cp.async.bulk.prefetch.L2.global`, sm_90) of that projection's weight after its own
work, so the bytes stream in while the kernels in between run and the GEMM finds them in L2:

- o_proj, all of it (32 MiB for Llama-3.1-8B, under the H200's 50 MiB L2) or its first
  LORASERVE_L2_PREFETCH_O_MB MiB, from rotary + K/V store: it has rotary's and decode
  attention's time to arrive;
- qkv, gate_up and down, their first LORASERVE_L2_PREFETCH_HEAD_MB MiB (default 8: what about
  2 µs of copy bandwidth brings in), from the input norm, the post-attention norm and SiLU*up.

The eighteenth session's skinny Triton GEMM prefetched the first 2-8 MB of its own W rows
before its PDL wait and never gained by it (benchmarks/RESULTS.md); here cuBLAS's GEMMs are
untouched and o's prefetch has attention's whole run to land.

A prefetch is a hint: it reads, never writes, and the GEMM reads the same bytes whether they are
in L2 or not, so results cannot change. `LORASERVE_L2_PREFETCH` names the projections (`o`,
`qkv`, `gate_up`, `down`, comma-separated; `all`; `1` is `o`; `0` or unset: none, the default
until measured). It applies where the layer kernels launch with PDL (decode graph captures on
sm_90+, ops/pdl.py), never under the interpreter, which cannot run inline PTX.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ops.settings import env_int
from ops.sizes import cdiv

CHUNK_ALIGN = 16  # cp.async.bulk.prefetch: 16-byte aligned address, size a multiple of 16
FLAT_CHUNK = 32768  # a contiguous weight is prefetched in pieces of this many bytes
TARGETS = ("qkv", "o", "gate_up", "down")


@functools.lru_cache(maxsize=1)
def l2_prefetch_targets() -> frozenset[str]:
    """LORASERVE_L2_PREFETCH: the projections whose weight the kernel ahead prefetches."""
    raw = os.environ.get("LORASERVE_L2_PREFETCH", "0").strip() or "0"
    if raw == "0":
        return frozenset()
    if raw == "1":
        return frozenset({"o"})
    if raw == "all":
        return frozenset(TARGETS)
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        raise ValueError(f"LORASERVE_L2_PREFETCH: {raw!r}: name projections among "
                         f"{', '.join(TARGETS)} (or all, 1 for o, 0 for none)")
    return frozenset(names)


@functools.lru_cache(maxsize=1)
def l2_prefetch_head_bytes() -> int:
    """LORASERVE_L2_PREFETCH_HEAD_MB (default 8): MiB of qkv's, gate_up's and down's weight
    prefetched."""
    return env_int("LORASERVE_L2_PREFETCH_HEAD_MB", 8, least=1) << 20


@functools.lru_cache(maxsize=1)
def l2_prefetch_o_bytes() -> int:
    """LORASERVE_L2_PREFETCH_O_MB: MiB of o_proj's weight prefetched (default 0: all of it;
    a bound, to measure whether the whole 32 MiB stays in L2 until o's GEMM reads it)."""
    return env_int("LORASERVE_L2_PREFETCH_O_MB", 0, least=0) << 20


def prefetch_for(weight: torch.Tensor, target: str) -> torch.Tensor | None:
    """What the kernel ahead of projection `target` (one of TARGETS) prefetches of its
    `weight` [N, K] under the setting: None (not named), else its first rows covering
    l2_prefetch_o_bytes (o; 0: all of it) or l2_prefetch_head_bytes (the others), a view."""
    if target not in l2_prefetch_targets():
        return None
    cap = l2_prefetch_o_bytes() if target == "o" else l2_prefetch_head_bytes()
    if cap == 0:
        return weight
    row_bytes = weight.shape[1] * weight.element_size()
    return weight[: max(1, min(weight.shape[0], cdiv(cap, row_bytes)))]


def prefetch_layout(shape: tuple[int, int], strides: tuple[int, int], element_size: int,
                    address: int) -> tuple[int, int, int]:
    """(rows, bytes a row, bytes between rows) `l2_prefetch` covers a 2-D tensor with: its own
    rows, or for a contiguous tensor FLAT_CHUNK-byte pieces where they divide it (fewer, larger
    prefetches). The rows must be contiguous and 16-byte aligned."""
    rows, cols = shape
    row_bytes, stride_bytes = cols * element_size, strides[0] * element_size
    if strides[1] != 1 and cols > 1:
        raise ValueError(f"L2 prefetch needs contiguous rows, got strides {strides}")
    strided = rows > 1 and stride_bytes % CHUNK_ALIGN
    if address % CHUNK_ALIGN or row_bytes % CHUNK_ALIGN or strided:
        raise ValueError(f"L2 prefetch needs {CHUNK_ALIGN}-byte aligned rows: address "
                         f"{address:#x}, row {row_bytes} B, stride {stride_bytes} B")
    if (rows == 1 or stride_bytes == row_bytes) and (rows * row_bytes) % FLAT_CHUNK == 0:
        return rows * row_bytes // FLAT_CHUNK, FLAT_CHUNK, FLAT_CHUNK
    return rows, row_bytes, stride_bytes


def prefetch_args(weight: torch.Tensor | None, on: bool, lanes: int) -> tuple[list, dict]:
    """(positional kernel arguments pf_addr, pf_rows, pf_row_bytes, pf_stride_bytes;
    constexprs PREFETCH, PF_LANES) for a kernel calling `l2_prefetch` on a 2-D CUDA tensor
    (`prefetch_layout`) with `lanes` threads a program. Off (`on` False, or no weight): zeros
    and PREFETCH False."""
    if not on or weight is None:
        return [0, 0, 0, 0], {"PREFETCH": False, "PF_LANES": lanes}
    if weight.dim() != 2 or not weight.is_cuda:
        raise ValueError(f"L2 prefetch needs a 2-D CUDA tensor, got {tuple(weight.shape)} on "
                         f"{weight.device}")
    layout = prefetch_layout(tuple(weight.shape), weight.stride(), weight.element_size(),
                             weight.data_ptr())
    return [weight.data_ptr(), *layout], {"PREFETCH": True, "PF_LANES": lanes}


@triton.jit
def l2_prefetch(pf_addr, pf_rows, pf_row_bytes, pf_stride_bytes, pid, nprogs,
                LANES: tl.constexpr):
    """Program `pid` of `nprogs` issues bulk L2 prefetches of its share of the rows
    [pf_addr + r * pf_stride_bytes, + pf_row_bytes), r < pf_rows: one row a lane a round, LANES
    lanes (one a thread: LANES = 32 * num_warps)."""
    lanes = tl.arange(0, LANES)
    for first in range(pid * LANES, pf_rows, nprogs * LANES):
        r = first + lanes
        addr = pf_addr + r.to(tl.int64) * pf_stride_bytes
        tl.inline_asm_elementwise(
            asm="{ .reg .pred p; setp.ne.b32 p, $3, 0; "
                "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            constraints="=r,l,r,r",
            args=[addr, (pf_row_bytes + r * 0).to(tl.int32), (r < pf_rows).to(tl.int32)],
            dtype=tl.int32, is_pure=False, pack=1)
