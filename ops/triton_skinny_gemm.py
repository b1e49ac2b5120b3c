"""A decode projection as a pipelined Triton GEMM: y = x W^T for few rows of x (decode batches).

Inside decode graph captures (`decode_linear`) it takes the projections whose shapes measured
faster than cuBLAS (`benchmarks/gemm_bench.py --skinny`, benchmarks/RESULTS.md). Each decode GEMM under cuBLAS ran 2-6 us longer than its weight bytes take at copy
bandwidth (H200, benchmarks/RESULTS.md): at batch 1 the o projection (32 MB) took 13.4 us, 2.5
TB/s of the 4.26 a copy reaches. A GEMM this thin is a stream of W, and streaming at full
bandwidth needs many bytes in flight: each program takes BLOCK_N rows of W over all of K in tiles
of BLOCK_K columns, and the loop keeps STAGES tiles in flight (Triton's software pipeline:
asynchronous copies into shared memory, or the tensor memory accelerator with TMA). x's rows
(padded to 16 for the tensor cores; the multiply costs nothing beside the stream) come from L2.
"""

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import nn

from ops.sizes import cdiv, next_pow2

# Decode rows it takes (gemm_bench measured batches 1 and 32).
MAX_ROWS = 32


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
):
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_live = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_live = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    # y^T = W x^T: W's rows are the MMA's M (64 a warpgroup on sm_90), x's rows its N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        kk = k0 + offs_k
        k_live = kk < K
        x = tl.load(x_rows + kk[None, :], mask=m_live[:, None] & k_live[None, :], other=0.0)
        w = tl.load(w_rows + kk[None, :], mask=n_live[:, None] & k_live[None, :], other=0.0)
        acc = tl.dot(w, tl.trans(x), acc)
    tl.store(y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None],
             acc.to(y_ptr.dtype.element_ty), mask=n_live[:, None] & m_live[None, :])


@triton.jit
def _skinny_gemm_tma_kernel(
    x_ptr,
    w_desc,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    m_live = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        kk = k0 + offs_k
        x = tl.load(x_rows + kk[None, :], mask=m_live[:, None] & (kk < K)[None, :], other=0.0)
        w = w_desc.load([n0, k0])  # out-of-bounds rows and columns read as zero
        acc = tl.dot(w, tl.trans(x), acc)
    tl.store(y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None],
             acc.to(y_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & m_live[None, :])


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
                block_n: int = 32, block_k: int = 256, stages: int = 4, num_warps: int = 4,
                tma: bool = False) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T -> [M, N] in x's dtype, for M <= 64 (rows of x and W
    contiguous, one dtype). block_n, block_k: powers of two, at least 16 (W rows and columns a
    tile); stages: tiles in flight; tma: load W through a TMA descriptor (CUDA sm_90+)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not multiply")
    if x.shape[0] > 64:
        raise ValueError(f"skinny_gemm takes at most 64 rows, got {x.shape[0]}")
    if x.stride(1) != 1 or weight.stride(1) != 1 or x.dtype != weight.dtype:
        raise ValueError("x and weight: rows contiguous, one dtype")
    rows, k_dim = x.shape
    n_dim = weight.shape[0]
    if out is None:
        out = torch.empty((rows, n_dim), dtype=x.dtype, device=x.device)
    if out.shape != (rows, n_dim) or out.stride(1) != 1 or out.dtype != x.dtype:
        raise ValueError(f"out must be [{rows}, {n_dim}] in {x.dtype}, rows contiguous")
    if rows == 0 or n_dim == 0:
        return out
    block_m = max(16, next_pow2(rows))
    grid = (cdiv(n_dim, block_n),)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        desc = TensorDescriptor.from_tensor(weight, [block_n, block_k])
        _skinny_gemm_tma_kernel[grid](
            x, desc, out, rows, n_dim, k_dim, x.stride(0), out.stride(0), BLOCK_M=block_m,
            BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, num_warps=num_warps,
        )
        return out
    _skinny_gemm_kernel[grid](
        x, weight, out, rows, n_dim, k_dim, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, num_warps=num_warps,
    )
    return out


def decode_tile(n: int, rows: int) -> tuple[int, int, int] | None:
    """(block_n, block_k, stages) for a decode projection of n outputs over `rows` rows, or
    None where cuBLAS measured as fast. On the H200 at Llama-3.1-8B shapes (gemm_bench
    --skinny, fourteenth session), against cuBLAS's F.linear, us: o (4096 x 4096) 11.7 / 12.2
    against 13.6 / 13.8 at batch 1 / 32 with 32 x 256 tiles; qkv (6144) 15.0 / 16.0 against
    15.8 / 16.6 with 64 x 256; down (4096 x 14336) 31.2 / 33.4 against 35.7 / 34.1; lm_head
    (128256) 238.6 / 252.0 against 249.7 / 270.7 with 64 x 128. gate_up (28672) measured
    level at best (cuBLAS streams it at 98 % of copy bandwidth): left to cuBLAS."""
    if rows > MAX_ROWS:
        return None
    if n <= 4096:
        return 32, 256, 4
    if n <= 8192:
        return 64, 256, 4
    if n >= 65536:
        return 64, 128, 4
    return None


def enabled() -> bool:
    """LORASERVE_SKINNY_GEMM: "1" (default) lets decode graphs use the skinny GEMM, "0" keeps
    cuBLAS for every projection (A/B runs)."""
    return os.environ.get("LORASERVE_SKINNY_GEMM", "1") != "0"


def decode_linear(linear: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The projection to run for decode input x: the skinny GEMM over linear's weight inside a
    decode graph capture (ops.lora.in_decode_capture) when its shape has a `decode_tile`, for
    a plain bias-free nn.Linear in bf16/fp16 on CUDA sm_90+ (on CPU tensors, whose kernels run
    in the interpreter only in tests, any dtype); else linear itself."""
    from ops.dispatch import use_triton
    from ops.lora import in_decode_capture

    w = getattr(linear, "weight", None)
    if (type(linear) is not nn.Linear or linear.bias is not None or not enabled()
            or not in_decode_capture() or not use_triton(x) or w.dtype != x.dtype):
        return linear
    if x.is_cuda and (x.dtype not in (torch.bfloat16, torch.float16)
                      or torch.cuda.get_device_capability(x.device)[0] < 9):
        return linear
    tile = decode_tile(w.shape[0], x.shape[0])
    if tile is None:
        return linear
    block_n, block_k, stages = tile
    return lambda v: skinny_gemm(v, w, block_n=block_n, block_k=block_k, stages=stages)
