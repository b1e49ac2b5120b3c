"""SiLU(gate) * up on CUDA, read straight from the fused gate_up projection: one launch.

Each value is computed in fp32; SiLU(gate) is rounded to the input dtype before the product, as
the unfused `F.silu(gate) * up` stores it in between.

Grid: (T, cdiv(inter, BLOCK)), BLOCK columns of one row per program.

With a LoRA fold (ops/triton_lora_fold.py) gate_up is the projection's output without its LoRA
delta yet: each program adds the delta of the gate and up values it loads (slices 0 and 1),
rounded to the dtype as the expand would have stored them. A fold program takes FOLD_GROUP
rows of a narrower block at once (grid (cdiv(T, FOLD_GROUP), cdiv(inter, BLOCK))): their t rows
are loaded once for all their columns, and an adapter's B tiles once for the group when its
rows share the adapter (rows come grouped by adapter).
"""

import torch
import triton
import triton.language as tl

from ops.pdl import resolve, wait_then_release
from ops.sizes import cdiv, next_pow2
from ops.triton_lora_fold import LoraFold, fold_args

_BLOCK = 1024
# A fold program's rows and columns. In a sweep on the H200 (benchmarks/fold_bench.py, RESULTS.md,
# twelfth session) 8 x 64 at 4 warps was the fastest over 8 split-K partials (8.6 against 12.3
# us a launch at batch 32 over 8 adapters for a row of 256 columns a program); over the one
# split serving now hands it (ops.lora.fold_presum) the two measured alike (8.6 against 8.2).
FOLD_GROUP = 8
_FOLD_BLOCK = 64
_FOLD_WARPS = 4


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr,
    out_ptr,
    inter,
    stride_in,
    stride_out,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < inter
    wait_then_release(USE_PDL)
    gate_ptr = gate_up_ptr + row * stride_in + cols
    gate = tl.load(gate_ptr, mask=live, other=0.0).to(tl.float32)
    up = tl.load(gate_ptr + inter, mask=live, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(dtype), mask=live)


@triton.jit
def _fold_t_rows(t_rows, t_mask, R, stride_ts, GROUP: tl.constexpr, SPLITS: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """The group's t rows of the gate and up slices, their split-K partials summed:
    ([GROUP, BLOCK_R], [GROUP, BLOCK_R]) fp32."""
    t_gate = tl.zeros((GROUP, BLOCK_R), dtype=tl.float32)
    t_up = tl.zeros((GROUP, BLOCK_R), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        t_gate += tl.load(t_rows + s * stride_ts, mask=t_mask, other=0.0).to(tl.float32)
        t_up += tl.load(t_rows + s * stride_ts + R, mask=t_mask, other=0.0).to(tl.float32)
    return t_gate, t_up


@triton.jit(do_not_specialize=["num_rows"])
def _silu_mul_fold_kernel(
    gate_up_ptr,
    out_ptr,
    num_rows,
    inter,
    stride_in,
    stride_out,
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
    BLOCK: tl.constexpr,
    GROUP: tl.constexpr,
    FOLD: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    EVEN_R: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """GROUP rows of BLOCK columns a program, all loaded at once. When the group's rows with an
    adapter share one (rows come grouped by adapter), its B tiles are loaded once for them all;
    else each row gathers its own (rows of one adapter share them through L1)."""
    rows = tl.program_id(0) * GROUP + tl.arange(0, GROUP)
    r_in = rows < num_rows
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < inter
    offs_r = tl.arange(0, BLOCK_R)
    r_live = offs_r < R
    dtype = out_ptr.dtype.element_ty
    # Before the wait (PDL): the rows' adapters, scalings and B tiles, which no kernel of the
    # layers writes; after it, gate_up and t.
    slots = tl.load(rslot_ptr + rows, mask=r_in, other=-1)
    lora = slots >= 0
    slot_safe = tl.maximum(slots, 0).to(tl.int64)
    t_rows = (t_ptr + rows[:, None].to(tl.int64) * stride_tm + slot_safe[:, None] * stride_tslot
              + offs_r[None, :])
    t_mask = lora[:, None] & r_live[None, :]
    scale_gate = tl.load(scal_ptr + slot_safe * stride_ss, mask=lora, other=0.0)
    scale_up = tl.load(scal_ptr + slot_safe * stride_ss + stride_si, mask=lora, other=0.0)
    xy = rows[:, None].to(tl.int64) * stride_in + cols[None, :]
    xy_mask = r_in[:, None] & live[None, :]
    first = tl.min(tl.where(lora, slots, 2147483647), axis=0)
    last = tl.max(slots, axis=0)
    b_cols = cols[:, None].to(tl.int64) * stride_bn + offs_r[None, :]
    b_mask = live[:, None] & r_live[None, :]
    # (the branches name their tiles apart: the compiler unifies a name's type across them)
    if first == last:  # one adapter: its B tiles once for the group
        b_one = b_ptr + first.to(tl.int64) * stride_bs + b_cols
        bg1 = tl.load(b_one, mask=b_mask, other=0.0).to(tl.float32)
        bu1 = tl.load(b_one + inter * stride_bn, mask=b_mask, other=0.0).to(tl.float32)
        wait_then_release(USE_PDL)
        t_gate, t_up = _fold_t_rows(t_rows, t_mask, R, stride_ts, GROUP, SPLITS, BLOCK_R)
        d_gate = tl.sum(t_gate[:, None, :] * bg1[None, :, :], axis=2)
        d_up = tl.sum(t_up[:, None, :] * bu1[None, :, :], axis=2)
    else:  # each row its own B tiles (none for base rows)
        b_rows = b_ptr + slot_safe[:, None, None] * stride_bs + b_cols[None, :, :]
        g_mask = lora[:, None, None] & b_mask[None, :, :]
        bgr = tl.load(b_rows, mask=g_mask, other=0.0).to(tl.float32)
        bur = tl.load(b_rows + inter * stride_bn, mask=g_mask, other=0.0).to(tl.float32)
        wait_then_release(USE_PDL)
        t_gate, t_up = _fold_t_rows(t_rows, t_mask, R, stride_ts, GROUP, SPLITS, BLOCK_R)
        d_gate = tl.sum(t_gate[:, None, :] * bgr, axis=2)
        d_up = tl.sum(t_up[:, None, :] * bur, axis=2)
    gate = tl.load(gate_up_ptr + xy, mask=xy_mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + xy + inter, mask=xy_mask, other=0.0).to(tl.float32)
    gate = (gate + tl.where(lora[:, None], d_gate * scale_gate[:, None], 0.0)).to(dtype)
    up = (up + tl.where(lora[:, None], d_up * scale_up[:, None], 0.0)).to(dtype)
    gate = gate.to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :],
             (act * up.to(tl.float32)).to(dtype), mask=xy_mask)


def silu_mul_triton(
    gate_up: torch.Tensor, out: torch.Tensor | None = None, fold: LoraFold | None = None,
    pdl: bool | None = None,
) -> torch.Tensor:
    """SiLU(gate_up[:, :inter]) * gate_up[:, inter:].

    gate_up: [T, 2 * inter] (rows contiguous, any row stride), bf16/fp16/fp32.
    out: optional [T, inter] buffer (rows contiguous) in gate_up's dtype.
    fold: gate_up's LoRA delta (two slices: gate, up), added to the values as they are loaded.
    pdl: programmatic dependent launch (ops/pdl.py; None:
    inside decode graph captures, unless LORASERVE_LAYER_PDL=0).
    Returns out: [T, inter] in gate_up's dtype.
    """
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [T, 2 * inter], got {tuple(gate_up.shape)}")
    if gate_up.stride(1) != 1:
        raise ValueError("gate_up rows must be contiguous")
    num_rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    if out is None:
        out = torch.empty((num_rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    if out.shape != (num_rows, inter) or out.dtype != gate_up.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be [T={num_rows}, {inter}] in {gate_up.dtype}, rows "
                         f"contiguous, got {tuple(out.shape)} {out.dtype}")
    if out.device != gate_up.device:
        raise ValueError("out must be on gate_up's device")
    if fold is not None:
        fold.check(gate_up)
        if fold.slice_offsets != (0, inter, 2 * inter):
            raise ValueError(f"fold slices {fold.slice_offsets} are not gate and up")
    if num_rows == 0 or inter == 0:
        return out
    pdl = resolve(pdl, gate_up)
    if fold is None:
        block = min(_BLOCK, next_pow2(inter))
        # 8 bf16 (16 bytes) per thread for each of gate and up
        _silu_mul_kernel[(num_rows, cdiv(inter, block))](
            gate_up, out, inter, gate_up.stride(0), out.stride(0), BLOCK=block, USE_PDL=pdl,
            num_warps=max(1, min(4, block // 256)), launch_pdl=pdl,
        )
        return out
    fold_launch(gate_up, out, fold, pdl=pdl)
    return out


def fold_launch(gate_up: torch.Tensor, out: torch.Tensor, fold: LoraFold,
                group: int = FOLD_GROUP, block: int = _FOLD_BLOCK,
                num_warps: int = _FOLD_WARPS, pdl: bool = False) -> None:
    """Launch the SiLU*up fold (arguments checked by silu_mul_triton) with `group` rows and
    `block` columns a program (powers of two; other values for benchmarks.fold_bench)."""
    num_rows, inter = out.shape
    args, consts = fold_args(fold, gate_up)
    block = min(block, next_pow2(inter))
    _silu_mul_fold_kernel[(cdiv(num_rows, group), cdiv(inter, block))](
        gate_up, out, num_rows, inter, gate_up.stride(0), out.stride(0), *args, BLOCK=block,
        GROUP=group, **consts, USE_PDL=pdl, num_warps=num_warps, launch_pdl=pdl,
    )
