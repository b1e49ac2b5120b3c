"""Row argmax on CUDA for greedy sampling: [B, V] logits -> [B] int64, in two launches.

torch's argmax reduces a row in one program: at batch 1 over Llama-3.1-8B's 128256 logits it
took 27 us on the H200, one SM reading the whole row. Here a row is spread over many programs.

Stage 1, grid (B, cdiv(V, BLOCK)): each program loads BLOCK entries of one row (fp32, bf16 or
fp16, upcast to fp32 after the load) and writes its maximum and the first index holding it to a
[B, nblocks] scratch (fp32 values, int32 indices). Stage 2, grid (B,): one program a row takes
the largest of the row's partials, ties to the smallest index; as each partial is the first
occurrence within its block and blocks follow the row's order, that is the row's first
occurrence, torch.argmax's rule.

NaN, as torch.argmax: a NaN ranks above every number, +inf included, and the first NaN of a row
wins. Both stages compare on a key with NaN replaced by +inf and, when the block (or the row's
partials) holds a NaN, only NaN entries are candidates; stage 1 stores NaN as the value of a
block that holds one. A row of -inf only returns 0 (every entry ties). -0.0 and 0.0 tie.

At V = 128256 a BLOCK of 4096 (8 warps, 16 fp32 a thread) is 32 programs a row at batch 1; B
rows make 32 B programs, and stage 2 reduces 32 partials a row.
"""

import torch
import triton
import triton.language as tl

from ops.dispatch import use_triton
from ops.sizes import cdiv, next_pow2

BLOCK = 4096
_MAX_WARPS = 8
_MAX_PARTIALS = 16384  # stage 2 holds a row's partials in one block
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT32_MAX = 2**31 - 1


@triton.jit
def _argmax_partial_kernel(
    x_ptr,
    val_ptr,
    idx_ptr,
    N,
    stride_x,
    nblocks,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    live = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=live, other=float("-inf")).to(tl.float32)
    is_nan = x != x  # noqa: PLR0124 (NaN is the one value unequal to itself)
    key = tl.where(is_nan, float("inf"), x)
    best = tl.max(key, axis=0)
    no_nan = tl.max(is_nan.to(tl.int32), axis=0) == 0
    # candidates: the NaNs when there is one, else the entries equal to the maximum
    hit = live & (is_nan | (no_nan & (key == best)))
    # every block has a live entry, so a hit: the index is < N
    idx = tl.min(tl.where(hit, offs, N), axis=0)
    val = tl.where(no_nan, best, float("nan"))
    tl.store(val_ptr + row * nblocks + blk, val)
    tl.store(idx_ptr + row * nblocks + blk, idx)


@triton.jit
def _argmax_final_kernel(
    val_ptr,
    idx_ptr,
    out_ptr,
    nblocks,
    PARTIALS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, PARTIALS)
    live = offs < nblocks
    v = tl.load(val_ptr + row * nblocks + offs, mask=live, other=float("-inf"))
    i = tl.load(idx_ptr + row * nblocks + offs, mask=live, other=0)
    is_nan = v != v  # noqa: PLR0124
    key = tl.where(is_nan, float("inf"), v)
    best = tl.max(key, axis=0)
    no_nan = tl.max(is_nan.to(tl.int32), axis=0) == 0
    hit = live & (is_nan | (no_nan & (key == best)))
    idx = tl.min(tl.where(hit, i, 2147483647), axis=0)
    tl.store(out_ptr + row, idx.to(tl.int64))


def _refusal(logits: torch.Tensor) -> str | None:
    """Why the kernels cannot take `logits`, or None."""
    if logits.dim() != 2:
        return f"logits must be [B, V], got {tuple(logits.shape)}"
    if logits.dtype not in _DTYPES:
        return f"logits must be float32, bfloat16 or float16, got {logits.dtype}"
    if logits.shape[1] == 0:
        return "logits have no columns: argmax of an empty row"
    if logits.shape[1] > _INT32_MAX:
        return f"rows of {logits.shape[1]} entries exceed int32 indices"
    if logits.stride(1) != 1:
        return "logits rows must be contiguous"
    return None


def _check(logits: torch.Tensor, block: int) -> None:
    refusal = _refusal(logits)
    if refusal is not None:
        raise ValueError(refusal)
    if block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    if cdiv(logits.shape[1], block) > _MAX_PARTIALS:
        raise ValueError(f"{cdiv(logits.shape[1], block)} blocks a row exceed the "
                         f"{_MAX_PARTIALS} stage 2 reduces: use a larger block")


def argmax_triton(
    logits: torch.Tensor, out: torch.Tensor | None = None, *, block: int = BLOCK
) -> torch.Tensor:
    """Index of each row's maximum, the first one on ties; NaN ranks above everything.

    logits: [B, V] (rows contiguous, any row stride), float32, bfloat16 or float16.
    out: optional [B] int64 buffer (contiguous) on logits' device.
    block: entries a stage-1 program reduces (a power of two); tests pass small ones.
    Returns out: [B] int64, equal to logits.argmax(dim=-1).
    """
    _check(logits, block)
    num_rows, n = logits.shape
    if out is None:
        out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    elif (out.shape != (num_rows,) or out.dtype != torch.int64 or out.device != logits.device
          or not out.is_contiguous()):
        raise ValueError(f"out must be [{num_rows}] int64 contiguous on {logits.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if num_rows == 0:
        return out
    nblocks = cdiv(n, block)
    vals = torch.empty((num_rows, nblocks), dtype=torch.float32, device=logits.device)
    idxs = torch.empty((num_rows, nblocks), dtype=torch.int32, device=logits.device)
    _argmax_partial_kernel[(num_rows, nblocks)](
        logits, vals, idxs, n, logits.stride(0), nblocks, BLOCK=block,
        num_warps=max(1, min(_MAX_WARPS, block // 512)),
    )
    partials = next_pow2(nblocks)
    _argmax_final_kernel[(num_rows,)](
        vals, idxs, out, nblocks, PARTIALS=partials,
        num_warps=max(1, min(_MAX_WARPS, partials // 256)),
    )
    return out


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1) of [B, V] logits: the Triton kernels where ops.dispatch.use_triton
    says so and they take the tensor (2-D, rows contiguous, a float dtype they read, V > 0),
    else torch."""
    if use_triton(logits) and _refusal(logits) is None:
        return argmax_triton(logits)
    return logits.argmax(dim=-1)
