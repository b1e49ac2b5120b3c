"""The KV-tile step shared by the decode and prefill attention kernels (inlined into each):
gather one tile of K and V through the block table, and fold it into the running online
softmax, in base 2."""

import triton
import triton.language as tl


@triton.jit
def load_kv_tile(
    k_cache_ptr,
    v_cache_ptr,
    table_row,  # the sequence's block-table row
    cols,  # [BLOCK_N] KV positions
    col_mask,  # [BLOCK_N] positions inside the sequence (unused when not MASKED)
    cache_head_offset,  # [1, HEAD_DIM]: the KV head's offset plus the dims
    stride_cache_block,
    stride_cache_token,
    PAGE_SIZE: tl.constexpr,
    MASKED: tl.constexpr,  # False: every position of the tile lies inside the sequence
):
    """(k, v), each [BLOCK_N, HEAD_DIM]; masked-out positions load zeros."""
    if MASKED:
        pages = tl.load(table_row + cols // PAGE_SIZE, mask=col_mask, other=0).to(tl.int64)
    else:
        pages = tl.load(table_row + cols // PAGE_SIZE).to(tl.int64)
    offsets = (
        pages[:, None] * stride_cache_block
        + (cols % PAGE_SIZE)[:, None] * stride_cache_token
        + cache_head_offset
    )
    if MASKED:
        k = tl.load(k_cache_ptr + offsets, mask=col_mask[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offsets, mask=col_mask[:, None], other=0.0)
    else:
        k = tl.load(k_cache_ptr + offsets)
        v = tl.load(v_cache_ptr + offsets)
    return k, v


@triton.jit
def softmax_tile(
    q,  # [ROWS, HEAD_DIM]
    k,  # [BLOCK_N, HEAD_DIM]
    v,  # [BLOCK_N, HEAD_DIM]
    m_i,  # [ROWS] running max (base 2)
    l_i,  # [ROWS] running sum
    acc,  # [ROWS, HEAD_DIM] fp32
    scale_log2,  # softmax scale times log2(e)
    visible,  # [ROWS, BLOCK_N] scores kept (unused when not MASKED)
    MASKED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """(m_i, l_i, acc) after one more KV tile."""
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * scale_log2
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return m_new, l_i, acc
