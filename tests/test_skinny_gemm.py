"""ops/triton_skinny_gemm.py: y = x W^T for decode batches, against torch (CPU tensors under
TRITON_INTERPRET=1 at small shapes; bf16 at Llama-3.1-8B shapes on CUDA, with and without TMA)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ops.triton_skinny_gemm import skinny_gemm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("rows", [1, 5, 16, 33])
@pytest.mark.parametrize(("n", "k", "block_n", "block_k"), [(48, 80, 16, 32), (64, 64, 32, 16)])
def test_skinny_gemm_matches_torch(rows, n, k, block_n, block_k) -> None:
    """fp32; N and K that are no multiple of the tile (masked edges) and ones that are."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g).to(DEVICE)
    w = torch.randn(n, k, generator=g).to(DEVICE)
    got = skinny_gemm(x, w, block_n=block_n, block_k=block_k, stages=2)
    torch.testing.assert_close(got, x @ w.T, rtol=2e-2, atol=2e-2)  # tf32 on CUDA


def test_skinny_gemm_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="do not multiply"):
        skinny_gemm(torch.zeros(1, 8), torch.zeros(4, 16))
    with pytest.raises(ValueError, match="at most 64 rows"):
        skinny_gemm(torch.zeros(65, 16), torch.zeros(4, 16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available()
                    or torch.cuda.get_device_capability()[0] < 9, reason="needs CUDA sm_90+")
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("rows", [1, 32])
def test_skinny_gemm_at_llama_shapes(tma, rows) -> None:
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    for n in (6144, 4096):
        w = torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
        want = torch.nn.functional.linear(x, w).float()
        got = skinny_gemm(x, w, tma=tma).float()
        assert ((got - want).norm() / want.norm()).item() < 1e-2
