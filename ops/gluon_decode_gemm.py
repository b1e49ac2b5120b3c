"""The decode GEMM with W's first tiles in flight before the PDL wait (Gluon, CUDA sm_90+;
by default: LORASERVE_DECODE_GEMM_TMA, which ops/triton_decode_gemm.py reads; this module,
which needs Triton's Gluon, is imported at the first launch that can take it).

ops/triton_decode_gemm.py streams W through Triton's software pipeline, whose first tiles are
issued only after the wait for the kernel ahead (ops/pdl.py): the pipeline's loads of x and W
go together, and x is the kernel ahead's output. Each of batch 32's four projections a layer
then runs 3-4.5 us over its weight's bytes at the measured bandwidth (benchmarks/RESULTS.md,
thirty-seventh session), about the time the first tiles take to arrive. W is no kernel's output,
so this kernel, written in Gluon to place each copy itself, issues its first STAGES tiles of W
(tensor-memory-accelerator copies into shared memory, one barrier a stage) before the wait, and
x's tiles after it: where the kernel ahead leaves SMs free (add+RMSNorm's 32 programs before
qkv and gate_up, the last wave of gate_up before down), a program's first tiles land while that
kernel still runs.

The same products as `_decode_gemm_kernel`: y^T = W x^T on warpgroup MMAs with W's BLOCK_N rows
as the MMA's M and x's rows, padded to MP (the copies fill rows past M with zeros), as its N;
fp32 accumulation; an unsplit projection's y in x's dtype (plus its bias), a split one's fp32
partials [split, M, N] over even shares of K's steps, and with SILU_MUL gate_up's product
SiLU(gate) * up (a program's tile is BLOCK_N / 2 gate rows over the matching up rows, two
copies a stage), rounded as there. LoRA decode steps' stacked GEMMs (base rows over every
slot's A) come here like any `decode_gemm`; there is no LoRA fold epilogue, so gate_up's fold
inside its GEMM (LORASERVE_DECODE_GATE_UP_FOLD, opt-in) keeps the Triton kernel.
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ops.settings import env_int
from ops.sizes import cdiv, next_pow2

TMA_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@gluon.jit
def _gdc_wait_then_release():
    """Wait for the kernel ahead (its writes visible), then let the next kernel launch."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [],
                              dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _load_w(w_desc, bars, w_bufs, s, row0, row_up, k,
            HALF: gl.constexpr, SILU_MUL: gl.constexpr, pred):
    """Stage s's tile of W at column k: BLOCK_N rows from row0, or with SILU_MUL HALF gate
    rows from row0 over HALF up rows from row_up."""
    if SILU_MUL:
        tma.async_copy_global_to_shared(w_desc, [row0, k], bars.index(s),
                                        w_bufs.index(s).slice(0, HALF, dim=0), pred=pred)
        tma.async_copy_global_to_shared(w_desc, [row_up, k], bars.index(s),
                                        w_bufs.index(s).slice(HALF, HALF, dim=0), pred=pred)
    else:
        tma.async_copy_global_to_shared(w_desc, [row0, k], bars.index(s), w_bufs.index(s),
                                        pred=pred)


@gluon.jit
def _tma_gemm_kernel(
    w_desc,  # W [rows, K]: block [BLOCK_N, BLOCK_K], or [BLOCK_N / 2, BLOCK_K] with SILU_MUL
    x_desc,  # x [M, K]: block [MP, BLOCK_K]
    b_ptr,
    y_ptr,
    M,
    N,  # y's columns (gate_up's inter with SILU_MUL)
    K_STEPS,  # K / BLOCK_K: the grid's slices (axis 1) take as even shares of them as divide
    stride_ys,
    stride_ym,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
    HAS_BIAS: gl.constexpr,
    USE_PDL: gl.constexpr,
    SILU_MUL: gl.constexpr,
    num_warps: gl.constexpr,
):
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    MP: gl.constexpr = x_desc.block_type.shape[0]
    HALF: gl.constexpr = BLOCK_N // 2
    pid_n = gl.program_id(0)
    pid_s = gl.program_id(1)
    n_split = gl.num_programs(1)
    k0 = pid_s * K_STEPS // n_split
    steps = (pid_s + 1) * K_STEPS // n_split - k0
    if SILU_MUL:
        row0 = pid_n * HALF
        row_up = N + row0
    else:
        row0 = pid_n * BLOCK_N
        row_up = row0

    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, MP, BLOCK_K], x_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    stage_bytes: gl.constexpr = (BLOCK_N + MP) * BLOCK_K * x_desc.dtype.primitive_bitwidth // 8

    # W is no kernel's output: its first STAGES tiles are in flight before the wait, each
    # stage's barrier expecting W's and x's bytes
    for s in gl.static_range(STAGES):
        live = s < steps
        mbarrier.expect(bars.index(s), stage_bytes, pred=live)
        _load_w(w_desc, bars, w_bufs, s, row0, row_up, (k0 + s) * BLOCK_K, HALF, SILU_MUL, live)
    if USE_PDL:
        _gdc_wait_then_release()  # x comes from the kernel ahead
    for s in gl.static_range(STAGES):
        tma.async_copy_global_to_shared(x_desc, [0, (k0 + s) * BLOCK_K], bars.index(s),
                                        x_bufs.index(s), pred=s < steps)

    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, MP, 16])
    acc = gl.zeros((BLOCK_N, MP), dtype=gl.float32, layout=acc_layout)
    for i in range(steps):
        cur = i % STAGES
        mbarrier.wait(bars.index(cur), (i // STAGES) & 1)
        acc = warpgroup_mma(w_bufs.index(cur), x_bufs.index(cur).permute((1, 0)), acc,
                            is_async=True)
        # (the stage's buffers as dependencies: its next copies come after the MMA read them)
        acc, _, _ = warpgroup_mma_wait(num_outstanding=0,
                                       deps=(acc, w_bufs.index(cur), x_bufs.index(cur)))
        # the stage is free again: its next tile, STAGES steps on
        nxt = i + STAGES
        live = nxt < steps
        k = (k0 + nxt) * BLOCK_K
        mbarrier.expect(bars.index(cur), stage_bytes, pred=live)
        _load_w(w_desc, bars, w_bufs, cur, row0, row_up, k, HALF, SILU_MUL, live)
        tma.async_copy_global_to_shared(x_desc, [0, k], bars.index(cur), x_bufs.index(cur),
                                        pred=live)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))

    # y[m, n] = acc[n, m]: lanes along n, y's contiguous dimension
    out_layout: gl.constexpr = gl.BlockedLayout([1, 1], [32, 1], [1, num_warps], [0, 1])
    offs_m = gl.arange(0, MP, layout=gl.SliceLayout(0, out_layout))
    m_live = offs_m < M
    if SILU_MUL:
        # gate's rows over up's: through shared memory to pair each column's two factors
        dtype: gl.constexpr = y_ptr.dtype.element_ty
        c_buf = gl.allocate_shared_memory(gl.float32, [BLOCK_N, MP],
                                          gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        c_buf.store(acc)
        gl.thread_barrier()
        gate = c_buf.slice(0, HALF, dim=0).load(out_layout)
        up = c_buf.slice(HALF, HALF, dim=0).load(out_layout)
        # as ops/triton_decode_gemm.py rounds it: each factor to y's dtype, SiLU in fp32
        # rounded before the product
        gate = gate.to(dtype).to(gl.float32)
        act = (gate / (1.0 + gl.exp(-gate))).to(dtype).to(gl.float32)
        out = act * up.to(dtype).to(gl.float32)
        offs_c = row0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, out_layout))
        ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_c[:, None]
        gl.store(ptrs, out.to(dtype), mask=(offs_c < N)[:, None] & m_live[None, :])
    else:
        val = gl.convert_layout(acc, out_layout)
        offs_n = row0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, out_layout))
        n_live = offs_n < N
        if HAS_BIAS:
            bias = gl.load(b_ptr + offs_n, mask=n_live, other=0.0).to(gl.float32)
            val = val + bias[:, None]
        ptrs = y_ptr + pid_s * stride_ys + offs_m[None, :] * stride_ym + offs_n[:, None]
        gl.store(ptrs, val.to(y_ptr.dtype.element_ty), mask=n_live[:, None] & m_live[None, :])


def tma_stages(stages: int, block_n: int, block_k: int, mp: int, elem: int) -> int:
    """The stages a launch takes: the decode GEMM's (`pipeline_stages`), fewer where W's and
    x's tiles in flight would pass LORASERVE_DECODE_GEMM_TMA_SMEM KB (default 200, the decode
    GEMM's own budget). At 150, o's programs (3 stages of 64 x 256: 144 KB) fit beside two of
    decode attention's (39 KB each), so they can copy W while attention runs; at 4 stages
    (192 KB) they wait for its programs to leave their SM."""
    per_stage = (block_n + mp) * block_k * elem
    return max(1, min(stages, _tma_smem_kb() * 1024 // per_stage))


@functools.lru_cache(maxsize=1)
def _tma_smem_kb() -> int:
    return env_int("LORASERVE_DECODE_GEMM_TMA_SMEM", 200, least=16, most=227)


def tma_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this kernel can take x @ weight^T: both on CUDA sm_90+, one 16-bit dtype, and
    the tensor-memory copies' rules (16-byte aligned bases and row strides, contiguous rows)."""
    if not (x.is_cuda and weight.is_cuda) or x.dtype not in TMA_DTYPES or weight.dtype != x.dtype:
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    elem = x.element_size()
    return all(t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * elem) % 16 == 0
               for t in (x, weight))


def _descriptors(x: torch.Tensor, weight: torch.Tensor, w_rows: int, mp: int, block_k: int):
    dtype = TMA_DTYPES[x.dtype]
    w_layout = gl.NVMMASharedLayout.get_default_for([w_rows, block_k], dtype)
    x_layout = gl.NVMMASharedLayout.get_default_for([mp, block_k], dtype)
    return (TensorDescriptor.from_tensor(weight, [w_rows, block_k], w_layout),
            TensorDescriptor.from_tensor(x, [mp, block_k], x_layout))


def tma_gemm_launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    out: torch.Tensor, split: int, block_n: int, block_k: int, warps: int,
                    stages: int, pdl: bool, silu_mul: bool = False) -> None:
    """Launch the kernel into `out` ([split, M, N] fp32 partials for split > 1, [1, M, N] or
    [M, N] in x's dtype otherwise; with silu_mul [M, inter]) at `stages` or fewer
    (`tma_stages`): the caller has checked the operands as ops/triton_decode_gemm.py's
    wrappers do (`check_operands`) and `tma_takes`."""
    rows, k_dim = x.shape
    mp = max(16, next_pow2(rows))
    if silu_mul:
        n_dim, w_rows = weight.shape[0] // 2, block_n // 2
        grid = (cdiv(n_dim, w_rows), 1)
    else:
        n_dim, w_rows = weight.shape[0], block_n
        grid = (cdiv(n_dim, block_n), split)
    w_desc, x_desc = _descriptors(x, weight, w_rows, mp, block_k)
    stages = tma_stages(stages, block_n, block_k, mp, x.element_size())
    out3 = out if out.dim() == 3 else out.unsqueeze(0)
    extra = {"launch_pdl": True} if pdl else {}
    _tma_gemm_kernel[grid](
        w_desc, x_desc, bias if bias is not None else weight, out3,
        rows, n_dim, k_dim // block_k, out3.stride(0), out3.stride(1),
        BLOCK_N=block_n, STAGES=stages, HAS_BIAS=bias is not None, USE_PDL=pdl,
        SILU_MUL=silu_mul, num_warps=warps, **extra,
    )
