"""The decode GEMV kernel (ops/triton_gemv.py, measured by benchmarks/gemm_bench.py, not on the
serving path) against torch: CPU tensors under TRITON_INTERPRET=1 at small shapes; bf16 at
Llama-3.1-8B shapes, with programmatic dependent launch, on CUDA."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # before triton is imported: kernels run in the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ops.triton_gemv import gemv_triton

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.double() @ w.double().T).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("k_dim", [96, 100])
def test_gemv_matches_torch(dtype, rows, k_dim) -> None:
    """One row (CUDA cores) and padded row blocks (tensor cores); 40 outputs over tiles of 16
    (a partial last one); K a multiple of the 32-wide tile and not."""
    g = torch.Generator().manual_seed(rows * k_dim)
    x = torch.randn(rows, k_dim, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(40, k_dim, generator=g).to(dtype).to(DEVICE)
    out = torch.full((rows, 40), float("nan"), dtype=dtype, device=DEVICE)
    got = gemv_triton(x, w, out=out, block_n=16, block_k=32)
    assert got is out
    tol = {torch.float32: 2e-3, torch.float16: 2e-2}[dtype]  # tf32 / fp16 tensor-core sums
    torch.testing.assert_close(got, reference(x, w), rtol=tol, atol=tol)


def test_gemv_rejects_what_it_does_not_take() -> None:
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="do not multiply"):
        gemv_triton(x, torch.randn(4, 9, device=DEVICE))
    with pytest.raises(ValueError, match="at most 32 rows"):
        gemv_triton(torch.randn(33, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="one dtype"):
        gemv_triton(x, torch.randn(4, 8, device=DEVICE, dtype=torch.float16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 32])
@pytest.mark.parametrize("pdl", [False, True])
def test_gemv_bf16_at_8b_shapes(rows, pdl) -> None:
    """qkv's and down's shapes in bf16, launched after another kernel (with PDL, the wait)."""
    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    for n_dim, k_dim in ((6144, 4096), (4096, 14336)):
        x = torch.randn(rows, k_dim, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n_dim, k_dim, device="cuda", dtype=torch.bfloat16) * 0.02
        x2 = x * 2  # the kernel before, writing x2
        got = gemv_triton(x2, w, pdl=pdl)
        torch.testing.assert_close(got.float(), reference(x2, w).float(), rtol=2e-2, atol=2e-2)
