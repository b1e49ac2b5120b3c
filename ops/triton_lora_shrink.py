"""LoRA shrink on CUDA: t = x A^T for every segment of tokens, all slices of a module in one launch.

Work is described by a row table (`indptr`, `slots`): entry e covers token rows
indptr[e]..indptr[e+1] of adapter slot slots[e] (-1 = base model rows). The table is the
segment list (triton backend) or the chunk list (csgmv backend); the kernel is the same.

Grid: (entries * m_progs, num_slices * n_tiles, split_k).
- Axis 0: an entry's rows are strided over `m_progs` programs in BLOCK_M tiles, so every row is
  covered whatever `m_progs` is (it is only a hint from the largest segment; a captured CUDA graph
  stays correct when later segments are longer).
- Axis 1: output columns of one slice, BLOCK_N at a time. Tiles at or beyond the slot's rank
  skip the K loop and store zeros, so a rank-1 adapter reads one row of A per slice.
- Axis 2: split-K. At decode the whole op is a read of r x in weights per adapter; splitting K
  fills the GPU. Each split writes its own fp32 partial (plain stores: deterministic, no memset);
  the caller sums them (one small reduction, read once by the expand).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _lora_shrink_kernel(
    x_ptr,
    a_ptr,
    out_ptr,
    indptr_ptr,
    slots_ptr,
    ranks_ptr,
    K,
    R,
    k_per_split,
    stride_xm,
    stride_xk,
    stride_as,
    stride_ar,
    stride_ak,
    stride_os,
    stride_om,
    stride_on,
    m_progs,
    N_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    entry = pid_m // m_progs
    m_prog = pid_m % m_progs
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    slice_id = pid_n // N_TILES
    n_start = (pid_n % N_TILES) * BLOCK_N

    row_start = tl.load(indptr_ptr + entry)
    row_end = tl.load(indptr_ptr + entry + 1)
    slot = tl.load(slots_ptr + entry)
    # base rows (slot -1) get rank 0: no weight reads, zeros stored
    rank = tl.where(slot >= 0, tl.load(ranks_ptr + tl.maximum(slot, 0)), 0)

    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_live = offs_n < rank
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    k_hi = tl.where(n_start < rank, k_hi, k_lo)
    a_rows = a_ptr + slot.to(tl.int64) * stride_as + (slice_id * R + offs_n)[None, :] * stride_ar
    out_cols = out_ptr + split * stride_os + (slice_id * R + offs_n)[None, :] * stride_on

    for m0 in range(row_start + m_prog * BLOCK_M, row_end, m_progs * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_live = offs_m < row_end
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_live = offs_k < k_hi
            x_tile = tl.load(
                x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
                mask=m_live[:, None] & k_live[None, :],
                other=0.0,
            ).to(tl.float32)
            a_tile = tl.load(
                a_rows + offs_k[:, None] * stride_ak,
                mask=k_live[:, None] & n_live[None, :],
                other=0.0,
            ).to(tl.float32)
            acc = tl.dot(x_tile, a_tile, acc, input_precision=DOT_PRECISION)
        tl.store(
            out_cols + offs_m[:, None].to(tl.int64) * stride_om,
            acc.to(out_ptr.dtype.element_ty),
            mask=m_live[:, None] & (offs_n < R)[None, :],
        )


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def shrink_split_k(num_tokens: int, num_programs: int, num_k_blocks: int, num_sms: int) -> int:
    """Split-K factor: grow while the grid is under two waves, K blocks remain and the partials
    stay small (split * tokens <= 2048)."""
    split = 1
    while (
        split * 2 <= num_k_blocks
        and num_programs * split * 2 <= 2 * num_sms
        and num_tokens * split * 2 <= 2048
    ):
        split *= 2
    return split


def triton_lora_shrink(
    x: torch.Tensor,
    A: torch.Tensor,
    slot_ranks: torch.Tensor,
    indptr: torch.Tensor,
    slots: torch.Tensor,
    num_entries: int,
    num_slices: int,
    block_m: int,
    m_progs: int,
    split_k: int | None = None,
    num_sms: int = 132,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """t partials = x A^T per row-table entry.

    x: [T, K] (any float dtype, any strides). A: [num_slots, num_slices * R, K].
    slot_ranks: [num_slots] int32 (<= R). indptr: [num_entries + 1] int32 row offsets,
    slots: [num_entries] int32 (-1 = base rows), both on x's device.
    block_m: rows per tile (power of two >= 16); m_progs: programs per entry (>= 1).
    split_k: K splits (None = heuristic, or out.shape[0] when out is given).
    out: optional buffer for the result (shape and dtype as returned).
    Returns: [split_k, T, num_slices * R], x.dtype when split_k == 1 else float32; columns at or
    beyond a slot's rank and rows of base entries are zero. Partials must be summed over dim 0.
    """
    num_tokens, k_dim = x.shape
    assert A.dim() == 3 and A.shape[2] == k_dim, f"A {tuple(A.shape)} vs x {tuple(x.shape)}"
    assert A.shape[1] % num_slices == 0, f"A rows {A.shape[1]} not a multiple of {num_slices}"
    assert slot_ranks.shape == (A.shape[0],), "slot_ranks must be [num_slots]"
    assert indptr.shape == (num_entries + 1,) and slots.shape == (num_entries,)
    assert block_m >= 16 and block_m & (block_m - 1) == 0 and m_progs >= 1
    assert x.device == A.device == indptr.device == slots.device == slot_ranks.device
    rank_pad = A.shape[1] // num_slices
    block_n = 16 if num_tokens <= 64 else min(64, max(16, _next_pow2(rank_pad)))
    block_k = 128 if block_m * block_n <= 1024 else 64
    block_k = min(block_k, max(16, _next_pow2(k_dim)))
    n_tiles = triton.cdiv(rank_pad, block_n)
    num_k_blocks = triton.cdiv(k_dim, block_k)
    if split_k is None and out is not None:
        split_k = out.shape[0]
    if split_k is None:
        programs = num_entries * m_progs * num_slices * n_tiles
        split_k = shrink_split_k(num_tokens, programs, num_k_blocks, num_sms)
    if out is None:
        split_k = max(1, min(split_k, num_k_blocks))  # surplus splits would only store zeros
    out_dtype = x.dtype if split_k == 1 else torch.float32
    out_shape = (split_k, num_tokens, A.shape[1])
    if out is None:
        out = torch.empty(out_shape, dtype=out_dtype, device=x.device)
    assert out.shape == out_shape and out.dtype == out_dtype, f"out must be {out_shape} {out_dtype}"
    assert out.device == x.device
    if num_tokens == 0 or num_entries == 0:
        return out.zero_()
    grid = (num_entries * m_progs, num_slices * n_tiles, split_k)
    _lora_shrink_kernel[grid](
        x,
        A,
        out,
        indptr,
        slots,
        slot_ranks,
        k_dim,
        rank_pad,
        triton.cdiv(num_k_blocks, split_k) * block_k,
        x.stride(0),
        x.stride(1),
        A.stride(0),
        A.stride(1),
        A.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        m_progs,
        N_TILES=n_tiles,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=4,
        num_stages=3,
    )
    return out
