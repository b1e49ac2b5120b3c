"""Decode projections whose weights are read before the kernel ahead of them finishes.

At batch 1 a decoder layer's cuBLAS GEMMs ran 1.2-6.7 us each over their weight's bytes at copy
bandwidth (H200, benchmarks/RESULTS.md): each started only after the kernel before it had
drained, ramped up, and tailed off, while the layer's small kernels between them (norms, rotary,
attention, SiLU*up) left HBM idle. cuBLAS's kernels launch without programmatic dependent
launch (PDL, ops/pdl.py), so nothing overlapped those gaps.

Here y = x W^T for a few rows of x is a Triton kernel launched with PDL. Nothing a layer kernel
writes is in W, so each program loads its whole slice of W (BLOCK_N rows over all of K, one
tile held in registers) *before* it waits for the kernel ahead: every program resident while
that kernel still runs has its weight bytes in flight or loaded, and only x (from L2) is read
after the wait. The program then lets the next kernel launch, so the next projection's
programs in turn load their weights while this one and the layer kernels between run. With
every projection and layer kernel under PDL, a decode forward is one chain of early launches.

A LoRA group whose expand the next kernel folds in (ops/triton_lora_fold.py) takes its shrink
in the same launch (`decode_gemv_lora`): the shrink's programs come first in the grid and load
their row's A slice before the wait too. (A shrink on a side stream beside this kernel waited
for its programs to drain: 0.59 ms a step at batch 1 with one adapter.)

`LORASERVE_DECODE_GEMV=R` (default 1; 0: off) sends the projections of decode graphs of at
most R rows here on CUDA sm_90+ (runtime/model/llama.py `takes_gemv`). On the H200 at
Llama-3.1-8B shapes the serving loop's batch-1 base step took 3.88-3.94 ms against 4.51-4.57
with cuBLAS; each further row is another pass over the loaded tile on the CUDA cores, which
already at 2 rows was slower than cuBLAS (4.91 against 4.64 ms a graph forward), hence 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ops.settings import env_int
from ops.sizes import cdiv, next_pow2

TILE_ELEMS = 16384  # W elements a program holds: 32 KB in 16-bit weights
MAX_K = 32768  # the widest input one tile spans (next_pow2(K) columns)
MAX_ROWS = 8
DEFAULT_ROWS = 1


@triton.jit
def _decode_gemv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    a_ptr,
    slots_ptr,
    t_ptr,
    M,
    N,
    K,
    NR,
    lora_progs,
    r_progs,
    stride_xm,
    stride_wn,
    stride_ym,
    stride_as,
    stride_ar,
    stride_tm,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    USE_PDL: tl.constexpr,
    EVEN_N: tl.constexpr,  # BLOCK_N divides N: no row masks on W
    EVEN_K: tl.constexpr,  # BLOCK_K == K: no column masks, vector loads
):
    pid = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    if EVEN_K:
        k_live = tl.full((BLOCK_K,), 1, tl.int1)
    else:
        k_live = offs_k < K
    if HAS_LORA and pid < lora_progs:
        # the LoRA shrink of one row: t[m] = x[m] A[slot]^T over BLOCK_N of A's rows. The row's
        # slot is a step input, written before the layers run, and A no kernel's output: both
        # are read before the wait. Base rows (slot -1) get zeros.
        m = pid // r_progs
        offs_r = (pid % r_progs) * BLOCK_N + tl.arange(0, BLOCK_N)
        r_live = offs_r < NR
        slot = tl.load(slots_ptr + m)
        a = tl.load(a_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_as
                    + offs_r[:, None].to(tl.int64) * stride_ar + offs_k[None, :],
                    mask=(r_live & (slot >= 0))[:, None] & k_live[None, :], other=0.0)
        if USE_PDL:
            gdc_wait()  # x comes from the kernel ahead
            gdc_launch_dependents()
        xm = tl.load(x_ptr + m * stride_xm + offs_k, mask=k_live, other=0.0)
        t = tl.sum(a.to(tl.float32) * xm.to(tl.float32)[None, :], axis=1)
        tl.store(t_ptr + m * stride_tm + offs_r, t.to(t_ptr.dtype.element_ty), mask=r_live)
    else:
        offs_n = (pid - lora_progs) * BLOCK_N + tl.arange(0, BLOCK_N)
        if EVEN_N:
            n_live = tl.full((BLOCK_N,), 1, tl.int1)
        else:
            n_live = offs_n < N
        # W and the bias are no kernel's output: loaded before the wait
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                    mask=n_live[:, None] & k_live[None, :], other=0.0,
                    eviction_policy="evict_first")
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=n_live, other=0.0).to(tl.float32)
        if USE_PDL:
            gdc_wait()  # x comes from the kernel ahead
            gdc_launch_dependents()
        for m in tl.static_range(ROWS):
            live = m < M
            x = tl.load(x_ptr + m * stride_xm + offs_k, mask=k_live & live, other=0.0)
            acc = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
            if HAS_BIAS:
                acc += bias
            tl.store(y_ptr + m * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty),
                     mask=n_live & live)


def gemv_tiling(n_dim: int, k_dim: int, tile: int | None = None,
                warps: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for W [n_dim, k_dim]: BLOCK_K spans all of K, BLOCK_N
    rows make up `tile` elements (default LORASERVE_DECODE_GEMV_TILE or TILE_ELEMS), at least
    one row; warps: default LORASERVE_DECODE_GEMV_WARPS or 8."""
    tile = tile or env_int("LORASERVE_DECODE_GEMV_TILE", TILE_ELEMS, least=1)
    warps = warps or env_int("LORASERVE_DECODE_GEMV_WARPS", 8, least=1)
    block_k = next_pow2(k_dim)
    block_n = max(1, min(next_pow2(n_dim), tile // block_k))
    return block_n, block_k, warps


def decode_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                pdl: bool = False, tile: int | None = None,
                warps: int | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias) -> [M, N] in x's dtype, fp32 accumulation, for
    1 <= M <= MAX_ROWS and K <= MAX_K. pdl: launch as a programmatic dependent of the kernel
    ahead (CUDA sm_90+; ops/pdl.py). tile, warps: `gemv_tiling`'s."""
    return _launch(x, weight, bias, None, None, pdl, tile, warps)[0]


def decode_gemv_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     A: torch.Tensor, row_slots: torch.Tensor, pdl: bool = False,
                     tile: int | None = None, warps: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(decode_gemv's y, the LoRA shrink t = x A[row_slots[m]]^T as [1, M, n*R] in x's dtype,
    zero for rows of slot -1), in one launch: the shrink's programs come first, so they hold
    their A rows before the wait as the projection's first programs hold W's. A: the group's
    [num_slots, n*R, K], rows contiguous; row_slots: [M] int32 (ops.lora.lora_row_slots)."""
    return _launch(x, weight, bias, A, row_slots, pdl, tile, warps)


def _launch(x, weight, bias, A, row_slots, pdl, tile, warps):
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not multiply")
    rows, k_dim = x.shape
    n_dim = weight.shape[0]
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"decode_gemv takes 1 to {MAX_ROWS} rows, got {rows}")
    if k_dim > MAX_K:
        raise ValueError(f"decode_gemv: {k_dim} input columns, at most {MAX_K}")
    if x.stride(1) != 1 or not weight.is_contiguous() or x.dtype != weight.dtype:
        raise ValueError("decode_gemv: x's rows contiguous, weight contiguous, one dtype")
    if bias is not None and (bias.shape != (n_dim,) or not bias.is_contiguous()):
        raise ValueError(f"decode_gemv: bias must be contiguous [{n_dim}]")
    out = torch.empty((rows, n_dim), dtype=x.dtype, device=x.device)
    block_n, block_k, warps = gemv_tiling(n_dim, k_dim, tile, warps)
    t = None
    lora_progs = r_progs = a_rows = 0
    if A is not None:
        if (A.dim() != 3 or A.shape[2] != k_dim or A.stride(2) != 1 or A.dtype != x.dtype
                or row_slots.shape != (rows,) or row_slots.dtype != torch.int32):
            raise ValueError(f"decode_gemv_lora: A {tuple(A.shape)} over {k_dim} inputs in "
                             f"{x.dtype}, rows contiguous, and [{rows}] int32 row slots")
        a_rows = A.shape[1]
        r_progs = cdiv(a_rows, block_n)
        lora_progs = rows * r_progs
        # padded as the shrink pads its partials (ops/triton_lora_shrink.py _partials)
        t = torch.empty((1, rows + (-rows % 16), a_rows), dtype=x.dtype,
                        device=x.device)[:, :rows]
    extra = {"launch_pdl": True} if pdl else {}
    grid = (lora_progs + cdiv(n_dim, block_n),)
    _decode_gemv_kernel[grid](
        x, weight, bias if bias is not None else weight, out,
        A if A is not None else weight, row_slots if A is not None else out,
        t if t is not None else out,
        rows, n_dim, k_dim, a_rows, lora_progs, r_progs,
        x.stride(0), weight.stride(0), out.stride(0),
        A.stride(0) if A is not None else 0, A.stride(1) if A is not None else 0,
        t.stride(1) if t is not None else 0,
        ROWS=next_pow2(rows), BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None,
        HAS_LORA=A is not None, USE_PDL=pdl, EVEN_N=n_dim % block_n == 0,
        EVEN_K=block_k == k_dim, num_warps=warps, **extra,
    )
    return out, t


def decode_gemv_rows() -> int:
    """LORASERVE_DECODE_GEMV: the most rows a decode graph's projections take this kernel for
    (default DEFAULT_ROWS; 0: off)."""
    return env_int("LORASERVE_DECODE_GEMV", DEFAULT_ROWS, least=0, most=MAX_ROWS)
