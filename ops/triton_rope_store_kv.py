"""Rotary embedding of q and k fused with the K/V cache write, on CUDA: one launch per layer.

For each token t: q_out[t] = rope(q[t]); k_cache[slot_t] = rope(k[t]); v_cache[slot_t] = v[t],
with slot_t = slot_mapping[t] = block_id * block_size + offset (a negative slot skips the cache
write). Optionally each q and k head is RMS-normalised over D first (per-head q/k norms).

Every step rounds to the input dtype where the unfused torch ops store a tensor, so the result
matches them: norm (fp32, rounded, then scaled by the weight and rounded), and for rope
round(round(x * cos) + round(rotate_half(x) * sin)), rotate_half(x) = cat(-x2, x1) for the
half-split layout x = cat(x1, x2). The kernel compiles without FMA contraction, which would
fuse one product into the sum unrounded (rope_store_kv_triton's launch says what it did).

The rotary rows are either given per token (cos, sin [T, D]) or gathered by the kernel from
the whole tables by each token's position (positions [T]): a step then launches no gathers of
its own ahead of the layers.

Grid: (T, H + KVH). Program (t, h) rotates query head h, or for h >= H key head h - H, which it
writes to the cache together with value head h - H.

q, k and v may also be a projection's split-K partials, fp32 [S, T, heads, D] views (ops/
triton_decode_gemm.py over S slices of K): each program sums its head's S values and rounds
the sum to the output dtype, as the unsplit projection would have stored it.

With a LoRA fold (ops/triton_lora_fold.py) q, k and v are views of the qkv projection's output
without its LoRA delta yet: each program adds the delta of the head values it loads (slices q, k
and v of the group), rounded to the dtype as the expand would have stored them, before the norm
and the rotation.
"""

import torch
import triton
import triton.language as tl

from ops.pdl import resolve, wait_then_release
from ops.sizes import next_pow2
from ops.triton_lora_fold import LoraFold, fold_args, lora_fold_apply, lora_fold_b, lora_fold_t


@triton.jit
def _head_norm(x1, x2, w_ptr, offs, live, eps, HEAD_DIM: tl.constexpr, HALF: tl.constexpr):
    """RMSNorm of one head held as its two halves, fp32 in and out."""
    dtype = w_ptr.dtype.element_ty
    inv_rms = 1.0 / tl.sqrt_rn((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / HEAD_DIM + eps)
    w1 = tl.load(w_ptr + offs, mask=live, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + offs, mask=live, other=0.0).to(tl.float32)
    y1 = (x1 * inv_rms).to(dtype).to(tl.float32) * w1
    y2 = (x2 * inv_rms).to(dtype).to(tl.float32) * w2
    return y1.to(dtype).to(tl.float32), y2.to(dtype).to(tl.float32)


@triton.jit
def load_parts(src, offs, live, stride_part, PARTS: tl.constexpr, like_ptr):
    """Values of the qkv projection's output at `offs` (any shape; here one half of a head
    row, in decode attention whole head rows), fp32: loaded, or with PARTS > 1 its split-K
    partials summed in slice order and rounded to like_ptr's dtype (what the unsplit
    projection stores)."""
    if PARTS == 1:
        return tl.load(src + offs, mask=live, other=0.0).to(tl.float32)
    x = tl.load(src + offs, mask=live, other=0.0).to(tl.float32)
    for p in tl.static_range(1, PARTS):
        x += tl.load(src + p * stride_part + offs, mask=live, other=0.0).to(tl.float32)
    return x.to(like_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _rotate(x1, x2, cos1, cos2, sin1, sin2, like_ptr):
    """Half-split rotary embedding, each product and the sum rounded to like_ptr's dtype."""
    dtype = like_ptr.dtype.element_ty
    a1 = (x1 * cos1).to(dtype).to(tl.float32)
    b1 = (-x2 * sin1).to(dtype).to(tl.float32)
    a2 = (x2 * cos2).to(dtype).to(tl.float32)
    b2 = (x1 * sin2).to(dtype).to(tl.float32)
    return (a1 + b1).to(dtype), (a2 + b2).to(dtype)


@triton.jit
def _rope_store_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    slot_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    q_norm_ptr,
    k_norm_ptr,
    num_heads,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_sin,
    stride_qot,
    stride_qoh,
    stride_cache_slot,
    stride_cache_head,
    eps,
    t_ptr,
    b_ptr,
    scal_ptr,
    rslot_ptr,
    R,
    stride_ts,
    stride_tm,
    stride_tslot,
    stride_bs,
    stride_bn,
    stride_ss,
    stride_si,
    stride_part,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    QK_NORM: tl.constexpr,
    FOLD: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    EVEN_R: tl.constexpr,
    USE_PDL: tl.constexpr,
    PARTS: tl.constexpr,  # split-K partials of q, k and v summed as they are loaded (1: none)
    GATHER: tl.constexpr,  # cos and sin are whole tables, read at row positions[t] (else t)
):
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs = tl.arange(0, BLOCK_HALF)
    live = offs < HALF
    q_size = num_heads * HEAD_DIM
    kv_size = (tl.num_programs(1) - num_heads) * HEAD_DIM
    # Before the wait (PDL): what no kernel of the layers writes (the positions and rotary
    # rows, the row's adapter and cache slots, the adapter's B rows); after it, the
    # projection's output and t.
    lora_slot = -1  # the row's adapter (a fold's delta); `slot` below is its cache slot
    if FOLD:
        lora_slot = tl.load(rslot_ptr + t)
    row = t
    if GATHER:
        row = tl.load(pos_ptr + t).to(tl.int64)
    cos1 = tl.load(cos_ptr + row * stride_cos + offs, mask=live, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + row * stride_cos + HALF + offs, mask=live, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + row * stride_sin + offs, mask=live, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + row * stride_sin + HALF + offs, mask=live, other=0.0).to(tl.float32)
    if head < num_heads:
        col = head * HEAD_DIM + offs
        if FOLD:
            bq1 = lora_fold_b(b_ptr, lora_slot, col, live, R, stride_bs, stride_bn, BLOCK_R,
                              EVEN_R)
            bq2 = lora_fold_b(b_ptr, lora_slot, col + HALF, live, R, stride_bs, stride_bn,
                              BLOCK_R, EVEN_R)
        wait_then_release(USE_PDL)
        src = q_ptr + t * stride_qt + head * stride_qh
        x1 = load_parts(src, offs, live, stride_part, PARTS, q_out_ptr)
        x2 = load_parts(src + HALF, offs, live, stride_part, PARTS, q_out_ptr)
        if FOLD:
            tq = lora_fold_t(t_ptr, t, lora_slot, 0, R, stride_ts, stride_tm, stride_tslot, SPLITS,
                             BLOCK_R, EVEN_R)
            x1 = lora_fold_apply(x1, bq1, tq, scal_ptr, lora_slot, 0, live, stride_ss,
                                 stride_si, q_out_ptr)
            x2 = lora_fold_apply(x2, bq2, tq, scal_ptr, lora_slot, 0, live, stride_ss,
                                 stride_si, q_out_ptr)
        if QK_NORM:
            x1, x2 = _head_norm(x1, x2, q_norm_ptr, offs, live, eps, HEAD_DIM, HALF)
        o1, o2 = _rotate(x1, x2, cos1, cos2, sin1, sin2, q_out_ptr)
        dst = q_out_ptr + t * stride_qot + head * stride_qoh
        tl.store(dst + offs, o1, mask=live)
        tl.store(dst + HALF + offs, o2, mask=live)
    else:
        kv_head = head - num_heads
        slot = tl.load(slot_ptr + t)
        kcol = q_size + kv_head * HEAD_DIM + offs
        vcol = kcol + kv_size
        if FOLD:
            bk1 = lora_fold_b(b_ptr, lora_slot, kcol, live, R, stride_bs, stride_bn, BLOCK_R,
                              EVEN_R)
            bk2 = lora_fold_b(b_ptr, lora_slot, kcol + HALF, live, R, stride_bs, stride_bn,
                              BLOCK_R, EVEN_R)
            bv1 = lora_fold_b(b_ptr, lora_slot, vcol, live, R, stride_bs, stride_bn, BLOCK_R,
                              EVEN_R)
            bv2 = lora_fold_b(b_ptr, lora_slot, vcol + HALF, live, R, stride_bs, stride_bn,
                              BLOCK_R, EVEN_R)
        wait_then_release(USE_PDL)
        src = k_ptr + t * stride_kt + kv_head * stride_kh
        x1 = load_parts(src, offs, live, stride_part, PARTS, q_out_ptr)
        x2 = load_parts(src + HALF, offs, live, stride_part, PARTS, q_out_ptr)
        vsrc = v_ptr + t * stride_vt + kv_head * stride_vh
        if PARTS == 1:
            v1 = tl.load(vsrc + offs, mask=live, other=0.0)
            v2 = tl.load(vsrc + HALF + offs, mask=live, other=0.0)
        else:
            out_dtype = q_out_ptr.dtype.element_ty
            v1 = load_parts(vsrc, offs, live, stride_part, PARTS, q_out_ptr).to(out_dtype)
            v2 = load_parts(vsrc + HALF, offs, live, stride_part, PARTS, q_out_ptr).to(out_dtype)
        if FOLD:
            tk = lora_fold_t(t_ptr, t, lora_slot, 1, R, stride_ts, stride_tm, stride_tslot, SPLITS,
                             BLOCK_R, EVEN_R)
            tv = lora_fold_t(t_ptr, t, lora_slot, 2, R, stride_ts, stride_tm, stride_tslot, SPLITS,
                             BLOCK_R, EVEN_R)
            x1 = lora_fold_apply(x1, bk1, tk, scal_ptr, lora_slot, 1, live, stride_ss,
                                 stride_si, q_out_ptr)
            x2 = lora_fold_apply(x2, bk2, tk, scal_ptr, lora_slot, 1, live, stride_ss,
                                 stride_si, q_out_ptr)
            v1 = lora_fold_apply(v1.to(tl.float32), bv1, tv, scal_ptr, lora_slot, 2, live,
                                 stride_ss, stride_si, q_out_ptr).to(q_out_ptr.dtype.element_ty)
            v2 = lora_fold_apply(v2.to(tl.float32), bv2, tv, scal_ptr, lora_slot, 2, live,
                                 stride_ss, stride_si, q_out_ptr).to(q_out_ptr.dtype.element_ty)
        if QK_NORM:
            x1, x2 = _head_norm(x1, x2, k_norm_ptr, offs, live, eps, HEAD_DIM, HALF)
        o1, o2 = _rotate(x1, x2, cos1, cos2, sin1, sin2, q_out_ptr)
        cache_dtype = k_cache_ptr.dtype.element_ty
        row = slot.to(tl.int64) * stride_cache_slot + kv_head * stride_cache_head
        store = live & (slot >= 0)
        tl.store(k_cache_ptr + row + offs, o1.to(cache_dtype), mask=store)
        tl.store(k_cache_ptr + row + HALF + offs, o2.to(cache_dtype), mask=store)
        tl.store(v_cache_ptr + row + offs, v1.to(cache_dtype), mask=store)
        tl.store(v_cache_ptr + row + HALF + offs, v2.to(cache_dtype), mask=store)


def rope_store_kv_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    q_out: torch.Tensor | None = None,
    fold: LoraFold | None = None,
    pdl: bool | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotary embedding of q and k (after per-head RMSNorm when norm weights are given), k and
    v written into the paged cache in place; returns the rotated q.

    q: [T, H, D]; k, v: [T, KVH, D]; any token and head strides, head rows contiguous (views of
    the fused qkv projection work as they are), one dtype: bf16/fp16/fp32. Or the projection's
    split-K partials: q [S, T, H, D], k, v [S, T, KVH, D], fp32, one slice stride (views of
    the partials [S, T, H*D + 2*KVH*D]), summed and rounded to cos's dtype as they are loaded
    (no fold then).
    cos, sin: [T, D] (rows contiguous, any row stride) in q's dtype (the output dtype with
    partials), the rotary table rows of each token's position; or, with `positions` ([T] int32
    or int64, each below P), the whole tables [P, D], which the kernel reads at row
    positions[t] for token t.
    k_cache, v_cache: [num_blocks, block_size, KVH, D], contiguous, same dtype.
    slot_mapping: [T] int64 or int32, block_id * block_size + offset; negative entries skip the
    cache write. q_norm_weight, k_norm_weight: [D] in the output dtype, both or neither; eps
    their epsilon. q_out: optional [T, H, D] buffer (head rows contiguous) in the output dtype.
    fold: the qkv projection's LoRA delta (slices q, k, v), when q, k and v are views of that
    output [T, H*D + 2*KVH*D]; added to the values as they are loaded.
    pdl: programmatic dependent launch (ops/pdl.py; None:
    inside decode graph captures, unless LORASERVE_LAYER_PDL=0).
    Returns q_out: [T, H, D] in q's dtype (cos's with partials).
    """
    parts, part_stride, q, k, v = check_rope_args(q, k, v, cos, sin, k_cache, v_cache,
                                                  slot_mapping, q_norm_weight, k_norm_weight,
                                                  positions, fold)
    out_dtype = cos.dtype if parts > 1 else q.dtype
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if q_out is None:
        q_out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    if q_out.shape != q.shape or q_out.dtype != out_dtype or q_out.stride(2) != 1:
        raise ValueError(f"q_out must be {tuple(q.shape)} {out_dtype} with contiguous head rows")
    if q_out.device != q.device:
        raise ValueError("q_out must be on q's device")
    if num_tokens == 0:
        return q_out
    half = head_dim // 2
    qk_norm = q_norm_weight is not None
    if fold is not None:
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        if fold.slice_offsets != (0, q_size, q_size + kv_size, q_size + 2 * kv_size):
            raise ValueError(f"fold slices {fold.slice_offsets} are not q, k and v")
        if fold.t.shape[1] != num_tokens:
            raise ValueError(f"fold of {fold.t.shape[1]} rows for {num_tokens} tokens")
    args, consts = fold_args(fold, q)
    pdl = resolve(pdl, q)
    _rope_store_kv_kernel[(num_tokens, num_heads + num_kv_heads)](
        q,
        k,
        v,
        cos,
        sin,
        positions if positions is not None else slot_mapping,
        slot_mapping,
        q_out,
        k_cache,
        v_cache,
        q_norm_weight if qk_norm else q,
        k_norm_weight if qk_norm else q,
        num_heads,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos.stride(0),
        sin.stride(0),
        q_out.stride(0),
        q_out.stride(1),
        k_cache.stride(1),
        k_cache.stride(2),
        eps,
        *args,
        part_stride,
        HEAD_DIM=head_dim,
        HALF=half,
        BLOCK_HALF=next_pow2(half),
        QK_NORM=qk_norm,
        **consts,
        USE_PDL=pdl,
        PARTS=parts,
        GATHER=positions is not None,
        launch_pdl=pdl,
        # a head is 2 * BLOCK_HALF values: one warp covers it in wide accesses; a fold's B
        # tiles (2 * BLOCK_HALF * BLOCK_R values a slice) take more threads
        num_warps=1 if fold is None else 4,
        # No FMA contraction: with it, sm_90's compile turned round(round(x * cos) +
        # round(rotate_half(x) * sin)) into fma(x, cos, round(rotate_half(x) * sin)), one
        # product left unrounded (fma.rn.f16 and fma.rn.bf16 in the PTX), so the kernel no
        # longer rounded as the model's torch rotary (and HF's) rounds, and decode attention's
        # own rotation (LORASERVE_DECODE_ATTN_ROPE) contracted its own way (fma.rn.bf16x2).
        # Without it: mul.rn, mul.rn, add.rn, each rounded as documented above.
        enable_fp_fusion=False,
    )
    return q_out


def check_rope_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None,
    positions: torch.Tensor | None, fold: LoraFold | None = None,
) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """rope_store_kv_triton's arguments checked (ValueError naming what is wrong): (split-K
    slices S, 1 without partials; their slice stride; q, k and v, the partials' first slice)."""
    parts, part_stride = 1, 0
    if q.dim() == 4:
        parts, part_stride = _check_partials(q, k, v, fold)
        q, k, v = q[0], k[0], v[0]
    out_dtype = cos.dtype if parts > 1 else q.dtype
    _check_inputs(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, q_norm_weight, k_norm_weight,
                  out_dtype, positions)
    return parts, part_stride, q, k, v


def _check_partials(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    fold: LoraFold | None) -> tuple[int, int]:
    """(S, slice stride) of split-K partials q [S, T, H, D], k and v [S, T, KVH, D]."""
    if k.dim() != 4 or v.dim() != 4 or not q.shape[0] == k.shape[0] == v.shape[0] >= 2:
        raise ValueError(f"split-K partials: q {tuple(q.shape)}, k {tuple(k.shape)} and v "
                         f"{tuple(v.shape)} must all be [S >= 2, T, heads, D]")
    if any(x.dtype != torch.float32 for x in (q, k, v)):
        raise ValueError("split-K partials must be fp32")
    if not q.stride(0) == k.stride(0) == v.stride(0):
        raise ValueError("split-K partials of q, k and v must share one slice stride")
    if fold is not None:
        raise ValueError("split-K partials take no LoRA fold")
    return q.shape[0], q.stride(0)


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    out_dtype: torch.dtype,
    positions: torch.Tensor | None = None,
) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"q must be [T, H, D], k and v [T, KVH, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    num_tokens, _, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or head_dim % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on T or D "
                         "(D must be even)")
    if any(x.stride(2) != 1 for x in (q, k, v)):
        raise ValueError("q, k and v head rows must be contiguous")
    if any(x.dtype != q.dtype for x in (k, v)) or any(x.dtype != out_dtype for x in (cos, sin)):
        raise ValueError("q, k, v, cos and sin must share one dtype (cos and sin the output's "
                         "with partials)")
    rows = num_tokens if positions is None else cos.shape[0]
    for name, x in (("cos", cos), ("sin", sin)):
        if x.shape != (rows, head_dim) or x.stride(1) != 1:
            want = f"T={num_tokens}" if positions is None else "P (as cos)"
            raise ValueError(f"{name} must be [{want}, D={head_dim}] with contiguous rows, got "
                             f"{tuple(x.shape)}")
    if positions is not None and (positions.shape != (num_tokens,)
                                  or positions.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"positions must be [T={num_tokens}] int32/int64, got "
                         f"{tuple(positions.shape)} {positions.dtype}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError("k_cache and v_cache must both be [num_blocks, block_size, KVH, D], "
                         f"one dtype, got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"k rows {tuple(k.shape[1:])} do not match cache rows "
                         f"{tuple(k_cache.shape[2:])}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be [T={num_tokens}] int32/int64, got "
                         f"{tuple(slot_mapping.shape)} {slot_mapping.dtype}")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("give both q_norm_weight and k_norm_weight, or neither")
    for w in (q_norm_weight, k_norm_weight):
        if w is not None and (w.shape != (head_dim,) or w.dtype != out_dtype
                              or not w.is_contiguous()):
            raise ValueError(f"q/k norm weights must be contiguous [D={head_dim}] in {out_dtype}")
    tensors = [q, k, v, cos, sin, k_cache, v_cache, slot_mapping, q_norm_weight, k_norm_weight,
               positions]
    if len({x.device for x in tensors if x is not None}) != 1:
        raise ValueError("all tensors must be on one device")
