"""Causal flash attention for prefill (and chunked prefill) over the paged KV cache.

Eager launches use a 3-D grid (query tile, KV head, sequence) sized by the longest query. A
CUDA graph fixes the grid at capture, so for replays over batches of other shapes the caller
instead hands a host-built tile table (`prefill_tile_table`), copied into a static buffer of
`prefill_tile_bound` entries, and the grid becomes (table entry, KV head).
"""

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ops.sizes import cdiv, next_pow2
from ops.triton_attention_tiles import (
    check_q_and_caches,
    lean_offsets,
    load_kv_tile,
    output_buffer,
    softmax_tile,
    wide_offsets,
)

_LOG2E = 1.4426950408889634
# A tile-table entry packs (sequence, query tile) as seq * 2**16 + tile: both fit one
# non-negative int32, and the kernel unpacks them with a shift and a mask.
_TILE_BITS = 16
_MAX_TABLE_SEQS = 1 << (31 - _TILE_BITS)
_MAX_SEQ_TILES = 1 << _TILE_BITS


# Scalars that change from step to step: Triton would otherwise compile a variant per value
# class (1, multiple of 16, other), and eager steps would meet new ones while serving.
PER_STEP_ARGS = ["stride_table"]


@triton.jit(do_not_specialize=PER_STEP_ARGS)
def _prefill_attention_kernel(
    q_ptr,  # [T, H, D]
    k_cache_ptr,  # [num_blocks, PAGE_SIZE, KVH, D]
    v_cache_ptr,  # [num_blocks, PAGE_SIZE, KVH, D]
    block_tables_ptr,  # [B, max_blocks_per_seq] int32
    cu_q_lens_ptr,  # [B + 1] int32
    kv_lens_ptr,  # [B] int32
    o_ptr,  # [T, H, D]
    tile_table_ptr,  # [P] int32 seq << 16 | tile, -1 for padding; read only when USE_TABLE
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
    TILE_BITS: tl.constexpr,
    USE_TABLE: tl.constexpr,  # grid (P, KVH) over the tile table instead of (tiles, KVH, B)
    LEAN: tl.constexpr,  # the KV tile load's unsigned page arithmetic (load_kv_tile)
    WIDE: tl.constexpr,  # the KV tile load's 64-bit cache offsets (load_kv_tile)
):
    kv_head = tl.program_id(1)
    if USE_TABLE:
        entry = tl.load(tile_table_ptr + tl.program_id(0))
        if entry < 0:
            return
        seq = entry >> TILE_BITS
        tile = entry & ((1 << TILE_BITS) - 1)
    else:
        tile = tl.program_id(0)
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
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, table_row, cols, None, cache_head_offset,
                            stride_cache_block, stride_cache_token, PAGE_SIZE, False, LEAN,
                            WIDE)
        m_i, l_i, acc = softmax_tile(q, k, v, m_i, l_i, acc, scale_log2, None, False,
                                     INPUT_PRECISION)

    # Tiles on the diagonal: causal and sequence-end masks. Tiles wholly above it are skipped.
    diag_end = tl.minimum(kv_len, context_len + last_token + 1)
    positions = context_len + tokens
    for n0 in range(full_end, diag_end, BLOCK_N):
        cols = n0 + cols_in_tile
        col_mask = cols < kv_len
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, table_row, cols, kv_len,
                            cache_head_offset, stride_cache_block, stride_cache_token, PAGE_SIZE,
                            True, LEAN, WIDE)
        visible = (cols[None, :] <= positions[:, None]) & col_mask[None, :]
        m_i, l_i, acc = softmax_tile(q, k, v, m_i, l_i, acc, scale_log2, visible, True,
                                     INPUT_PRECISION)

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


def prefill_block_m(max_q_len: int, group: int, head_dim: int, dtype: torch.dtype) -> int:
    """BLOCK_M of `prefill_attention_triton` for this max_q_len: the rows of (query token,
    query head of the KV head's group) pairs, token-major, that one query tile covers.

    group: query heads per KV head (H // KVH). head_dim: D. dtype: q's dtype.
    A tile table for a launch must be built with the block_m of that launch's max_q_len.
    """
    if max_q_len < 1 or group < 1:
        raise ValueError(f"max_q_len and group must be positive, got {max_q_len}, {group}")
    return _launch_config(max_q_len * group, head_dim, dtype == torch.float32)[0]


def prefill_tile_table(
    q_lens: Sequence[int], group: int, block_m: int, pad_to: int | None = None
) -> list[int]:
    """The query tiles of a batch, one entry per (sequence, tile), for a table launch.

    q_lens: each sequence's query length (0 for a sequence with nothing to compute).
    group: query heads per KV head. block_m: `prefill_block_m(max_q_len, ...)` of the launch.
    Sequence b gets entries for tiles t in range(cdiv(q_lens[b] * group, block_m)), in
    sequence order, each packed as b * 65536 + t (b < 32768, t < 65536, so a non-negative
    int32). pad_to: pad with -1 (programs that exit at once) to this length.
    """
    if group < 1 or block_m < 1:
        raise ValueError(f"group and block_m must be positive, got {group}, {block_m}")
    table: list[int] = []
    for seq, q_len in enumerate(q_lens):
        if q_len < 0:
            raise ValueError(f"q_lens[{seq}] is negative: {q_len}")
        num_tiles = cdiv(q_len * group, block_m)
        if num_tiles == 0:
            continue
        if seq >= _MAX_TABLE_SEQS:
            raise ValueError(f"a tile table holds sequences 0..{_MAX_TABLE_SEQS - 1}, got {seq}")
        if num_tiles > _MAX_SEQ_TILES:
            raise ValueError(
                f"sequence {seq} needs {num_tiles} query tiles, more than {_MAX_SEQ_TILES}"
            )
        first = seq << _TILE_BITS
        table.extend(range(first, first + num_tiles))
    if pad_to is not None:
        if len(table) > pad_to:
            raise ValueError(f"the batch needs {len(table)} tile entries, more than {pad_to}")
        table.extend([-1] * (pad_to - len(table)))
    return table


def prefill_tile_bound(max_tokens: int, max_seqs: int, group: int, block_m: int) -> int:
    """The most entries `prefill_tile_table` gives for any batch of at most max_tokens query
    tokens over at most max_seqs sequences: the size of a CUDA graph's static table.

    Each sequence wastes less than one tile: q_len * group rows fill
    cdiv(q_len * group, block_m) tiles of which at most block_m - gcd(group, block_m) rows
    are empty, since both row counts are multiples of that gcd. With k sequences and N tokens
    the table thus has at most (N * group + k * (block_m - gcd)) // block_m entries, largest
    at k = min(max_seqs, max_tokens). Exact when group divides block_m (k - 1 one-token
    sequences and one long one reach it) or block_m divides group (no waste); otherwise it
    may be a few entries over, each a program that exits at once.
    """
    if min(max_tokens, max_seqs) < 0 or group < 1 or block_m < 1:
        raise ValueError(
            f"need max_tokens, max_seqs >= 0 and group, block_m >= 1, got {max_tokens}, "
            f"{max_seqs}, {group}, {block_m}"
        )
    num_seqs = min(max_seqs, max_tokens)
    if num_seqs == 0:
        return 0
    max_waste = block_m - math.gcd(group, block_m)
    return (max_tokens * group + num_seqs * max_waste) // block_m


def _check_inputs(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    cu_q_lens: Tensor,
    kv_lens: Tensor,
    max_q_len: int,
    tile_table: Tensor | None,
) -> None:
    check_q_and_caches(q, k_cache, v_cache, "[T, H, D]")
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
    tensors = [q, k_cache, v_cache, block_tables, cu_q_lens, kv_lens]
    if tile_table is not None:
        if tile_table.dim() != 1 or tile_table.dtype != torch.int32:
            raise ValueError(
                f"tile_table must be [P] int32, got {tuple(tile_table.shape)} {tile_table.dtype}"
            )
        if not tile_table.is_contiguous():
            raise ValueError("tile_table must be contiguous")
        tensors.append(tile_table)
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if not isinstance(max_q_len, int) or max_q_len < 1:
        raise ValueError(f"max_q_len must be a positive python int, got {max_q_len!r}")


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
    tile_table: Tensor | None = None,
) -> Tensor:
    """Causal attention of each sequence's new queries over its paged KV cache.

    q: [T, H, D], the batch's query tokens, sequences concatenated (last dim contiguous).
    k_cache, v_cache: [num_blocks, block_size, KVH, D], contiguous, same dtype as q.
    block_tables: [B, max_blocks_per_seq] int32; entries past a sequence's blocks are ignored.
    cu_q_lens: [B + 1] int32 cumulative query lengths.
    kv_lens: [B] int32 KV lengths including this step's tokens (already stored).
    scale: softmax scale. max_q_len: the longest query length in the batch; it sets the query
    tile (`prefill_block_m`) and, without a table, the grid.
    out: optional contiguous [T, H, D] buffer in q's dtype to write into.
    tile_table: optional [P] int32 from `prefill_tile_table`, built with
    prefill_block_m(max_q_len, H // KVH, D, q.dtype) of this same max_q_len. It replaces the
    grid by (P, KVH), one program per entry and KV head, -1 entries doing nothing. The launch
    never reads it on the host, so under CUDA-graph capture max_q_len can be a bucket's bound
    and each replay's batch is whatever the static buffers (and table) hold: tokens past
    cu_q_lens[B] and sequences of q_len 0 are then left unwritten.
    Returns o: [T, H, D] in q's dtype (out when given). Query j of sequence b sits at position
    kv_lens[b] - q_len_b + j and attends to KV positions 0..that position.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, cu_q_lens, kv_lens, max_q_len, tile_table)
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    batch = block_tables.shape[0]
    o = output_buffer(out, q)
    if num_tokens == 0 or batch == 0:
        return o
    group = num_heads // num_kv_heads
    block_m, block_n, num_warps, num_stages = _launch_config(
        max_q_len * group, head_dim, q.dtype == torch.float32
    )
    if tile_table is None:
        grid: tuple[int, ...] = (cdiv(max_q_len * group, block_m), num_kv_heads, batch)
    elif tile_table.shape[0] == 0:
        return o
    else:
        grid = (tile_table.shape[0], num_kv_heads)
    _prefill_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_q_lens,
        kv_lens,
        o,
        cu_q_lens if tile_table is None else tile_table,  # any int32 pointer when unused
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
        TILE_BITS=_TILE_BITS,
        USE_TABLE=tile_table is not None,
        LEAN=lean_offsets(),
        WIDE=wide_offsets(k_cache, v_cache),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return o
