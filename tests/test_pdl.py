"""Programmatic dependent launch of the layer kernels (ops/pdl.py): the switch, and on the device
a chain of layers whose every kernel reads the one before, run with PDL inside a CUDA graph,
against the same chain without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ops.pdl import decode_scope, layer_pdl, resolve
from ops.triton_decode_attention import decode_attention_triton
from ops.triton_rmsnorm import add_rmsnorm_triton, rmsnorm_triton
from ops.triton_rope_store_kv import rope_store_kv_triton
from ops.triton_silu_mul import silu_mul_triton

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def fresh_switch():
    layer_pdl.cache_clear()
    yield
    layer_pdl.cache_clear()


def test_switch_is_on_by_default_off_on_cpu_and_outside_decode(monkeypatch, fresh_switch):
    monkeypatch.delenv("LORASERVE_LAYER_PDL", raising=False)
    assert not layer_pdl(torch.device("cpu"))  # CUDA sm_90+ only
    if torch.cuda.is_available():
        assert layer_pdl(torch.device("cuda")) == (torch.cuda.get_device_capability()[0] >= 9)
        t = torch.zeros(1, device="cuda")
        assert not resolve(None, t)  # outside a decode capture: no PDL
        with decode_scope():
            assert resolve(None, t) == layer_pdl(t.device)
            with decode_scope(False):
                assert not resolve(None, t)
        monkeypatch.setenv("LORASERVE_LAYER_PDL", "0")
        layer_pdl.cache_clear()
        with decode_scope():
            assert not resolve(None, t)
    with decode_scope():
        assert not resolve(None, torch.zeros(1))


def test_switch_rejects_other_values(monkeypatch, fresh_switch):
    monkeypatch.setenv("LORASERVE_LAYER_PDL", "yes")
    with pytest.raises(ValueError, match="LORASERVE_LAYER_PDL"):
        layer_pdl(torch.device("cpu"))


def test_pdl_on_a_cpu_tensor_is_refused():
    with pytest.raises(ValueError, match="sm_90"):
        resolve(True, torch.zeros(1))
    with pytest.raises(ValueError, match="sm_90"):
        rmsnorm_triton(torch.zeros(1, 8), torch.ones(8), 1e-5, pdl=True)


# ------------------------------------------------------------------------------- CUDA

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, PAGE = 1024, 8, 2, 128, 2816, 16


def make_layers(n: int, dtype: torch.dtype) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, device="cuda", generator=g) * 0.03).to(dtype)

    qkv_out = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    return [{"qkv": w(qkv_out, HIDDEN), "o": w(HIDDEN, HEADS * HEAD_DIM),
             "gate_up": w(2 * INTER, HIDDEN), "down": w(HIDDEN, INTER),
             "n1": (torch.rand(HIDDEN, device="cuda", generator=g) + 0.5).to(dtype),
             "n2": (torch.rand(HIDDEN, device="cuda", generator=g) + 0.5).to(dtype)}
            for _ in range(n)]


def plain_linear(x, w, pdl: bool):
    return F.linear(x, w)


def chain(h, layers, caches, cos, sin, slots, tables, lens, pdl: bool, linear=plain_linear):
    """Decoder layers as the decode forward runs them: each kernel reads its predecessor's
    output (norm -> GEMM -> rotary/store -> attention -> GEMM -> norm -> GEMM -> SiLU -> GEMM).
    linear(x, w, pdl): the projections (cuBLAS's, which launch without PDL, by default)."""
    residual = torch.zeros_like(h)
    q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for ly, (k_cache, v_cache) in zip(layers, caches):
        x, residual = add_rmsnorm_triton(h, residual, ly["n1"], 1e-5, pdl=pdl)
        qkv = linear(x, ly["qkv"], pdl)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        t = h.shape[0]
        q = rope_store_kv_triton(q.view(t, HEADS, HEAD_DIM), k.view(t, KV_HEADS, HEAD_DIM),
                                 v.view(t, KV_HEADS, HEAD_DIM), cos, sin, k_cache, v_cache,
                                 slots, pdl=pdl)
        o = decode_attention_triton(q, k_cache, v_cache, tables, lens, HEAD_DIM**-0.5, pdl=pdl)
        x, residual = add_rmsnorm_triton(linear(o.reshape(t, q_size), ly["o"], pdl), residual,
                                         ly["n2"], 1e-5, pdl=pdl)
        h = linear(silu_mul_triton(linear(x, ly["gate_up"], pdl), pdl=pdl), ly["down"], pdl)
    return rmsnorm_triton(h + residual, layers[-1]["n1"], 1e-5, pdl=pdl)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("batch", [1, 32])
def test_layer_chain_with_pdl_in_a_graph_matches_without(batch):
    """The chain with PDL, eagerly and replayed from a graph, bit for bit the chain without
    (the eager run starts from caches whose newest slot holds other values)."""
    check_chain_with_pdl(batch)


def check_chain_with_pdl(batch: int, linear=plain_linear) -> None:
    """The chain (projections by `linear`) with PDL, eagerly and from a graph, bit for bit
    the chain without."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90+")
    dtype, n_layers = torch.bfloat16, 4
    layers = make_layers(n_layers, dtype)
    ctx = 300  # tokens already in each sequence's cache, the new one is the 301st
    blocks_per_seq = (ctx + 1 + PAGE - 1) // PAGE
    num_blocks = batch * blocks_per_seq
    tables = torch.arange(num_blocks, device="cuda", dtype=torch.int32).view(batch, -1)
    lens = torch.full((batch,), ctx + 1, device="cuda", dtype=torch.int32)
    slots = (tables[:, ctx // PAGE] * PAGE + ctx % PAGE).long()
    positions = torch.full((batch,), ctx, device="cuda")
    inv = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda") / HEAD_DIM)
    freqs = torch.outer(positions.float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    shape = (num_blocks, PAGE, KV_HEADS, HEAD_DIM)
    start = [(torch.randn(shape, device="cuda").to(dtype), torch.randn(shape, device="cuda")
              .to(dtype)) for _ in range(n_layers)]

    def caches_copy():
        return [(k.clone(), v.clone()) for k, v in start]

    h_in = torch.randn(batch, HIDDEN, device="cuda").to(dtype)
    ref_caches = caches_copy()
    ref = chain(h_in, layers, ref_caches, cos, sin, slots, tables, lens, pdl=False,
                linear=linear)

    pdl_caches = caches_copy()
    static_h = h_in.clone()
    first = chain(static_h, layers, pdl_caches, cos, sin, slots, tables, lens, pdl=True,
                  linear=linear)  # compiles
    torch.cuda.synchronize()
    assert torch.equal(first, ref)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(static_h, layers, pdl_caches, cos, sin, slots, tables, lens, pdl=True,
                    linear=linear)
    for _ in range(3):  # replays rewrite the same cache slots with the same values
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref)
    for (k, v), (rk, rv) in zip(pdl_caches, ref_caches):
        assert torch.equal(k, rk) and torch.equal(v, rv)
    # a new input through the same graph: the chain reads it, not a stale one
    h2 = torch.randn(batch, HIDDEN, device="cuda").to(dtype)
    static_h.copy_(h2)
    graph.replay()
    ref2 = chain(h2, layers, caches_copy(), cos, sin, slots, tables, lens, pdl=False,
                 linear=linear)
    torch.cuda.synchronize()
    assert torch.equal(out, ref2)
