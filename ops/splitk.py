"""Split-K projections whose partials the next kernel sums (opt-in, decode graphs only).

At decode batches cuBLAS runs o_proj and down_proj split-K and reduces the slices in a launch
of its own: 64 launches a step for a 32-layer model. Here such a projection is one batched GEMM
over S slices of its input dimension with fp32 outputs, and add+RMSNorm, the next kernel in
either case, sums the S partials as it loads its input (ops/triton_rmsnorm.py
`add_rmsnorm_partials_triton`), rounding the sum to the stream's dtype as the GEMM would have
stored it.

`LORASERVE_DECODE_SPLITK=S` (S >= 2; unset or 0: off) turns it on for base-only decode graphs
on torch's own BLAS route, below LORASERVE_DECODE_CUBLASLT_MIN_BS rows (runtime/graphs.py
`graph_splits`). On the H200 (benchmarks/RESULTS.md) S=2 took 0.03-0.04 ms off the serving
loop's batch-1 step and added 0.03-0.06 ms at batch 32, where cuBLASLt's kernels do not split
K and the norms' fp32 loads cost more (twentieth session); at batches 1, 2, 4 and 8 the loop's
step was level with it (twenty-first session). So it stays off by default.
"""

from __future__ import annotations

import torch

from ops.scoped import ThreadSetting
from ops.settings import env_int

_splits = ThreadSetting(0)


def splitk_scope(splits: int):
    """Inside: the projections that allow it (runtime/model/llama.py `project`) return S fp32
    partials when S >= 2."""
    return _splits.set(splits)


def scope_splits() -> int:
    """The slices `splitk_scope` set (0 outside one): >= 2 only inside a base-only decode
    graph's capture whose o and down split."""
    return _splits.get()


def decode_splits() -> int:
    """LORASERVE_DECODE_SPLITK: the slices of base-only decode graphs' o and down projections
    (0: off, the default)."""
    splits = env_int("LORASERVE_DECODE_SPLITK", 0)
    if splits == 1 or splits < 0:
        raise ValueError(f"LORASERVE_DECODE_SPLITK: {splits} slices (0: off, or 2 and more)")
    return splits


def splitk_views(x: torch.Tensor, w: torch.Tensor, splits: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] and w [N, K] (contiguous) as `splits` slices of K, without copies:
    ([S, T, K/S], [S, K/S, N]), whose batched products sum to x @ w.T."""
    (t, k), n = x.shape, w.shape[0]
    if k % splits:
        raise ValueError(f"split-K: {k} columns do not split into {splits}")
    return (x.view(t, splits, k // splits).transpose(0, 1),
            w.view(n, splits, k // splits).permute(1, 2, 0))


def splitk_linear(x: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
    """The partials of x @ weight.T over `splits` slices of K: fp32 [S, T, N], one batched
    GEMM (fp32 outputs from 16-bit inputs through torch.bmm's out_dtype)."""
    xs, ws = splitk_views(x, weight, splits)
    if x.dtype == torch.float32:
        return torch.bmm(xs, ws)
    return torch.bmm(xs, ws, out_dtype=torch.float32)


def splits_for(linear: torch.nn.Module, x: torch.Tensor) -> int:
    """The slices `linear(x)` is split into in the current scope, or 0 (a plain projection)."""
    splits = _splits.get()
    if (splits < 2 or type(linear) is not torch.nn.Linear or linear.bias is not None
            or x.dim() != 2 or x.shape[1] % splits or not linear.weight.is_contiguous()):
        return 0
    return splits


def sum_partials(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The projection the partials [S, T, N] stand for, [T, N] in `dtype` (the torch paths;
    add+RMSNorm's kernel sums them as it loads them)."""
    return partials.sum(0).to(dtype)
