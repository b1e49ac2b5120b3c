"""ops/triton_decode_gemv.py: the decode projection that loads its weight before its PDL wait.
Its sums against F.linear (the interpreter on the CPU, the device at Llama-3.1-8B shapes), the
setting that sends decode graphs' projections to it, and on the device a layer chain with it
under PDL in a CUDA graph, bit for bit the chain without PDL."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ops.triton_decode_gemv import decode_gemv, decode_gemv_lora, decode_gemv_rows, gemv_tiling

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("rows", "n", "k", "bias", "tile"), [
    (1, 48, 64, False, 256),   # 4 rows a program, no masks
    (3, 50, 72, True, 256),    # rows padded to 4, N and K masked, a bias (Qwen2's qkv)
    (8, 16, 128, False, 64),   # the most rows; a tile narrower than K: one W row a program
    (2, 7, 40, True, 1024),    # more tile than W: BLOCK_N capped at N's power of two
])
def test_sums_match_linear(dtype, rows, n, k, bias, tile):
    g = torch.Generator().manual_seed(rows * 100 + n)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    got = decode_gemv(x, w, b, tile=tile, warps=4)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.dtype == dtype and got.shape == (rows, n)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert torch.allclose(got.float(), want, rtol=tol, atol=tol * k ** 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("slots", "n", "k", "a_rows", "tile"), [
    ([2], 48, 64, 48, 256),          # one adapter row (batch 1), A rows a multiple of BLOCK_N
    ([-1, 0, 2], 50, 72, 30, 256),   # a base row (zeros), A rows masked, N and K masked
    ([1, 1, -1, 0], 16, 128, 16, 64),
])
def test_lora_shrink_in_the_same_launch(dtype, slots, n, k, a_rows, tile):
    """decode_gemv_lora: y as decode_gemv, and each row's t = x A[slot]^T (zero for slot -1)."""
    g = torch.Generator().manual_seed(len(slots) * 10 + n)
    rows = len(slots)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    A = torch.randn(3, a_rows, k, generator=g).to(dtype)
    row_slots = torch.tensor(slots, dtype=torch.int32)
    y, t = decode_gemv_lora(x, w, None, A, row_slots, tile=tile, warps=4)
    assert t.shape == (1, rows, a_rows) and t.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert torch.allclose(y.float(), x.float() @ w.float().T, rtol=tol, atol=tol * k ** 0.5)
    for m, s in enumerate(slots):
        want = torch.zeros(a_rows) if s < 0 else x[m].float() @ A[s].float().T
        assert torch.allclose(t[0, m].float(), want, rtol=tol, atol=tol * k ** 0.5), m


def test_x_rows_may_be_strided():
    """x as a view of every other row of a wider buffer (a graph's static input)."""
    g = torch.Generator().manual_seed(3)
    buf = torch.randn(4, 96, generator=g)
    x = buf[::2, :64]
    w = torch.randn(32, 64, generator=g)
    assert torch.allclose(decode_gemv(x, w, tile=128, warps=4), x @ w.T, atol=1e-5)


def test_tiling():
    # Llama-3.1-8B at the default tile: 4 rows of 4096 inputs; down's 14336 spans 16384 lanes
    assert gemv_tiling(6144, 4096, 16384, 8) == (4, 4096, 8)
    assert gemv_tiling(4096, 14336, 16384, 8) == (1, 16384, 8)
    assert gemv_tiling(2, 64, 16384, 4) == (2, 64, 4)


def test_bad_input_is_refused():
    w = torch.zeros(8, 16)
    with pytest.raises(ValueError, match="do not multiply"):
        decode_gemv(torch.zeros(1, 8), w)
    with pytest.raises(ValueError, match="1 to 8 rows"):
        decode_gemv(torch.zeros(9, 16), w)
    with pytest.raises(ValueError, match="one dtype"):
        decode_gemv(torch.zeros(1, 16, dtype=torch.float16), w)
    with pytest.raises(ValueError, match="bias"):
        decode_gemv(torch.zeros(1, 16), w, torch.zeros(7))
    with pytest.raises(ValueError, match="at most 32768"):
        decode_gemv(torch.zeros(1, 40000), torch.zeros(1, 40000))


def test_setting(monkeypatch):
    monkeypatch.delenv("LORASERVE_DECODE_GEMV", raising=False)
    assert decode_gemv_rows() == 1
    monkeypatch.setenv("LORASERVE_DECODE_GEMV", "4")
    assert decode_gemv_rows() == 4
    for bad in ("9", "-1", "one"):
        monkeypatch.setenv("LORASERVE_DECODE_GEMV", bad)
        with pytest.raises(ValueError, match="LORASERVE_DECODE_GEMV"):
            decode_gemv_rows()


def test_base_linear_takes_the_kernel_only_in_decode_graphs(monkeypatch, triton_on_cpu):
    """runtime/model/llama.py base_linear: the kernel inside a decode forward where layer PDL
    applies and the batch has at most LORASERVE_DECODE_GEMV rows; nn.Linear everywhere else."""
    from ops.pdl import decode_scope
    from runtime.model import llama

    calls = []
    real = llama.decode_gemv

    def spy(x, w, b=None, pdl=False):
        calls.append((x.shape[0], pdl))
        return real(x, w, b)  # the interpreter: no PDL on the CPU

    monkeypatch.setattr(llama, "decode_gemv", spy)
    monkeypatch.setattr(llama, "pdl_resolve", lambda pdl, t: pdl is None and _in_decode())
    lin = nn.Linear(64, 32, bias=True)
    x = torch.randn(2, 64)
    want = lin(x)

    def _in_decode():
        from ops.pdl import _in_decode as flag
        return flag.get()

    monkeypatch.setenv("LORASERVE_DECODE_GEMV", "2")
    with torch.no_grad():
        assert torch.allclose(llama.base_linear(lin, x), want)  # outside a decode forward
        assert calls == []
        with decode_scope():
            got = llama.base_linear(lin, x)
            assert calls == [(2, True)] and torch.allclose(got, want, atol=1e-5)
            llama.base_linear(lin, torch.randn(3, 64))  # more rows than the setting
            assert len(calls) == 1
            monkeypatch.setenv("LORASERVE_DECODE_GEMV", "0")
            llama.base_linear(lin, x)
            assert len(calls) == 1


# ------------------------------------------------------------------------------- CUDA

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rows", [1, 2, 8])
def test_llama_8b_projections_bf16(rows):
    """bf16 at Llama-3.1-8B's projections: within bf16 rounding of F.linear (fp32 sums both)."""
    g = torch.Generator(device="cuda").manual_seed(rows)
    for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)):
        x = torch.randn(rows, k, device="cuda", generator=g).to(torch.bfloat16)
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        got = decode_gemv(x, w).float()
        want = F.linear(x.float(), w.float())
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 4e-3, (n, k, rel)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("batch", [1, 4])
def test_layer_chain_with_gemv_under_pdl_in_a_graph_matches_without(batch):
    """tests/test_pdl.py's layer chain with every projection this kernel: with PDL (each
    projection's weight loaded before its wait), eagerly and from a graph, bit for bit the
    same chain launched without PDL."""
    from tests.test_pdl import check_chain_with_pdl

    check_chain_with_pdl(batch, linear=lambda x, w, pdl: decode_gemv(x, w, pdl=pdl))
