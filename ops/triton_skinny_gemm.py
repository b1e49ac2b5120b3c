"""A decode projection as a pipelined Triton GEMM that starts reading its weight before the
kernel ahead of it ends: y = x W^T for the few rows of a decode batch.

Under cuBLAS each thin decode GEMM (qkv, o, down) ran 2-6 us longer than its weight bytes take at
copy bandwidth (H200, benchmarks/RESULTS.md), and a GEMM cannot overlap its own start-up with the
latency-bound kernel before it (add+RMSNorm, attention, SiLU*up), during which HBM sits mostly
idle. This kernel launches with programmatic dependent launch (ops/pdl.py): its programs become
resident while the kernel ahead still runs, and before they wait for it (`gdc_wait`) they ask
the memory system for the first `prefetch_k` columns of each of their W rows
(`cp.async.bulk.prefetch.L2`: W is not written by any kernel of the forward, so it may be read
before the wait). After the wait, the main loop streams W in tiles of BLOCK_K columns with
STAGES tiles in flight (Triton's software pipeline), W's rows as the MMA's M and x's rows
(padded to 16) as its N.

Decode graph captures take it where `decode_scope` allows (runtime/graphs.py, with
LORASERVE_SKINNY_GEMM; off by default until the device measures it in the forward).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import nn

from ops.pdl import resolve, wait_then_release
from ops.scoped import ThreadSetting
from ops.sizes import cdiv, next_pow2

MAX_ROWS = 32  # decode rows it takes (graph batch sizes up to 32)
MODES = ("0", "base", "all")
_PREFETCH_MB = 8.0  # default bytes asked for ahead of the wait, a projection

_in_scope = ThreadSetting(False)


@triton.jit
def _prefetch_rows_l2(w_rows, NBYTES: tl.constexpr):
    """Ask L2 for NBYTES from each row start in w_rows (a [BLOCK_N] pointer tensor); nothing
    waits on it."""
    addrs = w_rows.to(tl.pointer_type(tl.int8)).to(tl.int64)
    sizes = tl.full(w_rows.shape, NBYTES, tl.int32)
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;",
        "=r,l,r", [addrs, sizes], dtype=tl.int32, is_pure=False, pack=1,
    )


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
    PREFETCH_BYTES: tl.constexpr,  # a row's bytes asked for before the wait (0: none)
    USE_PDL: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_live = offs_n < N
    row_starts = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64) * stride_wn
    if USE_PDL and PREFETCH_BYTES > 0:
        _prefetch_rows_l2(row_starts, PREFETCH_BYTES)
    # x is the kernel ahead's output: every read of it comes after this
    wait_then_release(USE_PDL)
    offs_m = tl.arange(0, BLOCK_M)
    m_live = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    # y^T = W x^T: W's rows are the MMA's M (64 a warpgroup on sm_90), x's rows its N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        kk = k0 + offs_k
        k_live = kk < K
        x = tl.load(x_rows + kk[None, :], mask=m_live[:, None] & k_live[None, :], other=0.0)
        w = tl.load(row_starts[:, None] + kk[None, :], mask=n_live[:, None] & k_live[None, :], other=0.0)
        acc = tl.dot(w, tl.trans(x), acc)
    tl.store(y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None],
             acc.to(y_ptr.dtype.element_ty), mask=n_live[:, None] & m_live[None, :])


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None, *,
                block_n: int = 32, block_k: int = 256, stages: int = 4, num_warps: int = 4,
                prefetch_k: int = 0, pdl: bool | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T -> [M, N] in x's dtype, for M <= 64 (rows of x and W
    contiguous, one dtype). block_n, block_k: powers of two, at least 16 (W rows and columns a
    tile); stages: tiles in flight. pdl: programmatic dependent launch (ops/pdl.py; None:
    inside decode graph captures unless LORASERVE_LAYER_PDL=0); with it, prefetch_k columns of
    each W row are asked of L2 before the wait (rounded down to 16 bytes; 0: none)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not multiply")
    if x.shape[0] > 64:
        raise ValueError(f"skinny_gemm takes at most 64 rows, got {x.shape[0]}")
    if x.stride(1) != 1 or weight.stride(1) != 1 or x.dtype != weight.dtype:
        raise ValueError("x and weight: rows contiguous, one dtype")
    for name, v in (("block_n", block_n), ("block_k", block_k)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two of at least 16, got {v}")
    if prefetch_k < 0:
        raise ValueError(f"prefetch_k must be >= 0, got {prefetch_k}")
    rows, k_dim = x.shape
    n_dim = weight.shape[0]
    if out is None:
        out = torch.empty((rows, n_dim), dtype=x.dtype, device=x.device)
    if out.shape != (rows, n_dim) or out.stride(1) != 1 or out.dtype != x.dtype:
        raise ValueError(f"out must be [{rows}, {n_dim}] in {x.dtype}, rows contiguous")
    if rows == 0 or n_dim == 0:
        return out
    pdl = resolve(pdl, x)
    prefetch_bytes = (min(prefetch_k, k_dim) * weight.element_size()) // 16 * 16 if pdl else 0
    _skinny_gemm_kernel[(cdiv(n_dim, block_n),)](
        x, weight, out, rows, n_dim, k_dim, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=max(16, next_pow2(rows)), BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages,
        PREFETCH_BYTES=prefetch_bytes, USE_PDL=pdl, num_warps=num_warps, launch_pdl=pdl,
    )
    return out


def decode_tile(n: int, rows: int) -> tuple[int, int, int] | None:
    """(block_n, block_k, stages) for a decode projection of n outputs over `rows` rows, or
    None where it stays on cuBLAS. Tilings measured alone on the H200 at Llama-3.1-8B shapes
    (fourteenth session, against cuBLAS's F.linear, us): o (4096 x 4096) 11.7 / 12.2 against
    13.6 / 13.8 at batch 1 / 32 with 32 x 256 tiles; qkv (6144) 15.0 / 16.0 against 15.8 / 16.6
    with 64 x 256; down (4096 x 14336) 31.2 / 33.4 against 35.7 / 34.1; lm_head (128256) 238.6 /
    252.0 against 249.7 / 270.7 with 64 x 128. gate_up (28672) measured level at best (cuBLAS
    streams it at 98 % of copy bandwidth): left to cuBLAS."""
    if rows > MAX_ROWS:
        return None
    if n <= 4096:
        return 32, 256, 4
    if n <= 8192:
        return 64, 256, 4
    if n >= 65536:
        return 64, 128, 4
    if os.environ.get("LORASERVE_SKINNY_GATE_UP", "0") == "1":  # A/B: gate_up too
        return 64, 256, 4
    return None


def mode() -> str:
    """LORASERVE_SKINNY_GEMM: "0" (default) keeps cuBLAS for every projection; "base" lets
    decode graphs without adapters take the skinny GEMM; "all" every decode graph."""
    raw = os.environ.get("LORASERVE_SKINNY_GEMM", "0").strip() or "0"
    if raw not in MODES:
        raise ValueError(f"LORASERVE_SKINNY_GEMM: {raw!r} is not one of {MODES}")
    return raw


def prefetch_mb() -> float:
    """LORASERVE_SKINNY_PREFETCH_MB: MB of each projection's weight asked of L2 before its
    wait (default 8; 0: none)."""
    raw = os.environ.get("LORASERVE_SKINNY_PREFETCH_MB", str(_PREFETCH_MB)).strip()
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"LORASERVE_SKINNY_PREFETCH_MB: {raw!r} is not a number") from None
    if mb < 0:
        raise ValueError(f"LORASERVE_SKINNY_PREFETCH_MB must be >= 0, got {raw!r}")
    return mb


def graph_scope(with_lora: bool):
    """Around a decode graph's capture: its projections take the skinny GEMM where
    LORASERVE_SKINNY_GEMM allows."""
    m = mode()
    return _in_scope.set(m == "all" or (m == "base" and not with_lora))


def decode_linear(linear: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The projection to run for decode input x: the skinny GEMM over linear's weight inside
    `graph_scope` when its shape has a `decode_tile`, for a plain bias-free nn.Linear whose
    weight shares x's dtype, on CUDA sm_90+ in bf16/fp16 (CPU tensors, whose kernels run in
    the interpreter in tests, any dtype); else linear itself."""
    from ops.dispatch import use_triton

    w = getattr(linear, "weight", None)
    if (not _in_scope.get() or type(linear) is not nn.Linear or linear.bias is not None
            or w.dtype != x.dtype or not w.is_contiguous() or not use_triton(x)):
        return linear
    if x.is_cuda and (x.dtype not in (torch.bfloat16, torch.float16)
                      or torch.cuda.get_device_capability(x.device)[0] < 9):
        return linear
    tile = decode_tile(w.shape[0], x.shape[0])
    if tile is None:
        return linear
    block_n, block_k, stages = tile
    prefetch_k = int(prefetch_mb() * 2**20 / (w.shape[0] * w.element_size()))
    return lambda v: skinny_gemm(v, w, block_n=block_n, block_k=block_k, stages=stages,
                                 prefetch_k=prefetch_k)
