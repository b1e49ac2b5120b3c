"""A LoRA expand folded into the kernel that next reads the projection's output.

In a captured decode forward each LoRA application would end in an expand launch that reads the
projection's output y, adds scaling * t B^T to it and writes it back, only for the next kernel
to read y again. Folded, there is no expand launch: the next kernel (rotary + K/V store after
qkv, SiLU*up after gate_up, add+RMSNorm after o and down) loads y as before, adds the delta of
each value it loads, rounds the sum to y's dtype as the expand's store would, and goes on. So a
layer launches four kernels fewer, and y makes one round trip to memory fewer.

The delta of row m, column n of slice i is scalings[slot_m, i] * sum_r t[m, i*R + r] B[slot_m, n, r]
with t the shrink's split-K partials [splits, T, n*R] (summed here; serving hands one split,
summed beside the projection: ops.lora.fold_presum), B the pool's [num_slots, N_total, R] and
slot_m = row_slots[m] (-1: a base row, no delta). Columns past an adapter's rank are zero in the
pool's A and B, so the sum runs over all R columns unmasked. The sum runs on the CUDA cores in
fp32: a kernel folds a row, a head of one, or (SiLU*up) a group of 8 rows at a time, too few for
the tensor cores.

The kernels take the fold's arguments through `fold_args` and the jit helpers below, with
FOLD=False (and placeholder pointers) when nothing is folded. A consumer loads its B rows
(`lora_fold_b`) before it waits on the kernel ahead (ops/pdl.py: no layer kernel writes B), and
its t (`lora_fold_t`) and the projection's output after, then adds the delta
(`lora_fold_apply`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ops.sizes import next_pow2


@dataclass(frozen=True)
class LoraFold:
    """A LoRA delta not yet added to its projection's output: the consumer folds it in.

    t: the shrink's partials [splits, T, n*R]; B: [num_slots, N_total, R]; scalings:
    [num_slots, n] float32; row_slots: [T] int32 (-1 = no LoRA); slice_offsets: the group's
    output slices; info: the step's batch info, for `ops.lora.apply_fold` (a plain expand) where
    a consumer cannot fold. t_slot_stride: 0, or for a stacked t (`ops.lora.linear_lora_fold`
    over a pool's stack: [splits, T, num_slots * n*R], every slot's t for every row; more than
    one split where the stacked GEMM leaves split-K partials) n*R, so that row m reads the
    columns of its own slot row_slots[m]."""

    t: Tensor
    B: Tensor
    scalings: Tensor
    row_slots: Tensor
    slice_offsets: tuple[int, ...]
    info: object  # ops.lora.LoraBatchInfo (not imported: ops.lora imports this module)
    t_slot_stride: int = 0

    def check(self, y: Tensor) -> None:
        """Raise ValueError unless this fold fits output y [T, N_total]."""
        _, rows, cols = self.t.shape
        num_slices = len(self.slice_offsets) - 1
        rank_pad = self.B.shape[2]
        if (y.dim() != 2 or y.shape != (rows, self.B.shape[1])
                or self.slice_offsets[-1] != y.shape[1]):
            raise ValueError(f"fold of {rows} x {self.B.shape[1]} does not fit y {tuple(y.shape)}")
        slots = self.B.shape[0] if self.t_slot_stride else 1
        if self.t_slot_stride not in (0, num_slices * rank_pad):
            raise ValueError(f"fold: t slot stride {self.t_slot_stride} of a {num_slices} x "
                             f"{rank_pad} group")
        if cols != slots * num_slices * rank_pad or self.row_slots.shape != (rows,):
            raise ValueError("fold: t, B and row_slots disagree")
        if self.scalings.shape != (self.B.shape[0], num_slices):
            raise ValueError(f"fold: scalings {tuple(self.scalings.shape)}")
        if self.row_slots.dtype != torch.int32 or self.t.stride(2) != 1 or self.B.stride(2) != 1:
            raise ValueError("fold: row_slots must be int32, t and B rows contiguous")
        if len({x.device for x in (self.t, self.B, self.scalings, self.row_slots, y)}) != 1:
            raise ValueError("fold: all tensors must be on y's device")


FOLD_VALUES_PER_THREAD = 64  # fp32 values of a B tile a thread holds (more spills at rank 64)


def fold_block(fold: LoraFold, num_warps: int, cap: int) -> int:
    """Output columns a consumer program takes at a time: at most `cap`, and few enough that a
    B tile of them stays in registers (a power of two)."""
    block_r = max(16, next_pow2(fold.B.shape[2]))
    fits = FOLD_VALUES_PER_THREAD * 32 * num_warps // block_r
    return max(16, min(cap, 1 << (fits.bit_length() - 1)))


def fold_args(fold: LoraFold | None, like: Tensor) -> tuple[list, dict]:
    """(positional kernel arguments, constexprs) of `fold` for a kernel taking the fold helpers'
    arguments in this order: t_ptr, b_ptr, scal_ptr, rslot_ptr, R, stride_ts, stride_tm,
    stride_tslot, stride_bs, stride_bn, stride_ss, stride_si; constexprs FOLD, SPLITS, BLOCK_R,
    EVEN_R.
    Without a fold, `like` stands in for every pointer and FOLD is False."""
    if fold is None:
        return [like, like, like, like, 1, 0, 0, 0, 0, 0, 0, 0], {
            "FOLD": False, "SPLITS": 1, "BLOCK_R": 16, "EVEN_R": True}
    t, B, s = fold.t, fold.B, fold.scalings
    rank_pad = B.shape[2]
    block_r = max(16, next_pow2(rank_pad))
    args = [t, B, s, fold.row_slots, rank_pad, t.stride(0), t.stride(1), fold.t_slot_stride,
            B.stride(0), B.stride(1), s.stride(0), s.stride(1)]
    return args, {"FOLD": True, "SPLITS": t.shape[0], "BLOCK_R": block_r,
                  "EVEN_R": block_r == rank_pad}


@triton.jit
def lora_fold_t(t_ptr, row, slot, slice_id, R, stride_ts, stride_tm, stride_tslot,
                SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, EVEN_R: tl.constexpr):
    """Row `row`'s t for one slice, its split-K partials summed: [BLOCK_R] fp32. With a slot
    stride (a stacked t, `LoraFold.t_slot_stride`) the row's own slot's columns."""
    offs_r = tl.arange(0, BLOCK_R)
    ptrs = (t_ptr + row.to(tl.int64) * stride_tm + tl.maximum(slot, 0).to(tl.int64) * stride_tslot
            + slice_id * R + offs_r)
    t = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        if EVEN_R:
            t += tl.load(ptrs + s * stride_ts).to(tl.float32)
        else:
            t += tl.load(ptrs + s * stride_ts, mask=offs_r < R, other=0.0).to(tl.float32)
    return t


@triton.jit
def lora_fold_b(b_ptr, slot, cols, live, R, stride_bs, stride_bn, BLOCK_R: tl.constexpr,
                EVEN_R: tl.constexpr):
    """Adapter `slot`'s B rows of columns `cols`: [len(cols), BLOCK_R] fp32 (zero where `live`
    is false, all zero for slot -1: nothing is loaded then)."""
    offs_r = tl.arange(0, BLOCK_R)
    on = live & (slot >= 0)
    slot_safe = tl.maximum(slot, 0).to(tl.int64)
    b_ptrs = (b_ptr + slot_safe * stride_bs + cols[:, None].to(tl.int64) * stride_bn
              + offs_r[None, :])
    if EVEN_R:
        return tl.load(b_ptrs, mask=on[:, None], other=0.0).to(tl.float32)
    return tl.load(b_ptrs, mask=on[:, None] & (offs_r < R)[None, :], other=0.0).to(tl.float32)


@triton.jit
def lora_fold_apply(y, b, t, scal_ptr, slot, slice_id, live, stride_ss, stride_si, like_ptr):
    """y (fp32, as loaded) plus the delta of B rows `b` (lora_fold_b) for a row whose t is `t`,
    rounded to like_ptr's dtype as the expand stores it, back in fp32."""
    slot_safe = tl.maximum(slot, 0).to(tl.int64)
    scale = tl.load(scal_ptr + slot_safe * stride_ss + slice_id * stride_si, mask=slot >= 0,
                    other=0.0)
    # base rows' t is whatever the partials buffer held (the shrink skips them): never used
    d = tl.where(live & (slot >= 0), tl.sum(b * t[None, :], axis=1) * scale, 0.0)
    return (y + d).to(like_ptr.dtype.element_ty).to(tl.float32)

