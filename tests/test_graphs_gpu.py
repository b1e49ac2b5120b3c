"""Decode CUDA graphs (device only): graphs on and off give identical tokens across batches that
mix base rows and several adapters of different ranks, including replays with more adapters
resident than at capture (capture sees an empty pool)."""

from __future__ import annotations

import gc

import pytest
import torch

from runtime.config import LoraPathSpec
from tests.engine_utils import greedy, make_engine, run, run_batch
from tests.models import make_adapter, make_model, prompts, read_vocab

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    model = make_model(root / "m", "llama", hidden=128, heads=4, kv_heads=2, inter=256)
    ranks = [1, 4, 8, 16]
    targets = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"],
               ["gate_proj", "up_proj", "down_proj"], ["q_proj", "down_proj"]]
    adapters = [make_adapter(model, root / f"a{i}", rank=r, targets=t, seed=i)
                for i, (r, t) in enumerate(zip(ranks, targets))]
    return model, adapters


def outputs(model, prompts_, names, n, **cfg):
    """Run one fresh engine over the batch, then free its GPU memory for the next one."""
    engine = make_engine(model, **cfg)
    graphs = engine.runner.graphs
    out = run(run_batch(engine, prompts_, greedy(n), names))
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return out, graphs is not None


@pytest.mark.parametrize("backend", ["csgmv", "triton"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graphs_match_eager(setup, backend, dtype):
    model, adapters = setup
    vocab = read_vocab(model)
    specs = tuple(LoraPathSpec(f"a{i}", str(p)) for i, p in enumerate(adapters))
    ps = prompts(24, vocab, seed=3, lo=4, hi=60)
    names = [None, "a0", "a1", "a2", "a3", None] * 4
    common = {"device": "cuda", "dtype": dtype, "mem_fraction_static": 0.05, "lora_paths": specs,
                  "max_loras_per_batch": 4, "lora_backend": backend, "max_lora_rank": 16,
                  "lora_target_modules": ("all",)}
    eager, used = outputs(model, ps, names, 32, disable_cuda_graph=True, **common)
    assert not used
    graphed, used = outputs(model, ps, names, 32, cuda_graph_max_bs=32, **common)
    assert used
    assert graphed == eager
    base = [None] * 5
    eager_base, _ = outputs(model, ps[:5], base, 16, disable_cuda_graph=True, **common)
    graph_base, _ = outputs(model, ps[:5], base, 16, cuda_graph_max_bs=32, **common)
    assert graph_base == eager_base
