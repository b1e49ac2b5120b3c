"""What the decode and prefill attention kernels share: the KV-tile step (inlined into each:
gather one tile of K and V through the block table, and fold it into the running online
softmax, in base 2), and their wrappers' checks of q and the caches and of an output buffer."""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ops.settings import env_int

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_q_and_caches(q: Tensor, k_cache: Tensor, v_cache: Tensor, q_layout: str) -> None:
    """q ([q_layout], last dim contiguous) against k_cache and v_cache ([num_blocks,
    block_size, KVH, D], contiguous): head dims, head grouping, block size and dtype."""
    if q.dim() != 3:
        raise ValueError(f"q must be {q_layout}, got shape {tuple(q.shape)}")
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


def output_buffer(out: Tensor | None, q: Tensor) -> Tensor:
    """`out` checked to be a contiguous buffer of q's shape, dtype and device; a new one when
    None."""
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


def wide_offsets(k_cache: Tensor, v_cache: Tensor) -> bool:
    """Whether a cache's element offsets can pass 2**31 - 1, so the KV tile load must compute
    them in 64 bits (a layer's cache of a 2**31 elements is 4 GiB in bf16: no default
    configuration comes near it)."""
    return max(k_cache.numel(), v_cache.numel()) >= 2**31


def lean_offsets() -> int:
    """LORASERVE_ATTN_LEAN (default 0, opt-in): from 1 the KV tile load finds pages and slots
    with unsigned shifts and masks and, unless wide_offsets says otherwise, computes cache
    offsets in 32 bits; at 2 it also clamps a tile's positions past the sequence to its last
    one instead of masking its loads. The sm_90 KV loop of decode attention drops from 533
    instructions a tile to 407 (1) and 353 (2), and decode attention alone ran 12.40 us a
    layer at 2 against 12.74 at batch 32 over 143 tokens; but in the decode graphs, behind
    PDL, it ran longer (0.274 ms a step at batch 1 against 0.218, 0.446 at batch 32 against
    0.431), and the serving loop's base step was 0.05 ms longer at batch 1 at 1 and 2 and level
    at batch 32 (H200, thirty-eighth session: benchmarks/RESULTS.md). Why the graphs lose
    what the kernel alone gains is not known."""
    return env_int("LORASERVE_ATTN_LEAN", 0, least=0, most=2)


@triton.jit
def load_kv_tile(
    k_cache_ptr,
    v_cache_ptr,
    table_row,  # the sequence's block-table row
    cols,  # [BLOCK_N] KV positions
    end,  # positions at or past it lie outside the sequence (unused when not MASKED)
    cache_head_offset,  # [1, HEAD_DIM]: the KV head's offset plus the dims
    stride_cache_block,
    stride_cache_token,
    PAGE_SIZE: tl.constexpr,
    MASKED: tl.constexpr,  # False: every position of the tile lies inside the sequence
    LEAN: tl.constexpr,  # 1: unsigned page arithmetic, 32-bit offsets; 2: also no load masks
    WIDE: tl.constexpr,  # cache offsets in 64 bits (a cache of 2**31 elements or more)
):
    """(k, v), each [BLOCK_N, HEAD_DIM]. Positions at or past `end` load zeros or, at LEAN 2,
    the K and V of position end - 1 (the caller masks their scores: a finite V times a zero
    weight adds nothing).

    Positions are signed int32, so `cols // PAGE_SIZE` and `cols % PAGE_SIZE` round toward
    zero with a sign fix-up each; as unsigned they are one shift and one mask. A masked load
    is predicated copy by copy; a position clamped to the sequence's last is one min and
    leaves every load unmasked. Offsets in 32 bits spare each address its 64-bit
    multiply-adds. (The KV loop's instruction chain bounds decode attention at short contexts:
    benchmarks/RESULTS.md, thirty-seventh session.)
    """
    if MASKED and LEAN >= 2:
        cols = tl.minimum(cols, end - 1)
    if LEAN >= 1:
        positions = cols.to(tl.uint32)
        slots = (positions // PAGE_SIZE).to(tl.int32)
        within = (positions % PAGE_SIZE).to(tl.int32)
    else:
        slots = cols // PAGE_SIZE
        within = cols % PAGE_SIZE
    if MASKED and LEAN < 2:
        pages = tl.load(table_row + slots, mask=cols < end, other=0)
    else:
        pages = tl.load(table_row + slots)
    if WIDE or LEAN == 0:
        pages = pages.to(tl.int64)
    offsets = (
        pages[:, None] * stride_cache_block
        + within[:, None] * stride_cache_token
        + cache_head_offset
    )
    if MASKED and LEAN < 2:
        k = tl.load(k_cache_ptr + offsets, mask=(cols < end)[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offsets, mask=(cols < end)[:, None], other=0.0)
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
