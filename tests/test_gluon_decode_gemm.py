"""ops/gluon_decode_gemm.py: the decode GEMM with W's first tiles in flight before the PDL wait
(LORASERVE_DECODE_GEMM_TMA, on by default). On the CPU: the kernel compiled for sm_90 issues
W's copies, and only W's, ahead of the wait, and the wrappers keep the Triton kernel where it
cannot run. On the device: bit for bit the Triton kernel at Llama-3.1-8B's projections
(unsplit with and without a bias, split-K partials, gate_up with SiLU*up), masked rows and
columns, the PDL layer chain in a graph bit for bit the chain without PDL, and a small Llama's
decode graphs captured with it bit for bit those captured with the Triton kernel."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton.experimental.gluon", reason="Triton without Gluon")

import ops.triton_decode_gemm as tdg
from ops.gluon_decode_gemm import tma_takes
from ops.triton_decode_gemm import decode_gemm, decode_gemm_silu_mul, tma_gemm_on
from tests.test_sm90_compile import needs_backend, run_without_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# where the Triton kernel runs the wrapper tests' tensors (the interpreter's on the CPU)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

PTX = r"""
import json, sys
from benchmarks.sass_stats import compile_tma_gemm
kw = json.loads(sys.argv[1])
k = compile_tma_gemm(**kw)
print(json.dumps({"ptx": k.asm["ptx"], "shared": k.metadata.shared}))
"""


def _ptx(**kw) -> dict:
    return run_without_interpreter(PTX, kw)


@needs_backend  # (Gluon: the module's importorskip)
@pytest.mark.parametrize(("case", "stages"), [
    # qkv at batch 32 with Qwen2's bias, 4 stages of 64 x 256
    ({"rows": 32, "n": 6144, "k": 4096, "bias": True}, 4),
    # o's split-K partials at batch 2 (x's rows padded to 16)
    ({"rows": 2, "n": 4096, "k": 4096, "partials": True}, 4),
    # gate_up with SiLU*up: two copies a stage (gate's rows, up's rows), 4 stages of 64 x 128
    ({"rows": 32, "n": 2 * 14336, "k": 4096, "tiling": "64:128:0:4:4", "silu_mul": True}, 4),
])
def test_w_tiles_are_in_flight_before_the_wait(case, stages):
    """The compiled kernel issues its first `stages` tiles of W (tensor-memory copies) before
    griddepcontrol.wait, no copy of x before it, and x's first tiles right after the release;
    it fits the H200's shared memory."""
    out = _ptx(**case)
    ptx = out["ptx"]
    assert out["shared"] <= 227 * 1024
    wait = ptx.index("griddepcontrol.wait")
    release = ptx.index("griddepcontrol.launch_dependents")
    assert wait < release
    copy = re.compile(r"cp\.async\.bulk\.tensor\.2d\S*\s+\[[^\]]+\],\s*\[(%rd\d+),")
    before = [m.group(1) for m in copy.finditer(ptx[:wait])]
    w_copies = stages * (2 if case.get("silu_mul") else 1)
    assert len(before) == w_copies, before
    assert len(set(before)) == 1  # one descriptor: W's
    loop = ptx.index("mbarrier.try_wait", release)
    after = [m.group(1) for m in copy.finditer(ptx[release:loop])]
    assert len(after) == stages and set(after).isdisjoint(before), after


def test_wrappers_keep_the_triton_kernel_where_it_cannot_run(monkeypatch):
    """With the setting on, CPU tensors, fp32 anywhere and W tiles of rows that are no whole
    warpgroup MMA go to the Triton kernel: its results, not an error. (On a CUDA machine
    without the interpreter the operands are CUDA's: the Triton kernel takes no CPU tensor.)"""
    monkeypatch.setattr(tdg, "tma_gemm_on", lambda: True)
    on_cpu = DEVICE == "cpu"
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 64, generator=g).half().to(DEVICE)
    w = torch.randn(32, 64, generator=g).half().to(DEVICE)
    assert not tma_takes(x.float(), w.float())
    if on_cpu:
        assert not tma_takes(x, w)
    # 16-row tiles over 4 warps: no whole warpgroup MMA, so the Triton kernel on CUDA too
    assert not tdg._tma(x, w, (16, 16, 0, 4, 2))
    got = decode_gemm(x, w, tiling="16:16:0:4:2")
    assert torch.allclose(got.float(), x.float() @ w.float().T, rtol=2e-3, atol=2e-2)
    wg = torch.randn(64, 64, generator=g).half().to(DEVICE)
    got = decode_gemm_silu_mul(x, wg, tiling="16:16:0:4:2")
    gate, up = (x.float() @ wg.float().T).split(32, dim=-1)
    assert torch.allclose(got.float(), F.silu(gate) * up, rtol=1e-2, atol=2e-2)


def test_setting(monkeypatch):
    for value, want in (("", True), ("0", False), ("1", True)):
        tdg._tma_flag.cache_clear()
        monkeypatch.setenv("LORASERVE_DECODE_GEMM_TMA", value)
        assert tma_gemm_on() is want
    tdg._tma_flag.cache_clear()
    monkeypatch.setenv("LORASERVE_DECODE_GEMM_TMA", "2")
    with pytest.raises(ValueError, match="LORASERVE_DECODE_GEMM_TMA"):
        tma_gemm_on()
    tdg._tma_flag.cache_clear()


def test_gate_up_setting_keeps_the_triton_kernel_for_silu_mul(monkeypatch):
    """LORASERVE_DECODE_GEMM_TMA_GATE_UP=0: `decode_gemm_silu_mul` never launches the Gluon
    kernel, where `decode_gemm` still does (the launch recorded, not run)."""
    for value, want in (("", True), ("0", False), ("1", True)):
        tdg._tma_gate_up_flag.cache_clear()
        monkeypatch.setenv("LORASERVE_DECODE_GEMM_TMA_GATE_UP", value)
        assert tdg.tma_gate_up_on() is want
    tdg._tma_gate_up_flag.cache_clear()
    launches = []
    monkeypatch.setattr(tdg, "_tma", lambda x, w, tile: True)
    monkeypatch.setattr(tdg, "tma_gemm_launch", lambda *a, **kw: launches.append(kw))
    monkeypatch.setattr(tdg, "tma_gate_up_on", lambda: False)
    x = torch.randn(3, 64).half().to(DEVICE)
    got = decode_gemm_silu_mul(x, torch.randn(64, 64).half().to(DEVICE), tiling="16:16:0:4:2")
    assert launches == [] and got.shape == (3, 32)
    decode_gemm(x, torch.randn(32, 64).half().to(DEVICE), tiling="16:16:0:4:2")
    assert len(launches) == 1
    monkeypatch.setattr(tdg, "tma_gate_up_on", lambda: True)
    decode_gemm_silu_mul(x, torch.randn(64, 64).half().to(DEVICE), tiling="16:16:0:4:2")
    assert launches[-1] == {"silu_mul": True}


def test_stages_under_the_shared_memory_setting(monkeypatch):
    """LORASERVE_DECODE_GEMM_TMA_SMEM (KB) caps the stages: at 150, batch 32's 64 x 256 tiles
    (48 KB a stage) take 3 (o beside two decode attention programs), gate_up's 64 x 128 (24 KB)
    keep 4, 128 x 256 tiles over 64 rows (96 KB) 1; by default (200) 4, 4 and 2; never fewer
    than one."""
    from ops import gluon_decode_gemm as gdg

    cases = {"": (4, 4, 2), "150": (3, 4, 1), "40": (1, 1, 1)}
    for value, want in cases.items():
        gdg._tma_smem_kb.cache_clear()
        monkeypatch.setenv("LORASERVE_DECODE_GEMM_TMA_SMEM", value)
        got = (gdg.tma_stages(4, 64, 256, 32, 2), gdg.tma_stages(4, 64, 128, 32, 2),
               gdg.tma_stages(4, 128, 256, 64, 2))
        assert got == want, (value, got)
    gdg._tma_smem_kb.cache_clear()
    monkeypatch.setenv("LORASERVE_DECODE_GEMM_TMA_SMEM", "300")
    with pytest.raises(ValueError, match="LORASERVE_DECODE_GEMM_TMA_SMEM"):
        gdg.tma_stages(4, 64, 256, 32, 2)
    gdg._tma_smem_kb.cache_clear()


def _both(monkeypatch, fn, *args, **kw):
    """fn(*args, **kw) by the Triton kernel, then by this one."""
    monkeypatch.setattr(tdg, "tma_gemm_on", lambda: False)
    want = fn(*args, **kw)
    monkeypatch.setattr(tdg, "tma_gemm_on", lambda: True)
    return want, fn(*args, **kw)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rows", [2, 8, 32])
def test_llama_8b_projections_bit_for_bit(rows, monkeypatch):
    """bf16 at Llama-3.1-8B's projections, unsplit (qkv with a bias too) and o and down in 2
    slices, with PDL and without: bit for bit the Triton kernel, within bf16 rounding of
    F.linear."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs sm_90+")
    g = torch.Generator(device="cuda").manual_seed(rows)
    for n, k, split, bias in ((6144, 4096, 1, False), (6144, 4096, 1, True),
                              (4096, 4096, 2, False), (4096, 14336, 2, False)):
        x = torch.randn(rows, k, device="cuda", generator=g).to(torch.bfloat16)
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        b = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16) if bias else None
        assert tma_takes(x, w)
        for pdl in (False, True):
            want, got = _both(monkeypatch, decode_gemm, x, w, b, pdl=pdl, split=split)
            assert torch.equal(got, want), (n, k, split, bias, pdl,
                                            (got.float() - want.float()).abs().max().item())
        ref = F.linear(x.float(), w.float(), None if b is None else b.float())
        got = got.sum(0) if split > 1 else got.float()
        rel = ((got - ref).norm() / ref.norm()).item()
        assert rel < 4e-3, (n, k, split, rel)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rows", [2, 8, 32])
@pytest.mark.parametrize("tiling", [None, "128:128:0:8:3"])
def test_llama_8b_gate_up_bit_for_bit(rows, tiling, monkeypatch):
    """bf16 at Llama-3.1-8B's gate_up with SiLU*up, with PDL and without: bit for bit the
    Triton kernel."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs sm_90+")
    g = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 4096, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(2 * 14336, 4096, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    for pdl in (False, True):
        want, got = _both(monkeypatch, decode_gemm_silu_mul, x, w, pdl=pdl, tiling=tiling)
        assert torch.equal(got, want), (pdl, (got.float() - want.float()).abs().max().item())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masked_rows_and_columns(dtype, monkeypatch):
    """N not a multiple of BLOCK_N (the copies fill W's missing rows with zeros), 3 rows of x
    padded to 16, K's 7 steps of 256 unsplit and over 3 slices (2, 2 and 3 steps: fewer than
    the stages), gate_up's inter not a multiple of half a tile: bit for bit the Triton
    kernel."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs sm_90+")
    g = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(3, 1792, device="cuda", generator=g).to(dtype)
    w = (torch.randn(200, 1792, device="cuda", generator=g) * 0.05).to(dtype)
    for split in (1, 3):
        want, got = _both(monkeypatch, decode_gemm, x, w, split=split, tiling="64:256:0:4:4")
        assert torch.equal(got, want), split
    wg = (torch.randn(2 * 100, 1792, device="cuda", generator=g) * 0.05).to(dtype)
    want, got = _both(monkeypatch, decode_gemm_silu_mul, x, wg, tiling="64:128:0:4:4")
    assert torch.equal(got, want)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("batch", [4, 32])
def test_layer_chain_under_pdl_in_a_graph_matches_without(batch, monkeypatch):
    """tests/test_pdl.py's layer chain with every projection this kernel: with PDL (W's first
    tiles in flight before each wait), eagerly and from a graph, bit for bit the chain
    without PDL."""
    from tests.test_pdl import check_chain_with_pdl

    monkeypatch.setattr(tdg, "tma_gemm_on", lambda: True)
    check_chain_with_pdl(batch, linear=lambda x, w, pdl: decode_gemm(x, w, pdl=pdl))


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    from tests.test_graphs_gpu import make_setup

    return make_setup(tmp_path_factory.mktemp("tma"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mixed", [False, True])
def test_decode_graph_with_it_is_bitwise_the_one_without(small_llama, mixed, monkeypatch):
    """bf16, a decode step of 21 requests (base rows alone, or mixed over 4 adapters) of a
    small Llama whose decode graphs run the decode GEMM (base-only graphs: qkv, o and down in
    2 slices, 2 of K's 4 steps a slice, fewer than the stages, gate_up with SiLU*up; LoRA
    graphs: whichever base projections and LoRA stacks the GEMM takes there): graphs
    captured with this kernel give the logits of those captured with the Triton kernel, bit
    for bit."""
    from runtime.graphs import DecodeGraphs
    from tests.test_graphs_gpu import mixed_decode_step

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs sm_90+")
    for name, value in {"LORASERVE_DECODE_GEMM": "32", "LORASERVE_DECODE_GEMM_SPLIT": "2",
                        "LORASERVE_DECODE_GEMM_TILE": "64:32:0:4:2",
                        "LORASERVE_DECODE_GATE_UP": "1",
                        "LORASERVE_DECODE_GATE_UP_TILE": "64:32:0:4:2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(tdg, "tma_gemm_on", lambda: False)
    engine, fb = mixed_decode_step(small_llama, "csgmv", names=None if mixed else [None] * 24)
    g = engine.runner.graphs
    with torch.inference_mode():
        want = g.replay(fb).clone()
    launches = []

    def counted(*args, **kw):
        launches.append(kw.get("silu_mul", False))
        return launch(*args, **kw)

    launch = tdg.tma_gemm_launch
    monkeypatch.setattr(tdg, "tma_gemm_launch", counted)
    monkeypatch.setattr(tdg, "tma_gemm_on", lambda: True)
    tma = DecodeGraphs(g.model, g.kv_k, g.kv_v, g.max_bs, g.max_blocks, g.scratch_block,
                       engine.runner.block_size, g.lora_backend)
    tma.capture(engine.runner.streams.compute)
    # every bucket's base-only and LoRA graphs: gate_up with SiLU*up among them
    assert True in launches and False in launches
    with torch.inference_mode():
        got = [tma.replay(fb).clone() for _ in range(2)]
    torch.cuda.synchronize()
    for logits in got:
        diff = (logits.float() - want.float()).abs().max().item()
        assert torch.equal(logits, want), f"max |diff| {diff}"
