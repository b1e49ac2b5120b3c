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


def test_decode_linear_takes_only_eligible_projections(monkeypatch) -> None:
    """Inside decode captures only, for plain bias-free linears whose shape has a tile, at most
    MAX_ROWS rows, unless LORASERVE_SKINNY_GEMM=0."""
    import ops.dispatch
    from ops.lora import capture_paths
    from ops.triton_skinny_gemm import MAX_ROWS, decode_linear, decode_tile

    assert decode_tile(4096, 1) == (32, 256, 4) and decode_tile(6144, 32) == (64, 256, 4)
    assert decode_tile(128256, 1) == (64, 128, 4)
    assert decode_tile(28672, 1) is None and decode_tile(4096, MAX_ROWS + 1) is None
    monkeypatch.setattr(ops.dispatch, "TRITON_ON_CPU", True)
    monkeypatch.delenv("LORASERVE_SKINNY_GEMM", raising=False)
    lin = torch.nn.Linear(64, 48, bias=False)
    x = torch.randn(3, 64)
    assert decode_linear(lin, x) is lin  # not in a decode capture
    with capture_paths(fold=True):
        f = decode_linear(lin, x)
        assert f is not lin
        torch.testing.assert_close(f(x), lin(x), rtol=1e-5, atol=1e-5)
        biased = torch.nn.Linear(64, 48)
        assert decode_linear(biased, x) is biased
        assert decode_linear(lin, torch.randn(MAX_ROWS + 1, 64)) is lin
        monkeypatch.setenv("LORASERVE_SKINNY_GEMM", "0")
        assert decode_linear(lin, x) is lin


def test_decode_forward_with_skinny_projections_in_the_interpreter(tmp_path, monkeypatch):
    """A served base-model batch: decode forwards inside decode captures (folds on) run their
    projections and lm_head through the skinny GEMM, and give the logits and greedy tokens of
    the same forwards with LORASERVE_SKINNY_GEMM=0."""
    import ops.dispatch
    import ops.triton_skinny_gemm as sg
    from ops.lora import capture_paths
    from runtime.model import llama
    from tests.engine_utils import greedy, make_engine, run, run_batch
    from tests.models import make_model, prompts, read_vocab

    monkeypatch.setattr(ops.dispatch, "TRITON_ON_CPU", True)
    model = make_model(tmp_path / "m", "llama")
    ps = prompts(3, read_vocab(model), seed=5, lo=3, hi=10)
    forward = llama.CausalLM.forward
    calls = []
    real = sg.skinny_gemm
    monkeypatch.setattr(sg, "skinny_gemm", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    logits, tokens = {}, {}
    for skinny in ("1", "0"):
        monkeypatch.setenv("LORASERVE_SKINNY_GEMM", skinny)
        seen = logits.setdefault(skinny, [])

        def patched(self, fb, kv_k, kv_v, seen=seen):
            with capture_paths(fold=fb.is_decode):
                out = forward(self, fb, kv_k, kv_v)
            if fb.is_decode:
                seen.append(out.clone())
            return out

        monkeypatch.setattr(llama.CausalLM, "forward", patched)
        tokens[skinny] = run(run_batch(make_engine(model), ps, greedy(4), [None] * 3))
        if skinny == "1":
            assert calls, "no projection took the skinny GEMM"
            calls.clear()
    assert not calls
    assert logits["1"] and len(logits["1"]) == len(logits["0"])
    for a, b in zip(logits["1"], logits["0"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert tokens["1"] == tokens["0"]
