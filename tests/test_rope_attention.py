"""Decode attention with the rotary kernel's work in its launch (ops/triton_decode_attention.py
decode_rope_attention_triton, LORASERVE_DECODE_ATTN_ROPE=1) against the two launches it
replaces: rope_store_kv_triton (the tables read at each position) then decode_attention_triton.
The same K/V in the cache, bit for bit, and the same attention output within the kernels'
rounding, over sequences of one token (the new one alone), of one slice and of several, a
padding row, q/k norms, split-K partials. CPU: the interpreter in fp32 and fp16; on CUDA also
bf16 at Llama-3.1-8B's heads, with PDL."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ops.triton_decode_attention import decode_attention_triton, decode_rope_attention_triton
from ops.triton_rope_store_kv import rope_store_kv_triton
from tests.test_fused_ops import rope_tables

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: {"atol": 2e-5, "rtol": 2e-5}, torch.float16: {"atol": 3e-3, "rtol": 3e-3},
       torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2}}


def make_case(lens: list[int], heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
              page: int, parts: int = 1, seed: int = 0):
    """Sequences of kv_lens `lens` (0: a padding row writing a scratch slot) in a shuffled
    paged cache holding every token but the new one; the step's qkv rows (or `parts` fp32
    split-K partials of them), positions, slots and block tables."""
    g = torch.Generator().manual_seed(seed)
    batch = len(lens)
    blocks_each = max(1, max(-(-n // page) for n in lens))
    num_blocks = batch * blocks_each + 1  # the last: the padding rows' scratch block
    perm = torch.randperm(batch * blocks_each, generator=g).to(torch.int32)
    tables = perm.view(batch, blocks_each)
    cache_shape = (num_blocks, page, kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=g).to(dtype)
    v_cache = torch.randn(cache_shape, generator=g).to(dtype)
    scratch = (num_blocks - 1) * page
    positions = torch.tensor([max(n - 1, 0) for n in lens])
    slots = torch.tensor([
        int(tables[b, (n - 1) // page]) * page + (n - 1) % page if n else scratch
        for b, n in enumerate(lens)])
    width = (heads + 2 * kv_heads) * head_dim
    if parts == 1:
        qkv = torch.randn(batch, width, generator=g).to(dtype)
    else:
        qkv = torch.randn(parts, batch, width, generator=g) / parts
    qkv = qkv.to(DEVICE)  # before the split: q, k and v stay views of one buffer (partials)
    lead = qkv.shape[:-1]
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(*lead, heads, head_dim)
    k, v = k.view(*lead, kv_heads, head_dim), v.view(*lead, kv_heads, head_dim)
    cos, sin = rope_tables(torch.arange(max(lens) + 8), head_dim, dtype)  # the whole tables
    dev = [x.to(DEVICE) for x in (q, k, v, cos, sin, positions, slots, tables, k_cache, v_cache)]
    return dev + [torch.tensor(lens, dtype=torch.int32, device=DEVICE)]


def norm_weights(qk_norm: bool, head_dim: int, dtype: torch.dtype):
    if not qk_norm:
        return None, None
    g = torch.Generator().manual_seed(7)
    return tuple((torch.rand(head_dim, generator=g) + 0.5).to(dtype).to(DEVICE)
                 for _ in range(2))


def check(lens, heads=8, kv_heads=2, head_dim=32, dtype=torch.float32, page=4, parts=1,
          qk_norm=False, num_splits=1, min_split=16, config=(16, 2, 1), pdl=None):
    q, k, v, cos, sin, pos, slots, tables, k_cache, v_cache, kv_lens = make_case(
        lens, heads, kv_heads, head_dim, dtype, page, parts)
    qw, kw = norm_weights(qk_norm, head_dim, dtype)
    scale = head_dim ** -0.5
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    q_rot = rope_store_kv_triton(q, k, v, cos, sin, ref_k, ref_v, slots, qw, kw, 1e-6,
                                 positions=pos)
    want = decode_attention_triton(q_rot, ref_k, ref_v, tables, kv_lens, scale,
                                   num_splits=num_splits, min_split=min_split, config=config,
                                   pdl=pdl)
    got = decode_rope_attention_triton(q, k, v, cos, sin, pos, k_cache, v_cache, slots, tables,
                                       kv_lens, scale, qw, kw, 1e-6, num_splits=num_splits,
                                       min_split=min_split, config=config, pdl=pdl)
    assert got.dtype == want.dtype == cos.dtype and got.shape == want.shape
    if not qk_norm:  # (with norms the head's sum of squares is taken in another order)
        assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    else:
        torch.testing.assert_close(k_cache, ref_k, **TOL[dtype])
        assert torch.equal(v_cache, ref_v)
    torch.testing.assert_close(got, want, **TOL[dtype])
    for b, n in enumerate(lens):
        if n == 0:
            assert not got[b].any()  # a padding row attends to nothing
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_matches_the_two_launches(dtype, num_splits) -> None:
    """One token (the new one alone), a token past a page, one 16-token slice and its edge,
    several slices, a padding row: cache and output as rotary then attention give them."""
    check([1, 5, 16, 17, 0, 40], dtype=dtype, num_splits=num_splits)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("parts", [1, 2])
def test_norms_and_split_k_partials(qk_norm, parts) -> None:
    """Qwen3's per-head q/k norms, and the qkv projection's fp32 split-K partials summed and
    rounded as the rotary kernel sums them (fp16 output)."""
    check([3, 33, 0, 9], dtype=torch.float16, parts=parts, qk_norm=qk_norm, num_splits=3)


def test_checks_its_inputs() -> None:
    q, k, v, cos, sin, pos, slots, tables, k_cache, v_cache, kv_lens = make_case(
        [2, 3], 8, 2, 32, torch.float32, 4)
    args = (k_cache, v_cache, slots, tables, kv_lens, 0.1)
    with pytest.raises(ValueError, match="positions must be"):
        decode_rope_attention_triton(q, k, v, cos, sin, pos[:1], *args)
    with pytest.raises(ValueError, match="block_tables"):
        decode_rope_attention_triton(q, k, v, cos, sin, pos, k_cache, v_cache, slots,
                                     tables[:1], kv_lens, 0.1)
    with pytest.raises(ValueError, match="row stride"):
        decode_rope_attention_triton(q, k, v, cos, torch.cat([sin, sin], 1)[:, :32], pos, *args)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the model on the CPU through the interpreter's kernels")
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_model_with_it_keeps_its_tokens(arch, tmp_path, monkeypatch, triton_on_cpu) -> None:
    """The model's forward with the Triton kernels (the interpreter): with
    LORASERVE_DECODE_ATTN_ROPE=1 every decode step's layers take the one launch, no rotary
    kernel at decode (each fused launch stands for one the run without made), and greedy
    tokens and the prefill logits are those without (fp32; Qwen3's q/k norms inside)."""
    from runtime.model import llama
    from tests.engine_utils import engine_logits, greedy, make_engine, run, run_batch
    from tests.models import make_model, prompts, read_vocab

    folder = make_model(tmp_path, arch)
    ps = prompts(3, read_vocab(folder), seed=4, lo=3, hi=12)
    calls: list[str] = []
    real_fused, real_rope = llama.decode_rope_attention_triton, llama.rope_store_kv_triton

    def fused(*a, **kw):
        calls.append("fused")
        return real_fused(*a, **kw)

    def rope(*a, **kw):
        calls.append("rope")
        return real_rope(*a, **kw)

    monkeypatch.setattr(llama, "decode_rope_attention_triton", fused)
    monkeypatch.setattr(llama, "rope_store_kv_triton", rope)
    out, counts = {}, {}
    for flag in ("0", "1"):
        monkeypatch.setenv("LORASERVE_DECODE_ATTN_ROPE", flag)
        calls.clear()
        engine = make_engine(folder, max_running_requests=3)
        logits = engine_logits(engine, ps[0])
        out[flag] = (logits, run(run_batch(engine, ps, greedy(4))))
        counts[flag] = (calls.count("rope"), calls.count("fused"))
    layers = engine.runner.model.args.num_layers
    assert counts["0"][1] == 0 and counts["1"][1] >= 3 * layers  # three decode steps at least
    assert counts["1"][0] + counts["1"][1] == counts["0"][0]
    torch.testing.assert_close(out["1"][0], out["0"][0], rtol=1e-5, atol=1e-5)
    assert out["1"][1] == out["0"][1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
@pytest.mark.parametrize("pdl", [False, True])
def test_bf16_llama_heads_on_cuda(pdl) -> None:
    """bf16 at Llama-3.1-8B's heads (32 over 8, 128 wide, 16-token pages), batch 32 over
    contexts up to 300 with the default slices and launch configuration, with PDL and
    without."""
    g = torch.Generator().manual_seed(3)
    lens = torch.randint(1, 300, (31,), generator=g).tolist() + [0]
    check(lens, heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16, page=16,
          num_splits=None, min_split=None, config=None, pdl=pdl)
