"""Paged attention: torch references against dense maths, Triton kernels against the references.

CPU tests run the kernels under TRITON_INTERPRET=1 at small shapes in fp32 and fp16; the
GPU tests run bf16 at real shapes.
"""

import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

if not torch.cuda.is_available():
    # Without a GPU the kernels run in Triton's interpreter; set before they are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ops.attention import (
    decode_attention_triton,
    paged_decode_attention,
    paged_decode_attention_torch,
    paged_prefill_attention,
    paged_prefill_attention_torch,
    prefill_attention_triton,
    store_kv,
)
from ops.triton_decode_attention import choose_min_split, choose_num_splits
from ops.triton_prefill_attention import prefill_block_m, prefill_tile_bound, prefill_tile_table

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# Kernel output vs the fp32 reference: fp16/bf16 round the probabilities before the PV dot.
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


@dataclass
class PagedBatch:
    """A batch whose KV lives, shuffled, in a NaN-poisoned paged cache."""

    q: Tensor  # [T, H, D]
    keys: list[Tensor]  # per sequence, dense [kv_len, KVH, D]
    values: list[Tensor]
    k_cache: Tensor  # [num_blocks, block_size, KVH, D]
    v_cache: Tensor
    block_tables: Tensor  # [B, max_blocks] int32, garbage past each sequence's blocks
    cu_q_lens: Tensor  # [B + 1] int32
    kv_lens: Tensor  # [B] int32
    q_lens: list[int]

    @property
    def max_q_len(self) -> int:
        return max(self.q_lens)


def make_batch(
    q_lens: list[int],
    kv_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str = "cpu",
    seed: int = 0,
) -> PagedBatch:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    blocks_per_seq = [-(-kv_len // block_size) for kv_len in kv_lens]
    max_blocks = max(blocks_per_seq) + 2
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks stay NaN
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
    # Padding: out-of-range ids, and ids of a NaN spare block that a stray read would pick up.
    tables = torch.randint(-(2**20), 2**20, (len(kv_lens), max_blocks), generator=gen)
    tables[:, ::2] = num_blocks - 1
    block_ids = torch.randperm(num_blocks - 3, generator=gen).tolist()
    keys, values, slots = [], [], []
    for b, kv_len in enumerate(kv_lens):
        seq_blocks = [block_ids.pop() for _ in range(blocks_per_seq[b])]
        tables[b, : len(seq_blocks)] = torch.tensor(seq_blocks, dtype=torch.long)
        positions = torch.arange(kv_len)
        slots.append(tables[b, positions // block_size] * block_size + positions % block_size)
        keys.append(randn(kv_len, num_kv_heads, head_dim))
        values.append(randn(kv_len, num_kv_heads, head_dim))
    store_kv(torch.cat(keys), torch.cat(values), k_cache, v_cache, torch.cat(slots).to(device))
    cu_q_lens = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return PagedBatch(
        q=randn(sum(q_lens), num_heads, head_dim),
        keys=keys,
        values=values,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=tables.to(dtype=torch.int32, device=device),
        cu_q_lens=cu_q_lens.to(device),
        kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=device),
        q_lens=q_lens,
    )


def dense_attention(batch: PagedBatch, scale: float) -> Tensor:
    """The maths with no paging, in float64: [T, H, D]."""
    outputs = []
    starts = batch.cu_q_lens.tolist()
    for b, (k, v) in enumerate(zip(batch.keys, batch.values)):
        q = batch.q[starts[b] : starts[b + 1]].double()  # [q_len, H, D]
        group = q.shape[1] // k.shape[1]
        k = k.double().repeat_interleave(group, dim=1)  # [kv_len, H, D]
        v = v.double().repeat_interleave(group, dim=1)
        q_len, kv_len = q.shape[0], k.shape[0]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        positions = torch.arange(kv_len - q_len, kv_len)
        causal = torch.arange(kv_len)[None, :] <= positions[:, None]
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        outputs.append(torch.einsum("hqk,khd->qhd", probs, v))
    return torch.cat(outputs)


def run_prefill_triton(batch: PagedBatch, scale: float) -> Tensor:
    out = torch.full_like(batch.q, float("nan"))  # poisoned: every element must be written
    result = prefill_attention_triton(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.cu_q_lens,
        batch.kv_lens, scale, batch.max_q_len, out=out,
    )  # fmt: skip
    assert result is out
    assert not out.isnan().any()
    return out


def run_decode_triton(batch: PagedBatch, scale: float, num_splits: int | None,
                      **kwargs) -> Tensor:
    out = torch.full_like(batch.q, float("nan"))
    decode_attention_triton(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens, scale,
        num_splits=num_splits, out=out, **kwargs,
    )  # fmt: skip
    assert not out.isnan().any()
    return out


def prefill_reference(batch: PagedBatch, scale: float) -> Tensor:
    return paged_prefill_attention_torch(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.cu_q_lens,
        batch.kv_lens, scale, batch.max_q_len,
    )  # fmt: skip


def decode_reference(batch: PagedBatch, scale: float) -> Tensor:
    return paged_decode_attention_torch(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens, scale
    )


# Full prefill, single-token continuation, chunked continuation over a long cached prefix
# (past one KV tile, so the kernel's unmasked loop runs), and a chunk ending mid-block.
PREFILL_Q_LENS = [9, 1, 20, 3]
PREFILL_KV_LENS = [9, 14, 20 + 70, 3 + 5]


def test_store_kv_round_trip() -> None:
    gen = torch.Generator().manual_seed(1)
    k_cache = torch.full((6, 4, 2, 16), float("nan"))
    v_cache = torch.full((6, 4, 2, 16), float("nan"))
    slots = torch.randperm(24, generator=gen)[:10]
    k, v = torch.randn(10, 2, 16, generator=gen), torch.randn(10, 2, 16, generator=gen)
    store_kv(k, v, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache[slots // 4, slots % 4], k, rtol=0, atol=0)
    torch.testing.assert_close(v_cache[slots // 4, slots % 4], v, rtol=0, atol=0)
    assert int(k_cache.isnan().any(-1).any(-1).sum()) == 24 - 10  # nothing else was touched


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_prefill_reference_matches_dense(group: int, block_size: int) -> None:
    batch = make_batch(PREFILL_Q_LENS, PREFILL_KV_LENS, 4, 4 // group, 32, block_size,
                       torch.float32, seed=group * 100 + block_size)  # fmt: skip
    expected = dense_attention(batch, 0.3).float()
    torch.testing.assert_close(prefill_reference(batch, 0.3), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_decode_reference_matches_dense(group: int, block_size: int) -> None:
    kv_lens = [1, block_size, 2 * block_size + 1, 37]
    batch = make_batch([1] * 4, kv_lens, 4, 4 // group, 32, block_size, torch.float32, seed=7)
    expected = dense_attention(batch, 0.3).float()
    torch.testing.assert_close(decode_reference(batch, 0.3), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_prefill_triton_matches_reference(dtype: torch.dtype, group: int, block_size: int) -> None:
    batch = make_batch(PREFILL_Q_LENS, PREFILL_KV_LENS, 4, 4 // group, 32, block_size, dtype,
                       seed=group + block_size)  # fmt: skip
    torch.testing.assert_close(
        run_prefill_triton(batch, 0.2), prefill_reference(batch, 0.2), **TOLERANCES[dtype]
    )


@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_prefill_triton_several_query_tiles(head_dim: int) -> None:
    # 150 queries of a 3-head group pack into 450 rows: four tiles, whose edges split a token's
    # heads between tiles, and whose diagonals sit past a cached prefix.
    batch = make_batch([150, 5], [150 + 21, 5], 3, 1, head_dim, 16, torch.float16, seed=3)
    torch.testing.assert_close(
        run_prefill_triton(batch, 0.1), prefill_reference(batch, 0.1),
        **TOLERANCES[torch.float16],
    )  # fmt: skip


def test_prefill_triton_strided_q() -> None:
    # q as the model hands it over: a view into a fused qkv projection.
    batch = make_batch([6, 2], [6, 11], 4, 2, 32, 4, torch.float32, seed=5)
    qkv = torch.randn(8, 4 + 2 + 2, 32)
    qkv[:, :4] = batch.q
    batch.q = qkv[:, :4]
    assert not batch.q.is_contiguous()
    torch.testing.assert_close(
        run_prefill_triton(batch, 0.2), prefill_reference(batch, 0.2), **TOLERANCES[torch.float32]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_triton_matches_reference(
    dtype: torch.dtype, group: int, block_size: int, num_splits: int
) -> None:
    # kv_len 1, exactly at a block boundary, one past it, and past one 64-token KV tile.
    kv_lens = [1, 2 * block_size, 2 * block_size + 1, 70]
    batch = make_batch([1] * 4, kv_lens, 4, 4 // group, 32, block_size, dtype, seed=group)
    # one 64-token tile a slice at least: the 70-token sequence takes two slices
    torch.testing.assert_close(
        run_decode_triton(batch, 0.2, num_splits),
        decode_reference(batch, 0.2), **TOLERANCES[dtype],
    )  # fmt: skip


@pytest.mark.parametrize(("num_splits", "min_split"), [(3, 1), (7, 64), (7, 128), (5, 300)])
def test_decode_slices_follow_length_and_merge_in_kernel(num_splits: int, min_split: int) -> None:
    """The kernel cuts each sequence by its own length (at least min_split tokens, whole
    64-token tiles, at most num_splits slices); the slices' last program merges them, and
    leaves every arrival count at zero for the next launch."""
    from ops import triton_decode_attention as tda

    kv_lens = [1, 64, 65, 130, 300, 447]
    batch = make_batch([1] * 6, kv_lens, 8, 2, 32, 16, torch.float32, seed=min_split)
    got = run_decode_triton(batch, 0.3, num_splits, min_split=min_split)
    torch.testing.assert_close(got, decode_reference(batch, 0.3), **TOLERANCES[torch.float32])
    counts = tda._counts[batch.q.device]
    assert counts.shape[0] >= 6 * 2 and not counts.any()


@pytest.mark.parametrize("config", [(16, 2, 1), (32, 4, 2), (128, 8, 1)])
def test_decode_launch_configs(config: tuple[int, int, int]) -> None:
    """Other tile widths and warp counts (benchmarks/attn_bench.py --configs) compute the same
    attention: slices of whole tiles of the given width, merged in the kernel."""
    batch = make_batch([1] * 3, [5, 130, 300], 8, 2, 32, 16, torch.float32, seed=config[0])
    got = run_decode_triton(batch, 0.3, 4, config=config)
    torch.testing.assert_close(got, decode_reference(batch, 0.3), **TOLERANCES[torch.float32])


def test_decode_rejects_bad_config() -> None:
    batch = make_batch([1], [5], 4, 2, 32, 4, torch.float32)
    with pytest.raises(ValueError, match="config"):
        run_decode_triton(batch, 0.3, 1, config=(48, 4, 2))


@pytest.mark.parametrize("head_dim", [16, 64, 128, 256])
def test_decode_triton_head_dims_and_default_splits(head_dim: int) -> None:
    batch = make_batch([1] * 3, [5, 130, 16], 8, 2, head_dim, 8, torch.float16, seed=head_dim)
    torch.testing.assert_close(
        run_decode_triton(batch, 0.1, None), decode_reference(batch, 0.1),
        **TOLERANCES[torch.float16],
    )  # fmt: skip


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_padding_row_gives_zeros(num_splits: int) -> None:
    # A CUDA-graph bucket pads the batch with kv_len == 0 rows; they must stay finite.
    batch = make_batch([1, 1], [9, 1], 4, 2, 32, 4, torch.float32, seed=11)
    batch.kv_lens[1] = 0
    expected = decode_reference(batch, 0.2)
    assert (expected[1] == 0).all()
    torch.testing.assert_close(run_decode_triton(batch, 0.2, num_splits), expected)


@pytest.mark.parametrize("form", ["lean", "masked", "wide", "signed"])
def test_kv_tile_index_forms(monkeypatch, form: str) -> None:
    """Every form of the KV tile load's index arithmetic (ops/triton_attention_tiles.py
    load_kv_tile) gives the reference's attention, decode and prefill, over a NaN-poisoned
    cache: LORASERVE_ATTN_LEAN=2 clamps a tile's positions past the sequence to its last one
    (never reading the NaN slots past it in its last block, nor the table's garbage past its
    blocks), with 32-bit offsets and with 64-bit ones (caches of 2**31 elements or more); 1
    keeps its unsigned arithmetic but masks those loads; the signed default (0) masks them."""
    from ops import triton_decode_attention as tda
    from ops import triton_prefill_attention as tpa

    monkeypatch.setenv("LORASERVE_ATTN_LEAN", {"signed": "0", "masked": "1"}.get(form, "2"))
    for module in (tda, tpa):
        monkeypatch.setattr(module, "wide_offsets", lambda k, v: form == "wide")
    # ends mid-block and mid-tile, at a block boundary, one token, past two 64-token tiles
    kv_lens = [37, 48, 1, 150]
    batch = make_batch([1] * 4, kv_lens, 8, 2, 32, 16, torch.float16, seed=5)
    torch.testing.assert_close(run_decode_triton(batch, 0.2, 3), decode_reference(batch, 0.2),
                               **TOLERANCES[torch.float16])
    batch = make_batch(PREFILL_Q_LENS, PREFILL_KV_LENS, 8, 2, 32, 16, torch.float16, seed=6)
    torch.testing.assert_close(run_prefill_triton(batch, 0.2), prefill_reference(batch, 0.2),
                               **TOLERANCES[torch.float16])


def test_lean_setting_is_checked(monkeypatch) -> None:
    from ops.triton_attention_tiles import lean_offsets

    monkeypatch.delenv("LORASERVE_ATTN_LEAN", raising=False)
    assert lean_offsets() == 0
    monkeypatch.setenv("LORASERVE_ATTN_LEAN", "3")
    with pytest.raises(ValueError, match="LORASERVE_ATTN_LEAN"):
        lean_offsets()


def test_wide_offsets_threshold() -> None:
    """A layer's cache of 2**31 elements or more takes the 64-bit offsets; one element fewer
    keeps 32-bit ones (meta tensors: nothing is allocated)."""
    from ops.triton_attention_tiles import wide_offsets

    small = torch.empty((2**31 - 1,), device="meta")
    large = torch.empty((2**31,), device="meta")
    assert not wide_offsets(small, small)
    assert wide_offsets(large, small) and wide_offsets(small, large)


def test_public_functions_use_torch_on_cpu() -> None:
    batch = make_batch([3, 1], [3, 6], 4, 2, 32, 4, torch.float32, seed=2)
    out = paged_prefill_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.cu_q_lens,
        batch.kv_lens, 0.2, batch.max_q_len,
    )  # fmt: skip
    torch.testing.assert_close(out, prefill_reference(batch, 0.2), rtol=0, atol=0)
    decode = make_batch([1, 1], [3, 6], 4, 2, 32, 4, torch.float32, seed=2)
    out = paged_decode_attention(
        decode.q, decode.k_cache, decode.v_cache, decode.block_tables, decode.kv_lens, 0.2
    )
    torch.testing.assert_close(out, decode_reference(decode, 0.2), rtol=0, atol=0)


def test_choose_num_splits(monkeypatch) -> None:
    monkeypatch.delenv("LORASERVE_DECODE_ATTN_PROGRAMS_PER_SM", raising=False)
    assert choose_num_splits(batch=32, num_kv_heads=8, max_kv_capacity=4096, num_sms=132) == 2
    assert choose_num_splits(batch=64, num_kv_heads=8, max_kv_capacity=4096, num_sms=132) == 1
    assert choose_num_splits(batch=1, num_kv_heads=8, max_kv_capacity=4096, num_sms=132) == 32
    # A short block table caps the slices: no slice under 128 tokens of capacity.
    assert choose_num_splits(batch=1, num_kv_heads=8, max_kv_capacity=256, num_sms=132) == 2
    # one program per SM as the aim: batch 32's 256 (sequence, KV head) pairs take one slice
    monkeypatch.setenv("LORASERVE_DECODE_ATTN_PROGRAMS_PER_SM", "1")
    assert choose_num_splits(batch=32, num_kv_heads=8, max_kv_capacity=4096, num_sms=132) == 1
    assert choose_num_splits(batch=1, num_kv_heads=8, max_kv_capacity=4096, num_sms=132) == 17
    monkeypatch.setenv("LORASERVE_DECODE_ATTN_PROGRAMS_PER_SM", "0")
    with pytest.raises(ValueError, match="PROGRAMS_PER_SM"):
        choose_num_splits(batch=1, num_kv_heads=8, max_kv_capacity=4096, num_sms=132)


def test_choose_min_split(monkeypatch) -> None:
    """One 64-token tile, but 256 tokens (LORASERVE_DECODE_ATTN_WIDE_MIN_SPLIT) for grids
    whose (sequence, KV head) programs fill every SM, only those."""
    monkeypatch.delenv("LORASERVE_DECODE_ATTN_WIDE_MIN_SPLIT", raising=False)
    assert choose_min_split(batch=32, num_kv_heads=8, num_sms=132) == 256
    assert choose_min_split(batch=17, num_kv_heads=8, num_sms=132) == 256
    assert choose_min_split(batch=16, num_kv_heads=8, num_sms=132) == 64
    assert choose_min_split(batch=1, num_kv_heads=8, num_sms=132) == 64
    monkeypatch.setenv("LORASERVE_DECODE_ATTN_WIDE_MIN_SPLIT", "64")
    assert choose_min_split(batch=32, num_kv_heads=8, num_sms=132) == 64
    monkeypatch.setenv("LORASERVE_DECODE_ATTN_WIDE_MIN_SPLIT", "128")
    assert choose_min_split(batch=17, num_kv_heads=8, num_sms=132) == 128
    assert choose_min_split(batch=1, num_kv_heads=8, num_sms=132) == 64
    monkeypatch.setenv("LORASERVE_DECODE_ATTN_WIDE_MIN_SPLIT", "0")
    with pytest.raises(ValueError, match="WIDE_MIN_SPLIT"):
        choose_min_split(batch=32, num_kv_heads=8, num_sms=132)


def test_decode_wide_grid_takes_longer_slices(monkeypatch) -> None:
    """A batch whose programs fill the SMs (34 sequences x 4 KV heads on the CPU's assumed 132)
    by default (LORASERVE_DECODE_ATTN_WIDE_MIN_SPLIT 256) runs sequences up to 256 tokens in
    one slice and longer ones in slices of 256 or more, merged in the kernel: the reference's
    attention, as with one 64-token tile at least."""
    kv_lens = [[1, 100, 256, 257, 300, 600][i % 6] for i in range(34)]
    batch = make_batch([1] * 34, kv_lens, 8, 4, 16, 16, torch.float32, seed=3)
    expected = decode_reference(batch, 0.3)
    for wide in ("", "64"):
        monkeypatch.setenv("LORASERVE_DECODE_ATTN_WIDE_MIN_SPLIT", wide)
        torch.testing.assert_close(run_decode_triton(batch, 0.3, None), expected,
                                   **TOLERANCES[torch.float32])


@pytest.mark.parametrize("wide", ["64", ""])
@pytest.mark.parametrize("idle_exit", ["", "0"])
def test_decode_idle_slices_exit_early(monkeypatch, wide: str, idle_exit: str) -> None:
    """By default (LORASERVE_DECODE_ATTN_IDLE_EXIT) slices past a sequence's own leave before
    the PDL wait, and with it 0 after; either way the rest compute and merge the reference's
    attention and leave every arrival count at zero (7 slices a sequence, most idle; with
    256-token slices, the default in a grid that fills the SMs, more)."""
    from ops import triton_decode_attention as tda

    monkeypatch.setenv("LORASERVE_DECODE_ATTN_IDLE_EXIT", idle_exit)
    monkeypatch.setenv("LORASERVE_DECODE_ATTN_WIDE_MIN_SPLIT", wide)
    kv_lens = [[0, 1, 64, 65, 300, 600][i % 6] for i in range(34)]
    batch = make_batch([1] * 34, kv_lens, 8, 4, 16, 16, torch.float32, seed=4)
    expected = decode_reference(batch, 0.3)
    torch.testing.assert_close(run_decode_triton(batch, 0.3, 7), expected,
                               **TOLERANCES[torch.float32])
    assert not tda._counts[batch.q.device].any()


def test_wrappers_reject_bad_inputs() -> None:
    batch = make_batch([2, 1], [4, 3], 4, 2, 32, 4, torch.float32)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.cu_q_lens,
            batch.kv_lens, 0.2, 2)  # fmt: skip
    with pytest.raises(ValueError, match="block_tables"):
        prefill_attention_triton(*args[:3], batch.block_tables.long(), *args[4:])
    with pytest.raises(ValueError, match="multiple"):
        prefill_attention_triton(batch.q[:, :3], *args[1:])
    with pytest.raises(ValueError, match="cu_q_lens"):
        prefill_attention_triton(*args[:4], batch.cu_q_lens[:-1], *args[5:])
    with pytest.raises(ValueError, match="dtype"):
        prefill_attention_triton(batch.q.half(), *args[1:])
    with pytest.raises(ValueError, match="head_dim"):
        decode_attention_triton(batch.q[:2, :, :16], *args[1:4], batch.kv_lens, 0.2)
    with pytest.raises(ValueError, match="kv_lens"):
        decode_attention_triton(batch.q[:2], *args[1:4], batch.kv_lens.long(), 0.2)
    with pytest.raises(ValueError, match="out"):
        decode_attention_triton(batch.q[:2], *args[1:4], batch.kv_lens, 0.2,
                                out=torch.empty(2, 4, 16))  # fmt: skip
    with pytest.raises(ValueError, match=r"q must be \[B, H, D\]"):
        decode_attention_triton(batch.q[0], *args[1:4], batch.kv_lens, 0.2)
    with pytest.raises(ValueError, match=r"q must be \[T, H, D\]"):
        prefill_attention_triton(batch.q[0], *args[1:])
    with pytest.raises(ValueError, match="out must be contiguous"):
        prefill_attention_triton(*args, out=torch.empty(4, 3, 32).transpose(0, 1))
    table = torch.tensor([0, 1, 65536, -1], dtype=torch.int32)
    for bad_table in (table.long(), table.view(2, 2), table[::2]):
        with pytest.raises(ValueError, match="tile_table"):
            prefill_attention_triton(*args, tile_table=bad_table)


# Tile-table launches, as a CUDA graph replays them: max_q_len is the bucket's bound, not the
# batch's longest query, the table is padded with -1, and so is the batch: q_len 0 sequences
# (kv_len 1) at its end and tokens past cu_q_lens[B] that no sequence owns.
# Decode rows, a short prompt, an idle sequence, a multi-tile chunk over a cached prefix.
TABLE_Q_LENS = [1, 9, 0, 140, 1, 3, 0, 0]
TABLE_KV_LENS = [17, 9, 6, 140 + 25, 1, 3 + 70, 1, 1]
TABLE_MAX_Q_LEN = 160


def run_prefill_table(
    batch: PagedBatch, scale: float, max_q_len: int, num_pad_entries: int, num_pad_tokens: int
) -> Tensor:
    """The table launch over batch.q plus num_pad_tokens unowned tokens: [T + pad, H, D]."""
    num_tokens, num_heads, head_dim = batch.q.shape
    group = num_heads // batch.k_cache.shape[2]
    block_m = prefill_block_m(max_q_len, group, head_dim, batch.q.dtype)
    entries = prefill_tile_table(batch.q_lens, group, block_m)
    table = prefill_tile_table(batch.q_lens, group, block_m, pad_to=len(entries) + num_pad_entries)
    q = torch.cat([batch.q, torch.randn(num_pad_tokens, num_heads, head_dim).to(batch.q)])
    out = torch.full_like(q, float("nan"))
    prefill_attention_triton(
        q, batch.k_cache, batch.v_cache, batch.block_tables, batch.cu_q_lens, batch.kv_lens,
        scale, max_q_len, out=out,
        tile_table=torch.tensor(table, dtype=torch.int32, device=q.device),
    )  # fmt: skip
    assert not out[:num_tokens].isnan().any()  # every real row written
    assert out[num_tokens:].isnan().all()  # and no other
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 3])
def test_prefill_tile_table_matches_reference(dtype: torch.dtype, group: int) -> None:
    batch = make_batch(TABLE_Q_LENS, TABLE_KV_LENS, 2 * group, 2, 32, 4, dtype, seed=group)
    block_m = prefill_block_m(TABLE_MAX_Q_LEN, group, 32, dtype)
    assert cdiv_int(140 * group, block_m) >= 2  # the long chunk spans several tiles
    out = run_prefill_table(batch, 0.2, TABLE_MAX_Q_LEN, num_pad_entries=5, num_pad_tokens=3)
    num_tokens = batch.q.shape[0]
    expected = prefill_reference(batch, 0.2)
    torch.testing.assert_close(out[:num_tokens], expected, **TOLERANCES[dtype])
    # Same tiles as the 3-D grid of the same max_q_len, so the same bits.
    grid_out = torch.full_like(batch.q, float("nan"))
    prefill_attention_triton(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.cu_q_lens,
        batch.kv_lens, 0.2, TABLE_MAX_Q_LEN, out=grid_out,
    )  # fmt: skip
    torch.testing.assert_close(out[:num_tokens], grid_out, rtol=0, atol=0)


def test_prefill_tile_table_all_padding() -> None:
    # A replay whose batch is empty: every program exits, nothing is written.
    batch = make_batch([0, 0], [1, 1], 4, 2, 32, 4, torch.float32)
    batch.q = torch.randn(0, 4, 32)
    run_prefill_table(batch, 0.2, 16, num_pad_entries=4, num_pad_tokens=6)


def test_paged_prefill_attention_torch_ignores_tile_table() -> None:
    batch = make_batch([3, 1, 0], [3, 6, 1], 4, 2, 32, 4, torch.float32, seed=2)
    table = torch.full((7,), -1, dtype=torch.int32)  # not even this batch's table
    out = paged_prefill_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.cu_q_lens,
        batch.kv_lens, 0.2, 64, tile_table=table,
    )  # fmt: skip
    torch.testing.assert_close(out, prefill_reference(batch, 0.2), rtol=0, atol=0)


def cdiv_int(a: int, b: int) -> int:
    return -(-a // b)


def test_prefill_block_m_follows_max_q_len() -> None:
    assert prefill_block_m(1, 1, 128, torch.bfloat16) == 16
    assert prefill_block_m(20, 2, 128, torch.bfloat16) == 64
    assert prefill_block_m(256, 4, 128, torch.bfloat16) == 128
    assert prefill_block_m(256, 4, 128, torch.float32) == 64  # fp32 tiles stay small
    assert prefill_block_m(256, 4, 256, torch.bfloat16) == 64
    with pytest.raises(ValueError, match="positive"):
        prefill_block_m(0, 4, 128, torch.bfloat16)


def test_prefill_tile_table_packing_and_padding() -> None:
    # group 3, block_m 16: 1 token -> 3 rows, 1 tile; 6 tokens -> 18 rows, 2 tiles.
    assert prefill_tile_table([1, 0, 6], 3, 16) == [0, 2 * 65536, 2 * 65536 + 1]
    assert prefill_tile_table([1, 0, 6], 3, 16, pad_to=5) == [0, 131072, 131073, -1, -1]
    assert prefill_tile_table([16, 17], 1, 16, pad_to=3) == [0, 65536, 65537]
    assert prefill_tile_table([0, 0], 4, 64, pad_to=2) == [-1, -1]
    assert prefill_tile_table([], 4, 64) == []
    # The last sequence and the last tile that fit, both still non-negative int32.
    last = prefill_tile_table([0] * 32767 + [65536 * 16], 1, 16)
    assert last[-1] == 32767 * 65536 + 65535 == 2**31 - 1
    with pytest.raises(ValueError, match="more than 2"):
        prefill_tile_table([1, 0, 6], 3, 16, pad_to=2)
    with pytest.raises(ValueError, match="32767"):
        prefill_tile_table([0] * 32768 + [1], 1, 16)
    with pytest.raises(ValueError, match="65536"):
        prefill_tile_table([65536 * 16 + 1], 1, 16)
    with pytest.raises(ValueError, match="negative"):
        prefill_tile_table([3, -1], 1, 16)


def best_tile_count(max_tokens: int, max_seqs: int, group: int, block_m: int) -> int:
    """The longest table over all batches of the limits, by exhaustive dynamic programming."""
    # best[n]: most tiles from n tokens over the sequences so far (more can only add).
    best = [0] * (max_tokens + 1)
    for _ in range(max_seqs):
        best = [
            max([best[n]] + [best[n - q] + cdiv_int(q * group, block_m) for q in range(1, n + 1)])
            for n in range(max_tokens + 1)
        ]
    return best[max_tokens]


@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 6, 7, 16, 32])
def test_prefill_tile_bound_against_exhaustive(group: int, block_m: int) -> None:
    for max_tokens, max_seqs in [(0, 3), (5, 0), (1, 4), (7, 3), (20, 5), (40, 6), (33, 40)]:
        bound = prefill_tile_bound(max_tokens, max_seqs, group, block_m)
        best = best_tile_count(max_tokens, max_seqs, group, block_m)
        assert bound >= best
        # Never looser than the naive bound of one partial tile per sequence.
        assert bound <= cdiv_int(max_tokens * group, block_m) + max_seqs
        if block_m % group == 0 or group % block_m == 0:
            assert bound == best
        else:
            assert bound - best <= 1 + min(max_seqs, max_tokens) * group // block_m


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    q_lens=st.lists(st.integers(0, 600), max_size=48),
    group=st.integers(1, 8),
    block_m=st.sampled_from([16, 32, 64, 128]),
    spare_tokens=st.integers(0, 50),
    spare_seqs=st.integers(0, 5),
)
def test_prefill_tile_bound_holds(
    q_lens: list[int], group: int, block_m: int, spare_tokens: int, spare_seqs: int
) -> None:
    max_tokens, max_seqs = sum(q_lens) + spare_tokens, len(q_lens) + spare_seqs
    bound = prefill_tile_bound(max_tokens, max_seqs, group, block_m)
    assert len(prefill_tile_table(q_lens, group, block_m)) <= bound
    assert len(prefill_tile_table(q_lens, group, block_m, pad_to=bound)) == bound
    # The batch that reaches the bound when group divides block_m: one-token sequences and
    # one long one.
    num_seqs = min(max_seqs, max_tokens)
    if num_seqs and block_m % group == 0:
        worst = [1] * (num_seqs - 1) + [max_tokens - num_seqs + 1]
        assert len(prefill_tile_table(worst, group, block_m)) == bound


def test_prefill_tile_bound_at_a_graph_bucket() -> None:
    # 256 tokens over 32 sequences, 4-head groups, 128-row tiles: 31 one-token sequences and
    # one of 225 tokens (8 tiles) is the worst case.
    block_m = prefill_block_m(256, 4, 128, torch.bfloat16)
    assert prefill_tile_bound(256, 32, 4, block_m) == 39
    assert len(prefill_tile_table([1] * 31 + [225], 4, block_m)) == 39


# GPU, real shapes, bf16: 32 query heads over 8 KV heads, head_dim 128, 16-token blocks.


def _gpu_lens(seed: int, count: int, low: int, high: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (count,), generator=gen).tolist()


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("batch_size", [1, 8, 32])
@pytest.mark.parametrize("num_splits", [None, 1, 7])
@pytest.mark.parametrize("min_split", [None, 64, 256])  # None: choose_min_split
def test_gpu_decode_matches_reference(
    dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    batch_size: int,
    num_splits: int | None,
    min_split: int | None,
) -> None:
    kv_lens = _gpu_lens(batch_size, batch_size, 1, 2048)
    kv_lens[0] = 2048
    batch = make_batch([1] * batch_size, kv_lens, num_heads, num_kv_heads, head_dim, 16, dtype,
                       device="cuda", seed=batch_size)  # fmt: skip
    torch.testing.assert_close(
        run_decode_triton(batch, head_dim**-0.5, num_splits, min_split=min_split),
        decode_reference(batch, head_dim**-0.5),
        **TOLERANCES[dtype],
    )


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("block_size", [16, 1, 128])
def test_gpu_prefill_matches_reference(
    dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int
) -> None:
    # Eight sequences: fresh prompts and chunked continuations over cached prefixes.
    q_lens = _gpu_lens(1, 8, 1, 512)
    kv_lens = [q_len + prefix for q_len, prefix in zip(q_lens, _gpu_lens(2, 8, 0, 1536))]
    kv_lens[:3] = q_lens[:3]
    batch = make_batch(q_lens, kv_lens, num_heads, num_kv_heads, head_dim, block_size, dtype,
                       device="cuda", seed=block_size)  # fmt: skip
    tolerance = TOLERANCES[dtype] if dtype != torch.float32 else {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(
        run_prefill_triton(batch, head_dim**-0.5), prefill_reference(batch, head_dim**-0.5),
        **tolerance,
    )  # fmt: skip


@pytest.mark.gpu
@requires_cuda
def test_gpu_head_dim_256() -> None:
    prefill = make_batch([300, 40, 1], [300, 40 + 500, 77], 8, 2, 256, 16, torch.bfloat16,
                         device="cuda", seed=6)  # fmt: skip
    torch.testing.assert_close(
        run_prefill_triton(prefill, 0.06), prefill_reference(prefill, 0.06),
        **TOLERANCES[torch.bfloat16],
    )  # fmt: skip
    decode = make_batch([1] * 3, [1, 500, 2048], 8, 2, 256, 16, torch.bfloat16, device="cuda")
    torch.testing.assert_close(
        run_decode_triton(decode, 0.06, None), decode_reference(decode, 0.06),
        **TOLERANCES[torch.bfloat16],
    )  # fmt: skip


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("head_dim", [128, 256])
def test_gpu_decode_fp32(head_dim: int) -> None:
    batch = make_batch([1] * 8, _gpu_lens(8, 8, 1, 2048), 32, 8, head_dim, 16, torch.float32,
                       device="cuda", seed=8)  # fmt: skip
    torch.testing.assert_close(
        run_decode_triton(batch, 0.08, None), decode_reference(batch, 0.08), atol=1e-4, rtol=1e-4
    )


@pytest.mark.gpu
@requires_cuda
def test_gpu_public_functions_dispatch_to_triton() -> None:
    batch = make_batch([5, 1], [9, 1], 32, 8, 128, 16, torch.bfloat16, device="cuda")
    out = paged_prefill_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.cu_q_lens,
        batch.kv_lens, 0.1, batch.max_q_len,
    )  # fmt: skip
    torch.testing.assert_close(out, run_prefill_triton(batch, 0.1), rtol=0, atol=0)


@pytest.mark.gpu
@requires_cuda
def test_gpu_decode_cuda_graph_replay() -> None:
    # Capture once, then change the inputs in place: replays must follow the new contents.
    batch = make_batch([1] * 4, [2048] * 4, 32, 8, 128, 16, torch.bfloat16, device="cuda", seed=4)
    out = torch.empty_like(batch.q)

    def step() -> None:
        decode_attention_triton(batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
                                batch.kv_lens, 0.1, out=out)  # fmt: skip

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for kv_lens in ([1, 300, 2048, 17], [2048, 1, 16, 33]):
        batch.kv_lens.copy_(torch.tensor(kv_lens, dtype=torch.int32))
        batch.q.normal_()
        out.fill_(float("nan"))
        graph.replay()
        torch.testing.assert_close(out, decode_reference(batch, 0.1), **TOLERANCES[torch.bfloat16])


@pytest.mark.gpu
@requires_cuda
def test_gpu_prefill_tile_table_cuda_graph_replay() -> None:
    # One graph for a bucket of 256 tokens over 32 sequences, replayed for batches of other
    # shapes after copying their inputs and tile tables into its static buffers.
    num_heads, num_kv_heads, head_dim, block_size, dtype = 32, 8, 128, 16, torch.bfloat16
    max_tokens, max_seqs, max_blocks, num_blocks = 256, 32, 128, 4096
    group, scale = num_heads // num_kv_heads, head_dim**-0.5
    block_m = prefill_block_m(max_tokens, group, head_dim, dtype)
    num_entries = prefill_tile_bound(max_tokens, max_seqs, group, block_m)
    q = torch.zeros(max_tokens, num_heads, head_dim, dtype=dtype, device="cuda")
    out = torch.empty_like(q)
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype,
                          device="cuda")  # fmt: skip
    v_cache = torch.zeros_like(k_cache)
    block_tables = torch.zeros(max_seqs, max_blocks, dtype=torch.int32, device="cuda")
    cu_q_lens = torch.zeros(max_seqs + 1, dtype=torch.int32, device="cuda")
    kv_lens = torch.ones(max_seqs, dtype=torch.int32, device="cuda")
    tile_table = torch.full((num_entries,), -1, dtype=torch.int32, device="cuda")

    def step() -> None:
        prefill_attention_triton(q, k_cache, v_cache, block_tables, cu_q_lens, kv_lens, scale,
                                 max_tokens, out=out, tile_table=tile_table)  # fmt: skip

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    # A few sequences; all 32 (decode rows and chunks over cached prefixes); one full bucket.
    mixed = [1] * 24 + [30, 2, 100, 1, 50, 7, 1, 20]
    cases = [
        ([1, 1, 180, 37, 3], [700, 1, 180, 37 + 900, 3 + 15]),
        (mixed, [q_len + prefix for q_len, prefix in zip(mixed, range(0, 1600, 50))]),
        ([256], [256 + 1000]),
    ]
    for seed, (q_lens, seq_kv_lens) in enumerate(cases):
        batch = make_batch(q_lens, seq_kv_lens, num_heads, num_kv_heads, head_dim, block_size,
                           dtype, device="cuda", seed=seed)  # fmt: skip
        num_tokens, num_seqs = batch.q.shape[0], len(q_lens)
        q[:num_tokens] = batch.q
        k_cache[: batch.k_cache.shape[0]] = batch.k_cache
        v_cache[: batch.v_cache.shape[0]] = batch.v_cache
        block_tables.zero_()
        block_tables[:num_seqs, : batch.block_tables.shape[1]] = batch.block_tables
        cu_q_lens[: num_seqs + 1] = batch.cu_q_lens
        cu_q_lens[num_seqs + 1 :] = num_tokens  # padding sequences: q_len 0, kv_len 1
        kv_lens.fill_(1)
        kv_lens[:num_seqs] = batch.kv_lens
        table = prefill_tile_table(q_lens, group, block_m, pad_to=num_entries)
        tile_table.copy_(torch.tensor(table, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert not out[:num_tokens].isnan().any()
        assert out[num_tokens:].isnan().all()  # padding tokens are left alone
        torch.testing.assert_close(
            out[:num_tokens], run_prefill_triton(batch, scale), **TOLERANCES[dtype]
        )
    # The public function hands the table through to the same launch.
    eager = paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_q_lens, kv_lens, scale,
                                    max_tokens, tile_table=tile_table)  # fmt: skip
    torch.testing.assert_close(eager[:num_tokens], out[:num_tokens], rtol=0, atol=0)
