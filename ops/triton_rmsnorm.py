"""RMSNorm on CUDA, optionally fused with the residual add before it: one launch per norm.

out = weight * norm(x + residual), with the sum rounded to the stream's dtype (and written back as
the new residual) before it is normalised, as the unfused `h = h + delta; norm(h)` does. The
normalisation runs in fp32 and its result is rounded to the input dtype before the weight scales
it, matching the torch RMSNorm in runtime/model/llama.py.

Grid: (T,), one program per row; the whole row sits in one block (hidden sizes up to 32K).

With a LoRA fold (ops/triton_lora_fold.py) x is a projection's output whose LoRA delta was not
added yet: the fold kernel adds it first, rounding x + delta to x's dtype as the expand would
have stored it. The delta's B tile of a whole row would not fit one program, and one program
would read it alone, so a row is cut over several programs (grid (T, parts)): each writes its
part of the new residual and its part's sum of squares, then counts itself in with an atomic;
the row's last program adds the sums in a fixed order (the result does not depend on which
program came last) and normalises the row.
"""

import torch
import triton
import triton.language as tl

from ops.pdl import resolve, wait_then_release
from ops.scratch import outgrow
from ops.sizes import cdiv, next_pow2
from ops.triton_lora_fold import (
    LoraFold,
    fold_args,
    fold_block,
    lora_fold_apply,
    lora_fold_b,
    lora_fold_t,
)

_MAX_BLOCK = 32768
_FOLD_COLS = 256  # row elements a fold program adds the delta of (at most)
_FOLD_WARPS = 4


@triton.jit
def load_x(ptrs, live, stride_xs, X_SPLITS: tl.constexpr, like_ptr):
    """A row's values of x in fp32: x itself, or the sum of its X_SPLITS fp32 split-K
    partials (`stride_xs` apart) rounded to like_ptr's dtype, as the projection's GEMM would
    have stored it."""
    x = tl.load(ptrs, mask=live, other=0.0).to(tl.float32)
    if X_SPLITS > 1:
        for sp in tl.static_range(1, X_SPLITS):
            x += tl.load(ptrs + sp * stride_xs, mask=live, other=0.0)
        x = x.to(like_ptr.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    N,
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    stride_xs,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
    X_SPLITS: tl.constexpr,  # x is this many fp32 partials to sum (split-K), or 1: x itself
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    live = offs < N
    w = tl.load(w_ptr + offs, mask=live, other=0.0).to(tl.float32)  # no kernel writes it
    wait_then_release(USE_PDL)
    x = load_x(x_ptr + row * stride_x + offs, live, stride_xs, X_SPLITS, res_out_ptr)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + offs, mask=live, other=0.0).to(tl.float32)
        # the residual stream is stored in its dtype: normalise the rounded sum
        s = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + offs, s, mask=live)
        x = s.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / N + eps)
    y = (x * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (y * w).to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _add_rmsnorm_fold_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    sums_ptr,
    count_ptr,
    N,
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    stride_sums,
    stride_xs,
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
    BLOCK: tl.constexpr,
    COLS: tl.constexpr,
    PARTS: tl.constexpr,
    FOLD: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    EVEN_R: tl.constexpr,
    USE_PDL: tl.constexpr,
    X_SPLITS: tl.constexpr = 1,  # x is this many fp32 partials to sum (split-K), or 1: x itself
):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    parts = tl.num_programs(1)
    dtype = res_out_ptr.dtype.element_ty
    offs = part * COLS + tl.arange(0, COLS)
    live = offs < N
    # before the wait (PDL): the row's adapter and its B rows, which no kernel of the layers
    # writes; after it, x, t and the residual
    slot = tl.load(rslot_ptr + row)
    b = lora_fold_b(b_ptr, slot, offs, live, R, stride_bs, stride_bn, BLOCK_R, EVEN_R)
    wait_then_release(USE_PDL)
    t = lora_fold_t(t_ptr, row, slot, 0, R, stride_ts, stride_tm, stride_tslot, SPLITS, BLOCK_R,
                    EVEN_R)
    x = load_x(x_ptr + row * stride_x + offs, live, stride_xs, X_SPLITS, res_out_ptr)
    x = lora_fold_apply(x, b, t, scal_ptr, slot, 0, live, stride_ss, stride_si, res_out_ptr)
    r = tl.load(res_ptr + row * stride_res + offs, mask=live, other=0.0).to(tl.float32)
    s = (x + r).to(dtype)
    tl.store(res_out_ptr + row * stride_res_out + offs, s, mask=live)
    s32 = s.to(tl.float32)
    tl.store(sums_ptr + row * stride_sums + part, tl.sum(s32 * s32, axis=0))
    # every thread's stores above, then one release of them with the arrival count
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + row, 1, sem="acq_rel", scope="gpu")
    if arrived == parts - 1:  # the row's last program: the other parts' stores are visible
        offs_p = tl.arange(0, PARTS)
        sums = tl.load(sums_ptr + row * stride_sums + offs_p, mask=offs_p < parts, other=0.0,
                       cache_modifier=".cg")
        inv_rms = 1.0 / tl.sqrt_rn(tl.sum(sums, axis=0) / N + eps)
        # (names of their own: the compiler unifies a name's type across the branch)
        offs_row = tl.arange(0, BLOCK)
        in_row = offs_row < N
        s_row = tl.load(res_out_ptr + row * stride_res_out + offs_row, mask=in_row, other=0.0,
                        cache_modifier=".cg").to(tl.float32)
        w = tl.load(w_ptr + offs_row, mask=in_row, other=0.0).to(tl.float32)
        y = (s_row * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * stride_out + offs_row, (y * w).to(out_ptr.dtype.element_ty),
                 mask=in_row)
        tl.store(count_ptr + row, 0)  # ready for the next launch


# The fold kernel's per-row scratch, by (device, stream): partial sums of squares and arrival
# counts (zero between launches: each row's last program resets its count). Captured graphs
# keep pointers to it, so it only ever grows, and an outgrown one is kept alive.
_fold_scratch: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_fold_scratch_outgrown: list[tuple[torch.Tensor, torch.Tensor]] = []


def _fold_scratch_for(device: torch.device, rows: int, parts: int):
    """(sums [>= rows, >= parts] fp32, counts [>= rows] int32) for launches on the current
    stream of `device`; allocated outside CUDA graph captures only (the warm-up forwards
    before a capture allocate it)."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device, stream)
    have = _fold_scratch.get(key)
    if have is not None and have[1].shape[0] >= rows and have[0].shape[1] >= parts:
        return have
    outgrow(device, have, _fold_scratch_outgrown, "add+RMSNorm fold: the scratch")
    if have is not None:
        rows, parts = max(rows, have[1].shape[0]), max(parts, have[0].shape[1])
    have = (torch.zeros((rows, parts), dtype=torch.float32, device=device),
            torch.zeros((rows,), dtype=torch.int32, device=device))
    _fold_scratch[key] = have
    return have


def _check(x: torch.Tensor, weight: torch.Tensor, name: str = "x") -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be [T, N], got {tuple(x.shape)}")
    if weight.shape != (x.shape[1],):
        raise ValueError(f"weight must be [N={x.shape[1]}], got {tuple(weight.shape)}")
    if x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError(f"{name} rows and weight must be contiguous")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) must match {name} "
                         f"({x.dtype}, {x.device})")
    if x.shape[1] > _MAX_BLOCK:
        raise ValueError(f"rows of {x.shape[1]} elements exceed the kernel's {_MAX_BLOCK}")


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    res_out: torch.Tensor | None,
    fold: LoraFold | None = None,
    pdl: bool | None = None,
) -> None:
    num_rows, n = x.shape[-2:]  # x may be split-K partials [S, T, N]
    if num_rows == 0:
        return
    block = next_pow2(n)
    pdl = resolve(pdl, x)
    if fold is not None:
        assert residual is not None and res_out is not None
        args, consts = fold_args(fold, x)
        cols = min(block, fold_block(fold, _FOLD_WARPS, _FOLD_COLS))
        parts = cdiv(n, cols)
        sums, counts = _fold_scratch_for(x.device, num_rows, next_pow2(parts))
        _add_rmsnorm_fold_kernel[(num_rows, parts)](
            x, residual, weight, out, res_out, sums, counts, n, x.stride(-2), residual.stride(0),
            out.stride(0), res_out.stride(0), sums.stride(0), x.stride(0) if x.dim() == 3 else 0,
            eps, *args, BLOCK=block, COLS=cols, PARTS=next_pow2(parts), **consts, USE_PDL=pdl,
            X_SPLITS=x.shape[0] if x.dim() == 3 else 1, num_warps=_FOLD_WARPS, launch_pdl=pdl,
        )
        return
    # One warp per 512 elements: at hidden 4096 in bf16, 8 warps and two 16-byte loads in
    # flight per thread for each of x and residual.
    num_warps = max(1, min(16, block // 512))
    res = residual if residual is not None else x
    res_o = res_out if res_out is not None else out
    _rmsnorm_kernel[(num_rows,)](
        x,
        res,
        weight,
        out,
        res_o,
        n,
        x.stride(-2),
        res.stride(0),
        out.stride(0),
        res_o.stride(0),
        x.stride(0) if x.dim() == 3 else 0,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        USE_PDL=pdl,
        X_SPLITS=x.shape[0] if x.dim() == 3 else 1,
        num_warps=num_warps,
        launch_pdl=pdl,
    )


def _output(out: torch.Tensor | None, x: torch.Tensor, name: str) -> torch.Tensor:
    if out is None:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"{name} must be {tuple(x.shape)} {x.dtype} on {x.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if out.stride(1) != 1:
        raise ValueError(f"{name} rows must be contiguous")
    return out


def rmsnorm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None,
    pdl: bool | None = None,
) -> torch.Tensor:
    """weight * rmsnorm(x), normalised in fp32.

    x: [T, N] (rows contiguous, any row stride), bf16/fp16/fp32. weight: [N], x's dtype.
    out: optional [T, N] buffer (rows contiguous) in x's dtype.
    pdl: programmatic dependent launch (ops/pdl.py; None:
    inside decode graph captures, unless LORASERVE_LAYER_PDL=0).
    Returns out: [T, N] in x's dtype.
    """
    _check(x, weight)
    out = _output(out, x, "out")
    _launch(x, None, weight, eps, out, None, pdl=pdl)
    return out


def add_rmsnorm_triton(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    fold: LoraFold | None = None,
    pdl: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + residual (rounded to x's dtype); returns (weight * rmsnorm(s), s).

    x, residual: [T, N] (rows contiguous, any row stride), same dtype, bf16/fp16/fp32.
    weight: [N] in x's dtype. out, residual_out: optional [T, N] buffers (rows contiguous) in
    x's dtype for the norm and for s; residual_out may be residual itself (each element is read
    before it is written, by the same program). fold: x's LoRA delta, added to x first (x
    itself is not written). pdl: programmatic dependent launch (ops/pdl.py; None: inside
    decode graph captures, unless LORASERVE_LAYER_PDL=0). Returns (out, residual_out).
    """
    _check(x, weight)
    _check(residual, weight, "residual")
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    out = _output(out, x, "out")
    residual_out = _output(residual_out, x, "residual_out")
    if fold is not None:
        fold.check(x)
    _launch(x, residual, weight, eps, out, residual_out, fold, pdl)
    return out, residual_out


def add_rmsnorm_partials_triton(
    partials: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    fold: LoraFold | None = None,
    pdl: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rmsnorm_triton for a projection left as split-K partials: x = the sum of
    `partials` (fp32 [S, T, N], rows contiguous, any row and split strides; ops.splitk),
    rounded to residual's dtype as the projection's GEMM would have stored it, plus fold's
    delta when given (rounded as there), then s = x + residual as there. Returns
    (weight * rmsnorm(s), s), both new [T, N] in residual's dtype."""
    if partials.dim() != 3 or partials.dtype != torch.float32 or partials.stride(2) != 1:
        raise ValueError(f"partials must be fp32 [S, T, N] with contiguous rows, got "
                         f"{partials.dtype} {tuple(partials.shape)}")
    _check(residual, weight, "residual")
    if partials.shape[1:] != residual.shape or partials.device != residual.device:
        raise ValueError(f"partials {tuple(partials.shape)} on {partials.device} must be "
                         f"[S, *{tuple(residual.shape)}] on {residual.device}")
    if fold is not None:
        fold.check(residual)
    out = _output(None, residual, "out")
    residual_out = _output(None, residual, "residual_out")
    _launch(partials, residual, weight, eps, out, residual_out, fold, pdl)
    return out, residual_out
