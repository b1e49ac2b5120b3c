"""Paged attention: Triton kernels on CUDA, plain torch everywhere else.

KV cache layout, per layer: k_cache, v_cache: [num_blocks, block_size, KVH, D]. Token p of a
sequence lives in block block_tables[b, p // block_size] at offset p % block_size. Query head h
reads KV head h // (H // KVH).

The torch functions are what CPU serving runs and the reference the kernels are tested against.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from ops.dispatch import use_triton
from ops.store_kv import store_kv
from ops.triton_decode_attention import decode_attention_triton
from ops.triton_prefill_attention import prefill_attention_triton

__all__ = [
    "decode_attention_triton",
    "paged_decode_attention",
    "paged_decode_attention_torch",
    "paged_prefill_attention",
    "paged_prefill_attention_torch",
    "prefill_attention_triton",
    "store_kv",
]


def paged_prefill_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    cu_q_lens: Tensor,
    kv_lens: Tensor,
    scale: float,
    max_q_len: int,
    tile_table: Tensor | None = None,
) -> Tensor:
    """Causal attention of each sequence's new queries over its paged KV cache.

    q: [T, H, D], the batch's query tokens, sequences concatenated.
    k_cache, v_cache: [num_blocks, block_size, KVH, D].
    block_tables: [B, max_blocks_per_seq] int32. cu_q_lens: [B + 1] int32 cumulative q lengths.
    kv_lens: [B] int32 KV lengths including this step's tokens, whose K/V are already stored.
    max_q_len: the longest query length in the batch (or a CUDA-graph bucket's bound on it).
    tile_table: optional [P] int32 query-tile table for the Triton kernel, built by
    `prefill_tile_table` with the block_m of this max_q_len (see prefill_attention_triton);
    the torch path, whose result does not depend on it, ignores it.
    Returns o: [T, H, D] in q's dtype. Query j of sequence b sits at position
    kv_lens[b] - q_len_b + j and attends to KV positions 0..that position.
    """
    args = (q, k_cache, v_cache, block_tables, cu_q_lens, kv_lens, scale, max_q_len)
    if use_triton(q):
        return prefill_attention_triton(*args, tile_table=tile_table)
    return paged_prefill_attention_torch(*args)


def paged_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    kv_lens: Tensor,
    scale: float,
) -> Tensor:
    """Attention of one new query per sequence over its paged KV cache.

    q: [B, H, D]; query b sits at position kv_lens[b] - 1 and sees positions 0..kv_lens[b]-1.
    k_cache, v_cache: [num_blocks, block_size, KVH, D]. block_tables: [B, max_blocks] int32.
    kv_lens: [B] int32. Returns o: [B, H, D] in q's dtype.
    """
    if use_triton(q):
        return decode_attention_triton(q, k_cache, v_cache, block_tables, kv_lens, scale)
    return paged_decode_attention_torch(q, k_cache, v_cache, block_tables, kv_lens, scale)


def _gather_kv(cache: Tensor, block_table_row: Tensor, kv_len: int) -> Tensor:
    """One sequence's cached rows in position order: [kv_len, KVH, D]."""
    block_size = cache.shape[1]
    num_blocks = -(-kv_len // block_size)
    return cache[block_table_row[:num_blocks].long()].flatten(0, 1)[:kv_len]


def paged_prefill_attention_torch(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    cu_q_lens: Tensor,
    kv_lens: Tensor,
    scale: float,
    max_q_len: int,
) -> Tensor:
    """Torch reference of paged_prefill_attention (same arguments), one sequence at a time."""
    del max_q_len  # only the kernel's grid needs it
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    starts = cu_q_lens.tolist()
    for b, kv_len in enumerate(kv_lens.tolist()):
        q_start, q_end = starts[b], starts[b + 1]
        if q_end == q_start:
            continue
        k = _gather_kv(k_cache, block_tables[b], kv_len)
        v = _gather_kv(v_cache, block_tables[b], kv_len)
        positions = torch.arange(kv_len - (q_end - q_start), kv_len, device=q.device)
        # mask: [q_len, kv_len], True where the key is at or before the query's position.
        mask = torch.arange(kv_len, device=q.device)[None, :] <= positions[:, None]
        out = F.scaled_dot_product_attention(
            q[q_start:q_end].transpose(0, 1).float(),  # [H, q_len, D]
            k.transpose(0, 1).float(),  # [KVH, kv_len, D]
            v.transpose(0, 1).float(),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        o[q_start:q_end] = out.transpose(0, 1).to(q.dtype)
    return o


def paged_decode_attention_torch(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    kv_lens: Tensor,
    scale: float,
) -> Tensor:
    """Torch reference of paged_decode_attention (same arguments), the whole batch at once.

    Sequences are gathered up to the longest one and padded positions masked; a kv_len of 0
    (a padding row) gives zeros, as the kernel does.
    """
    batch = q.shape[0]
    block_size = k_cache.shape[1]
    if batch == 0:
        return torch.empty_like(q)
    max_kv_len = int(kv_lens.max())
    num_blocks = max(1, -(-max_kv_len // block_size))
    kv_lens = kv_lens.long()
    block_starts = torch.arange(num_blocks, device=q.device) * block_size
    # Table entries past a sequence's blocks are arbitrary: point them at block 0 instead.
    tables = block_tables[:, :num_blocks].long()
    tables = torch.where(block_starts[None, :] < kv_lens[:, None], tables, 0)
    num_slots = num_blocks * block_size
    # valid: [B, S], True for positions inside the sequence.
    valid = torch.arange(num_slots, device=q.device)[None, :] < kv_lens[:, None]
    # Zero the padded rows: their contents are arbitrary and 0 * NaN would leak through.
    k = k_cache[tables].flatten(1, 2).float().masked_fill_(~valid[:, :, None, None], 0.0)
    v = v_cache[tables].flatten(1, 2).float().masked_fill_(~valid[:, :, None, None], 0.0)
    # Always let position 0 through: a no-op for real rows, zeros for kv_len == 0 rows.
    attend = valid.clone()
    attend[:, 0] = True
    out = F.scaled_dot_product_attention(
        q[:, :, None, :].float(),  # [B, H, 1, D]
        k.transpose(1, 2),  # [B, KVH, S, D]
        v.transpose(1, 2),
        attn_mask=attend[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    return out[:, :, 0, :].to(q.dtype)
