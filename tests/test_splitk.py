"""Split-K projections left as partials for the next norm (ops/splitk.py, opt-in): the views,
the setting, which projections take them, add+RMSNorm summing them (the Triton kernel under the
interpreter, and the torch path), and a whole forward with them against one without."""

from __future__ import annotations

import os

import pytest
import torch

from ops.splitk import decode_splits, splitk_linear, splitk_scope, splitk_views, splits_for

needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="Triton kernels on the CPU need TRITON_INTERPRET=1")


def test_splitk_views_sum_to_the_projection() -> None:
    """The views are the input's and the weight's K slices, copies of nothing, and their
    batched products sum to x @ w.T; a K that does not split is an error."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 48, generator=g), torch.randn(20, 48, generator=g)
    for s in (1, 2, 3, 4):
        xs, wsl = splitk_views(x, w, s)
        assert xs.shape == (s, 3, 48 // s) and wsl.shape == (s, 48 // s, 20)
        assert xs.data_ptr() == x.data_ptr() and wsl.data_ptr() == w.data_ptr()
        torch.testing.assert_close(splitk_linear(x, w, s).sum(0), x @ w.T, rtol=1e-5,
                                   atol=1e-5)
        assert torch.equal(xs[s - 1], x[:, (s - 1) * 48 // s:])
    with pytest.raises(ValueError, match="split-K"):
        splitk_views(x, w, 5)


def test_decode_splits_setting(monkeypatch) -> None:
    """LORASERVE_DECODE_SPLITK: off by default and at 0, else the slice count (2 and more); a
    bad value is an error that names the setting."""
    monkeypatch.delenv("LORASERVE_DECODE_SPLITK", raising=False)
    assert decode_splits() == 0
    for raw, want in (("0", 0), ("2", 2), ("4", 4)):
        monkeypatch.setenv("LORASERVE_DECODE_SPLITK", raw)
        assert decode_splits() == want
    for bad in ("1", "-2", "two"):
        monkeypatch.setenv("LORASERVE_DECODE_SPLITK", bad)
        with pytest.raises(ValueError, match="LORASERVE_DECODE_SPLITK"):
            decode_splits()


def test_graph_splits_only_base_graphs_on_torchs_route(monkeypatch) -> None:
    """Split-K applies to base-only decode graphs below the cuBLASLt threshold (where cuBLAS
    splits K with a reduce launch of its own), never to LoRA graphs or cuBLASLt's. The decode
    GEMM's rows (2-32 by default) split as LORASERVE_DECODE_GEMM_SPLIT says (default 2)."""
    from runtime.graphs import graph_splits

    monkeypatch.delenv("LORASERVE_DECODE_SPLITK", raising=False)
    for name in ("LORASERVE_DECODE_GEMM", "LORASERVE_DECODE_GEMM_SPLIT", "LORASERVE_DECODE_GEMV",
                 "LORASERVE_DECODE_CUBLASLT_MIN_BS"):
        monkeypatch.delenv(name, raising=False)
    assert [graph_splits(bs, False) for bs in (1, 2, 16, 32, 33)] == [0, 2, 2, 2, 0]
    assert graph_splits(16, True) == 0
    monkeypatch.setenv("LORASERVE_DECODE_GEMM_SPLIT", "1")
    assert graph_splits(16, False) == 0
    monkeypatch.setenv("LORASERVE_DECODE_GEMM", "0")  # torch's BLAS route at every batch
    monkeypatch.setenv("LORASERVE_DECODE_SPLITK", "2")
    assert [graph_splits(bs, False) for bs in (1, 8, 15, 16, 32)] == [2, 2, 2, 0, 0]
    assert graph_splits(1, True) == 0
    monkeypatch.setenv("LORASERVE_DECODE_CUBLASLT_MIN_BS", "0")  # cuBLASLt off: every batch
    assert graph_splits(32, False) == 2
    monkeypatch.delenv("LORASERVE_DECODE_SPLITK")
    assert graph_splits(1, False) == 0


def test_splits_only_inside_the_scope_for_plain_bias_free_linears() -> None:
    lin = torch.nn.Linear(48, 20, bias=False)
    x = torch.zeros(3, 48)
    assert splits_for(lin, x) == 0  # outside any scope
    with splitk_scope(2):
        assert splits_for(lin, x) == 2
        assert splits_for(torch.nn.Linear(48, 20, bias=True), x) == 0
        assert splits_for(torch.nn.Linear(50, 20, bias=False), torch.zeros(3, 50)) == 2
        assert splits_for(torch.nn.Linear(49, 20, bias=False), torch.zeros(3, 49)) == 0

        class Sharded(torch.nn.Linear):  # a subclass may all-reduce its output: left alone
            pass

        assert splits_for(Sharded(48, 20, bias=False), x) == 0
        with splitk_scope(0):
            assert splits_for(lin, x) == 0
    assert splits_for(lin, x) == 0


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [2, 3])
def test_add_rmsnorm_sums_the_partials(dtype: torch.dtype, splits: int) -> None:
    """The kernel sums the partials, rounds the sum to the stream's dtype as the GEMM would
    have stored it, then adds and normalises as add_rmsnorm_triton does on that sum."""
    from ops.triton_rmsnorm import add_rmsnorm_partials_triton, add_rmsnorm_triton

    g = torch.Generator().manual_seed(splits)
    partials = torch.randn(splits, 5, 96, generator=g)
    residual = torch.randn(5, 96, generator=g).to(dtype)
    weight = (torch.rand(96, generator=g) + 0.5).to(dtype)
    out, s = add_rmsnorm_partials_triton(partials, residual, weight, 1e-5)
    want_out, want_s = add_rmsnorm_triton(partials.sum(0).to(dtype), residual, weight, 1e-5)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-3,
                                                                        "atol": 2e-3}
    torch.testing.assert_close(s, want_s, **tol)
    torch.testing.assert_close(out, want_out, **tol)
    with pytest.raises(ValueError, match="partials"):
        add_rmsnorm_partials_triton(partials.to(dtype) if dtype != torch.float32
                                    else partials[0], residual, weight, 1e-5)
    with pytest.raises(ValueError, match="partials"):
        add_rmsnorm_partials_triton(partials[:, :4], residual, weight, 1e-5)


@pytest.mark.parametrize("kernels", [False, True])
def test_forward_with_partials_matches_the_plain_forward(tmp_path, monkeypatch,
                                                         kernels: bool) -> None:
    """A whole forward whose o and down projections return split-K partials (each norm sums
    them; the final norm takes its rows' partials) gives the plain forward's logits, through
    the fused kernels under the interpreter and through the torch path."""
    import ops.dispatch
    from runtime.model import llama
    from tests.engine_utils import engine_logits, make_engine
    from tests.models import make_model, prompts, read_vocab

    if kernels:
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1")
        monkeypatch.setattr(ops.dispatch, "TRITON_ON_CPU", True)
    calls = {"linear": 0, "norm": 0}

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return call

    # torch's BLAS route: in the decode GEMM's rows a split it does not take runs unsplit
    monkeypatch.setenv("LORASERVE_DECODE_GEMM", "0")
    monkeypatch.setattr(llama, "splitk_linear", counted("linear", llama.splitk_linear))
    monkeypatch.setattr(llama, "add_rmsnorm_partials_triton",
                        counted("norm", llama.add_rmsnorm_partials_triton))
    model = make_model(tmp_path / "m", "llama", layers=3)
    engine = make_engine(model)
    tokens = prompts(1, read_vocab(model), seed=4, lo=9, hi=10)[0]
    plain = engine_logits(engine, tokens)
    assert calls == {"linear": 0, "norm": 0}
    with splitk_scope(2):
        split = engine_logits(engine, tokens)
    # o and down in each of 3 layers; the norms after them (the last down's: the final norm)
    assert calls == {"linear": 6, "norm": 6 if kernels else 0}
    torch.testing.assert_close(split, plain, rtol=1e-4, atol=1e-4)
