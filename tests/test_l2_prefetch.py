"""Weights prefetched into L2 inside decode graphs (ops/l2_prefetch.py): the setting, where it
applies, and on CUDA sm_90+ that a captured prefetch runs, changes no memory, and leaves a
served batch's greedy tokens as eager decode gives them."""

from __future__ import annotations

import pytest
import torch

from ops import l2_prefetch
from ops.lora import capture_paths

needs_sm90 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="needs CUDA sm_90+")


def test_prefetch_mb_reads_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("LORASERVE_L2_PREFETCH", raising=False)
    assert l2_prefetch.prefetch_mb() == l2_prefetch.PREFETCH_MB
    monkeypatch.setenv("LORASERVE_L2_PREFETCH", "o:32, gate_up:8.5")
    assert l2_prefetch.prefetch_mb() == {"o": 32.0, "gate_up": 8.5}
    monkeypatch.setenv("LORASERVE_L2_PREFETCH", "0")
    assert l2_prefetch.prefetch_mb() == {}
    for bad, why in (("mlp:4", "group"), ("o", "group"), ("o:x", "not a number"),
                     ("o:-1", ">= 0")):
        monkeypatch.setenv("LORASERVE_L2_PREFETCH", bad)
        with pytest.raises(ValueError, match=why):
            l2_prefetch.prefetch_mb()


def test_prefetches_only_inside_cuda_decode_captures(monkeypatch) -> None:
    """On CPU tensors, or outside a capture, the forward's context prefetches nothing and
    `after` launches nothing."""
    monkeypatch.setenv("LORASERVE_L2_PREFETCH", "o:32")
    x = torch.zeros(2, 4)
    with capture_paths(fold=True):
        assert not l2_prefetch.enabled(x)
        with l2_prefetch.forward(x):
            l2_prefetch.after(x, "o")  # a no-op: no plan outside a prefetching forward
    assert getattr(l2_prefetch._local, "plan", None) is None


@needs_sm90
@pytest.mark.gpu
def test_captured_prefetch_runs_and_changes_nothing(monkeypatch) -> None:
    """A decode-capture forward with prefetches forked after each of three GEMMs replays, its
    output is the eager one, and the weights are unchanged."""
    monkeypatch.setenv("LORASERVE_L2_PREFETCH", "o:1,gate_up:2,down:100")
    dev = torch.device("cuda")
    ws = [torch.randn(1024, 1024, device=dev) for _ in range(3)]
    before = [w.clone() for w in ws]
    x = torch.randn(4, 1024, device=dev)
    l2_prefetch.prepare(dev)

    def forward():
        h = x
        with l2_prefetch.forward(h):
            for w, group in zip(ws, ("o", "gate_up", "down")):
                h = torch.tanh(h @ w.t())
                l2_prefetch.after(w, group)
        return h

    want = forward()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with capture_paths(fold=True):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            assert l2_prefetch.enabled(x)
            out = forward()
    assert not l2_prefetch._prefetcher(dev).pending  # joined at the end of the forward
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want)
    for a, b in zip(ws, before):
        assert torch.equal(a, b)


@needs_sm90
@pytest.mark.gpu
def test_served_tokens_with_prefetch_match_eager(tmp_path, monkeypatch) -> None:
    """fp32, mixed base rows and two adapters: decode graphs that prefetch every group give
    eager decode's greedy tokens, and their captures did launch prefetches."""
    import gc

    from runtime.config import LoraPathSpec
    from tests.engine_utils import greedy, make_engine, run, run_batch
    from tests.models import make_adapter, make_model, prompts, read_vocab

    monkeypatch.setenv("LORASERVE_L2_PREFETCH", "o:1,gate_up:1,down:1,qkv:1")
    launches = []
    real = l2_prefetch.l2_prefetch
    monkeypatch.setattr(l2_prefetch, "l2_prefetch",
                        lambda w, n: (launches.append(n), real(w, n)))
    model = make_model(tmp_path / "m", "llama", hidden=512, heads=8, kv_heads=4, inter=1024)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    specs = tuple(LoraPathSpec(f"a{i}", str(make_adapter(model, tmp_path / f"a{i}", rank=8,
                                                          seed=i, targets=targets)))
                  for i in range(2))
    ps = prompts(6, read_vocab(model), seed=4, lo=4, hi=40)
    names = [None, "a0", "a1", "a0", None, "a1"]
    cfg = {"device": "cuda", "dtype": "float32", "mem_fraction_static": 0.05,
           "lora_paths": specs, "max_loras_per_batch": 2, "max_lora_rank": 8,
           "lora_target_modules": ("all",)}
    out = {}
    for graphs in (False, True):
        engine = make_engine(model, disable_cuda_graph=not graphs, **cfg)
        out[graphs] = run(run_batch(engine, ps, greedy(12), names))
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    assert launches, "no prefetch was captured"
    assert out[True] == out[False]
