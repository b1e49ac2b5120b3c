"""ops/triton_skinny_gemm.py: y = x W^T for decode batches, against torch (CPU tensors under
TRITON_INTERPRET=1 at small shapes; bf16 at Llama-3.1-8B shapes on CUDA, with programmatic
dependent launch and its L2 prefetch), and which projections decode graphs route to it."""

import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ops import dispatch
from ops.triton_skinny_gemm import decode_linear, decode_tile, graph_scope, mode, skinny_gemm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_sm90 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="needs CUDA sm_90+")


@pytest.mark.parametrize("rows", [1, 5, 16, 33])
@pytest.mark.parametrize(("n", "k", "block_n", "block_k"), [(48, 80, 16, 32), (64, 64, 32, 16)])
def test_skinny_gemm_matches_torch(rows, n, k, block_n, block_k) -> None:
    """fp32; N and K that are no multiple of the tile (masked edges) and ones that are."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g).to(DEVICE)
    w = torch.randn(n, k, generator=g).to(DEVICE)
    got = skinny_gemm(x, w, block_n=block_n, block_k=block_k, stages=2)
    torch.testing.assert_close(got, x @ w.T, rtol=2e-2, atol=2e-2)  # tf32 on CUDA


def test_skinny_gemm_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="do not multiply"):
        skinny_gemm(torch.zeros(1, 8), torch.zeros(4, 16))
    with pytest.raises(ValueError, match="at most 64 rows"):
        skinny_gemm(torch.zeros(65, 16), torch.zeros(4, 16))
    with pytest.raises(ValueError, match="block_k"):
        skinny_gemm(torch.zeros(1, 16), torch.zeros(4, 16), block_k=24)
    with pytest.raises(ValueError, match="prefetch_k"):
        skinny_gemm(torch.zeros(1, 16), torch.zeros(4, 16), prefetch_k=-1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sm_90"):
            skinny_gemm(torch.zeros(1, 16), torch.zeros(4, 16), pdl=True)


def test_decode_tiles() -> None:
    """o, qkv, down and lm_head at Llama-3.1-8B shapes take it up to 32 rows; gate_up and
    wider batches stay on cuBLAS."""
    assert decode_tile(4096, 1) == (32, 256, 4)
    assert decode_tile(6144, 32) == (64, 256, 4)
    assert decode_tile(128256, 8) == (64, 128, 4)
    assert decode_tile(28672, 1) is None
    assert decode_tile(4096, 33) is None


@pytest.fixture
def on_cpu_kernels(monkeypatch):
    monkeypatch.setattr(dispatch, "TRITON_ON_CPU", True)


def test_decode_linear_follows_the_mode(monkeypatch, on_cpu_kernels) -> None:
    lin = nn.Linear(64, 48, bias=False)
    x = torch.randn(3, 64)
    monkeypatch.delenv("LORASERVE_SKINNY_GEMM", raising=False)
    assert mode() == "0"
    with graph_scope(with_lora=False):
        assert decode_linear(lin, x) is lin  # off by default
    monkeypatch.setenv("LORASERVE_SKINNY_GEMM", "base")
    assert decode_linear(lin, x) is lin  # outside a graph capture
    with graph_scope(with_lora=True):
        assert decode_linear(lin, x) is lin
    with graph_scope(with_lora=False):
        run = decode_linear(lin, x)
        assert run is not lin
        torch.testing.assert_close(run(x), lin(x), rtol=1e-4, atol=1e-4)
        biased = nn.Linear(64, 48)
        assert decode_linear(biased, x) is biased
        assert decode_linear(lin, torch.randn(33, 64)) is lin  # past MAX_ROWS
        wide = nn.Linear(64, 28672, bias=False, device="meta")
        assert decode_linear(wide, x) is wide  # gate_up's width: cuBLAS
    monkeypatch.setenv("LORASERVE_SKINNY_GEMM", "all")
    with graph_scope(with_lora=True):
        assert decode_linear(lin, x) is not lin
    monkeypatch.setenv("LORASERVE_SKINNY_GEMM", "yes")
    with pytest.raises(ValueError, match="LORASERVE_SKINNY_GEMM"):
        graph_scope(with_lora=False)
    monkeypatch.setenv("LORASERVE_SKINNY_GEMM", "all")
    monkeypatch.setenv("LORASERVE_SKINNY_PREFETCH_MB", "-1")
    with graph_scope(with_lora=False), pytest.raises(ValueError, match="PREFETCH_MB"):
        decode_linear(lin, x)


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("rows", [1, 32])
def test_skinny_gemm_at_llama_shapes_with_pdl(rows) -> None:
    """bf16 at qkv, o, down and lm_head shapes, launched with PDL and its L2 prefetch, against
    F.linear; then two projections chained in a CUDA graph with PDL, the second reading the
    first's output, bit for bit the chain launched without it."""
    torch.manual_seed(rows)
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    for n, k in ((6144, 4096), (4096, 4096), (4096, 14336), (128256, 4096)):
        xk = x if k == 4096 else torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        block_n, block_k, stages = decode_tile(n, rows)
        want = torch.nn.functional.linear(xk, w).float()
        got = skinny_gemm(xk, w, block_n=block_n, block_k=block_k, stages=stages,
                          prefetch_k=1024, pdl=True).float()
        assert ((got - want).norm() / want.norm()).item() < 1e-2, (n, k)
    w1 = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16) * 0.02
    y1 = torch.empty(rows, 14336, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for pdl in (True, False):
        y2 = torch.empty(rows, 4096, device="cuda", dtype=torch.bfloat16)

        def chain(pdl=pdl, y2=y2):
            skinny_gemm(x, w1, y1, block_n=32, prefetch_k=4096, pdl=pdl)
            skinny_gemm(y1, w2, y2, block_n=32, prefetch_k=4096, pdl=pdl)

        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            chain()
        s.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            chain()
        y1.zero_()
        y2.zero_()
        g.replay()
        torch.cuda.synchronize()
        outs[pdl] = y2.clone()
    assert torch.equal(outs[True], outs[False])
