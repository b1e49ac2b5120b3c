"""A decode projection as a Triton kernel: y = x W^T for few rows of x (decode batches).

Not on the serving path: `benchmarks/gemm_bench.py --triton` times it against cuBLAS on the
device. The question it answers: each decode GEMM under cuBLAS ran about 5 us longer than its
weight bytes take at copy bandwidth (H200, benchmarks/RESULTS.md, twelfth session), a fixed
cost per launch (start, first loads, tail) that 128 GEMMs a forward pay one after another.

W is [N, K] row-major as served; each program streams BLOCK_N rows of it over all of K, x's rows
riding along from L2. The next W tile is loaded before the current one is multiplied. With
USE_PDL (programmatic dependent launch, sm_90+) a program loads its first W tile before it waits
for the kernel before it, which W does not depend on: the launch and the first load's latency
overlap that kernel's tail; it signals its own dependents once its last tile is loaded.

One row (M = 1) sums W * x on the CUDA cores; more rows (padded to 16) use the tensor cores.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ops.sizes import cdiv, next_pow2


@triton.jit
def _gemv_kernel(
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
    USE_PDL: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_live = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    # W does not depend on the kernel before: its first tile is in flight before the wait
    w = tl.load(w_rows + offs_k[None, :], mask=n_live[:, None] & (offs_k < K)[None, :], other=0.0)
    if USE_PDL:
        gdc_wait()
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_rows + kk[None, :], mask=m_live[:, None] & (kk < K)[None, :], other=0.0)
        kn = kk + BLOCK_K
        w_next = tl.load(w_rows + kn[None, :], mask=n_live[:, None] & (kn < K)[None, :],
                         other=0.0)
        if BLOCK_M == 1:
            acc += tl.sum(x.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]
        else:
            acc += tl.dot(x, tl.trans(w))
        w = w_next
    if USE_PDL:
        gdc_launch_dependents()
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=m_live[:, None] & n_live[None, :])


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
                block_n: int = 32, block_k: int = 256, num_warps: int = 4,
                pdl: bool = False) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T -> [M, N] in x's dtype, for M <= 32 (rows of x and W
    contiguous). block_n, block_k: powers of two (W rows and columns a program's tile);
    pdl: launch as a programmatic dependent of the kernel before (CUDA sm_90+)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not multiply")
    if x.shape[0] > 32:
        raise ValueError(f"gemv_triton takes at most 32 rows, got {x.shape[0]}")
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
    block_m = 1 if rows == 1 else max(16, next_pow2(rows))
    extra = {"launch_pdl": True} if pdl else {}
    _gemv_kernel[(cdiv(n_dim, block_n),)](
        x, weight, out, rows, n_dim, k_dim, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, USE_PDL=pdl, num_warps=num_warps,
        **extra,
    )
    return out
