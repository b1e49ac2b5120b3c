"""Embedding LoRA shrink on CUDA: a row gather, t[i] = A_emb[slot_i, ids[i], :].

A_emb is stored transposed ([num_slots, vocab, R]) so each token reads one contiguous row.
Grid: (entries * m_progs,) over the same row table as the linear LoRA ops; only the first `rank`
columns are read (the rest are zero in the pool), and base rows get zeros.
"""

import torch
import triton
import triton.language as tl

from ops.sizes import next_pow2

# Scalars that change from step to step: Triton would otherwise compile a variant per value
# class (1, multiple of 16, other), and eager steps would meet new ones while serving.
PER_STEP_ARGS = ["m_progs"]


@triton.jit(do_not_specialize=PER_STEP_ARGS)
def _lora_embed_shrink_kernel(
    ids_ptr,
    a_ptr,
    out_ptr,
    indptr_ptr,
    slots_ptr,
    ranks_ptr,
    R,
    stride_as,
    stride_av,
    stride_ar,
    stride_om,
    stride_or,
    m_progs,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    entry = pid_m // m_progs
    m_prog = pid_m % m_progs
    row_start = tl.load(indptr_ptr + entry)
    row_end = tl.load(indptr_ptr + entry + 1)
    slot = tl.load(slots_ptr + entry)
    rank = tl.where(slot >= 0, tl.load(ranks_ptr + tl.maximum(slot, 0)), 0)
    offs_r = tl.arange(0, BLOCK_R)
    a_slot = a_ptr + slot.to(tl.int64) * stride_as + offs_r[None, :] * stride_ar

    for m0 in range(row_start + m_prog * BLOCK_M, row_end, m_progs * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_live = offs_m < row_end
        ids = tl.load(ids_ptr + offs_m, mask=m_live, other=0).to(tl.int64)
        rows = tl.load(
            a_slot + ids[:, None] * stride_av,
            mask=m_live[:, None] & (offs_r < rank)[None, :],
            other=0.0,
        )
        tl.store(
            out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_r[None, :] * stride_or,
            rows.to(out_ptr.dtype.element_ty),
            mask=m_live[:, None] & (offs_r < R)[None, :],
        )


def triton_lora_embed_shrink(
    ids: torch.Tensor,
    A_emb: torch.Tensor,
    slot_ranks: torch.Tensor,
    indptr: torch.Tensor,
    slots: torch.Tensor,
    num_entries: int,
    block_m: int,
    m_progs: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """t[i] = A_emb[slot_i, ids[i], :] (zeros for base rows).

    ids: [T] int32/int64 token ids. A_emb: [num_slots, vocab, R]. slot_ranks: [num_slots] int32.
    indptr: [num_entries + 1] int32 row offsets, slots: [num_entries] int32 (-1 = base rows).
    Returns t: [T, R] in A_emb's dtype (written into `out` when given).
    """
    assert ids.dim() == 1 and A_emb.dim() == 3, "ids must be [T], A_emb [num_slots, vocab, R]"
    assert slot_ranks.shape == (A_emb.shape[0],)
    assert indptr.shape == (num_entries + 1,) and slots.shape == (num_entries,)
    assert m_progs >= 1 and block_m >= 1
    assert ids.device == A_emb.device == indptr.device == slots.device == slot_ranks.device
    num_tokens, rank_pad = ids.shape[0], A_emb.shape[2]
    if out is None:
        out = torch.empty((num_tokens, rank_pad), dtype=A_emb.dtype, device=ids.device)
    assert out.shape == (num_tokens, rank_pad) and out.dtype == A_emb.dtype
    assert out.device == ids.device
    if num_tokens == 0 or num_entries == 0:
        return out.zero_()
    _lora_embed_shrink_kernel[(num_entries * m_progs,)](
        ids.contiguous(),
        A_emb,
        out,
        indptr,
        slots,
        slot_ranks,
        rank_pad,
        A_emb.stride(0),
        A_emb.stride(1),
        A_emb.stride(2),
        out.stride(0),
        out.stride(1),
        m_progs,
        BLOCK_M=block_m,
        BLOCK_R=next_pow2(rank_pad),
        num_warps=4,
    )
    return out
