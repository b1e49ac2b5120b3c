"""RMSNorm on CUDA, optionally fused with the residual add before it: one launch per norm.

out = weight * norm(x + residual), with the sum rounded to the stream's dtype (and written back as
the new residual) before it is normalised, as the unfused `h = h + delta; norm(h)` does. The
normalisation runs in fp32 and its result is rounded to the input dtype before the weight scales
it, matching the torch RMSNorm in runtime/model/llama.py.

Grid: (T,), one program per row; the whole row sits in one block (hidden sizes up to 32K).

With a LoRA fold (ops/triton_lora_fold.py) x is a projection's output whose LoRA delta was not
added yet: the fused kernel adds it first, rounding x + delta to x's dtype as the expand would
have stored it. That kernel walks the row in chunks (the delta's B tile of a whole row would not
fit in registers), writes the new residual as it goes, then normalises the row it wrote.
"""

import torch
import triton
import triton.language as tl

from ops.sizes import next_pow2
from ops.triton_lora_fold import LoraFold, fold_args, fold_block, lora_fold_add, lora_fold_t

_MAX_BLOCK = 32768
_FOLD_CHUNK = 2048  # row elements a fold program adds the delta of at a time (at most)


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
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    live = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=live, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=live, other=0.0).to(tl.float32)
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
    N,
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    eps,
    t_ptr,
    b_ptr,
    scal_ptr,
    rslot_ptr,
    R,
    stride_ts,
    stride_tm,
    stride_bs,
    stride_bn,
    stride_ss,
    stride_si,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
    FOLD: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    EVEN_R: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dtype = res_out_ptr.dtype.element_ty
    slot = tl.load(rslot_ptr + row)
    t = lora_fold_t(t_ptr, row, 0, R, stride_ts, stride_tm, SPLITS, BLOCK_R, EVEN_R)
    sq = tl.zeros((CHUNK,), dtype=tl.float32)
    for c0 in range(0, N, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        live = offs < N
        x = tl.load(x_ptr + row * stride_x + offs, mask=live, other=0.0).to(tl.float32)
        x = lora_fold_add(x, b_ptr, scal_ptr, slot, t, 0, offs, live, R, stride_bs, stride_bn,
                          stride_ss, stride_si, x_ptr, BLOCK_R, EVEN_R)
        r = tl.load(res_ptr + row * stride_res + offs, mask=live, other=0.0).to(tl.float32)
        s = (x + r).to(dtype)
        tl.store(res_out_ptr + row * stride_res_out + offs, s, mask=live)
        s32 = s.to(tl.float32)
        sq += s32 * s32
    inv_rms = 1.0 / tl.sqrt_rn(tl.sum(sq, axis=0) / N + eps)
    tl.debug_barrier()  # the row's sums, written by every thread, are read back below
    offs = tl.arange(0, BLOCK)
    live = offs < N
    s = tl.load(res_out_ptr + row * stride_res_out + offs, mask=live, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=live, other=0.0).to(tl.float32)
    y = (s * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (y * w).to(out_ptr.dtype.element_ty), mask=live)


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
) -> None:
    num_rows, n = x.shape
    if num_rows == 0:
        return
    block = next_pow2(n)
    if fold is not None:
        assert residual is not None and res_out is not None
        args, consts = fold_args(fold, x)
        num_warps = max(1, min(16, block // 256))
        _add_rmsnorm_fold_kernel[(num_rows,)](
            x, residual, weight, out, res_out, n, x.stride(0), residual.stride(0), out.stride(0),
            res_out.stride(0), eps, *args, BLOCK=block,
            CHUNK=min(block, fold_block(fold, num_warps, _FOLD_CHUNK)), **consts,
            num_warps=num_warps,
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
        x.stride(0),
        res.stride(0),
        out.stride(0),
        res_o.stride(0),
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=num_warps,
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
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """weight * rmsnorm(x), normalised in fp32.

    x: [T, N] (rows contiguous, any row stride), bf16/fp16/fp32. weight: [N], x's dtype.
    out: optional [T, N] buffer (rows contiguous) in x's dtype.
    Returns out: [T, N] in x's dtype.
    """
    _check(x, weight)
    out = _output(out, x, "out")
    _launch(x, None, weight, eps, out, None)
    return out


def add_rmsnorm_triton(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    fold: LoraFold | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + residual (rounded to x's dtype); returns (weight * rmsnorm(s), s).

    x, residual: [T, N] (rows contiguous, any row stride), same dtype, bf16/fp16/fp32.
    weight: [N] in x's dtype. out, residual_out: optional [T, N] buffers (rows contiguous) in
    x's dtype for the norm and for s; residual_out may be residual itself (each element is read
    before it is written, by the same program). fold: x's LoRA delta, added to x first (x
    itself is not written). Returns (out, residual_out).
    """
    _check(x, weight)
    _check(residual, weight, "residual")
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    out = _output(out, x, "out")
    residual_out = _output(residual_out, x, "residual_out")
    if fold is not None:
        fold.check(x)
    _launch(x, residual, weight, eps, out, residual_out, fold)
    return out, residual_out
