"""LoRA expand on CUDA: y[:, slice] += scaling * t[:, slice] B[slot, slice]^T, in place.

Same row table as the shrink (segments or chunks; slot -1 = base rows, which are never touched).
Grid: (entries * m_progs, output tiles of all slices together). Slices of uneven width (q, k, v)
are tiled separately, so no tile straddles two slices and no program idles: the tile index is
mapped to its slice with a few scalar compares against cumulative tile counts. The inner loop
runs over the slot's rank only, BLOCK_K at a time. `t` may be fp32 (a split-K shrink's reduced
partials) or the activations' dtype; it is upcast after loading.
"""

import itertools

import torch
import triton
import triton.language as tl

MAX_SLICES = 4


@triton.jit
def _pick(i, v0, v1, v2, v3):
    return tl.where(i == 0, v0, tl.where(i == 1, v1, tl.where(i == 2, v2, v3)))


@triton.jit
def _lora_expand_kernel(
    t_ptr,
    b_ptr,
    y_ptr,
    scalings_ptr,
    indptr_ptr,
    slots_ptr,
    ranks_ptr,
    R,
    off0,
    off1,
    off2,
    off3,
    off4,
    tiles1,
    tiles2,
    tiles3,
    stride_tm,
    stride_tr,
    stride_bs,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    stride_ss,
    stride_si,
    m_progs,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    entry = pid_m // m_progs
    m_prog = pid_m % m_progs
    pid_n = tl.program_id(1)
    slice_id = (pid_n >= tiles1).to(tl.int32) + (pid_n >= tiles2) + (pid_n >= tiles3)
    tile_in_slice = pid_n - _pick(slice_id, 0, tiles1, tiles2, tiles3)
    n_lo = _pick(slice_id, off0, off1, off2, off3)
    n_hi = _pick(slice_id, off1, off2, off3, off4)
    offs_n = n_lo + tile_in_slice * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = offs_n < n_hi

    row_start = tl.load(indptr_ptr + entry)
    row_end = tl.load(indptr_ptr + entry + 1)
    slot = tl.load(slots_ptr + entry)
    # base rows: an empty row range, so y is neither read nor written there
    row_end = tl.where(slot >= 0, row_end, row_start)
    slot_safe = tl.maximum(slot, 0)
    rank = tl.load(ranks_ptr + slot_safe)
    scaling = tl.load(scalings_ptr + slot_safe * stride_ss + slice_id * stride_si)
    b_cols = b_ptr + slot_safe.to(tl.int64) * stride_bs + offs_n[None, :].to(tl.int64) * stride_bn
    t_cols = t_ptr + slice_id * R * stride_tr

    for m0 in range(row_start + m_prog * BLOCK_M, row_end, m_progs * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_live = offs_m < row_end
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_K):
            offs_r = r0 + tl.arange(0, BLOCK_K)
            r_live = offs_r < rank
            t_tile = tl.load(
                t_cols + offs_m[:, None].to(tl.int64) * stride_tm + offs_r[None, :] * stride_tr,
                mask=m_live[:, None] & r_live[None, :],
                other=0.0,
            ).to(tl.float32)
            b_tile = tl.load(
                b_cols + offs_r[:, None] * stride_br,
                mask=r_live[:, None] & n_live[None, :],
                other=0.0,
            ).to(tl.float32)
            acc = tl.dot(t_tile, b_tile, acc, input_precision=DOT_PRECISION)
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
        y_mask = m_live[:, None] & n_live[None, :]
        y_old = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y_old + scaling * acc).to(y_ptr.dtype.element_ty), mask=y_mask)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _expand_block_n(num_programs_per_tile: int, widths: list[int], num_sms: int) -> int:
    """Widest output tile that still gives two waves of programs (64 at most: y tiles are
    read-modify-write, wider tiles only add registers)."""
    for block_n in (64, 32):
        tiles = sum(triton.cdiv(w, block_n) for w in widths)
        if num_programs_per_tile * tiles >= 2 * num_sms:
            return block_n
    return 16 if max(widths) <= 16 else 32


def triton_lora_expand(
    t: torch.Tensor,
    B: torch.Tensor,
    y: torch.Tensor,
    slice_offsets: tuple[int, ...],
    scalings: torch.Tensor,
    slot_ranks: torch.Tensor,
    indptr: torch.Tensor,
    slots: torch.Tensor,
    num_entries: int,
    block_m: int,
    m_progs: int,
    num_sms: int = 132,
) -> None:
    """y[rows, off_i:off_{i+1}] += scalings[slot, i] * t[rows, i*R:i*R+rank] B[slot, off_i.., :rank]^T.

    t: [T, n * R], any float dtype.
    B: [num_slots, N_total, R]. y: [T, N_total], updated in place (any strides).
    slice_offsets: n + 1 Python ints, 0 .. N_total, n <= 4. scalings: [num_slots, n] float32.
    slot_ranks: [num_slots] int32. indptr: [num_entries + 1] int32, slots: [num_entries] int32
    (-1 = base rows: left untouched). block_m: power of two >= 16; m_progs >= 1.
    """
    num_slices = len(slice_offsets) - 1
    assert t.dim() == 2, "t must be [T, n * R]"
    num_tokens, t_cols = t.shape
    assert 1 <= num_slices <= MAX_SLICES, f"{num_slices} slices, at most {MAX_SLICES}"
    assert B.dim() == 3 and y.dim() == 2, "B must be [num_slots, N_total, R], y [T, N_total]"
    rank_pad = B.shape[2]
    assert t_cols == num_slices * rank_pad, f"t has {t_cols} columns, want {num_slices}*{rank_pad}"
    assert slice_offsets[0] == 0 and slice_offsets[-1] == B.shape[1] == y.shape[1]
    assert all(a < b for a, b in itertools.pairwise(slice_offsets)), "empty slice"
    assert y.shape[0] == num_tokens
    assert scalings.shape == (B.shape[0], num_slices), f"scalings {tuple(scalings.shape)}"
    assert slot_ranks.shape == (B.shape[0],)
    assert indptr.shape == (num_entries + 1,) and slots.shape == (num_entries,)
    assert block_m >= 16 and block_m & (block_m - 1) == 0 and m_progs >= 1
    assert t.device == B.device == y.device == scalings.device == indptr.device == slots.device
    if num_tokens == 0 or num_entries == 0:
        return
    widths = [b - a for a, b in itertools.pairwise(slice_offsets)]
    block_n = _expand_block_n(num_entries * m_progs, widths, num_sms)
    tile_counts = [triton.cdiv(w, block_n) for w in widths]
    tile_cum = [sum(tile_counts[: i + 1]) for i in range(num_slices)]
    big = 1 << 30
    tiles = tile_cum[:-1] + [big] * (MAX_SLICES - num_slices)
    offs = list(slice_offsets) + [slice_offsets[-1]] * (MAX_SLICES + 1 - len(slice_offsets))
    low_precision = t.dtype != torch.float32 or B.dtype != torch.float32
    grid = (num_entries * m_progs, tile_cum[-1])
    _lora_expand_kernel[grid](
        t,
        B,
        y,
        scalings,
        indptr,
        slots,
        slot_ranks,
        rank_pad,
        *offs,
        *tiles[:3],
        t.stride(0),
        t.stride(1),
        B.stride(0),
        B.stride(1),
        B.stride(2),
        y.stride(0),
        y.stride(1),
        scalings.stride(0),
        scalings.stride(1),
        m_progs,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=min(64, max(16, _next_pow2(rank_pad))),
        DOT_PRECISION="tf32" if low_precision else "ieee",
        num_warps=4,
        num_stages=2,
    )
