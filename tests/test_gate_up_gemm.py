"""ops/triton_decode_gemm.py `decode_gemm_silu_mul`: gate_up's projection and SiLU*up in one
launch (LORASERVE_DECODE_GATE_UP). Against the GEMM into gate_up then ops/triton_silu_mul.py
(the interpreter on the CPU; on the device bit for bit at Llama-3.1-8B's shape), which forwards
take it, the model's logits and greedy tokens with it against without (base rows and adapters
in one batch), and on the device decode graphs with it against eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ops.triton_decode_gemm import (
    DEFAULT_GATE_UP_TILING,
    DEFAULT_LARGE_TILING,
    GateUpFold,
    decode_gemm,
    decode_gemm_silu_mul,
    gate_up_fold_splits,
    gate_up_gemm,
    gate_up_tiling,
    large_gemm_tiling,
)
from ops.triton_silu_mul import silu_mul_triton

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def two_launches(x: torch.Tensor, w: torch.Tensor, tiling: str | None = None) -> torch.Tensor:
    """What the fused launch stands for: gate_up through the decode GEMM, then SiLU*up."""
    return silu_mul_triton(decode_gemm(x, w, tiling=tiling))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("rows", "inter", "k", "tiling"), [
    (3, 40, 64, "16:16:32:4:2"),   # inter not a multiple of 8 columns a program: masked
    (17, 64, 96, "32:32:0:4:2"),   # rows padded to 32, the loop alone
    (32, 48, 64, "64:16:0:4:2"),   # 32 columns a program over 48: the second half masked
    (64, 8, 32, "16:16:32:4:2"),   # the most rows; all of K loaded ahead, no loop
])
def test_matches_gate_up_then_silu_mul(dtype, rows, inter, k, tiling):
    g = torch.Generator().manual_seed(rows * 10 + inter)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = (torch.randn(2 * inter, k, generator=g) * 0.3).to(dtype)
    got = decode_gemm_silu_mul(x, w, tiling=tiling)
    assert got.shape == (rows, inter) and got.dtype == dtype
    # the interpreter's sums may round apart in the last place (its matmul's blocking follows
    # the tile's rows): within an ulp of the two launches, and near the fp32 formula
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(got, two_launches(x, w, tiling), rtol=tol, atol=tol)
    gate, up = F.linear(x.float(), w.float()).split(inter, dim=-1)
    torch.testing.assert_close(got.float(), F.silu(gate) * up, rtol=4 * tol, atol=4 * tol)


def stacked_reference(x, w, a, b, sc, rs, tiling=None):
    """What the one launch with a fold stands for: the pool's stacked GEMM (gate_up's rows,
    then every slot's A) and SiLU*up folding the delta (ops/triton_silu_mul.py)."""
    from ops.triton_lora_fold import LoraFold

    inter = w.shape[0] // 2
    y_all = decode_gemm(x, torch.cat([w, a]), tiling=tiling)
    fold = LoraFold(y_all[:, 2 * inter:].unsqueeze(0).contiguous(), b, sc, rs,
                    (0, inter, 2 * inter), None, t_slot_stride=a.shape[0] // b.shape[0])
    return silu_mul_triton(y_all[:, :2 * inter].contiguous(), fold=fold)


def fold_case(dtype, rows, inter, k, rank, slots, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = (torch.randn(2 * inter, k, generator=g) * 0.3).to(dtype)
    a = (torch.randn(slots * 2 * rank, k, generator=g) * 0.3).to(dtype)
    b = (torch.randn(slots, 2 * inter, rank, generator=g) * 0.3).to(dtype)
    sc = torch.rand(slots, 2, generator=g) + 0.5
    rs = torch.randint(-1, slots, (rows,), generator=g).to(torch.int32)
    return [v.to(device) for v in (x, w, a, b, sc, rs)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("rows", "inter", "k", "rank", "slots", "tiling", "splits"), [
    (5, 40, 64, 4, 3, "16:16:32:4:2", 2),   # t in 2 fp32 partials; inter masked
    (17, 64, 96, 6, 2, "32:32:0:4:2", 1),   # t unsplit in x's dtype; a rank padded to 8
    (24, 32, 96, 16, 5, "32:16:32:4:2", 3),  # 5 slots' 80 rank columns: 2 MMAs, one masked
    (6, 32, 64, 72, 2, "32:32:0:4:2", 1),   # a rank past 64: a slot's 128 columns an MMA
])
def test_fold_matches_stacked_gemm_then_silu_fold(dtype, rows, inter, k, rank, slots, tiling,
                                                  splits):
    """With gate_up's LoRA (`GateUpFold`: t from the decode GEMM over every slot's A, in
    slices of K; the delta as MMAs over 64 of the slots' rank columns at a time): as the
    stacked GEMM and SiLU*up's fold, for base rows and several adapters' rows mixed (fp16 bit
    for bit in the interpreter)."""
    x, w, a, b, sc, rs = fold_case(dtype, rows, inter, k, rank, slots, rows)
    t = decode_gemm(x, a, split=splits, tiling=tiling)
    t = t if splits > 1 else t.unsqueeze(0)
    got = decode_gemm_silu_mul(x, w, tiling=tiling, fold=GateUpFold(t, b, sc, rs))
    want = stacked_reference(x, w, a, b, sc, rs, tiling)
    tol = 1e-4 if dtype == torch.float32 else 0.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    plain = decode_gemm_silu_mul(x, w, tiling=tiling)  # base rows: no delta
    base = rs < 0
    torch.testing.assert_close(got[base], plain[base], rtol=tol, atol=tol)
    assert not torch.allclose(got[~base], plain[~base], atol=1e-2)


def test_fold_input_is_checked():
    x, w, _, b, sc, rs = fold_case(torch.float32, 4, 16, 32, 4, 2, 1)
    t = torch.zeros(1, 4, 16)
    t_ = "16:16:32:4:2"
    for fold, why in ((GateUpFold(t, b[:, :8], sc, rs), "fold B"),
                      (GateUpFold(t[:, :, :8], b, sc, rs), "fold t"),
                      (GateUpFold(t, b, sc.double(), rs), "fold scalings"),
                      (GateUpFold(t, b, sc, rs.long()), "fold row_slots")):
        with pytest.raises(ValueError, match=why):
            decode_gemm_silu_mul(x, w, tiling=t_, fold=fold)


def test_bad_input_is_refused(monkeypatch):
    t = "16:16:32:4:2"
    with pytest.raises(ValueError, match="do not multiply"):
        decode_gemm_silu_mul(torch.zeros(2, 8), torch.zeros(32, 64), tiling=t)
    with pytest.raises(ValueError, match="odd number of rows"):
        decode_gemm_silu_mul(torch.zeros(2, 64), torch.zeros(31, 64), tiling=t)
    with pytest.raises(ValueError, match="1 to 64 rows"):
        decode_gemm_silu_mul(torch.zeros(65, 64), torch.zeros(32, 64), tiling=t)
    with pytest.raises(ValueError, match="do not tile"):
        decode_gemm_silu_mul(torch.zeros(2, 40), torch.zeros(32, 40), tiling=t)
    with pytest.raises(ValueError, match="one dtype"):
        decode_gemm_silu_mul(torch.zeros(2, 64, dtype=torch.float16), torch.zeros(32, 64),
                             tiling=t)
    monkeypatch.setenv("LORASERVE_DECODE_GATE_UP_TILE", "24:16:0:4:2")
    with pytest.raises(ValueError, match="BLOCK_N"):
        decode_gemm_silu_mul(torch.zeros(2, 64), torch.zeros(32, 64))


def test_settings(monkeypatch):
    monkeypatch.delenv("LORASERVE_DECODE_GATE_UP", raising=False)
    monkeypatch.delenv("LORASERVE_DECODE_GATE_UP_TILE", raising=False)
    assert gate_up_gemm() is True and gate_up_tiling() == DEFAULT_GATE_UP_TILING
    monkeypatch.setenv("LORASERVE_DECODE_GATE_UP", "0")
    assert gate_up_gemm() is False
    for bad in ("2", "yes"):
        monkeypatch.setenv("LORASERVE_DECODE_GATE_UP", bad)
        with pytest.raises(ValueError, match="LORASERVE_DECODE_GATE_UP"):
            gate_up_gemm()
    monkeypatch.setenv("LORASERVE_DECODE_GATE_UP_TILE", "128:128:0:8:3")
    assert gate_up_tiling() == "128:128:0:8:3"
    monkeypatch.setenv("LORASERVE_DECODE_GATE_UP_TILE", "128:100:0:8:3")
    with pytest.raises(ValueError, match="BLOCK_K"):
        gate_up_tiling()
    monkeypatch.delenv("LORASERVE_DECODE_GATE_UP_FOLD", raising=False)
    assert gate_up_fold_splits() == 0
    monkeypatch.setenv("LORASERVE_DECODE_GATE_UP_FOLD", "8")
    assert gate_up_fold_splits() == 8
    monkeypatch.setenv("LORASERVE_DECODE_GATE_UP_FOLD", "-1")
    with pytest.raises(ValueError, match="LORASERVE_DECODE_GATE_UP_FOLD"):
        gate_up_fold_splits()
    # the tiling of weights and LoRA stacks above MAX_WEIGHT_ELEMS (gate_up's stacks)
    monkeypatch.delenv("LORASERVE_DECODE_GEMM_LARGE", raising=False)
    assert large_gemm_tiling() == DEFAULT_LARGE_TILING
    monkeypatch.setenv("LORASERVE_DECODE_GEMM_LARGE", "0")
    assert large_gemm_tiling() is None
    monkeypatch.setenv("LORASERVE_DECODE_GEMM_LARGE", "64:128")
    with pytest.raises(ValueError, match="BLOCK_N:BLOCK_K"):
        large_gemm_tiling()


def test_which_forwards_take_it(monkeypatch, triton_on_cpu):
    """runtime/model/llama.py `takes_gate_up_gemm`: a bias-free nn.Linear inside a decode
    forward where layer PDL applies, in the GEMM's rows, with LORASERVE_DECODE_GATE_UP=1."""
    from ops.pdl import _in_decode, decode_scope
    from runtime.model import llama

    monkeypatch.setattr(llama, "pdl_resolve", lambda pdl, t: pdl is None and _in_decode.get())
    monkeypatch.setenv("LORASERVE_DECODE_GATE_UP_TILE", "16:16:32:4:2")
    monkeypatch.setenv("LORASERVE_DECODE_GEMV", "1")
    monkeypatch.setenv("LORASERVE_DECODE_GEMM", "8")
    monkeypatch.setenv("LORASERVE_DECODE_GATE_UP", "1")
    lin = nn.Linear(64, 32, bias=False)
    x = torch.randn(4, 64)
    assert not llama.takes_gate_up_gemm(lin, x)  # outside a decode forward
    with decode_scope():
        assert llama.takes_gate_up_gemm(lin, x)
        assert not llama.takes_gate_up_gemm(nn.Linear(64, 32, bias=True), x)
        assert not llama.takes_gate_up_gemm(lin, torch.randn(9, 64))  # above the GEMM's rows
        assert not llama.takes_gate_up_gemm(lin, torch.randn(1, 64))  # the GEMV's row
        assert not llama.takes_gate_up_gemm(nn.Linear(40, 32, bias=False), torch.randn(4, 40))
        monkeypatch.setenv("LORASERVE_DECODE_GATE_UP", "0")
        assert not llama.takes_gate_up_gemm(lin, x)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_model_with_it_matches_without(arch, tmp_path, monkeypatch, triton_on_cpu):
    """The engine's forward with every MLP of up to 32 rows on the fused launch (the
    interpreter; PDL resolved as in a decode graph): logits and greedy tokens as without it
    (fp32), for base rows and adapters in one batch. Adapters on q and v leave gate_up to it;
    one on the MLP's projections takes the two launches wherever it is in the batch."""
    from runtime.config import LoraPathSpec
    from runtime.model import llama
    from tests.engine_utils import engine_logits, greedy, make_engine, run, run_batch
    from tests.models import make_adapter, make_model, prompts, read_vocab

    folder = make_model(tmp_path, arch)
    qv = make_adapter(folder, tmp_path / "qv", rank=4, seed=1)
    mlp = make_adapter(folder, tmp_path / "mlp", rank=4, seed=2,
                       targets=["gate_proj", "up_proj", "down_proj"])
    ps = prompts(4, read_vocab(folder), seed=8, lo=3, hi=12)
    calls = []
    real = llama.decode_gemm_silu_mul

    def spy(x, w, pdl=False, tiling=None):
        calls.append(x.shape[0])
        return real(x, w, tiling=tiling)  # the interpreter: no PDL on the CPU

    monkeypatch.setattr(llama, "decode_gemm_silu_mul", spy)
    plain = llama.decode_gemm
    monkeypatch.setattr(llama, "decode_gemm",
                        lambda x, w, b=None, pdl=False, split=1, tiling=None:
                        plain(x, w, b, split=split, tiling=tiling))
    monkeypatch.setattr(llama, "runs_fused", lambda m, x: m.use_fused)
    monkeypatch.setattr(llama, "pdl_resolve", lambda pdl, t: True)
    monkeypatch.setenv("LORASERVE_DECODE_GEMV", "0")
    monkeypatch.setenv("LORASERVE_DECODE_GEMM", "32")
    monkeypatch.setenv("LORASERVE_DECODE_GEMM_TILE", "16:16:32:4:2")
    monkeypatch.setenv("LORASERVE_DECODE_GATE_UP_TILE", "32:16:0:4:2")
    runs = {"qv": (qv, [None, "qv", None, "qv"]), "both": (None, [None, "qv", "mlp", "mlp"])}
    got = {}
    for on in ("0", "1"):
        monkeypatch.setenv("LORASERVE_DECODE_GATE_UP", on)
        for name, (_, loras) in runs.items():
            calls.clear()
            paths = [LoraPathSpec("qv", str(qv))]
            if name == "both":
                paths.append(LoraPathSpec("mlp", str(mlp)))
            engine = make_engine(folder, lora_paths=tuple(paths))
            got[on, name] = (engine_logits(engine, ps[0]),
                             run(run_batch(engine, ps, greedy(5), loras)))
            if on == "0":
                assert calls == [], name
            else:  # the batch's 4-row decode steps: with q/v adapter rows, not with MLP ones
                assert set(calls) <= set(range(1, 33)), calls
                assert (4 in calls) == (name == "qv"), (name, calls)
    for name in runs:
        torch.testing.assert_close(got["1", name][0], got["0", name][0], rtol=1e-4, atol=1e-4)
        assert got["1", name][1] == got["0", name][1], name


# ------------------------------------------------------------------------------- CUDA

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rows", [2, 8, 32])
@pytest.mark.parametrize("tiling", [None, "64:128:0:4:4", "128:128:0:8:3"])
def test_llama_8b_gate_up_bit_for_bit(rows, tiling):
    """bf16 at Llama-3.1-8B's gate_up (inter 14336): bit for bit the GEMM into gate_up and the
    SiLU*up kernel after it, with and without PDL; within bf16 rounding of fp32."""
    g = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 4096, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(2 * 14336, 4096, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    want = two_launches(x, w, tiling)
    for pdl in (False, True):
        got = decode_gemm_silu_mul(x, w, pdl=pdl, tiling=tiling)
        assert torch.equal(got, want), (pdl, (got.float() - want.float()).abs().max().item())
    gate, up = F.linear(x.float(), w.float()).split(14336, dim=-1)
    ref = F.silu(gate) * up
    rel = ((got.float() - ref).norm() / ref.norm()).item()
    assert rel < 8e-3, rel


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("rows", "slots"), [(8, 8), (32, 8), (32, 32)])
def test_llama_8b_gate_up_fold_bf16(rows, slots):
    """bf16 at Llama-3.1-8B's gate_up over 8 or 32 slots of rank 16, rows mixed over them and
    base rows, t in 8 slices of K, with and without PDL: within bf16 rounding of the stacked
    GEMM and SiLU*up's fold."""
    x, w, a, b, sc, rs = fold_case(torch.bfloat16, rows, 14336, 4096, 16, slots, rows, "cuda")
    w, a, b = w * 0.1, a * 0.1, b * 0.1
    want = stacked_reference(x, w, a, b, sc, rs).float()
    t = decode_gemm(x, a, split=8)
    for pdl in (False, True):
        got = decode_gemm_silu_mul(x, w, pdl=pdl, fold=GateUpFold(t, b, sc, rs)).float()
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 1e-2, (pdl, rel)
