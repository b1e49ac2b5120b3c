"""Decode attention over the paged KV cache: one query per sequence, split-KV (flash decoding).

Each program takes one sequence, one KV head with all the query heads that share it (so K/V are
read once per group), and one slice of the KV range. The grid's slice count follows shapes only
(capturable); each sequence cuts its own length into as few of them as it fills, and the last of
its slices to finish (an atomic arrival count) merges their partial results through their
log-sum-exps, in slice order. One launch: a second merge kernel cost more than the merge (a
launch and a wave of its own; benchmarks/RESULTS.md, thirteenth session).

`decode_rope_attention_triton` (opt-in, LORASERVE_DECODE_ATTN_ROPE=1) also does the rotary
kernel's work (ops/triton_rope_store_kv.py) in the same launch: each program rotates its
group's query heads from the qkv projection's output (after Qwen3's q/k norms, summing split-K
partials), reads the cache up to the token before the new one, and the program whose slice
holds the new token rotates its key, stores it and its value into the cache and adds them to
its softmax from registers. A layer then launches one kernel fewer at decode. That variant
compiles without FMA contraction, as the rotary kernel does, so both round the rotation the same
way (with it each fused products into sums its own way, and the caches differed in last bits).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ops.pdl import resolve, wait_then_release
from ops.scratch import outgrow
from ops.settings import env_flag, env_int
from ops.sizes import cdiv, next_pow2
from ops.triton_attention_tiles import (
    check_q_and_caches,
    lean_offsets,
    load_kv_tile,
    output_buffer,
    softmax_tile,
    wide_offsets,
)
from ops.triton_rope_store_kv import check_rope_args, load_parts

_LOG2E = 1.4426950408889634
# The grid's slices: one per this many tokens of the block table's width at most.
_MIN_TOKENS_PER_SPLIT = 128
_MAX_SPLITS = 64
_DEFAULT_SM_COUNT = 132


# Scalars that change from step to step: Triton would otherwise compile a variant per value
# class (1, multiple of 16, other), and eager steps would meet new ones while serving. The
# slice count is one of them (it follows the batch and the block-table width): a run-time
# value, not a constexpr, so one compiled kernel serves every count.
PER_STEP_ARGS = ["stride_table", "num_splits", "min_split"]


@triton.jit
def _rope_rows(src, offs, offs_sw, sign, stride_part, cos, sin, w, w_sw, eps,
               PARTS: tl.constexpr, QK_NORM: tl.constexpr, HEAD_DIM: tl.constexpr,
               AXIS: tl.constexpr, like_ptr, mask):
    """Head rows of the qkv projection's output rotated as ops/triton_rope_store_kv.py rotates
    them, each step rounded to like_ptr's dtype: x loaded at `offs` (head rows along AXIS's
    other dimension, or one row with AXIS 0), rotate_half(x) as x at the swapped halves
    (`offs_sw`) times `sign`; split-K partials (PARTS > 1) summed and rounded first, then the
    per-head RMSNorm with QK_NORM (weights w, and w_sw at the swapped halves). Returns the
    rotated rows in like_ptr's dtype."""
    dtype = like_ptr.dtype.element_ty
    x = load_parts(src, offs, mask, stride_part, PARTS, like_ptr)
    xs = load_parts(src, offs_sw, mask, stride_part, PARTS, like_ptr)
    if QK_NORM:
        inv_rms = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=AXIS, keep_dims=True) / HEAD_DIM + eps)
        x = ((x * inv_rms).to(dtype).to(tl.float32) * w).to(dtype).to(tl.float32)
        xs = ((xs * inv_rms).to(dtype).to(tl.float32) * w_sw).to(dtype).to(tl.float32)
    a = (x * cos).to(dtype).to(tl.float32)
    b = (sign * xs * sin).to(dtype).to(tl.float32)
    return (a + b).to(dtype)


@triton.jit(do_not_specialize=PER_STEP_ARGS)
def _decode_attention_kernel(
    q_ptr,  # [B, H, D]
    k_cache_ptr,  # [num_blocks, PAGE_SIZE, KVH, D]
    v_cache_ptr,  # [num_blocks, PAGE_SIZE, KVH, D]
    block_tables_ptr,  # [B, max_blocks_per_seq] int32
    kv_lens_ptr,  # [B] int32
    o_ptr,  # [B, H, D]
    partial_o_ptr,  # [B, H, num_splits, D] fp32, each used slice's normalized output
    partial_lse_ptr,  # [B, H, num_splits] fp32, each used slice's log2-sum-exp2
    count_ptr,  # [>= B * KVH] int32 arrival counts, zero between launches
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    stride_table,
    scale_log2,  # softmax scale times log2(e): the kernel works in base 2
    num_splits,  # programs per (sequence, KV head) (grid axis 2): at most this many slices
    min_split,  # the shortest slice worth a program of its own, a multiple of BLOCK_N
    # ROPE only (else placeholders): the new token's key and value heads (views of the qkv
    # projection's output, or of its split-K partials' first slice), the rotary tables, the
    # tokens' positions and cache slots, the q/k norm weights
    k_new_ptr,
    v_new_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_part,
    cos_ptr,
    sin_ptr,
    stride_cos,
    pos_ptr,
    slot_ptr,
    q_norm_ptr,
    k_norm_ptr,
    eps,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_H: tl.constexpr,  # GROUP padded up to a dot-friendly size
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr,  # GROUP padded to a power of two: the merge's rows
    BLOCK_S: tl.constexpr,  # num_splits' bound padded to a power of two
    SPLIT_CHUNK: tl.constexpr,  # slices the merge loads at once
    USE_PDL: tl.constexpr,  # programmatic dependent launch (ops/pdl.py)
    LEAN: tl.constexpr,  # the KV tile load's unsigned page arithmetic (load_kv_tile)
    WIDE: tl.constexpr,  # the KV tile load's 64-bit cache offsets (load_kv_tile)
    IDLE_EXIT: tl.constexpr,  # slices past the sequence leave before the PDL wait
    ROPE: tl.constexpr,  # q rotated here, the new token's K/V stored here (module docstring)
    PARTS: tl.constexpr,  # ROPE: split-K partials of q, k and v summed as they are loaded
    QK_NORM: tl.constexpr,  # ROPE: per-head RMSNorm of q and k before the rotation
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    kv_len = tl.load(kv_lens_ptr + seq)
    # The slices follow the sequence's own length, not the table's width: whole tiles, at least
    # min_split tokens, so a short sequence uses few of its programs (the rest return at once).
    split_len = tl.maximum(tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N, min_split)
    used = tl.maximum(tl.cdiv(kv_len, split_len), 1)  # kv_len == 0 (padding): one, writes 0
    if IDLE_EXIT:  # noqa: SIM102 (a constexpr: `and` would not fold with a tensor)
        # A slice past the sequence's own reads and writes nothing: it leaves before the wait,
        # at its launch behind the kernel ahead, not after it.
        if split >= used:
            return
    dims = tl.arange(0, HEAD_DIM)
    if ROPE:
        # step inputs and weights, which no kernel of the layers writes: read before the wait
        half = HEAD_DIM // 2
        dims_sw = tl.where(dims < half, dims + half, dims - half)
        sign = tl.where(dims < half, -1.0, 1.0)
        pos = tl.load(pos_ptr + seq).to(tl.int64)
        cos = tl.load(cos_ptr + pos * stride_cos + dims).to(tl.float32)
        sin = tl.load(sin_ptr + pos * stride_cos + dims).to(tl.float32)
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        qw = cos  # the weights are unused without QK_NORM
        qw_sw = cos
        kw = cos
        kw_sw = cos
        if QK_NORM:
            qw = tl.load(q_norm_ptr + dims).to(tl.float32)
            qw_sw = tl.load(q_norm_ptr + dims_sw).to(tl.float32)
            kw = tl.load(k_norm_ptr + dims).to(tl.float32)
            kw_sw = tl.load(k_norm_ptr + dims_sw).to(tl.float32)
    # kv_lens is a step input, written before the layers run: read before the wait
    wait_then_release(USE_PDL)
    if split < used:
        start = split * split_len
        # with ROPE the new token (the last) comes from registers, not from the cache
        end = tl.minimum(start + split_len, kv_len - 1 if ROPE else kv_len)
        group_rows = tl.arange(0, BLOCK_H)
        row_mask = group_rows < GROUP
        heads = kv_head * GROUP + group_rows
        q_rows = q_ptr + seq.to(tl.int64) * stride_qb
        if ROPE:
            q = _rope_rows(q_rows, heads[:, None] * stride_qh + dims[None, :],
                           heads[:, None] * stride_qh + dims_sw[None, :], sign[None, :],
                           stride_part, cos[None, :], sin[None, :], qw[None, :], qw_sw[None, :],
                           eps, PARTS, QK_NORM, HEAD_DIM, 1, cos_ptr, row_mask[:, None])
        else:
            q = tl.load(q_rows + heads[:, None] * stride_qh + dims[None, :],
                        mask=row_mask[:, None], other=0.0)
        table_row = block_tables_ptr + seq.to(tl.int64) * stride_table
        cache_head_offset = kv_head * stride_cache_head + dims[None, :]

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_mask = cols < end
            k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, table_row, cols, end,
                                cache_head_offset, stride_cache_block, stride_cache_token,
                                PAGE_SIZE, True, LEAN, WIDE)
            m_i, l_i, acc = softmax_tile(q, k, v, m_i, l_i, acc, scale_log2, col_mask[None, :],
                                         True, INPUT_PRECISION)
        if ROPE and split == used - 1:
            # The slice that holds the new token: its key rotated, key and value into the
            # cache, and both into the softmax as the cache holds them. A padding row
            # (kv_len 0) stores them too, as the rotary kernel would, and attends to nothing.
            cache_dtype = k_cache_ptr.dtype.element_ty
            k_row = k_new_ptr + seq.to(tl.int64) * stride_kt + kv_head * stride_kh
            k_new = _rope_rows(k_row, dims, dims_sw, sign, stride_part, cos, sin, kw, kw_sw,
                               eps, PARTS, QK_NORM, HEAD_DIM, 0, cos_ptr, dims < HEAD_DIM)
            v_row = v_new_ptr + seq.to(tl.int64) * stride_vt + kv_head * stride_vh
            v_new = load_parts(v_row, dims, dims < HEAD_DIM, stride_part, PARTS, cos_ptr)
            k_new = k_new.to(cache_dtype)
            v_new = v_new.to(cos_ptr.dtype.element_ty).to(cache_dtype)
            cache_row = slot * stride_cache_token + kv_head * stride_cache_head + dims
            keep = (dims < HEAD_DIM) & (slot >= 0)
            tl.store(k_cache_ptr + cache_row, k_new, mask=keep)
            tl.store(v_cache_ptr + cache_row, v_new, mask=keep)
            if kv_len > 0:
                s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale_log2
                m_new = tl.maximum(m_i, s_new)
                alpha = tl.exp2(m_i - m_new)
                p_new = tl.exp2(s_new - m_new)
                l_i = l_i * alpha + p_new
                acc = (acc * alpha[:, None]
                       + p_new.to(cache_dtype).to(tl.float32)[:, None]
                       * v_new.to(tl.float32)[None, :])
                m_i = m_new

        o_rows = o_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        if used == 1:
            # l_i is 0 only for kv_len == 0 (a padding row of a graph bucket): write zeros.
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(o_rows, out.to(o_ptr.dtype.element_ty), mask=row_mask[:, None])
        else:
            # Every used slice holds at least one token, so l_i > 0.
            partial_rows = (seq * (GROUP * tl.num_programs(1)) + heads).to(tl.int64) * num_splits
            tl.store(
                partial_o_ptr + (partial_rows + split)[:, None] * HEAD_DIM + dims[None, :],
                acc / l_i[:, None],
                mask=row_mask[:, None],
            )
            tl.store(partial_lse_ptr + partial_rows + split, m_i + tl.log2(l_i), mask=row_mask)
            # every thread's stores above, then one release of them with the arrival count
            tl.debug_barrier()
            counter = count_ptr + seq * tl.num_programs(1) + kv_head
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == used - 1:
                # The last slice to finish merges them all through their log-sum-exps, a chunk
                # of slices at a time (a fixed order: the result does not depend on which slice
                # came last). Rows here are the group's heads alone, not padded for tl.dot.
                g = tl.arange(0, BLOCK_G)
                g_mask = g < GROUP
                merge_rows = (seq * (GROUP * tl.num_programs(1)) + kv_head * GROUP + g).to(
                    tl.int64) * num_splits
                all_s = tl.arange(0, BLOCK_S)
                lses = tl.load(partial_lse_ptr + merge_rows[:, None] + all_s[None, :],
                               mask=g_mask[:, None] & (all_s < used)[None, :],
                               other=float("-inf"), cache_modifier=".cg")
                lse_max = tl.where(g_mask, tl.max(lses, 1), 0.0)
                total = tl.sum(tl.exp2(lses - lse_max[:, None]), 1)
                merged = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
                for c in range(0, used, SPLIT_CHUNK):
                    chunk = c + tl.arange(0, SPLIT_CHUNK)
                    in_chunk = g_mask[:, None] & (chunk < used)[None, :]
                    slots = merge_rows[:, None] + chunk[None, :]
                    weight = tl.exp2(tl.load(partial_lse_ptr + slots, mask=in_chunk,
                                             other=float("-inf"), cache_modifier=".cg")
                                     - lse_max[:, None])
                    part = tl.load(partial_o_ptr + (slots * HEAD_DIM)[:, :, None]
                                   + dims[None, None, :], mask=in_chunk[:, :, None], other=0.0,
                                   cache_modifier=".cg")
                    merged += tl.sum(part * weight[:, :, None], 1)
                merged = merged / tl.where(total == 0.0, 1.0, total)[:, None]
                merge_heads = kv_head * GROUP + g
                tl.store(o_ptr + seq.to(tl.int64) * stride_ob + merge_heads[:, None] * stride_oh
                         + dims[None, :], merged.to(o_ptr.dtype.element_ty),
                         mask=g_mask[:, None])
                tl.store(counter, 0)  # ready for the next launch


def choose_num_splits(batch: int, num_kv_heads: int, max_kv_capacity: int, num_sms: int) -> int:
    """Slices of the KV range per (sequence, KV head), from shapes only (CUDA-graph safe).

    Aims for about LORASERVE_DECODE_ATTN_PROGRAMS_PER_SM programs per SM (default 2), never
    slices shorter than _MIN_TOKENS_PER_SPLIT tokens of the block table's capacity, at most
    _MAX_SPLITS. (At batch 32 over 8 KV heads, 1 gives each sequence one slice: 11.5 against
    12.6 us a layer alone over 143 tokens on the H200, but the serving loop's base step was
    level, 4.71 against 4.72 ms: thirty-first session.)
    """
    per_sm = env_int("LORASERVE_DECODE_ATTN_PROGRAMS_PER_SM", 2, least=1)
    num_programs = max(1, batch * num_kv_heads)
    wanted = cdiv(per_sm * num_sms, num_programs)
    useful = cdiv(max_kv_capacity, _MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful, _MAX_SPLITS))


def choose_min_split(batch: int, num_kv_heads: int, num_sms: int) -> int:
    """The shortest slice worth a program of its own, in tokens, from shapes only: one 64-token
    tile, or for grids whose (sequence, KV head) programs alone fill every SM
    LORASERVE_DECODE_ATTN_WIDE_MIN_SPLIT (default 256), which keeps sequences up to that
    length in one slice (no second program, no merge) and splits longer ones as before.

    At 256, decode attention alone at batch 32 took 12.33 us a layer over 143 tokens against
    12.66 at 64, 15.29 against 15.44 over 256, 23.40 against 23.26 over 512, level over 1024
    (H200, thirty-eighth session, benchmarks/RESULTS.md). With the idle slices it leaves
    leaving before the PDL wait (LORASERVE_DECODE_ATTN_IDLE_EXIT, on by default), attention
    moved batch 32's loop step end by 375 us against 393 (thirty-ninth session's profile of the
    serving loop). One slice a sequence outright (LORASERVE_DECODE_ATTN_PROGRAMS_PER_SM=1) took
    11.50 over 143 tokens but 40.70 against 38.39 over 1024.
    """
    if batch * num_kv_heads >= num_sms:
        return env_int("LORASERVE_DECODE_ATTN_WIDE_MIN_SPLIT", 256, least=1)
    return 64


def _launch_config(head_dim: int, is_fp32: bool) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the main decode kernel, measured on an H200.

    fp32 tiles are twice the bytes: one stage fewer keeps them within shared memory.
    """
    return (64 if head_dim <= 128 else 32), 4, (2 if is_fp32 else 3)


def _check_inputs(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, kv_lens: Tensor
) -> None:
    check_q_and_caches(q, k_cache, v_cache, "[B, H, D]")
    batch = q.shape[0]
    if block_tables.shape[:1] != (batch,) or block_tables.dim() != 2:
        raise ValueError(
            f"block_tables must be [B={batch}, max_blocks], got {tuple(block_tables.shape)}"
        )
    if block_tables.dtype != torch.int32 or not block_tables.is_contiguous():
        raise ValueError(f"block_tables must be contiguous int32, got {block_tables.dtype}")
    if kv_lens.shape != (batch,) or kv_lens.dtype != torch.int32 or not kv_lens.is_contiguous():
        raise ValueError(
            f"kv_lens must be contiguous [B={batch}] int32, got {tuple(kv_lens.shape)} "
            f"{kv_lens.dtype}"
        )
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, kv_lens)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


# Arrival counts by device, zero between launches (each (sequence, KV
# head)'s last slice resets its count). A device's attention launches all run on its compute
# stream, one after another, so they share one set (a capture runs on a stream of its own, and
# finds the set its warm-up forward allocated). Captured graphs keep pointers to it, so it only
# grows, and an outgrown one is kept alive.
_counts: dict[torch.device, Tensor] = {}
_counts_outgrown: list[Tensor] = []


def _counts_for(device: torch.device, size: int) -> Tensor:
    have = _counts.get(device)
    if have is not None and have.shape[0] >= size:
        return have
    outgrow(device, have, _counts_outgrown, "decode attention: the arrival counts")
    have = torch.zeros((max(size, 0 if have is None else have.shape[0]),), dtype=torch.int32,
                       device=device)
    _counts[device] = have
    return have


def decode_attention_triton(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    kv_lens: Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    min_split: int | None = None,
    out: Tensor | None = None,
    pdl: bool | None = None,
    config: tuple[int, int, int] | None = None,
) -> Tensor:
    """Attention of one new query per sequence over its paged KV cache.

    q: [B, H, D] (last dim contiguous); query b sits at position kv_lens[b] - 1.
    k_cache, v_cache: [num_blocks, block_size, KVH, D], contiguous, same dtype as q.
    block_tables: [B, max_blocks_per_seq] int32; entries past a sequence's blocks are ignored.
    kv_lens: [B] int32; a 0 entry (padding row of a CUDA-graph bucket) gives zeros.
    scale: softmax scale.
    num_splits: slices of the KV range; by default chosen from B, KVH and the block table width,
    never from tensor contents, so the launch is CUDA-graph capturable. A sequence uses only as
    many of them as its own length fills with slices of at least `min_split` tokens (rounded up
    to whole KV tiles; by default `choose_min_split`'s, from shapes), and its last slice to
    finish merges them.
    out: optional contiguous [B, H, D] buffer in q's dtype to write into.
    pdl: programmatic dependent launch (ops/pdl.py; None:
    inside decode graph captures, unless LORASERVE_LAYER_PDL=0).
    config: (BLOCK_N, num_warps, num_stages) instead of the measured default (benchmarks sweep
    it: benchmarks/attn_bench.py --configs).
    Returns o: [B, H, D] in q's dtype (out when given).
    """
    _check_inputs(q, k_cache, v_cache, block_tables, kv_lens)
    o = output_buffer(out, q)
    return _launch(q, o, k_cache, v_cache, block_tables, kv_lens, scale, num_splits, min_split,
                   pdl, config, None)


def decode_rope_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    positions: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    kv_lens: Tensor,
    scale: float,
    q_norm_weight: Tensor | None = None,
    k_norm_weight: Tensor | None = None,
    eps: float = 1e-6,
    *,
    num_splits: int | None = None,
    min_split: int | None = None,
    pdl: bool | None = None,
    config: tuple[int, int, int] | None = None,
) -> Tensor:
    """rope_store_kv_triton (with `positions`) then decode_attention_triton, in one launch.

    q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping, the norm weights and eps as
    rope_store_kv_triton takes them (no LoRA fold: a fold's delta goes through the rotary
    kernel); block_tables, kv_lens, scale and the launch options as decode_attention_triton
    takes them, query b at position kv_lens[b] - 1 (positions[b] for its rotation). The new
    token's key and value go into the cache at its slot (none for a negative slot) and into the
    softmax as the cache holds them. Returns o: [B, H, D] in the output dtype (q's, or cos's
    with split-K partials)."""
    parts, part_stride, q, k, v = check_rope_args(q, k, v, cos, sin, k_cache, v_cache,
                                                  slot_mapping, q_norm_weight, k_norm_weight,
                                                  positions)
    o = torch.empty(q.shape, dtype=cos.dtype, device=q.device)
    _check_inputs(o, k_cache, v_cache, block_tables, kv_lens)
    if cos.stride(0) != sin.stride(0):
        raise ValueError("cos and sin must share one row stride")
    qk_norm = q_norm_weight is not None
    rope = {
        "args": (k, v, k.stride(0), k.stride(1), v.stride(0), v.stride(1), part_stride, cos, sin,
                 cos.stride(0), positions, slot_mapping,
                 q_norm_weight if qk_norm else cos, k_norm_weight if qk_norm else cos, eps),
        "consts": {"ROPE": True, "PARTS": parts, "QK_NORM": qk_norm},
    }
    return _launch(q, o, k_cache, v_cache, block_tables, kv_lens, scale, num_splits, min_split,
                   pdl, config, rope)


def fp_fusion(rope: bool) -> bool:
    """Whether a launch compiles with FMA contraction (Triton's default): not the variant with
    the rotation inside, which rounds it as the rotary kernel does (module docstring)."""
    return not rope


def _launch(q: Tensor, o: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
            kv_lens: Tensor, scale: float, num_splits: int | None, min_split: int | None,
            pdl: bool | None, config: tuple[int, int, int] | None, rope: dict | None) -> Tensor:
    """The decode attention kernel over checked inputs, into `o` (its shape and dtype the
    attention's); `rope`: decode_rope_attention_triton's arguments and constants, or None."""
    batch, num_heads, head_dim = o.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if batch == 0:
        return o
    if num_splits is None or min_split is None:
        num_sms = (
            torch.cuda.get_device_properties(q.device).multi_processor_count
            if q.is_cuda
            else _DEFAULT_SM_COUNT
        )
        if num_splits is None:
            num_splits = choose_num_splits(
                batch, num_kv_heads, block_tables.shape[1] * page_size, num_sms
            )
        if min_split is None:
            min_split = choose_min_split(batch, num_kv_heads, num_sms)
    if not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"num_splits must be in 1..{_MAX_SPLITS}, got {num_splits}")
    if min_split < 1:
        raise ValueError(f"min_split must be positive, got {min_split}")
    if config is None:
        config = _launch_config(head_dim, o.dtype == torch.float32)
    block_n, num_warps, num_stages = config
    if block_n not in (16, 32, 64, 128) or num_warps not in (1, 2, 4, 8) or num_stages < 1:
        raise ValueError(f"config (BLOCK_N, num_warps, num_stages) out of range: {config}")
    pdl = resolve(pdl, q)
    # Partials are unused with one slice; a one-element placeholder keeps the signature.
    partial_shape = (batch, num_heads, num_splits) if num_splits > 1 else (1, 1, 1)
    partial_lse = torch.empty(partial_shape, dtype=torch.float32, device=q.device)
    partial_o = torch.empty((*partial_shape, head_dim), dtype=torch.float32, device=q.device)
    if rope is None:  # placeholders of the ROPE arguments (never read)
        rope = {"args": (q, q, 0, 0, 0, 0, 0, q, q, 0, kv_lens, kv_lens, q, q, 0.0),
                "consts": {"ROPE": False, "PARTS": 1, "QK_NORM": False}}
    _decode_attention_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, kv_lens, o, partial_o, partial_lse,
        _counts_for(q.device, batch * num_kv_heads), q.stride(0), q.stride(1), o.stride(0),
        o.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), scale * _LOG2E, num_splits, cdiv(min_split, block_n) * block_n,
        *rope["args"],
        GROUP=group, BLOCK_H=max(16, next_pow2(group)), HEAD_DIM=head_dim, PAGE_SIZE=page_size,
        BLOCK_N=block_n,
        # fp32 inputs keep full precision instead of silently dropping to tf32.
        INPUT_PRECISION="ieee" if o.dtype == torch.float32 else "tf32",
        BLOCK_G=next_pow2(group), BLOCK_S=next_pow2(_MAX_SPLITS),
        SPLIT_CHUNK=max(2, 64 // next_pow2(group)),
        USE_PDL=pdl, LEAN=lean_offsets(), WIDE=wide_offsets(k_cache, v_cache),
        # on by default (LORASERVE_DECODE_ATTN_IDLE_EXIT=0 waits in every slice): in the
        # serving loop's profile at batch 32, attention moved the step's end 375 us against 393
        # without (H200, benchmarks/RESULTS.md thirty-ninth session)
        IDLE_EXIT=env_flag("LORASERVE_DECODE_ATTN_IDLE_EXIT", True),
        **rope["consts"],
        num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
        enable_fp_fusion=fp_fusion(rope["consts"]["ROPE"]),
    )
    return o
