"""cuBLASLt's algorithms for one decode projection, called through ctypes (benchmarks only).

torch's F.linear takes whatever kernel cuBLAS's heuristic picks first (at batch 1 a split-K
kernel and a reduce for o and down); `torch.backends.cuda.preferred_blas_library("cublaslt")`
takes cuBLASLt's first. This module asks cuBLASLt's heuristic for up to `count` algorithms of
y = x W^T (x [M, K], W [N, K], y [M, N], row-major, bf16 or fp16, fp32 accumulation) and runs
any one of them on torch's current stream, so `benchmarks/gemm_bench.py --lt-algos` can time
each in a CUDA graph beside F.linear, and `benchmarks/step_bench.py --lt-plan` can capture the
decode graphs with the fastest ones (`install_plan`). Nothing in serving uses it.

Row-major y = x W^T is, in cuBLASLt's column-major terms, D (N x M, ld N) = op(A) B with A
the weight seen as a K x N matrix (ld K) transposed, and B = x seen as K x M (ld K).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

# cublasComputeType_t, cudaDataType_t, cublasOperation_t
COMPUTE_32F = 68
R_32F, R_16F, R_16BF = 0, 2, 14
OP_N, OP_T = 0, 1
# cublasLtMatmulDescAttributes_t
DESC_TRANSA, DESC_TRANSB = 3, 4
# cublasLtMatmulPreferenceAttributes_t
PREF_MAX_WORKSPACE_BYTES = 1
# cublasLtMatmulAlgoConfigAttributes_t: 32-bit values but the 16-bit shape ids
CONFIG_ATTRS = {"algo_id": 0, "tile_id": 1, "splitk_num": 2, "reduction_scheme": 3,
                "cta_swizzling": 4, "custom_option": 5, "stages_id": 6, "inner_shape_id": 7,
                "cluster_shape_id": 8}
_DTYPES = {torch.bfloat16: R_16BF, torch.float16: R_16F}


class MatmulAlgo(ctypes.Structure):
    """cublasLtMatmulAlgo_t: opaque, 64 bytes."""

    _fields_ = [("data", ctypes.c_uint64 * 8)]


class HeuristicResult(ctypes.Structure):
    """cublasLtMatmulHeuristicResult_t."""

    _fields_ = [("algo", MatmulAlgo), ("workspace_size", ctypes.c_size_t),
                ("state", ctypes.c_int), ("waves_count", ctypes.c_float),
                ("reserved", ctypes.c_int * 4)]


@dataclass(frozen=True)
class Problem:
    """cuBLASLt's view of row-major y [M, N] = x [M, K] @ W[N, K]^T."""

    transa: int
    transb: int
    m: int  # rows of D: the projection's outputs
    n: int  # columns of D: the batch
    k: int
    lda: int
    ldb: int
    ldd: int


def problem(batch: int, n_out: int, n_in: int) -> Problem:
    if min(batch, n_out, n_in) < 1:
        raise ValueError(f"GEMM dimensions must be positive: {batch}x{n_out}x{n_in}")
    return Problem(OP_T, OP_N, n_out, batch, n_in, n_in, n_in, n_out)


def _library_path() -> str:
    """The libcublasLt torch has loaded (CUDA initialized first), from the process's maps."""
    torch.cuda.init()
    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")  # loads cuBLAS(Lt)
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if "libcublasLt" in path and path.startswith("/"):
                return path
    raise RuntimeError("cuBLASLt is not loaded in this process (torch without CUDA?)")


@functools.cache
def _lib() -> ctypes.CDLL:
    """torch's libcublasLt with the signatures this module calls (sizes and 64-bit values
    exact), opened once."""
    lib = ctypes.CDLL(_library_path())
    vp, pp, i32, u64, i64, size = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                   ctypes.c_int32, ctypes.c_uint64, ctypes.c_int64,
                                   ctypes.c_size_t)
    signatures = {
        "cublasLtCreate": [pp],
        "cublasLtMatmulDescCreate": [pp, i32, i32],
        "cublasLtMatmulDescSetAttribute": [vp, i32, vp, size],
        "cublasLtMatrixLayoutCreate": [pp, i32, u64, u64, i64],
        "cublasLtMatmulPreferenceCreate": [pp],
        "cublasLtMatmulPreferenceSetAttribute": [vp, i32, vp, size],
        "cublasLtMatmulPreferenceDestroy": [vp],
        "cublasLtMatmulAlgoGetHeuristic": [vp, vp, vp, vp, vp, vp, vp, i32,
                                           ctypes.POINTER(HeuristicResult),
                                           ctypes.POINTER(ctypes.c_int)],
        "cublasLtMatmulAlgoConfigGetAttribute": [ctypes.POINTER(MatmulAlgo), i32, vp, size,
                                                 ctypes.POINTER(ctypes.c_size_t)],
        "cublasLtMatmul": [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp,
                           ctypes.POINTER(MatmulAlgo), vp, size, vp],
    }
    for name, args in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt {what} failed: status {status}")


class LtLinear:
    """Every heuristic algorithm for one projection shape and batch; `run(algo, ...)` launches
    one on torch's current stream (CUDA-graph capturable: the workspace is preallocated)."""

    def __init__(self, batch: int, n_out: int, n_in: int, dtype: torch.dtype = torch.bfloat16,
                 count: int = 32, workspace_bytes: int = 32 << 20) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("LtLinear needs CUDA")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be bfloat16 or float16, got {dtype}")
        self.lib = lib = _lib()
        self.p = p = problem(batch, n_out, n_in)
        self.shape = (batch, n_out, n_in)
        self.workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device="cuda")
        vp = ctypes.c_void_p
        self.handle, self.desc = vp(), vp()
        _check(lib.cublasLtCreate(ctypes.byref(self.handle)), "create")
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), COMPUTE_32F, R_32F),
               "matmul descriptor")
        for attr, op in ((DESC_TRANSA, p.transa), (DESC_TRANSB, p.transb)):
            value = ctypes.c_int32(op)
            _check(lib.cublasLtMatmulDescSetAttribute(self.desc, attr,
                                                      ctypes.cast(ctypes.byref(value), vp), 4),
                   "transpose attribute")
        dt = _DTYPES[dtype]
        self.a, self.b, self.d = vp(), vp(), vp()
        u64, i64 = ctypes.c_uint64, ctypes.c_int64
        for layout, rows, cols, ld in ((self.a, p.k, p.m, p.lda), (self.b, p.k, p.n, p.ldb),
                                       (self.d, p.m, p.n, p.ldd)):
            _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), dt, u64(rows), u64(cols),
                                                  i64(ld)), "matrix layout")
        pref = vp()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
        ws = ctypes.c_uint64(workspace_bytes)
        _check(lib.cublasLtMatmulPreferenceSetAttribute(
            pref, PREF_MAX_WORKSPACE_BYTES, ctypes.cast(ctypes.byref(ws), vp), 8),
            "workspace limit")
        results = (HeuristicResult * count)()
        returned = ctypes.c_int(0)
        _check(lib.cublasLtMatmulAlgoGetHeuristic(self.handle, self.desc, self.a, self.b,
                                                  self.d, self.d, pref, count, results,
                                                  ctypes.byref(returned)), "heuristic")
        lib.cublasLtMatmulPreferenceDestroy(pref)
        self.algos = [results[i] for i in range(returned.value) if results[i].state == 0]
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def config(self, i: int) -> dict[str, int]:
        """Algorithm i's id, tile, split-K count, reduction scheme, ... and its waves."""
        out: dict[str, int] = {}
        for name, attr in CONFIG_ATTRS.items():
            for kind in (ctypes.c_uint32, ctypes.c_uint16):  # the shape ids are 16-bit
                value, written = kind(0), ctypes.c_size_t(0)
                status = self.lib.cublasLtMatmulAlgoConfigGetAttribute(
                    ctypes.byref(self.algos[i].algo), attr,
                    ctypes.cast(ctypes.byref(value), ctypes.c_void_p), ctypes.sizeof(kind),
                    ctypes.byref(written))
                if status == 0:
                    out[name] = int(value.value)
                    break
        out["workspace_bytes"] = int(self.algos[i].workspace_size)
        return out

    def run(self, i: int, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y = x @ w.T with algorithm i, on the current stream."""
        batch, n_out, n_in = self.shape
        if x.shape != (batch, n_in) or w.shape != (n_out, n_in) or y.shape != (batch, n_out):
            raise ValueError(f"shapes {tuple(x.shape)}, {tuple(w.shape)}, {tuple(y.shape)} are "
                             f"not this problem's {self.shape}")
        if not (x.is_contiguous() and w.is_contiguous() and y.is_contiguous()):
            raise ValueError("x, w and y must be contiguous")
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        vp = ctypes.c_void_p
        _check(self.lib.cublasLtMatmul(
            self.handle, self.desc, ctypes.cast(ctypes.byref(self.alpha), vp),
            vp(w.data_ptr()), self.a, vp(x.data_ptr()), self.b,
            ctypes.cast(ctypes.byref(self.beta), vp), vp(y.data_ptr()), self.d,
            vp(y.data_ptr()), self.d, ctypes.byref(self.algos[i].algo),
            vp(self.workspace.data_ptr()), ctypes.c_size_t(self.workspace.numel()), stream),
            "matmul")
        return y


def best_plan(rows: list[dict], min_gain: float = 0.03) -> list[dict]:
    """From gemm_bench rows (`--lt-algos`): for each projection and batch whose fastest cuBLASLt
    algorithm beats F.linear by more than `min_gain`, {out, in, batch, algo, us, linear_us}."""
    plan = []
    for key in sorted({(r["proj"], r["batch"]) for r in rows}):
        mine = [r for r in rows if (r["proj"], r["batch"]) == key]
        linear = next((r for r in mine if r["layout"] == "linear"), None)
        lts = [r for r in mine if r["layout"].startswith("lt:")]
        if linear is None or not lts:
            continue
        best = min(lts, key=lambda r: r["us"])
        if best["us"] < (1 - min_gain) * linear["us"]:
            plan.append({"proj": key[0], "out": best["out"], "in": best["in"],
                         "batch": key[1], "algo": int(best["layout"][3:]), "us": best["us"],
                         "linear_us": linear["us"]})
    return plan


def install_plan(plan: list[dict], dtype: torch.dtype = torch.bfloat16,
                 count: int = 24) -> Callable[[], None]:
    """Benchmarks only: from now on, every bias-free nn.Linear whose (out, in, rows) has an
    entry in `plan` runs that cuBLASLt algorithm while a CUDA graph is being captured (so the
    decode graphs take it), and F.linear otherwise. `count` must be the one the plan was
    measured with (the algorithms are the heuristic's list, by index). Returns the function
    that puts F.linear back."""
    lts = {(p["out"], p["in"], p["batch"]): (LtLinear(p["batch"], p["out"], p["in"], dtype,
                                                      count=count), p["algo"]) for p in plan}
    for (n_out, n_in, batch), (lt, algo) in lts.items():  # load each kernel before a capture
        if not 0 <= algo < len(lt.algos):
            raise ValueError(f"plan: algorithm {algo} for {n_out}x{n_in} at batch {batch}, the "
                             f"heuristic offers {len(lt.algos)} (measured with another count?)")
        lt.run(algo, torch.zeros(batch, n_in, device="cuda", dtype=dtype),
               torch.zeros(n_out, n_in, device="cuda", dtype=dtype),
               torch.empty(batch, n_out, device="cuda", dtype=dtype))
    torch.cuda.synchronize()
    original = torch.nn.Linear.forward

    def forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        entry = None
        if (self.bias is None and x.dim() == 2 and x.is_cuda and x.dtype == dtype
                and torch.cuda.is_current_stream_capturing()):
            entry = lts.get((self.out_features, self.in_features, x.shape[0]))
        if entry is None or not x.is_contiguous():
            return original(self, x)
        lt, algo = entry
        y = torch.empty(x.shape[0], self.out_features, device=x.device, dtype=x.dtype)
        return lt.run(algo, x, self.weight, y)

    torch.nn.Linear.forward = forward

    def uninstall() -> None:
        torch.nn.Linear.forward = original

    return uninstall
