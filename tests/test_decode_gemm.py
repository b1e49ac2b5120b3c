"""ops/triton_decode_gemm.py: decode projections of a few to 64 rows on tensor cores, their
first weight tile loaded before the PDL wait. Sums and split-K partials against F.linear (the
interpreter on the CPU, the device at Llama-3.1-8B shapes), the tiling and row settings, which
projections take it, and on the device a layer chain with it under PDL bit for bit the chain
without PDL."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ops.triton_decode_gemm import (
    DEFAULT_TILING,
    decode_gemm,
    decode_gemm_rows,
    gemm_fits,
    gemm_splits,
    gemm_tiling,
    pipeline_stages,
    qkv_gemm_splits,
    qkv_gemm_tiling,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("rows", "n", "k", "bias", "tiling"), [
    (2, 64, 64, False, "16:16:32:4:2"),    # rows padded to 16, W's first half ahead of the wait
    (17, 40, 96, True, "16:32:32:4:2"),    # rows padded to 32, N masked, a bias (Qwen2's qkv)
    (32, 48, 64, False, "32:16:0:4:2"),    # nothing loaded ahead: the loop alone
    (64, 16, 64, False, "16:16:64:4:2"),   # the most rows; all of K loaded ahead, no loop
])
def test_sums_match_linear(dtype, rows, n, k, bias, tiling):
    g = torch.Generator().manual_seed(rows * 100 + n)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    got = decode_gemm(x, w, b, tiling=tiling)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.dtype == dtype and got.shape == (rows, n)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert torch.allclose(got.float(), want, rtol=tol, atol=tol * k ** 0.5)


@pytest.mark.parametrize(("rows", "split", "tiling", "bounds"), [
    (3, 2, "16:16:16:4:2", (0, 64, 128)), (32, 4, "16:16:0:4:2", (0, 32, 64, 96, 128)),
    # 8 steps of 16 over 3 slices: 2, 3 and 3 steps (the first loads one ahead of the wait)
    (5, 3, "16:16:16:4:2", (0, 32, 80, 128)), (16, 3, "32:32:0:4:2", (0, 32, 64, 128))])
def test_split_k_partials_sum_to_linear(rows, split, tiling, bounds):
    """split > 1: fp32 partials [split, M, N], slice s the product over K's s-th slice; where
    the split does not divide K's BLOCK_K steps, slice s takes steps [s*n//split,
    (s+1)*n//split)."""
    g = torch.Generator().manual_seed(split)
    x = torch.randn(rows, 128, generator=g).half()
    w = torch.randn(32, 128, generator=g).half()
    parts = decode_gemm(x, w, split=split, tiling=tiling)
    assert parts.shape == (split, rows, 32) and parts.dtype == torch.float32
    for s in range(split):
        lo, hi = bounds[s], bounds[s + 1]
        want = x[:, lo:hi].float() @ w[:, lo:hi].float().T
        assert torch.allclose(parts[s], want, rtol=1e-3, atol=1e-3), s
    assert torch.allclose(parts.sum(0), x.float() @ w.float().T, rtol=1e-3, atol=1e-2)


def test_x_rows_may_be_strided():
    """x as a view of every other row of a wider buffer (a graph's static input)."""
    g = torch.Generator().manual_seed(3)
    buf = torch.randn(8, 96, generator=g)
    x = buf[::2, :64]
    w = torch.randn(32, 64, generator=g)
    assert torch.allclose(decode_gemm(x, w, tiling="16:16:32:4:2"), x @ w.T, atol=1e-4)


def test_tiling(monkeypatch):
    monkeypatch.delenv("LORASERVE_DECODE_GEMM_TILE", raising=False)
    assert gemm_tiling() == DEFAULT_TILING
    monkeypatch.setenv("LORASERVE_DECODE_GEMM_TILE", "32:256:512:8:3")
    assert gemm_tiling() == (32, 256, 512, 8, 3)
    for bad, why in (("32:256", "BLOCK_N:BLOCK_K"), ("24:256:512:8:3", "BLOCK_N"),
                     ("32:8:0:4:2", "BLOCK_K"), ("32:64:96:4:2", "PRE_K"),
                     ("32:64:64:0:2", "warps")):
        with pytest.raises(ValueError, match=why):
            gemm_tiling(bad)
    # Llama-3.1-8B's K (4096, 14336) tiles at the default, also as 2 slices; a K of 200 not
    tile = DEFAULT_TILING
    assert gemm_fits(32, 4096, 1, tile) and gemm_fits(32, 14336, 2, tile)
    assert not gemm_fits(32, 200, 1, tile) and not gemm_fits(65, 4096, 1, tile)
    assert not gemm_fits(8, 256, 1, (64, 128, 512, 4, 4))  # K narrower than loaded ahead
    # slices of uneven steps: 4096 at BLOCK_K 128 in 3 (10, 11, 11); not more slices than steps
    assert gemm_fits(32, 4096, 3, (128, 128, 0, 8, 4))
    assert not gemm_fits(32, 256, 3, (64, 128, 0, 4, 4))
    assert not gemm_fits(32, 640, 3, (64, 128, 256, 4, 4))  # a slice of 1 step, PRE_K 2

    # the pipeline's stages within SMEM_BUDGET: 64 rows at BLOCK_K 256 get 3 of 4 (256 KB)
    assert pipeline_stages((64, 256, 0, 4, 4), 32, 2) == 4
    assert pipeline_stages((64, 256, 0, 4, 4), 64, 2) == 3
    assert pipeline_stages((64, 256, 256, 4, 4), 32, 2) == 3


def test_bad_input_is_refused():
    w = torch.zeros(16, 64)
    t = "16:16:32:4:2"
    with pytest.raises(ValueError, match="do not multiply"):
        decode_gemm(torch.zeros(1, 8), w, tiling=t)
    with pytest.raises(ValueError, match="1 to 64 rows"):
        decode_gemm(torch.zeros(65, 64), w, tiling=t)
    with pytest.raises(ValueError, match="one dtype"):
        decode_gemm(torch.zeros(2, 64, dtype=torch.float16), w, tiling=t)
    with pytest.raises(ValueError, match="bias"):
        decode_gemm(torch.zeros(2, 64), w, torch.zeros(16), split=2, tiling=t)
    with pytest.raises(ValueError, match="do not tile"):
        decode_gemm(torch.zeros(2, 64), w, split=3, tiling=t)


def test_settings(monkeypatch):
    for name, fn, default in (("LORASERVE_DECODE_GEMM", decode_gemm_rows, 32),
                              ("LORASERVE_DECODE_GEMM_SPLIT", gemm_splits, 2),
                              ("LORASERVE_DECODE_GEMM_QKV_SPLIT", qkv_gemm_splits, 0)):
        monkeypatch.delenv(name, raising=False)
        assert fn() == default
        monkeypatch.setenv(name, "0")
        assert fn() == 0
        monkeypatch.setenv(name, "-1")
        with pytest.raises(ValueError, match=name):
            fn()
    monkeypatch.setenv("LORASERVE_DECODE_GEMM", "32")
    assert decode_gemm_rows() == 32
    monkeypatch.setenv("LORASERVE_DECODE_GEMM", "65")
    with pytest.raises(ValueError, match="LORASERVE_DECODE_GEMM"):
        decode_gemm_rows()
    for fn, name in ((gemm_splits, "LORASERVE_DECODE_GEMM_SPLIT"),
                     (qkv_gemm_splits, "LORASERVE_DECODE_GEMM_QKV_SPLIT")):
        monkeypatch.setenv(name, "1")
        assert fn() == 0
        monkeypatch.setenv(name, "2")
        assert fn() == 2
    monkeypatch.delenv("LORASERVE_DECODE_GEMM_QKV_TILE", raising=False)
    assert qkv_gemm_tiling() is None
    monkeypatch.setenv("LORASERVE_DECODE_GEMM_QKV_TILE", "128:128:256:8:3")
    assert qkv_gemm_tiling() == "128:128:256:8:3"
    monkeypatch.setenv("LORASERVE_DECODE_GEMM_QKV_TILE", "100:128:0:4:4")
    with pytest.raises(ValueError, match="power of two"):
        qkv_gemm_tiling()


def test_which_projections_take_it(monkeypatch, triton_on_cpu):
    """runtime/model/llama.py: inside a decode forward where layer PDL applies, rows above the
    GEMV's and up to LORASERVE_DECODE_GEMM take this kernel (o and down as split-K partials
    when the graph's scope splits); nn.Linear everywhere else. runtime/graphs.py
    `graph_splits` gives base-only graphs in its rows LORASERVE_DECODE_GEMM_SPLIT."""
    from ops.pdl import decode_scope
    from ops.splitk import splitk_scope
    from runtime import graphs
    from runtime.model import llama

    calls = []
    real = llama.decode_gemm

    def spy(x, w, b=None, pdl=False, split=1, tiling=None):
        calls.append((x.shape[0], pdl, split))
        return real(x, w, b, split=split, tiling=tiling)  # the interpreter: no PDL on the CPU

    def in_decode():
        from ops.pdl import _in_decode as flag
        return flag.get()

    monkeypatch.setattr(llama, "decode_gemm", spy)
    gemv_rows = []
    monkeypatch.setattr(llama, "decode_gemv",
                        lambda x, w, b=None, pdl=False: gemv_rows.append(x.shape[0]) or x)
    monkeypatch.setattr(llama, "pdl_resolve", lambda pdl, t: pdl is None and in_decode())
    monkeypatch.setenv("LORASERVE_DECODE_GEMM_TILE", "16:16:32:4:2")
    monkeypatch.setenv("LORASERVE_DECODE_GEMV", "1")
    monkeypatch.setenv("LORASERVE_DECODE_GEMM", "8")
    lin = nn.Linear(64, 32, bias=True)
    plain = nn.Linear(64, 32, bias=False)
    x = torch.randn(4, 64)
    monkeypatch.setattr(llama, "MAX_WEIGHT_ELEMS", 32 * 64)
    with torch.no_grad():
        want = lin(x)
        assert torch.allclose(llama.base_linear(lin, x), want)  # outside a decode forward
        assert calls == []
        with decode_scope():
            assert torch.allclose(llama.base_linear(lin, x), want, atol=1e-4)
            assert calls == [(4, True, 1)]
            llama.base_linear(lin, torch.randn(9, 64))  # more rows than the setting
            llama.base_linear(lin, torch.randn(1, 64))  # the GEMV's row
            assert len(calls) == 1 and gemv_rows == [1]
            with splitk_scope(2):
                parts = llama.project(plain, x, None, None, partials=True)
                assert calls[-1] == (4, True, 2) and parts.shape == (2, 4, 32)
                assert torch.allclose(parts.sum(0), plain(x), atol=1e-4)
                # the GEMM's rows, a weight whose K (40) its tiling does not divide: one
                # plain projection, not torch's split-K partials
                odd = nn.Linear(40, 32, bias=False)
                y = llama.project(odd, torch.randn(4, 40), None, None, partials=True)
                assert y.shape == (4, 32) and calls[-1] == (4, True, 2)
                # outside the GEMM's rows torch's split-K (LORASERVE_DECODE_SPLITK) stays
                parts = llama.project(plain, torch.randn(9, 64), None, None, partials=True)
                assert parts.shape == (2, 9, 32) and len(calls) == 2
            big = nn.Linear(64, 48)
            monkeypatch.setenv("LORASERVE_DECODE_GEMM_LARGE", "0")
            llama.base_linear(big, x)  # a weight above MAX_WEIGHT_ELEMS: cuBLAS, when off
            # a LoRA stack (project_fold's stack_mm) as any weight: by its size
            assert llama.gemm_takes_weight(torch.zeros(32, 64), x)
            assert not llama.gemm_takes_weight(torch.zeros(48, 64), x)
            assert len(calls) == 2 and llama.weight_tiling(big.weight) is None
            # LORASERVE_DECODE_GEMM_LARGE: larger weights too, at its tiling
            monkeypatch.setenv("LORASERVE_DECODE_GEMM_LARGE", "32:16:0:4:2")
            assert llama.weight_tiling(big.weight) == "32:16:0:4:2"
            assert llama.weight_tiling(lin.weight) is None
            assert llama.gemm_takes_weight(torch.zeros(48, 64), x)
            assert not llama.gemm_takes_weight(torch.zeros(48, 64), x, tiling="16:16:32:4:2")
            assert torch.allclose(llama.base_linear(big, x), big(x), atol=1e-4)
            assert len(calls) == 3
            monkeypatch.setenv("LORASERVE_DECODE_GEMM_LARGE", "32:24:0:4:2")
            with pytest.raises(ValueError, match="BLOCK_K"):
                llama.gemm_takes_weight(torch.zeros(48, 64), x)
            monkeypatch.delenv("LORASERVE_DECODE_GEMM_LARGE")
            monkeypatch.setenv("LORASERVE_DECODE_GEMM", "0")
            llama.base_linear(lin, x)
            assert len(calls) == 3
    monkeypatch.setenv("LORASERVE_DECODE_GEMM", "32")
    monkeypatch.setenv("LORASERVE_DECODE_GEMM_SPLIT", "2")
    assert graphs.graph_splits(32, with_lora=False) == 2
    assert graphs.graph_splits(32, with_lora=True) == 0
    assert graphs.graph_splits(40, with_lora=False) == 0  # cuBLASLt's rows: no split there


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2"])
def test_qkv_partials_summed_by_rotary_match_unsplit(arch, tmp_path, monkeypatch, triton_on_cpu):
    """The model's forward with every projection of up to 32 rows through the GEMM in the
    interpreter (PDL resolved as in a decode graph, fused kernels on), in a split scope: with
    LORASERVE_DECODE_GEMM_QKV_SPLIT=2, qkv leaves 2 fp32 partials that the rotary kernel sums
    (Qwen3's q/k norms after the sum); prefill logits and greedy tokens match qkv unsplit
    (fp32). Qwen2's qkv has a bias: it stays unsplit."""
    from runtime.model import llama
    from tests.engine_utils import engine_logits, greedy, make_engine, run, run_batch
    from tests.models import make_model, prompts, read_vocab

    folder = make_model(tmp_path, arch)
    ps = prompts(3, read_vocab(folder), seed=6, lo=3, hi=12)
    calls = []
    real = llama.decode_gemm

    def spy(x, w, b=None, pdl=False, split=1, tiling=None):
        calls.append((w.shape[0], split, tiling))
        return real(x, w, b, split=split, tiling=tiling)  # the interpreter: no PDL on the CPU

    monkeypatch.setattr(llama, "decode_gemm", spy)
    monkeypatch.setattr(llama, "runs_fused", lambda m, x: m.use_fused)
    monkeypatch.setattr(llama, "pdl_resolve", lambda pdl, t: True)
    monkeypatch.setattr(llama, "scope_splits", lambda: 2)  # as inside a base graph's capture
    monkeypatch.setenv("LORASERVE_DECODE_GEMV", "0")
    monkeypatch.setenv("LORASERVE_DECODE_GEMM", "32")
    monkeypatch.setenv("LORASERVE_DECODE_GEMM_TILE", "16:16:32:4:2")
    monkeypatch.setenv("LORASERVE_DECODE_GEMM_QKV_TILE", "32:16:0:4:2")
    qkv_rows = 64 + 2 * 32  # the tiny model: hidden 64, 4 heads over 2 KV heads
    logits, tokens = {}, {}
    for split in ("0", "2"):
        monkeypatch.setenv("LORASERVE_DECODE_GEMM_QKV_SPLIT", split)
        calls.clear()
        engine = make_engine(folder)
        logits[split] = engine_logits(engine, ps[0])
        tokens[split] = run(run_batch(engine, ps, greedy(5)))
        qkv_splits = {c for c in calls if c[0] == qkv_rows}
        if split == "2" and arch != "qwen2":
            assert qkv_splits == {(qkv_rows, 2, "32:16:0:4:2")}, qkv_splits
        else:
            assert qkv_splits == {(qkv_rows, 1, None)}, qkv_splits
    torch.testing.assert_close(logits["2"], logits["0"], rtol=1e-4, atol=1e-4)
    assert tokens["2"] == tokens["0"]


# ------------------------------------------------------------------------------- CUDA

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rows", [2, 8, 32, 64])
def test_llama_8b_projections_bf16(rows):
    """bf16 at Llama-3.1-8B's projections, unsplit and (o, down) in 2 slices: within bf16
    rounding of F.linear (fp32 sums both)."""
    g = torch.Generator(device="cuda").manual_seed(rows)
    for n, k, split in ((6144, 4096, 1), (4096, 4096, 2), (28672, 4096, 1), (4096, 14336, 2)):
        x = torch.randn(rows, k, device="cuda", generator=g).to(torch.bfloat16)
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        want = F.linear(x.float(), w.float())
        for s in {1, split}:
            got = decode_gemm(x, w, split=s)
            got = got.sum(0) if s > 1 else got.float()
            rel = ((got - want).norm() / want.norm()).item()
            assert rel < 4e-3, (n, k, s, rel)


@pytest.mark.gpu
@needs_cuda
def test_llama_8b_lora_stacks_in_3_slices_bf16():
    """bf16, a 32-slot pool's o and down stacks (4608 rows) at batch 32 as `lora_split_plan`
    takes them on the H200: 3 slices of K (uneven: 32 and 112 steps of 128) at
    WIDE_LORA_TILING, within bf16 rounding of F.linear."""
    from ops.triton_decode_gemm import WIDE_LORA_TILING

    g = torch.Generator(device="cuda").manual_seed(3)
    for k in (4096, 14336):
        x = torch.randn(32, k, device="cuda", generator=g).to(torch.bfloat16)
        w = (torch.randn(4608, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        got = decode_gemm(x, w, split=3, tiling=WIDE_LORA_TILING)
        assert got.shape == (3, 32, 4608)
        want = F.linear(x.float(), w.float())
        rel = ((got.sum(0) - want).norm() / want.norm()).item()
        assert rel < 4e-3, (k, rel)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("batch", [4, 32])
def test_layer_chain_with_gemm_under_pdl_in_a_graph_matches_without(batch):
    """tests/test_pdl.py's layer chain with every projection this kernel: with PDL (each
    projection's first W tile loaded before its wait), eagerly and from a graph, bit for bit
    the same chain launched without PDL."""
    from tests.test_pdl import check_chain_with_pdl

    check_chain_with_pdl(batch, linear=lambda x, w, pdl: decode_gemm(x, w, pdl=pdl))


def test_tma_setting_without_gluon_names_what_is_missing(monkeypatch, caplog):
    """Where ops/gluon_decode_gemm.py cannot be imported (a Triton without Gluon):
    LORASERVE_DECODE_GEMM_TMA=1 is an error naming the setting, not a silent fallback; by
    default the Triton kernel runs and the log says why; CPU operands never import it."""
    import sys

    import ops.triton_decode_gemm as tdg

    monkeypatch.setitem(sys.modules, "ops.gluon_decode_gemm", None)  # import fails
    x, w = torch.zeros(2, 64).half(), torch.zeros(32, 64).half()
    monkeypatch.setattr(tdg, "tma_gemm_on", lambda: True)
    tdg._tma_takes_fn.cache_clear()
    assert decode_gemm(x, w, tiling="64:16:0:4:2").shape == (2, 32)  # CPU: the Triton kernel
    assert tdg._tma_takes_fn.cache_info().currsize == 0
    try:
        monkeypatch.setenv("LORASERVE_DECODE_GEMM_TMA", "1")
        with pytest.raises(RuntimeError, match="LORASERVE_DECODE_GEMM_TMA=1 needs Triton's Gluon"):
            tdg._tma_takes_fn()
        tdg._tma_takes_fn.cache_clear()
        monkeypatch.delenv("LORASERVE_DECODE_GEMM_TMA")
        with caplog.at_level("WARNING", logger="ops.triton_decode_gemm"):
            assert tdg._tma_takes_fn() is None
        assert "has no Gluon" in caplog.text and "LORASERVE_DECODE_GEMM_TMA=0" in caplog.text
        assert tdg.tma_gemm_state() == "triton"  # what step_bench records then
    finally:
        tdg._tma_takes_fn.cache_clear()


def test_tma_gemm_state_says_which_kernel_runs(monkeypatch):
    """step_bench's record of the unfolded decode GEMMs' kernel follows both settings."""
    import ops.triton_decode_gemm as tdg

    monkeypatch.setattr(tdg, "_tma_takes_fn", lambda: (lambda x, w: True))
    for on, gate_up, want in ((True, True, "gluon"), (True, False, "gluon, gate_up on triton"),
                              (False, True, "triton"), (False, False, "triton")):
        monkeypatch.setattr(tdg, "tma_gemm_on", lambda on=on: on)
        monkeypatch.setattr(tdg, "tma_gate_up_on", lambda g=gate_up: g)
        assert tdg.tma_gemm_state() == want
