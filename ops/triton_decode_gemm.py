"""Decode projections of 2-64 rows on tensor cores, launched with PDL (decode graphs of 2-32
rows by default: LORASERVE_DECODE_GEMM).

ops/triton_decode_gemv.py holds a program's whole slice of W in registers before its PDL wait;
that is one row's sums on the CUDA cores, slower than cuBLAS from 2 rows on. Here y = x W^T runs
as MMAs with W's rows as the MMA's M (y^T = W x^T: a decode batch is too thin to fill an M of
64, W's rows are not), x's rows padded to 16, 32 or 64 as the MMA's N. Each program owns
BLOCK_N of W's rows (over a slice of K when split, below) and loads its first PRE_K columns of
them before the wait for the kernel ahead (ops/pdl.py): W is no kernel's output. After the
wait it reads x, lets the next kernel launch, and streams the rest of its W rows in BLOCK_K
tiles through Triton's software pipeline.

`split` > 1 gives each program a 1/split slice of K and returns fp32 partials [split, M, N]
that the next add+RMSNorm sums (ops/splitk.py, ops/triton_rmsnorm.py
`add_rmsnorm_partials_triton`): for o and down, whose N alone makes too few programs.

On the H200 at batch 32 (benchmarks/RESULTS.md, twenty-ninth session) the default tiling
behind add+RMSNorm took qkv 16.9 us against cuBLAS's 19.1, o as two slices 10.5 against 14.0
alone, down as two slices 30.3 against 34.0; loading 256 columns ahead of the wait (PRE_K)
was slower, since it leaves shared memory for one stage fewer. The serving loop's base step
at batch 32 took 4.85 ms against 5.04.

gate_up, above MAX_WEIGHT_ELEMS, runs here with SiLU*up in the epilogue (`SILU_MUL`,
`decode_gemm_silu_mul`): a program's tile is BLOCK_N / 2 of gate's rows over the matching up
rows, so one MMA accumulates both factors of its columns of SiLU(gate) * up, and the SiLU*up
launch and gate_up's intermediate go. LORASERVE_DECODE_GATE_UP (default 1) sends decode
graphs' gate_up here where it has no LoRA in the step, at LORASERVE_DECODE_GATE_UP_TILE
(default DEFAULT_GATE_UP_TILING). Thirty-third session (H200, one process each): the serving
loop's base step at batch 32 took 4.66-4.69 ms against 4.79-4.86 without, in three rounds.
Larger weights without it (gate_up's LoRA stacks: its rows over every slot's A) run here at
LORASERVE_DECODE_GEMM_LARGE's tiling (default DEFAULT_LARGE_TILING; 0: cuBLAS): the 8-slot
pool's 8-adapter loop step took 5.19-5.20 ms against 5.29-5.31 on cuBLAS.

`LORASERVE_DECODE_GEMM=R` (default 32; 0: off) sends the projections of decode graphs of
2..R rows here on CUDA sm_90+ (runtime/model/llama.py `takes_gemm`): base projections and
LoRA groups' stacks (the base rows over every slot's A), where the tiling divides K and the
weight has at most MAX_WEIGHT_ELEMS elements; others stay on cuBLAS.
`LORASERVE_DECODE_GEMM_TILE=BLOCK_N:BLOCK_K:PRE_K:WARPS:STAGES` overrides the tiling and
`LORASERVE_DECODE_GEMM_SPLIT=S` (default 2; 1: unsplit) splits base-only graphs' o and down
(runtime/graphs.py `graph_splits`). Thirtieth session (H200, one process each): with it the
serving loop's base step at batch 32 took 4.70 ms against 4.98 without (1.28 of the floor
against 1.36), the 8-adapter step in the 8-slot pool 1.14 of that base in the loop (1.11 in
the graph) against 1.11 (1.14) of the slower one.

`LORASERVE_DECODE_GEMM_TMA` (default 1; 0: off) sends the wrappers' unfolded launches on CUDA
sm_90+ in 16-bit dtypes to ops/gluon_decode_gemm.py: the same products with W's first tiles
copied before the PDL wait, which this kernel's pipeline cannot place there (H200, batch 32's
loop step: 4.583-4.584 ms against 4.655-4.693 in one call, level in another, the graph forward
faster in every pair; benchmarks/RESULTS.md, forty-third session).

Down's GEMM computing SiLU(gate) * up as it loaded its input from gate_up (one launch fewer a
layer) was bit for bit the two kernels, but every program recomputed SiLU over its slice of K:
the serving loop's base step at batch 32 took 6.23 ms against 4.80 (thirty-first session), and
it was removed.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ops.dispatch import num_sms
from ops.settings import env_flag, env_int
from ops.sizes import cdiv, next_pow2
from ops.triton_decode_gemv import decode_gemv_rows

log = logging.getLogger(__name__)

MAX_ROWS = 64
DEFAULT_TILING = (64, 256, 0, 4, 4)  # BLOCK_N, BLOCK_K, PRE_K, warps, stages
SMEM_BUDGET = 200 * 1024  # the pipeline's shared memory a program may take (H200: 227 KB)
# Weights of more elements take LORASERVE_DECODE_GEMM_LARGE's tiling (or cuBLAS, with it 0):
# gate_up (28672 x 4096) alone streamed at 96-97 % of copy bandwidth on cuBLAS at batch 32, at
# 89-94 % here at the default tiling (H200, benchmarks/RESULTS.md).
MAX_WEIGHT_ELEMS = 64 << 20


@triton.jit
def _decode_gemm_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K_STEPS,  # K / BLOCK_K: the grid's slices (axis 1) take as even shares of them as divide
    stride_xm,
    stride_wn,
    stride_ys,
    stride_ym,
    MP: tl.constexpr,  # x's rows padded to a power of two >= 16
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRE_K: tl.constexpr,  # columns of W loaded before the wait (a multiple of BLOCK_K, or 0)
    HAS_BIAS: tl.constexpr,
    USE_PDL: tl.constexpr,
    EVEN_N: tl.constexpr,  # BLOCK_N divides N
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), else "tf32" (unused for 16-bit)
    STAGES: tl.constexpr,  # W and x tiles in flight in the loop (Triton's software pipeline)
    SILU_MUL: tl.constexpr,  # W is gate_up [2N, K]: y = SiLU(gate) * up [M, N] (no bias, split)
    # gate_up's LoRA added before SiLU (with SILU_MUL; `GateUpFold`): t's partials
    # [T_SPLITS, M, num_slots * 2R] from the kernel ahead, B [num_slots, 2N, R], scalings
    # [num_slots, 2], each row's slot (-1: none)
    t_ptr=None, fb_ptr=None, scal_ptr=None, rslot_ptr=None, R=0, stride_tsplit=0,
    stride_tm=0, t_slot_stride=0, stride_bs=0, stride_bn=0, stride_ss=0, stride_si=0,
    NUM_SLOTS=1,
    FOLD: tl.constexpr = False,
    T_SPLITS: tl.constexpr = 1,
    BLOCK_R: tl.constexpr = 16,  # R padded to a power of two
    BLOCK_C: tl.constexpr = 64,  # slots' rank columns an MMA of the epilogue takes
    FOLD_STAGES: tl.constexpr = 1,  # the epilogue's B and t tiles in flight
    EVEN_R: tl.constexpr = False,  # R == BLOCK_R
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    k_base = (pid_s * K_STEPS // n_split) * BLOCK_K
    k_len = ((pid_s + 1) * K_STEPS // n_split) * BLOCK_K - k_base
    if SILU_MUL:
        # BLOCK_N / 2 gate rows over the matching up rows (N further on) in one tile: an MMA
        # whose output holds both factors of the program's BLOCK_N / 2 columns of y
        offs_r = tl.arange(0, BLOCK_N)
        offs_n = pid_n * (BLOCK_N // 2) + offs_r % (BLOCK_N // 2)
        w_idx = offs_n + (offs_r >= BLOCK_N // 2).to(tl.int32) * N
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        w_idx = offs_n
    offs_m = tl.arange(0, MP)
    if EVEN_N:
        n_live = tl.full((BLOCK_N,), 1, tl.int1)
    else:
        n_live = offs_n < N
    m_live = offs_m < M
    w_rows = w_ptr + w_idx[:, None].to(tl.int64) * stride_wn + k_base
    x_rows = x_ptr + offs_m[:, None] * stride_xm + k_base
    acc = tl.zeros((BLOCK_N, MP), dtype=tl.float32)
    if PRE_K > 0:
        # W is no kernel's output: its first PRE_K columns are in flight before the wait
        offs_p = tl.arange(0, PRE_K)
        w0 = tl.load(w_rows + offs_p[None, :], mask=n_live[:, None], other=0.0)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_live, other=0.0).to(tl.float32)
    if USE_PDL:
        if not FOLD:
            gdc_wait()  # x comes from the kernel ahead
        # (FOLD: the kernel ahead is t's GEMM, which waited for x's producer before it let
        # this grid launch, so x is complete; this grid waits for t before its epilogue)
        gdc_launch_dependents()
    if PRE_K > 0:
        x0 = tl.load(x_rows + offs_p[None, :], mask=m_live[:, None], other=0.0)
        acc = tl.dot(w0, tl.trans(x0), acc, input_precision=PRECISION)
    offs_k = tl.arange(0, BLOCK_K)
    for k in tl.range(PRE_K, k_len, BLOCK_K, num_stages=STAGES):
        w = tl.load(w_rows + k + offs_k[None, :], mask=n_live[:, None], other=0.0)
        x = tl.load(x_rows + k + offs_k[None, :], mask=m_live[:, None], other=0.0)
        acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += bias[:, None]
    if SILU_MUL:
        # as the projection stores gate_up and ops/triton_silu_mul.py computes from it: each
        # factor rounded to y's dtype, SiLU in fp32 rounded before the product
        dtype = y_ptr.dtype.element_ty
        if FOLD:
            # as ops/triton_silu_mul.py's fold: each value's delta added to it as the projection
            # stored it, the sum rounded to y's dtype (t rounded as the stacked GEMM stores it).
            # The delta as MMAs over every slot's rank columns (B [tile rows, slots * R] by t
            # [rows, slots * R], each row's t kept in its own slot's columns, zero elsewhere):
            # one for gate's t and one for up's, each tile row taking its half's
            if USE_PDL:
                gdc_wait()  # t comes from the kernel ahead
            slots = tl.load(rslot_ptr + offs_m, mask=m_live, other=-1)
            up_row = offs_r >= BLOCK_N // 2  # each tile row's slice: gate or up
            offs_c = tl.arange(0, BLOCK_C)
            # (each slot's rank columns as whole runs of BLOCK_R, so that B's and t's tiles load
            # as vectors and Triton's pipeline copies them ahead)
            c_rank = offs_c % BLOCK_R
            d_gate = tl.zeros((BLOCK_N, MP), dtype=tl.float32)
            d_up = tl.zeros((BLOCK_N, MP), dtype=tl.float32)
            t_rows = t_ptr + offs_m[:, None].to(tl.int64) * stride_tm
            for c0 in tl.range(0, NUM_SLOTS * BLOCK_R, BLOCK_C, num_stages=FOLD_STAGES):
                c_slot = c0 // BLOCK_R + offs_c // BLOCK_R
                if EVEN_R:
                    c_live = c_slot < NUM_SLOTS
                else:
                    c_live = (c_slot < NUM_SLOTS) & (c_rank < R)
                bv = tl.load(fb_ptr + c_slot[None, :].to(tl.int64) * stride_bs
                             + w_idx[:, None].to(tl.int64) * stride_bn + c_rank[None, :],
                             mask=n_live[:, None] & c_live[None, :], other=0.0)
                own = (slots[:, None] == c_slot[None, :]) & c_live[None, :]
                t_cols = t_rows + c_slot[None, :].to(tl.int64) * t_slot_stride + c_rank[None, :]
                tg = tl.zeros((MP, BLOCK_C), dtype=tl.float32)
                tu = tl.zeros((MP, BLOCK_C), dtype=tl.float32)
                for sp in tl.static_range(T_SPLITS):
                    tg += tl.load(t_cols + sp * stride_tsplit, mask=own, other=0.0).to(tl.float32)
                    tu += tl.load(t_cols + sp * stride_tsplit + R, mask=own,
                                  other=0.0).to(tl.float32)
                tg = tg.to(bv.dtype)
                tu = tu.to(bv.dtype)
                d_gate = tl.dot(bv, tl.trans(tg), d_gate, input_precision=PRECISION)
                d_up = tl.dot(bv, tl.trans(tu), d_up, input_precision=PRECISION)
            lora = slots >= 0
            s_safe = tl.maximum(slots, 0).to(tl.int64)
            live2 = n_live[:, None] & lora[None, :]
            scale = tl.load(scal_ptr + s_safe[None, :] * stride_ss
                            + up_row[:, None].to(tl.int64) * stride_si, mask=live2, other=0.0)
            delta = tl.where(up_row[:, None], d_up, d_gate)
            acc = acc.to(dtype).to(tl.float32) + tl.where(live2, delta * scale, 0.0)
        gate, up = tl.split(tl.permute(tl.reshape(acc, (2, BLOCK_N // 2, MP)), (1, 2, 0)))
        gate = gate.to(dtype).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        out = act * up.to(dtype).to(tl.float32)
        offs_c = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        y = y_ptr + offs_m[None, :] * stride_ym + offs_c[:, None]
        tl.store(y, out.to(dtype), mask=(offs_c < N)[:, None] & m_live[None, :])
    else:
        y = y_ptr + pid_s * stride_ys + offs_m[None, :] * stride_ym + offs_n[:, None]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=n_live[:, None] & m_live[None, :])


def tma_gemm_on() -> bool:
    """LORASERVE_DECODE_GEMM_TMA (default 1; 0: off): the wrappers' unfolded launches on CUDA
    sm_90+ in 16-bit dtypes run ops/gluon_decode_gemm.py's kernel (read once a process). By
    default only where Triton has Gluon (3.5 or later); set to 1, a Triton without it is an
    error naming the setting."""
    return _tma_flag()


@functools.lru_cache(maxsize=1)
def _tma_flag() -> bool:
    return env_flag("LORASERVE_DECODE_GEMM_TMA", True)


def tma_gate_up_on() -> bool:
    """LORASERVE_DECODE_GEMM_TMA_GATE_UP (default 1; 0: `decode_gemm_silu_mul` keeps the
    Triton kernel while the other projections take ops/gluon_decode_gemm.py's)."""
    return _tma_gate_up_flag()


@functools.lru_cache(maxsize=1)
def _tma_gate_up_flag() -> bool:
    return env_flag("LORASERVE_DECODE_GEMM_TMA_GATE_UP", True)


def tma_gemm_state() -> str:
    """What runs the unfolded decode GEMMs on CUDA (for benchmark records): "gluon", "gluon,
    gate_up on triton" (LORASERVE_DECODE_GEMM_TMA_GATE_UP=0) or "triton" (the setting off, or a
    Triton without Gluon)."""
    if not tma_gemm_on() or _tma_takes_fn() is None:
        return "triton"
    return "gluon" if tma_gate_up_on() else "gluon, gate_up on triton"


@functools.lru_cache(maxsize=1)
def _tma_takes_fn():
    """ops/gluon_decode_gemm.py's `tma_takes`, or None where Triton has no Gluon and the
    setting is the default (the Triton kernel then, said once in the log)."""
    try:
        from ops.gluon_decode_gemm import tma_takes
    except ImportError as e:
        if os.environ.get("LORASERVE_DECODE_GEMM_TMA", "").strip() == "1":
            raise RuntimeError(f"LORASERVE_DECODE_GEMM_TMA=1 needs Triton's Gluon (Triton 3.5 "
                               f"or later; this one: {triton.__version__}): {e}") from e
        log.warning("decode GEMM: Triton %s has no Gluon (%s); the Triton kernel runs every "
                    "projection (LORASERVE_DECODE_GEMM_TMA=0 says so and hides this)",
                    triton.__version__, e)
        return None
    return tma_takes


def _tma(x: torch.Tensor, weight: torch.Tensor, tile) -> bool:
    """Whether this launch goes to ops/gluon_decode_gemm.py (LORASERVE_DECODE_GEMM_TMA, on by
    default: CUDA operands its copies take, nothing loaded ahead by PRE_K and W's tile rows in
    whole warpgroup MMAs: 16 a warp). That module needs Triton's Gluon: imported only here."""
    block_n, _, pre_k, warps, _ = tile
    if not (x.is_cuda and tma_gemm_on() and pre_k == 0 and block_n % (16 * warps) == 0):
        return False
    takes = _tma_takes_fn()
    return takes is not None and takes(x, weight)


def tma_gemm_launch(*args, **kw) -> None:
    """ops/gluon_decode_gemm.py `tma_gemm_launch` (imported at the first launch)."""
    from ops.gluon_decode_gemm import tma_gemm_launch as launch

    launch(*args, **kw)


def gemm_tiling(spec: str | None = None) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, PRE_K, warps, stages) from `spec` or LORASERVE_DECODE_GEMM_TILE
    ("64:128:256:4:4"), else DEFAULT_TILING."""
    spec = spec or os.environ.get("LORASERVE_DECODE_GEMM_TILE", "")
    if not spec:
        return DEFAULT_TILING
    parts = spec.split(":")
    try:
        block_n, block_k, pre_k, warps, stages = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"decode GEMM tiling {spec!r}: want BLOCK_N:BLOCK_K:PRE_K:WARPS:STAGES "
                         "(integers)") from None
    for name, v in (("BLOCK_N", block_n), ("BLOCK_K", block_k)):
        if v < 16 or v != next_pow2(v):
            raise ValueError(f"decode GEMM tiling {spec!r}: {name} must be a power of two >= 16")
    if pre_k < 0 or pre_k % block_k or (pre_k and pre_k != next_pow2(pre_k)):
        raise ValueError(f"decode GEMM tiling {spec!r}: PRE_K must be 0 or a power-of-two "
                         "multiple of BLOCK_K")
    if warps < 1 or stages < 1:
        raise ValueError(f"decode GEMM tiling {spec!r}: warps and stages must be >= 1")
    return block_n, block_k, pre_k, warps, stages


def gemm_fits(rows: int, k_dim: int, split: int = 1, tiling=None) -> bool:
    """Whether `decode_gemm` takes `rows` x `k_dim` over `split` slices at this tiling: K in
    whole BLOCK_K steps, each slice at least a step and PRE_K's columns (slices take
    K / BLOCK_K / split steps, rounded down or up)."""
    _, block_k, pre_k, _, _ = tiling or gemm_tiling()
    if not 1 <= rows <= MAX_ROWS or split < 1 or k_dim % block_k:
        return False
    least = (k_dim // block_k // split) * block_k
    return least >= max(block_k, pre_k)


def check_operands(name: str, x: torch.Tensor, weight: torch.Tensor, split: int,
                   tile: tuple[int, int, int, int, int]) -> None:
    """Raise ValueError unless x [M, K] and weight [N, K] are `name`'s to take over `split`
    slices of K at `tile`: 1 <= M <= MAX_ROWS, K tiled, x's rows and weight contiguous, one
    dtype."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not multiply")
    rows, k_dim = x.shape
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"{name} takes 1 to {MAX_ROWS} rows, got {rows}")
    if not gemm_fits(rows, k_dim, split, tile):
        raise ValueError(f"{name}: {k_dim} input columns over {split} slices do not tile by "
                         f"BLOCK_K {tile[1]} with {tile[2]} loaded ahead")
    if x.stride(1) != 1 or not weight.is_contiguous() or x.dtype != weight.dtype:
        raise ValueError(f"{name}: x's rows contiguous, weight contiguous, one dtype")


def decode_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                pdl: bool = False, split: int = 1, tiling: str | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias) for 1 <= M <= MAX_ROWS: [M, N] in x's dtype, or with
    split > 1 fp32 partials [split, M, N] whose sum it is (no bias then). fp32 accumulation.
    pdl: launch as a programmatic dependent of the kernel ahead (CUDA sm_90+; ops/pdl.py).
    tiling: "BLOCK_N:BLOCK_K:PRE_K:WARPS:STAGES" (`gemm_tiling`)."""
    tile = gemm_tiling(tiling)
    check_operands("decode_gemm", x, weight, split, tile)
    (rows, k_dim), n_dim = x.shape, weight.shape[0]
    block_n, block_k, pre_k, warps, _ = tile
    if bias is not None and (split > 1 or bias.shape != (n_dim,) or not bias.is_contiguous()):
        raise ValueError(f"decode_gemm: bias must be contiguous [{n_dim}], and only unsplit")
    if split > 1:
        out = torch.empty((split, rows, n_dim), dtype=torch.float32, device=x.device)
    else:
        out = torch.empty((1, rows, n_dim), dtype=x.dtype, device=x.device)
    mp = max(16, next_pow2(rows))
    stages = pipeline_stages(tile, mp, x.element_size())
    if _tma(x, weight, tile):
        tma_gemm_launch(x, weight, bias, out, split, block_n, block_k, warps, stages, pdl)
        return out if split > 1 else out[0]
    extra = {"launch_pdl": True} if pdl else {}
    grid = (cdiv(n_dim, block_n), split)
    _decode_gemm_kernel[grid](
        x, weight, bias if bias is not None else weight, out,
        rows, n_dim, k_dim // block_k,
        x.stride(0), weight.stride(0), out.stride(0), out.stride(1),
        MP=mp, BLOCK_N=block_n, BLOCK_K=block_k, PRE_K=pre_k,
        HAS_BIAS=bias is not None, USE_PDL=pdl, EVEN_N=n_dim % block_n == 0,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        STAGES=stages, SILU_MUL=False, num_warps=warps, **extra,
    )
    return out if split > 1 else out[0]


@dataclass(frozen=True)
class GateUpFold:
    """gate_up's LoRA for `decode_gemm_silu_mul` to add before SiLU: the shrink of every slot
    for every row, t [splits, M, num_slots * 2R] (its slices of K summed there, fp32 or x's
    dtype; slot s's columns from s*2R: gate's R, then up's), B [num_slots, 2 * inter, R]
    (gate's rows, then up's), scalings [num_slots, 2] float32 and each row's slot (row_slots
    [M] int32, -1: a base row). With PDL, t must come from the kernel launched just ahead, one
    that waits for x's producer before it lets the next launch (`decode_gemm` with pdl)."""

    t: torch.Tensor
    B: torch.Tensor
    scalings: torch.Tensor
    row_slots: torch.Tensor

    def check(self, rows: int, inter: int, device: torch.device) -> None:
        """Raise ValueError unless this fold fits `rows` rows of gate_up over `inter`."""
        t, b, s = self.t, self.B, self.scalings
        if b.dim() != 3 or b.shape[1] != 2 * inter or b.stride(2) != 1:
            raise ValueError(f"fold B {tuple(b.shape)}: want [num_slots, {2 * inter}, R], rank "
                             "columns contiguous")
        slots, rank = b.shape[0], b.shape[2]
        if t.dim() != 3 or tuple(t.shape[1:]) != (rows, slots * 2 * rank) or t.stride(2) != 1:
            raise ValueError(f"fold t {tuple(t.shape)}: want [splits, {rows}, "
                             f"{slots * 2 * rank}] (every slot's gate and up ranks a row)")
        if tuple(s.shape) != (slots, 2) or s.dtype != torch.float32:
            raise ValueError(f"fold scalings {tuple(s.shape)} {s.dtype}: want [{slots}, 2] "
                             "float32")
        if tuple(self.row_slots.shape) != (rows,) or self.row_slots.dtype != torch.int32:
            raise ValueError(f"fold row_slots {tuple(self.row_slots.shape)} "
                             f"{self.row_slots.dtype}: want [{rows}] int32")
        if any(v.device != device for v in (t, b, s, self.row_slots)):
            raise ValueError("fold tensors must be on x's device")


def decode_gemm_silu_mul(x: torch.Tensor, weight: torch.Tensor, pdl: bool = False,
                         tiling: str | None = None,
                         fold: GateUpFold | None = None) -> torch.Tensor:
    """SiLU(x gate^T) * (x up^T) for gate_up's weight [2 * inter, K] (gate's rows, then up's)
    and 1 <= M <= MAX_ROWS rows of x: [M, inter] in x's dtype, bit for bit `decode_gemm` into
    gate_up and ops/triton_silu_mul.py after it, in one launch. A program takes BLOCK_N / 2 of
    gate's rows and the matching up rows. pdl, tiling: as `decode_gemm` (tiling default
    LORASERVE_DECODE_GATE_UP_TILE). fold: gate_up's LoRA, added to each value before SiLU as
    ops/triton_silu_mul.py's fold adds it (`GateUpFold`)."""
    tile = gemm_tiling(tiling or gate_up_tiling())
    check_operands("decode_gemm_silu_mul", x, weight, 1, tile)
    if weight.shape[0] % 2:
        raise ValueError(f"gate_up's weight has an odd number of rows ({weight.shape[0]})")
    rows, k_dim = x.shape
    inter = weight.shape[0] // 2
    block_n, block_k, pre_k, warps, _ = tile
    half = block_n // 2
    out = torch.empty((rows, inter), dtype=x.dtype, device=x.device)
    mp = max(16, next_pow2(rows))
    if fold is None and tma_gate_up_on() and _tma(x, weight, tile):
        tma_gemm_launch(x, weight, None, out, 1, block_n, block_k, warps,
                        pipeline_stages(tile, mp, x.element_size()), pdl, silu_mul=True)
        return out
    extra = {"launch_pdl": True} if pdl else {}
    if fold is not None:
        fold.check(rows, inter, x.device)
        t, b, sc = fold.t, fold.B, fold.scalings
        rank = b.shape[2]
        block_r = next_pow2(rank)
        block_c = max(16, block_r, min(64, block_r * next_pow2(b.shape[0])))  # whole slots
        extra.update(
            t_ptr=t, fb_ptr=b, scal_ptr=sc, rslot_ptr=fold.row_slots, R=rank,
            stride_tsplit=t.stride(0), stride_tm=t.stride(1), t_slot_stride=2 * rank,
            stride_bs=b.stride(0), stride_bn=b.stride(1), stride_ss=sc.stride(0),
            stride_si=sc.stride(1), NUM_SLOTS=b.shape[0], FOLD=True, T_SPLITS=t.shape[0],
            BLOCK_R=block_r, BLOCK_C=block_c, EVEN_R=rank == block_r,
            FOLD_STAGES=fold_stages(tile, mp, block_c, x.element_size(), t.element_size(),
                                    t.shape[0]))
    _decode_gemm_kernel[(cdiv(inter, half), 1)](
        x, weight, weight, out,
        rows, inter, k_dim // block_k,
        x.stride(0), weight.stride(0), 0, out.stride(0),
        MP=mp, BLOCK_N=block_n, BLOCK_K=block_k, PRE_K=pre_k,
        HAS_BIAS=False, USE_PDL=pdl, EVEN_N=inter % half == 0,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        STAGES=pipeline_stages(tile, mp, x.element_size()), SILU_MUL=True,
        num_warps=warps, **extra,
    )
    return out


DEFAULT_GATE_UP_TILING = "64:128:0:4:4"  # the serving loop's fastest of four (s41a/s41b)


def gate_up_tiling() -> str:
    """LORASERVE_DECODE_GATE_UP_TILE: `decode_gemm_silu_mul`'s tiling (BLOCK_N:BLOCK_K:PRE_K:
    WARPS:STAGES, BLOCK_N W rows a program: half gate's, half up's; default
    DEFAULT_GATE_UP_TILING), checked here."""
    spec = os.environ.get("LORASERVE_DECODE_GATE_UP_TILE", "") or DEFAULT_GATE_UP_TILING
    gemm_tiling(spec)
    return spec


def gate_up_gemm() -> bool:
    """LORASERVE_DECODE_GATE_UP (default 1; 0: off): decode graphs' gate_up without LoRA on it
    runs as `decode_gemm_silu_mul` where the decode GEMM takes its rows; off, as any weight
    above MAX_WEIGHT_ELEMS (LORASERVE_DECODE_GEMM_LARGE: this kernel, or cuBLAS), then the
    SiLU*up kernel."""
    return env_int("LORASERVE_DECODE_GATE_UP", 1, least=0, most=1) == 1


def gate_up_fold_splits() -> int:
    """LORASERVE_DECODE_GATE_UP_FOLD=S (default 0: off): in decode graphs whose plan folds
    gate_up's LoRA over the pool's stack, every slot's shrink runs first as this kernel over
    the stack's A rows in S slices of K (1: unsplit), and `decode_gemm_silu_mul` adds the
    delta before SiLU (`GateUpFold`), in place of the stacked GEMM and SiLU*up's fold."""
    return env_int("LORASERVE_DECODE_GATE_UP_FOLD", 0, least=0, most=64)


DEFAULT_LARGE_TILING = "64:128:0:4:4"  # gate_up's LoRA stacks: s41c, the 8-slot pool


def large_gemm_tiling() -> str | None:
    """LORASERVE_DECODE_GEMM_LARGE=BLOCK_N:BLOCK_K:PRE_K:WARPS:STAGES (default
    DEFAULT_LARGE_TILING; 0: off, cuBLAS): weights and LoRA stacks above MAX_WEIGHT_ELEMS
    (gate_up's stack: its weight with every slot's A under it) take this kernel too, at this
    tiling, where it takes their rows; checked here."""
    spec = os.environ.get("LORASERVE_DECODE_GEMM_LARGE", "").strip() or DEFAULT_LARGE_TILING
    if spec == "0":
        return None
    gemm_tiling(spec)
    return spec


def pipeline_stages(tiling, mp: int, elem: int) -> int:
    """The tiling's stages, fewer where W's and x's tiles in flight would pass SMEM_BUDGET
    (64 rows of x at BLOCK_K 256 and 4 stages take 256 KB: no launch)."""
    block_n, block_k, pre_k, _, stages = tiling
    per_stage = (block_n + mp) * block_k * elem
    budget = SMEM_BUDGET - (block_n + mp) * pre_k * elem
    return max(1, min(stages, budget // per_stage))


def pipeline_smem(tiling, mp: int, elem: int) -> int:
    """The shared memory of the decode GEMM's main loop at `tiling` over `mp` padded rows of
    `elem`-byte values: its stages' W and x tiles (`pipeline_stages`) and PRE_K's."""
    block_n, block_k, pre_k, _, _ = tiling
    return (block_n + mp) * (block_k * pipeline_stages(tiling, mp, elem) + pre_k) * elem


def fold_stages(tiling, mp: int, block_c: int, elem: int, t_elem: int, t_splits: int) -> int:
    """The stages of `decode_gemm_silu_mul`'s fold epilogue (B's tile and t's gate and up tiles
    of every slice in flight, a buffer each): the tiling's, fewer where they would pass the
    main loop's shared memory, which the epilogue takes again once that loop ends (more would
    take more: 8 slices of t at 4 stages asked 424 KB of the H200's 227). 1: loaded in turn."""
    block_n, _, _, _, stages = tiling
    per_stage = block_n * block_c * elem + 2 * t_splits * mp * block_c * t_elem
    return max(1, min(stages, pipeline_smem(tiling, mp, elem) // per_stage))


DEFAULT_ROWS = 32  # batch 32's base step 0.28 ms shorter on the H200 (thirtieth session)
DEFAULT_SPLITS = 2


def decode_gemm_rows() -> int:
    """LORASERVE_DECODE_GEMM: the most rows a decode graph's projections take this kernel for
    (default DEFAULT_ROWS; 0: off)."""
    return env_int("LORASERVE_DECODE_GEMM", DEFAULT_ROWS, least=0, most=MAX_ROWS)


def in_gemm_rows(rows: int) -> bool:
    """Whether a decode forward of `rows` rows is this kernel's: above the GEMV's
    (LORASERVE_DECODE_GEMV) and up to LORASERVE_DECODE_GEMM."""
    return decode_gemv_rows() < rows <= decode_gemm_rows()


def _slices(name: str, default: int) -> int:
    """A slice-count setting: 0 or 1 mean unsplit (0 returned)."""
    splits = env_int(name, default, least=0)
    return splits if splits >= 2 else 0


DEFAULT_LORA_SPLITS = 4
WIDE_LORA_TILING = "128:128:0:8:4"  # 160 KB of pipeline at 32 rows: one program an SM


def lora_gemm_splits() -> int:
    """LORASERVE_DECODE_GEMM_LORA_SPLIT: the most slices of K for o's and down's stacked GEMM
    (base rows, then every slot's A) in LoRA decode graphs that fold their expands (default
    DEFAULT_LORA_SPLITS; 0 or 1: unsplit); `lora_split_plan` picks the slices and the tiling,
    and the next add+RMSNorm sums the partials of both and adds the delta. Unsplit, an 8-slot
    pool's stacks (4224 rows) make 66 programs of 64 rows on the H200's 132 SMs, down's each
    over all 14336 columns: over 2 slices the 8-adapter step at batch 32 took 5.18 ms in the
    serving loop against 5.32 (H200, thirty-fourth session)."""
    return _slices("LORASERVE_DECODE_GEMM_LORA_SPLIT", DEFAULT_LORA_SPLITS)


SMEM_PER_SM = 228 * 1024  # an H100/H200 multiprocessor's shared memory
SMEM_RESERVED = 1024  # of it, the driver's a resident program


def resident_programs(tiling, rows: int, elem: int) -> int:
    """How many of the decode GEMM's programs at `tiling` over `rows` rows of `elem`-byte
    values a multiprocessor holds at once, by the shared memory of their pipelines."""
    smem = pipeline_smem(tiling, max(16, next_pow2(rows)), elem) + SMEM_RESERVED
    return max(1, SMEM_PER_SM // smem)


def sm_share(n_rows: int, k_dim: int, splits: int, tile, sms: int) -> int:
    """The weight elements the busiest multiprocessor streams for the decode GEMM's grid over
    `n_rows` x `k_dim` at `tile` in `splits` slices of K: its programs (the grid spread over
    `sms`) times a program's rows times its slice's columns (the widest slice)."""
    block_n, block_k = tile[0], tile[1]
    programs = cdiv(n_rows, block_n) * splits
    return cdiv(programs, sms) * block_n * cdiv(k_dim // block_k, splits) * block_k


def lora_split_plan(n_rows: int, k_dim: int, x: torch.Tensor,
                    tiling: str | None = None) -> tuple[str | None, int]:
    """(tiling, slices) for o's or down's stack of `n_rows` x `k_dim` over x's rows: among the
    stack's own tiling (`tiling`; None: the default) and WIDE_LORA_TILING (128 rows a program;
    LORASERVE_DECODE_GEMM_LORA_TILE in place of both where set), and 2 up to
    `lora_gemm_splits` slices whose grid is one wave (its programs at most the multiprocessors
    times those each holds, `resident_programs`: a second wave of a few programs cost more
    than the slices gained), the one whose busiest multiprocessor streams the least
    (`sm_share`; ties: fewer slices, the stack's tiling). (tiling, 0): unsplit, where no
    split streams less. An 8-slot pool's stacks (4224 rows) at batch 32 on 132 SMs: 2
    slices at the default tiling (132 programs); a 32-slot pool's (4608 rows: 144 programs
    at 64 rows over 2 slices): 3 slices of 128 rows (108 programs), the busiest multiprocessor
    streaming about 0.69 of what the unsplit grid's does."""
    most = lora_gemm_splits()
    own = gemm_tiling(tiling)
    sms = num_sms(x.device)
    rows, elem = x.shape[0], x.element_size()
    if most < 2 or not gemm_fits(rows, k_dim, 1, own):
        return tiling, 0
    # (what the busiest SM streams, slices, the tiling's rank), tiling: unsplit at its own first
    options = [((sm_share(n_rows, k_dim, 1, own, sms), 1, 0), tiling)]
    named = lora_split_tiling()
    for rank, spec in enumerate((named,) if named else (tiling, WIDE_LORA_TILING)):
        tile = gemm_tiling(spec)
        fits = sms * resident_programs(tile, rows, elem)
        options += [((sm_share(n_rows, k_dim, splits, tile, sms), splits, rank), spec)
                    for splits in range(2, most + 1)
                    if cdiv(n_rows, tile[0]) * splits <= fits
                    and gemm_fits(rows, k_dim, splits, tile)]
    (_, splits, _), spec = min(options, key=lambda o: o[0])
    return (spec, splits) if splits > 1 else (tiling, 0)


def lora_split_tiling() -> str | None:
    """LORASERVE_DECODE_GEMM_LORA_TILE (BLOCK_N:BLOCK_K:PRE_K:WARPS:STAGES; default: none):
    the one tiling of o's and down's stacks where they split (`lora_split_plan`), checked
    here."""
    spec = os.environ.get("LORASERVE_DECODE_GEMM_LORA_TILE", "") or None
    if spec is not None:
        gemm_tiling(spec)
    return spec


def qkv_gemm_splits() -> int:
    """LORASERVE_DECODE_GEMM_QKV_SPLIT: the slices of K for qkv in base-only decode graphs
    whose o and down split (default 0 or 1: unsplit); the rotary kernel sums the partials
    (ops/triton_rope_store_kv.py). Opt-in: qkv alone at batch 32 took 15.6 us over 2 slices
    at 128:128:256:8:3 against 16.8 unsplit at the default tiling (H200, thirtieth session),
    but the serving loop's base step at batch 32 took 4.76-4.77 ms with it against 4.71-4.72
    without (thirty-first session)."""
    return _slices("LORASERVE_DECODE_GEMM_QKV_SPLIT", 0)


def qkv_gemm_tiling() -> str | None:
    """LORASERVE_DECODE_GEMM_QKV_TILE: split qkv's tiling (BLOCK_N:BLOCK_K:PRE_K:WARPS:STAGES;
    default: every projection's, `gemm_tiling`), checked here."""
    spec = os.environ.get("LORASERVE_DECODE_GEMM_QKV_TILE", "") or None
    if spec is not None:
        gemm_tiling(spec)
    return spec


def gemm_splits() -> int:
    """LORASERVE_DECODE_GEMM_SPLIT: the slices of K for base-only graphs' o and down where they
    take this kernel (default DEFAULT_SPLITS; 0 or 1: unsplit); the next add+RMSNorm sums the
    partials."""
    return _slices("LORASERVE_DECODE_GEMM_SPLIT", DEFAULT_SPLITS)
