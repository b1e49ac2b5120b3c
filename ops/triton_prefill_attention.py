"""Causal flash attention for prefill (and chunked prefill) over the paged KV cache."""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ops.sizes import cdiv, next_pow2

_LOG2E = 1.4426950408889634
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _prefill_attention_kernel(
    q_ptr,  # [T, H, D]
    k_cache_ptr,  # [num_blocks, PAGE_SIZE, KVH, D]
    v_cache_ptr,  # [num_blocks, PAGE_SIZE, KVH, D]
    block_tables_ptr,  # [B, max_blocks_per_seq] int32
    cu_q_lens_ptr,  # [B + 1] int32
    kv_lens_ptr,  # [B] int32
    o_ptr,  # [T, H, D]
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    stride_table,
    scale_log2,  # softmax scale times log2(e): the kernel works in base 2
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(cu_q_lens_ptr + seq)
    q_len = tl.load(cu_q_lens_ptr + seq + 1) - q_start
    # Rows pack (token, query head of this KV head's group), token-major, so one K/V tile
    # serves the whole group.
    first_token = (tile * BLOCK_M) // GROUP
    if first_token >= q_len:
        return
    last_token = (tile * BLOCK_M + BLOCK_M - 1) // GROUP
    kv_len = tl.load(kv_lens_ptr + seq)
    # Query token j sits at position context_len + j; earlier chunks are already in the cache.
    context_len = kv_len - q_len

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tokens = rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_mask = tokens < q_len
    dims = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + tokens).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
        mask=row_mask[:, None],
        other=0.0,
    )
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table
    cache_head_offset = kv_head * stride_cache_head + dims[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    cols_in_tile = tl.arange(0, BLOCK_N)

    # KV tiles that every row of this tile sees in full need no mask: all of them lie at or
    # below the first token's position, which is inside the sequence.
    full_end = ((context_len + first_token + 1) // BLOCK_N) * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        cols = n0 + cols_in_tile
        pages = tl.load(table_row + cols // PAGE_SIZE).to(tl.int64)
        offsets = (
            pages[:, None] * stride_cache_block
            + (cols % PAGE_SIZE)[:, None] * (stride_cache_token)
            + cache_head_offset
        )
        k = tl.load(k_cache_ptr + offsets)
        v = tl.load(v_cache_ptr + offsets)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * scale_log2
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new

    # Tiles on the diagonal: causal and sequence-end masks. Tiles wholly above it are skipped.
    diag_end = tl.minimum(kv_len, context_len + last_token + 1)
    positions = context_len + tokens
    for n0 in range(full_end, diag_end, BLOCK_N):
        cols = n0 + cols_in_tile
        col_mask = cols < kv_len
        pages = tl.load(table_row + cols // PAGE_SIZE, mask=col_mask, other=0).to(tl.int64)
        offsets = (
            pages[:, None] * stride_cache_block
            + (cols % PAGE_SIZE)[:, None] * (stride_cache_token)
            + cache_head_offset
        )
        k = tl.load(k_cache_ptr + offsets, mask=col_mask[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offsets, mask=col_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * scale_log2
        visible = (cols[None, :] <= positions[:, None]) & col_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(
        o_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :],
        acc.to(o_ptr.dtype.element_ty),
        mask=row_mask[:, None],
    )


def _launch_config(max_rows: int, head_dim: int, is_fp32: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for max_rows = longest q_len * group.

    Short chunks get short query tiles; the long-tile settings were measured on an H200.
    fp32 tiles are twice the bytes, so they stay small enough for shared memory.
    """
    block_m = min(128 if head_dim <= 128 else 64, max(16, next_pow2(max_rows)))
    if is_fp32:
        return min(block_m, 64), (64 if head_dim <= 128 else 32), 4, 2
    if head_dim > 128:
        return block_m, 32, 8 if block_m == 64 else 4, 2
    if block_m == 128:
        return block_m, 128, 8, 3
    if block_m == 64:
        return block_m, 64, 4, 3
    return block_m, 64, 4, 2


def _check_inputs(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    cu_q_lens: Tensor,
    kv_lens: Tensor,
    max_q_len: int,
) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [T, H, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, KVH, D], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    num_heads, head_dim = q.shape[1], q.shape[2]
    _, page_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"q head_dim {head_dim} != cache head_dim {cache_head_dim}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim must be a power of two in 16..256, got {head_dim}")
    if page_size not in (1, 2, 4, 8, 16, 32, 64, 128):
        raise ValueError(f"block_size must be a power of two in 1..128, got {page_size}")
    if q.dtype not in _FLOAT_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            "q, k_cache, v_cache must share one dtype of float16/bfloat16/float32, got "
            f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if q.stride(2) != 1:
        raise ValueError("q's last dimension must be contiguous")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32:
        raise ValueError(
            f"block_tables must be [B, max_blocks] int32, got {tuple(block_tables.shape)} "
            f"{block_tables.dtype}"
        )
    if not block_tables.is_contiguous():
        raise ValueError("block_tables must be contiguous")
    batch = block_tables.shape[0]
    if cu_q_lens.shape != (batch + 1,) or cu_q_lens.dtype != torch.int32:
        raise ValueError(
            f"cu_q_lens must be [B+1={batch + 1}] int32, got {tuple(cu_q_lens.shape)} "
            f"{cu_q_lens.dtype}"
        )
    if kv_lens.shape != (batch,) or kv_lens.dtype != torch.int32:
        raise ValueError(
            f"kv_lens must be [B={batch}] int32, got {tuple(kv_lens.shape)} {kv_lens.dtype}"
        )
    if not (cu_q_lens.is_contiguous() and kv_lens.is_contiguous()):
        raise ValueError("cu_q_lens and kv_lens must be contiguous")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, cu_q_lens, kv_lens)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if not isinstance(max_q_len, int) or max_q_len < 1:
        raise ValueError(f"max_q_len must be a positive python int, got {max_q_len!r}")


def _output_buffer(out: Tensor | None, q: Tensor) -> Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got {tuple(out.shape)} "
            f"{out.dtype} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    return out


def prefill_attention_triton(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    cu_q_lens: Tensor,
    kv_lens: Tensor,
    scale: float,
    max_q_len: int,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Causal attention of each sequence's new queries over its paged KV cache.

    q: [T, H, D], the batch's query tokens, sequences concatenated (last dim contiguous).
    k_cache, v_cache: [num_blocks, block_size, KVH, D], contiguous, same dtype as q.
    block_tables: [B, max_blocks_per_seq] int32; entries past a sequence's blocks are ignored.
    cu_q_lens: [B + 1] int32 cumulative query lengths.
    kv_lens: [B] int32 KV lengths including this step's tokens (already stored).
    scale: softmax scale. max_q_len: the longest query length in the batch (sets the grid).
    out: optional contiguous [T, H, D] buffer in q's dtype to write into.
    Returns o: [T, H, D] in q's dtype (out when given). Query j of sequence b sits at position
    kv_lens[b] - q_len_b + j and attends to KV positions 0..that position.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, cu_q_lens, kv_lens, max_q_len)
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    batch = block_tables.shape[0]
    o = _output_buffer(out, q)
    if num_tokens == 0 or batch == 0:
        return o
    group = num_heads // num_kv_heads
    block_m, block_n, num_warps, num_stages = _launch_config(
        max_q_len * group, head_dim, q.dtype == torch.float32
    )
    grid = (cdiv(max_q_len * group, block_m), num_kv_heads, batch)
    _prefill_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_q_lens,
        kv_lens,
        o,
        q.stride(0),
        q.stride(1),
        o.stride(0),
        o.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        scale * _LOG2E,
        GROUP=group,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        # fp32 inputs keep full precision instead of silently dropping to tf32.
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return o
