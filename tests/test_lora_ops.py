"""Multi-LoRA ops: batch metadata, the torch reference against a per-token computation, and both
Triton backends against the reference (CPU tensors under TRITON_INTERPRET=1; real shapes on CUDA).
"""

import dataclasses
import functools
import os
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    # before triton is imported: kernels run in the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ops.lora import (
    DECODE_CHUNK,
    PREFILL_CHUNK_TILES,
    LoraBatchInfo,
    apply_lora,
    apply_lora_torch,
    apply_lora_triton,
    build_lora_batch_info,
    linear_lora,
    lora_embed_shrink,
    lora_embed_shrink_torch,
    lora_embed_shrink_triton,
    lora_expand,
    lora_expand_torch,
    lora_expand_triton,
    lora_row_table,
    lora_shrink,
    lora_shrink_torch,
    lora_shrink_triton,
    overlaps_shrink,
)
from ops.triton_lora_expand import expand_max_splits
from ops.triton_lora_shrink import shrink_partials_buffer, shrink_split_k, triton_lora_shrink

# the interpreter trips a numpy deprecation on every scalar index
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BACKENDS = [("csgmv", 16), ("csgmv", 32), ("triton", 16)]


@pytest.fixture(params=["rows", "entries"])
def expand_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both expand kernels: over row blocks (steps of up to ROWS_EXPAND_MAX_TOKENS tokens) and
    over the row table's entries (larger steps)."""
    import ops.lora

    monkeypatch.setattr(ops.lora, "ROWS_EXPAND_MAX_TOKENS", 512 if request.param == "rows" else 0)
    return request.param


@dataclass
class LoraGroup:
    """Pool buffers of one fused module group, rows beyond each slot's rank zeroed."""

    A: torch.Tensor  # [num_slots, n*R, in]
    B: torch.Tensor  # [num_slots, N_total, R]
    scalings: torch.Tensor  # [num_slots, n] float32
    slot_ranks: torch.Tensor  # [num_slots] int32
    slice_offsets: tuple[int, ...]

    @property
    def num_slices(self) -> int:
        return len(self.slice_offsets) - 1


def make_group(
    ranks: list[int],
    rank_pad: int,
    in_dim: int,
    widths: list[int],
    dtype: torch.dtype,
    device: str = "cpu",
) -> LoraGroup:
    n, num_slots = len(widths), len(ranks)
    offsets = tuple(sum(widths[:i]) for i in range(n + 1))
    A = torch.randn(num_slots, n, rank_pad, in_dim, device=device) / in_dim**0.5
    B = torch.randn(num_slots, offsets[-1], rank_pad, device=device) / rank_pad**0.5
    for slot, rank in enumerate(ranks):
        A[slot, :, rank:] = 0
        B[slot, :, rank:] = 0
    return LoraGroup(
        A=A.reshape(num_slots, n * rank_pad, in_dim).to(dtype),
        B=B.to(dtype),
        scalings=torch.rand(num_slots, n, device=device) + 0.5,
        slot_ranks=torch.tensor(ranks, dtype=torch.int32, device=device),
        slice_offsets=offsets,
    )


def token_slots(layout: list[tuple[int, int]]) -> list[int]:
    """[(slot, length), ...] -> per-token slots."""
    return [slot for slot, length in layout for _ in range(length)]


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 1e-2}


def base_rows(slots: list[int]) -> torch.Tensor:
    return torch.tensor([s < 0 for s in slots])


# ------------------------------------------------------------------------------ batch metadata


def test_build_info_segments_and_chunks() -> None:
    slots = token_slots([(-1, 2), (3, 40), (-1, 1), (0, 3), (-1, 5)])
    info = build_lora_batch_info(slots, torch.ones(4, dtype=torch.int32), "csgmv", 16, "cpu")
    assert info.seg_indptr.tolist() == [0, 2, 42, 43, 46, 51]
    assert info.seg_slots.tolist() == [-1, 3, -1, 0, -1]
    assert (info.num_segments, info.max_seg_len) == (5, 40)
    assert info.chunk_indptr.tolist() == [0, 2, 18, 34, 42, 43, 46, 51]
    assert info.chunk_slots.tolist() == [-1, 3, 3, 3, -1, 0, -1]
    assert info.num_chunks == 7 and info.chunk_size == 16 and info.backend == "csgmv"
    assert info.seg_indptr.dtype == info.chunk_slots.dtype == torch.int32


def test_prefill_chunks_hold_several_tiles() -> None:
    """Steps that prefill cut segments into chunks of PREFILL_CHUNK_TILES tiles of chunk_size
    rows: the shrink gives each tile a program, the expand each program EXPAND_TILES tiles of
    one chunk; decode tables (DECODE_CHUNK) keep a tile a chunk."""
    slots = token_slots([(-1, 2), (3, 600), (0, 3)])
    ranks = torch.ones(4, dtype=torch.int32)
    info = build_lora_batch_info(slots, ranks, "csgmv", 32, "cpu")
    rows = 32 * PREFILL_CHUNK_TILES
    assert info.chunk_indptr.tolist() == [0, 2, 2 + rows, 2 + 2 * rows, 602, 605]
    assert info.chunk_slots.tolist() == [-1, 3, 3, 3, 0] and info.chunk_size == 32
    table = lora_row_table(info)
    assert (table.block_m, table.m_progs) == (32, PREFILL_CHUNK_TILES)
    short = build_lora_batch_info(token_slots([(0, 70), (1, 5)]), ranks, "csgmv", 32, "cpu")
    assert lora_row_table(short).m_progs == 3  # no more programs than the longest run's tiles
    decode = build_lora_batch_info(token_slots([(0, 40)]), ranks, "csgmv", DECODE_CHUNK, "cpu")
    assert decode.chunk_indptr.tolist() == [0, 16, 32, 40]
    assert lora_row_table(decode).m_progs == 1


def test_build_info_padding_and_empty() -> None:
    ranks = torch.ones(2, dtype=torch.int32)
    info = build_lora_batch_info([1, 1, 0], ranks, "triton", 16, "cpu", pad_to=4)
    assert info.seg_indptr.tolist() == [0, 2, 3, 3, 3]
    assert info.seg_slots.tolist() == [1, 0, -1, -1]
    assert info.chunk_indptr.tolist() == [0, 2, 3, 3, 3] and info.num_chunks == 4
    empty = build_lora_batch_info([], ranks, "csgmv", 16, "cpu")
    assert empty.num_segments == empty.num_chunks == empty.max_seg_len == 0


@pytest.mark.parametrize(
    ("slots", "backend", "chunk_size"),
    [([0, 1, 0], "csgmv", 16), ([0], "cuda-magic", 16), ([0], "csgmv", 24), ([2], "triton", 16)],
)
def test_build_info_rejects(slots: list[int], backend: str, chunk_size: int) -> None:
    with pytest.raises(ValueError):
        build_lora_batch_info(slots, torch.ones(2, dtype=torch.int32), backend, chunk_size, "cpu")


# ------------------------------------------------------------------ torch reference vs per token


@pytest.mark.parametrize("widths", [[24], [20, 12], [24, 8, 8]])
def test_reference_matches_per_token_math(widths: list[int]) -> None:
    ranks, rank_pad, in_dim = [4, 1, 16], 16, 40
    group = make_group(ranks, rank_pad, in_dim, widths, torch.float32)
    slots = token_slots([(-1, 2), (2, 5), (0, 1), (-1, 3), (1, 4), (-1, 1)])
    info = build_lora_batch_info(slots, group.slot_ranks, "triton", 16, "cpu")
    x = torch.randn(len(slots), in_dim)
    y = torch.randn(len(slots), sum(widths))
    expected = y.clone()
    n = group.num_slices
    for i, slot in enumerate(slots):
        if slot < 0:
            continue
        for j, (lo, hi) in enumerate(zip(group.slice_offsets, group.slice_offsets[1:])):
            a = group.A[slot, j * rank_pad : (j + 1) * rank_pad]  # [R, in], zero beyond rank
            b = group.B[slot, lo:hi]  # [width, R]
            expected[i, lo:hi] += group.scalings[slot, j] * (b @ (a @ x[i]))
    t = lora_shrink_torch(x, group.A, info, n)
    for i, slot in enumerate(slots):
        want = torch.zeros(n * rank_pad) if slot < 0 else group.A[slot] @ x[i]
        torch.testing.assert_close(t[i], want, atol=1e-5, rtol=1e-5)
    apply_lora_torch(x, group.A, group.B, y, group.slice_offsets, group.scalings, info)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    # the CPU dispatch is the reference
    y2 = expected.clone()
    lora_expand(
        lora_shrink(x, group.A, info, n), group.B, y2, group.slice_offsets, group.scalings, info
    )
    y3 = expected.clone()
    apply_lora(x, group.A, group.B, y3, group.slice_offsets, group.scalings, info)
    assert torch.equal(y2, y3)


# ------------------------------------------------------------------ Triton kernels vs reference

# (slot ranks, R, in, slice widths, layout)
CASES = {
    "n1-mixed": ([1, 8, 16], 16, 48, [40], [(-1, 3), (0, 17), (2, 1), (-1, 2), (1, 40)]),
    "n2-base-ends": ([8, 16], 16, 32, [24, 40], [(1, 3), (-1, 5), (0, 17), (-1, 1)]),
    "n3-qkv": ([64, 8, 1], 64, 40, [32, 8, 8], [(-1, 1), (2, 3), (0, 40), (1, 1), (-1, 17)]),
    "n3-r256": ([256, 32], 256, 24, [16, 24, 8], [(0, 17), (-1, 3), (1, 5)]),
    "n1-decode": ([16, 64, 1, 8], 64, 32, [48], [(3, 1), (0, 1), (-1, 1), (2, 1), (1, 1)]),
    "n3-decode": ([16, 4, 8], 16, 40, [32, 8, 8], [(0, 1), (-1, 1), (2, 1), (1, 1), (-1, 1)]),
    # past 64 tokens with every slice's columns in one shrink tile (fold)
    "n3-fold": ([16, 4, 1], 16, 40, [32, 8, 8], [(-1, 5), (0, 40), (1, 20), (-1, 3), (2, 9)]),
    "n2-fold": ([32, 5], 32, 24, [24, 40], [(1, 30), (-1, 10), (0, 33)]),
    # a prefill segment over two csgmv chunks of PREFILL_CHUNK_TILES tiles, the second partial
    "n2-long": ([16, 8], 16, 24, [24, 40], [(0, 300), (-1, 7), (1, 45)]),
}


def run_case(
    name: str, dtype: torch.dtype, backend: str, chunk_size: int, split_k: int | None
) -> None:
    ranks, rank_pad, in_dim, widths, layout = CASES[name]
    group = make_group(ranks, rank_pad, in_dim, widths, dtype)
    slots = token_slots(layout)
    info = build_lora_batch_info(slots, group.slot_ranks, backend, chunk_size, "cpu")
    num_tokens, n = len(slots), group.num_slices
    x = torch.randn(num_tokens, in_dim).to(dtype)
    tol = tolerances(dtype)

    t_ref = lora_shrink_torch(x, group.A, info, n)
    t = torch.full((num_tokens, n * rank_pad), float("nan"), dtype=dtype)
    lora_shrink_triton(x, group.A, info, n, split_k=split_k, out=t)
    torch.testing.assert_close(t, t_ref, **tol)
    assert not t[base_rows(slots)].any(), "base rows of t must be zero"

    # y is a column window of a wider buffer: strides are honoured, neighbours untouched
    wide = torch.randn(num_tokens, sum(widths) + 7).to(dtype)
    poisoned = wide.clone()
    y = wide[:, 3 : 3 + sum(widths)]
    y_ref = y.clone()
    lora_expand_torch(t_ref, group.B, y_ref, group.slice_offsets, group.scalings, info)
    lora_expand_triton(t_ref, group.B, y, group.slice_offsets, group.scalings, info)
    torch.testing.assert_close(y, y_ref, **tol)
    is_base = base_rows(slots)
    assert torch.equal(wide[is_base], poisoned[is_base]), "base rows changed"
    assert torch.equal(wide[:, :3], poisoned[:, :3]) and torch.equal(wide[:, -4:], poisoned[:, -4:])

    y_fused = poisoned[:, 3 : 3 + sum(widths)].clone()
    apply_lora_triton(
        x, group.A, group.B, y_fused, group.slice_offsets, group.scalings, info, split_k=split_k
    )
    torch.testing.assert_close(y_fused, y_ref, **tol)
    assert torch.equal(y_fused[is_base], poisoned[is_base, 3 : 3 + sum(widths)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("backend", "chunk_size"), BACKENDS, ids=["csgmv16", "csgmv32", "triton"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_reference(
    expand_kernel: str,
    name: str, backend: str, chunk_size: int, dtype: torch.dtype
) -> None:
    run_case(name, dtype, backend, chunk_size, split_k=None)


@pytest.mark.parametrize("split_k", [1, 2, 3])
@pytest.mark.parametrize("backend", ["csgmv", "triton"])
def test_split_k(backend: str, split_k: int) -> None:
    run_case("n3-qkv", torch.float32, backend, 16, split_k=split_k)


def test_split_k_partials_all_written() -> None:
    """Four splits over two K blocks: every partial is stored, the surplus ones as zeros."""
    group = make_group([8, 16], 16, 256, [24, 8], torch.float32)
    slots = token_slots([(-1, 2), (1, 5), (0, 3), (-1, 1)])
    info = build_lora_batch_info(slots, group.slot_ranks, "csgmv", 16, "cpu")
    table = lora_row_table(info)
    x = torch.randn(len(slots), 256)
    out = torch.full((4, len(slots), 32), float("nan"))
    triton_lora_shrink(
        x,
        group.A,
        group.slot_ranks,
        table.indptr,
        table.slots,
        table.num_entries,
        2,
        table.block_m,
        table.m_progs,
        out=out,
    )
    torch.testing.assert_close(out.sum(0), lora_shrink_torch(x, group.A, info, 2))


@pytest.mark.parametrize("num_splits", [1, 3, 8, 11])
@pytest.mark.parametrize("backend", ["csgmv", "triton"])
def test_expand_sums_partials(expand_kernel: str, backend: str, num_splits: int) -> None:
    """The expand sums split-K partials as it loads them (up to 11, more than one load takes),
    reading neither base rows nor columns at or beyond a slot's rank (poisoned with NaN)."""
    ranks, rank_pad, widths = [64, 5, 1], 64, [24, 8, 8]
    group = make_group(ranks, rank_pad, 8, widths, torch.float32)
    assert expand_max_splits(16, rank_pad) == 2
    slots = token_slots([(-1, 2), (1, 5), (0, 17), (-1, 1), (2, 3)])
    info = build_lora_batch_info(slots, group.slot_ranks, backend, 16, "cpu")
    num_tokens, n = len(slots), group.num_slices
    partials = torch.randn(num_splits, num_tokens, n * rank_pad)
    is_base = base_rows(slots)
    view = partials.view(num_splits, num_tokens, n, rank_pad)
    for i, slot in enumerate(slots):
        view[:, i, :, ranks[slot] :] = float("nan")  # slot -1 poisons the base row whole
    clean = torch.where(partials.isnan(), 0.0, partials).sum(0)
    y = torch.randn(num_tokens, sum(widths))
    y_ref = y.clone()
    lora_expand_torch(clean, group.B, y_ref, group.slice_offsets, group.scalings, info)
    lora_expand_triton(partials, group.B, y, group.slice_offsets, group.scalings, info)
    torch.testing.assert_close(y, y_ref)
    assert not y.isnan().any() and torch.equal(y[is_base], y_ref[is_base])


@pytest.mark.parametrize("pad_to", [None, 96])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_rows_expand_many_adapters(pad_to: int | None, dtype: torch.dtype) -> None:
    """The row-block expand over 40 adapters of one or two rows each between base rows: more
    segments than one search step compares (64), row blocks that straddle segments, a pool
    rank of 8 (under the 16 the tensor-core path multiplies), split partials whose columns
    beyond each slot's rank are NaN, and a padded table whose entries past the live count are
    poisoned."""
    import ops.lora
    from ops.triton_lora_expand import ROWS_BLOCK_E, triton_lora_expand_rows

    assert ops.lora.uses_rows_expand(96, 32) and ops.lora.uses_rows_expand(4096, 16)
    ranks = [1 + slot % 8 for slot in range(40)]
    group = make_group(ranks, 8, 8, [24, 8, 8], dtype)
    layout = [(-1, 1)]
    for slot in range(40):
        layout += [(slot, 1 + slot % 2), (-1, 1)] if slot % 3 else [(slot, 2)]
    slots = token_slots(layout)
    info = build_lora_batch_info(slots, group.slot_ranks, "triton", 16, "cpu", pad_to=pad_to)
    assert int(info.counts[0]) > ROWS_BLOCK_E
    num_tokens, n = len(slots), group.num_slices
    partials = torch.randn(3, num_tokens, n * 8)
    view = partials.view(3, num_tokens, n, 8)
    for i, slot in enumerate(slots):
        view[:, i, :, ranks[slot] if slot >= 0 else 0 :] = float("nan")
    clean = torch.where(partials.isnan(), 0.0, partials).sum(0)
    y = torch.randn(num_tokens, 40).to(dtype)
    y_ref = y.float()
    lora_expand_torch(clean, group.B.float(), y_ref, group.slice_offsets, group.scalings, info)
    if pad_to is not None:  # entries past the live count: a visit would hit slot 0 everywhere
        live = int(info.seg_live.item())
        info.seg_indptr[live + 1] = 0
        info.seg_slots[live:] = 0
    triton_lora_expand_rows(
        partials, group.B, y, group.slice_offsets, group.scalings, group.slot_ranks,
        info.seg_indptr, info.seg_slots, info.num_segments, live=info.seg_live,
    )
    torch.testing.assert_close(y.float(), y_ref, **tolerances(dtype))
    is_base = base_rows(slots)
    assert not y.isnan().any()
    assert torch.equal(y[is_base].float(), y_ref[is_base])


def test_apply_lora_rank_sweep(expand_kernel: str) -> None:
    """Ranks 1..64 in one batch over a 4-way split-K (partials summed by the expand), fp16."""
    ranks = [1, 2, 3, 7, 16, 31, 33, 64]
    group = make_group(ranks, 64, 512, [16, 8], torch.float16)
    layout = [(-1, 1)] + [(slot, 1 + slot % 3) for slot in range(len(ranks))] + [(-1, 2)]
    slots = token_slots(layout)
    info = build_lora_batch_info(slots, group.slot_ranks, "csgmv", 16, "cpu", pad_to=24)
    x = torch.randn(len(slots), 512).to(torch.float16)
    y = torch.randn(len(slots), 24).to(torch.float16)
    y_ref = y.float()
    apply_lora_torch(
        x.float(),
        group.A.float(),
        group.B.float(),
        y_ref,
        group.slice_offsets,
        group.scalings,
        info,
    )
    y_out = y.clone()
    apply_lora_triton(x, group.A, group.B, y_out, group.slice_offsets, group.scalings, info, 4)
    torch.testing.assert_close(y_out.float(), y_ref, **tolerances(torch.float16))
    assert torch.equal(y_out[base_rows(slots)], y[base_rows(slots)])


def test_split_k_heuristic_at_decode_shapes() -> None:
    """Llama-3.1-8B at rank 16 (H200, 132 SMs): decode splits K as far as one expand load sums
    (8 splits: 512 columns of A a program at hidden 4096); a captured batch of 32 (32 chunk
    entries, most of them empty) keeps the grid within eight waves; prefill does not split."""
    max_split = expand_max_splits(16, 16)
    assert max_split == 8
    assert shrink_split_k(1, 3, 4096 // 128, 132, max_split) == 8  # qkv, one token
    assert shrink_split_k(1, 1, 14336 // 128, 132, max_split) == 8  # down, one token
    assert shrink_split_k(32, 32 * 3, 4096 // 128, 132, 32) == 8  # qkv, 32 chunks: waves bind
    assert shrink_split_k(4096, 256 * 3, 4096 // 128, 132, max_split) == 1  # prefill
    assert expand_max_splits(64, 64) == 1 and expand_max_splits(16, 64) == 2


@pytest.mark.parametrize("entry_programs", [None, 1, 2, 3])
@pytest.mark.parametrize("backend", ["csgmv", "triton"])
def test_padded_info_matches(
    expand_kernel: str, backend: str, entry_programs: int | None, monkeypatch
) -> None:
    """Empty base entries appended for CUDA graphs change nothing, whether one program group
    takes each entry or fewer groups loop over the real ones (the count read from the device);
    entries past that count are never visited (poisoned here: a visit would corrupt y). The
    opt-in eager shrink (LORASERVE_SHRINK_EAGER=1) does visit them, relying on the padding
    being the empty base entries lora_tables and the graph buffers write: it is left off."""
    monkeypatch.delenv("LORASERVE_SHRINK_EAGER", raising=False)
    group = make_group([4, 16, 8], 16, 32, [16, 16, 8], torch.float32)
    slots = token_slots([(-1, 2), (1, 3), (-1, 1), (0, 2), (2, 20)])
    info = build_lora_batch_info(slots, group.slot_ranks, backend, 16, "cpu", pad_to=9)
    live = int((info.chunk_live if backend == "csgmv" else info.seg_live).item())
    assert live == (6 if backend == "csgmv" else 5)  # the 20-row segment is two chunks
    if entry_programs is not None:
        info = dataclasses.replace(info, entry_programs=entry_programs)
    indptr, table_slots = (
        (info.chunk_indptr, info.chunk_slots) if backend == "csgmv"
        else (info.seg_indptr, info.seg_slots)
    )
    x, y = torch.randn(len(slots), 32), torch.randn(len(slots), 40)
    y_ref = y.clone()
    apply_lora_torch(x, group.A, group.B, y_ref, group.slice_offsets, group.scalings, info)
    # the padding rewritten so that entry live + 1 covers every row with slot 2 again
    indptr[live + 1] = 0
    indptr[live + 2 :] = len(slots)
    table_slots[live:] = 2
    apply_lora_triton(x, group.A, group.B, y, group.slice_offsets, group.scalings, info)
    torch.testing.assert_close(y, y_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("backend", "chunk_size"), BACKENDS, ids=["csgmv16", "csgmv32", "triton"])
def test_embed_shrink(backend: str, chunk_size: int, dtype: torch.dtype) -> None:
    ranks, rank_pad, vocab = [1, 8, 16], 16, 50
    A_emb = torch.randn(3, vocab, rank_pad).to(dtype)
    for slot, rank in enumerate(ranks):
        A_emb[slot, :, rank:] = 0
    slot_ranks = torch.tensor(ranks, dtype=torch.int32)
    slots = token_slots([(-1, 3), (2, 40), (0, 1), (-1, 2), (1, 17), (-1, 1)])
    info = build_lora_batch_info(slots, slot_ranks, backend, chunk_size, "cpu")
    ids = torch.randint(0, vocab, (len(slots),))
    t_ref = lora_embed_shrink_torch(ids, A_emb, info)
    for i, slot in enumerate(slots):  # the reference against a direct gather
        want = torch.zeros(rank_pad, dtype=dtype) if slot < 0 else A_emb[slot, ids[i]]
        assert torch.equal(t_ref[i], want)
    assert torch.equal(lora_embed_shrink(ids, A_emb, info), t_ref)
    t = torch.full((len(slots), rank_pad), float("nan"), dtype=dtype)
    lora_embed_shrink_triton(ids.to(torch.int32), A_emb, info, out=t)
    assert torch.equal(t, t_ref)


# ------------------------------------------------------------------ real shapes on the GPU

GPU_GROUPS = {
    "qkv": (4096, [4096, 1024, 1024]),
    "o": (4096, [4096]),
    "gate_up": (4096, [14336, 14336]),
    "down": (14336, [4096]),
}


def gpu_layout(num_tokens: int, num_adapters: int) -> list[int]:
    """Tokens of `num_adapters` adapters of uneven length, base rows at both ends."""
    if num_tokens < num_adapters + 2:
        return [num_tokens % num_adapters] * num_tokens
    weights = torch.rand(num_adapters) + 0.2
    lengths = (weights / weights.sum() * (num_tokens - 2)).long().clamp(min=1)
    lengths[-1] = num_tokens - 2 - lengths[:-1].sum()
    return [-1] + token_slots(list(enumerate(lengths.tolist()))) + [-1]


@pytest.mark.parametrize("num_tokens", [1, 32, 512])
@pytest.mark.parametrize("rank_pad", [16, 64, 256])
@pytest.mark.parametrize("group_name", list(GPU_GROUPS))
@pytest.mark.parametrize("backend", ["csgmv", "triton"])
@pytest.mark.gpu
@needs_cuda
def test_gpu_real_shapes(
    expand_kernel: str, backend: str, group_name: str, rank_pad: int, num_tokens: int
) -> None:
    in_dim, widths = GPU_GROUPS[group_name]
    ranks = [rank_pad, rank_pad // 2, 8, 1, rank_pad, 4, rank_pad, 2]
    group = make_group(ranks, rank_pad, in_dim, widths, torch.bfloat16, device="cuda")
    slots = gpu_layout(num_tokens, len(ranks))
    info = build_lora_batch_info(slots, group.slot_ranks, backend, 16, "cuda")
    x = torch.randn(num_tokens, in_dim, device="cuda", dtype=torch.bfloat16)
    y0 = torch.randn(num_tokens, sum(widths), device="cuda", dtype=torch.bfloat16)
    cpu_info = build_lora_batch_info(slots, group.slot_ranks.cpu(), backend, 16, "cpu")
    t_ref = lora_shrink_torch(x.cpu().float(), group.A.cpu().float(), cpu_info, len(widths))
    y_ref = y0.cpu().float()
    lora_expand_torch(
        t_ref, group.B.cpu().float(), y_ref, group.slice_offsets, group.scalings.cpu(), cpu_info
    )

    t = lora_shrink(x, group.A, info, len(widths))
    torch.testing.assert_close(t.float().cpu(), t_ref, atol=2e-2, rtol=2e-2)
    y = y0.clone()
    lora_expand(t, group.B, y, group.slice_offsets, group.scalings, info)
    y_fused = y0.clone()
    apply_lora(x, group.A, group.B, y_fused, group.slice_offsets, group.scalings, info)
    is_base = base_rows(slots).cuda()
    for out in (y, y_fused):
        torch.testing.assert_close(out.float().cpu(), y_ref, atol=5e-2, rtol=2e-2)
        assert torch.equal(out[is_base], y0[is_base])
    # with and without programmatic dependent launch: the same kernels, the same bits
    for pdl in (False, True) if torch.cuda.get_device_capability()[0] >= 9 else (False,):
        y_pdl = y0.clone()
        apply_lora_triton(
            x, group.A, group.B, y_pdl, group.slice_offsets, group.scalings, info, pdl=pdl
        )
        assert torch.equal(y_pdl, y_fused)


def llama_layer_groups(num_slots: int, rank: int) -> dict[str, LoraGroup]:
    return {
        name: make_group([rank] * num_slots, rank, in_dim, widths, torch.bfloat16, "cuda")
        for name, (in_dim, widths) in GPU_GROUPS.items()
    }


def chained_layer(
    groups: dict[str, LoraGroup],
    ys: dict[str, torch.Tensor],
    y0s: dict[str, torch.Tensor],
    x: torch.Tensor,
    info: LoraBatchInfo,
    pdl: bool,
) -> None:
    """The four applications of a layer back to back, each reading the previous one's output,
    so a kernel that ran ahead of its predecessor would read stale activations."""
    for name, group in groups.items():
        ys[name].copy_(y0s[name])
        apply_lora_triton(
            x, group.A, group.B, ys[name], group.slice_offsets, group.scalings, info, pdl=pdl
        )
        x = ys[name][:, : GPU_GROUPS["down"][0] if name == "gate_up" else 4096]


@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("backend", ["csgmv", "triton"])
@pytest.mark.gpu
@needs_cuda
def test_gpu_graph_replay_decode(expand_kernel: str, backend: str, batch: int, pdl: bool) -> None:
    """Decode as the runner captures it: metadata in static buffers padded to `batch` entries,
    one graph of a Llama-3.1-8B layer's four applications, replayed over 1, 8 and 32 distinct
    rank-16 adapters (and base rows); each replay equals the eager run bit for bit."""
    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    num_slots = 32
    groups = llama_layer_groups(num_slots, 16)
    ranks = groups["qkv"].slot_ranks
    x = torch.randn(batch, 4096, device="cuda", dtype=torch.bfloat16)
    y0s = {
        name: torch.randn(batch, sum(w), device="cuda", dtype=torch.bfloat16)
        for name, (_, w) in GPU_GROUPS.items()
    }
    ys = {name: torch.empty_like(y0) for name, y0 in y0s.items()}
    static = build_lora_batch_info([-1] * batch, ranks, backend, 16, "cuda", pad_to=batch)
    static.num_segments = static.num_chunks = static.max_seg_len = batch
    chained_layer(groups, ys, y0s, x, static, pdl)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chained_layer(groups, ys, y0s, x, static, pdl)
    layouts = [[0] * batch, [-1] * batch]
    if batch == 32:
        layouts += [
            [-1] + token_slots([(s, 4) for s in range(7)]) + [7, 7, 7],  # 8 adapters
            list(range(32)),  # 32 adapters, one row each
            token_slots([(5, 20), (-1, 3), (9, 9)]),
        ]
    for slots in layouts:
        info = build_lora_batch_info(slots, ranks, backend, 16, "cuda", pad_to=batch)
        info.max_seg_len = batch  # as captured: the same grids, so the same bits
        for name in ("seg_indptr", "seg_slots", "chunk_indptr", "chunk_slots", "seg_live",
                     "chunk_live"):  # as a graph replay fills its static buffers
            getattr(static, name).copy_(getattr(info, name))
        x.normal_()  # fresh inputs: a kernel reading stale buffers would not go unnoticed
        for y0 in y0s.values():
            y0.normal_()
        graph.replay()
        replayed = {name: y.clone() for name, y in ys.items()}
        chained_layer(groups, ys, y0s, x, info, pdl=False)
        for name, y in ys.items():
            torch.testing.assert_close(replayed[name], y, atol=1e-2, rtol=1e-2, msg=name)
        if all(s < 0 for s in slots):
            assert all(torch.equal(ys[name], y0s[name]) for name in ys)


@pytest.mark.gpu
@needs_cuda
def test_gpu_two_launches_per_application() -> None:
    """One LoRA application is exactly two kernels (shrink, expand): no reduction, no memset."""
    group = llama_layer_groups(8, 16)["qkv"]
    slots = [-1] + token_slots([(s, 4) for s in range(7)]) + [7, 7, 7]
    info = build_lora_batch_info(slots, group.slot_ranks, "csgmv", 16, "cuda", pad_to=32)
    x = torch.randn(32, 4096, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(32, 6144, device="cuda", dtype=torch.bfloat16)
    for num_tokens in (1, 32):
        one = (
            info
            if num_tokens == 32
            else build_lora_batch_info([3], group.slot_ranks, "csgmv", 16, "cuda")
        )
        args = (x[:num_tokens], group.A, group.B, y[:num_tokens], group.slice_offsets,
                group.scalings, one)
        apply_lora(*args)  # compile first
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            apply_lora(*args)
            torch.cuda.synchronize()
        kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        assert len(kernels) == 2, kernels
        assert "shrink" in kernels[0] and "expand" in kernels[1], kernels


@pytest.mark.parametrize(
    ("num_tokens", "slots_of", "pad_to"),
    [(1, lambda n: [0], None), (32, lambda n: list(range(8)) * 4, 32),
     (40, lambda n: [-1] * 8 + [1] * 32, None), (300, lambda n: [2] * n, None)],
)
def test_partials_buffer_matches_the_shrinks_own(num_tokens, slots_of, pad_to) -> None:
    """The buffer allocated ahead for a side-stream shrink has the split, shape and dtype the
    shrink picks for itself: the overlapped shrink is the same kernel launch."""
    group = make_group([4, 8, 16, 2, 16, 1, 16, 3], 16, 256, [48, 16, 16], torch.float16)
    slots = sorted(slots_of(num_tokens), key=lambda s: (s < 0, s))
    info = build_lora_batch_info(slots, group.slot_ranks, "csgmv", 16, "cpu", pad_to=pad_to)
    x = torch.randn(num_tokens, 256, dtype=torch.float16)
    table = lora_row_table(info)
    own = triton_lora_shrink(
        x, group.A, group.slot_ranks, table.indptr, table.slots, table.num_entries, 3,
        table.block_m, table.m_progs, live=table.live, entry_progs=table.entry_progs,
        max_split=expand_max_splits(table.block_m, 16),
    )
    ahead = shrink_partials_buffer(
        x, group.A, 3, table.block_m, table.m_progs, table.num_entries, table.entry_progs,
        max_split=expand_max_splits(table.block_m, 16),
    )
    assert (ahead.shape, ahead.dtype, ahead.stride()) == (own.shape, own.dtype, own.stride())


def test_overlap_only_inside_cuda_graph_captures(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors never take the side stream (the torch references run serially), eager CUDA
    steps neither, and LORASERVE_LORA_OVERLAP=0 turns it off in captures too."""
    assert not overlaps_shrink(torch.zeros(4096, 8))
    group = make_group([4, 8], 8, 32, [16], torch.float32)
    info = build_lora_batch_info([0, 0, -1, 1], group.slot_ranks, "csgmv", 16, "cpu")
    x, W = torch.randn(4, 32), torch.randn(16, 32)
    y = linear_lora(x, lambda v: v @ W.T, group.A, group.B, group.slice_offsets,
                    group.scalings, info)
    ref = x @ W.T
    apply_lora_torch(x, group.A, group.B, ref, group.slice_offsets, group.scalings, info)
    torch.testing.assert_close(y, ref)
    if torch.cuda.is_available():
        x = torch.zeros(8, 8, device="cuda")
        assert not overlaps_shrink(x)
        seen = []
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            seen.append(overlaps_shrink(x))
            monkeypatch.setenv("LORASERVE_LORA_OVERLAP", "0")
            seen.append(overlaps_shrink(x))
        assert seen == [True, False]


def overlapped_layer(
    groups: dict[str, LoraGroup],
    weights: dict[str, torch.Tensor],
    x: torch.Tensor,
    info: LoraBatchInfo,
    mode: str,
) -> dict[str, torch.Tensor]:
    """A Llama-3.1-8B layer's four projections with their LoRA, each reading the previous
    one's output: serially ("0") or with the shrink on the side stream ("shrink")."""
    outs = {}
    for name, group in groups.items():
        base = functools.partial(torch.nn.functional.linear, weight=weights[name])
        args = (group.A, group.B, group.slice_offsets, group.scalings, info)
        if mode == "shrink":
            y = linear_lora(x, base, *args, overlap=True)
        else:
            y = base(x)
            apply_lora_triton(x, group.A, group.B, y, group.slice_offsets, group.scalings, info)
        outs[name] = y
        x = y[:, : GPU_GROUPS["down"][0] if name == "gate_up" else 4096]
    return outs


@pytest.mark.parametrize("batch", [1, 32, 512])
@pytest.mark.gpu
@needs_cuda
def test_gpu_overlapped_shrink_matches_serial(batch: int) -> None:
    """The shrink on a side stream beside the projection gives the serial path's bits, eager
    and replayed from a CUDA graph (fork and join as parallel branches) over changing
    layouts."""
    mode = "shrink"
    groups = llama_layer_groups(32, 16)
    weights = {
        name: torch.randn(sum(w), d, device="cuda", dtype=torch.bfloat16) / d**0.5
        for name, (d, w) in GPU_GROUPS.items()
    }
    ranks = groups["qkv"].slot_ranks
    x = torch.randn(batch, 4096, device="cuda", dtype=torch.bfloat16)
    layout = [-1] + token_slots([(s, 4) for s in range(7)]) + [7] * 3 if batch >= 32 else [3]
    layout = (layout * (batch // len(layout)))[:batch] if batch > 32 else layout
    layout = sorted(layout, key=lambda s: (s < 0, s))
    info = build_lora_batch_info(layout, ranks, "csgmv", 16, "cuda")
    serial = overlapped_layer(groups, weights, x, info, "0")
    overlapped = overlapped_layer(groups, weights, x, info, mode)
    for name in serial:
        assert torch.equal(serial[name], overlapped[name]), name
    if batch > 32:
        return
    static = build_lora_batch_info([-1] * batch, ranks, "csgmv", 16, "cuda", pad_to=batch)
    static.num_segments = static.num_chunks = static.max_seg_len = batch
    overlapped_layer(groups, weights, x, static, mode)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = overlapped_layer(groups, weights, x, static, mode)
    layouts = [[5] * batch, [-1] * batch]
    if batch == 32:
        layouts += [list(range(32)), token_slots([(5, 20), (-1, 3), (9, 9)])]
    for slots in layouts:
        info = build_lora_batch_info(slots, ranks, "csgmv", 16, "cuda", pad_to=batch)
        info.max_seg_len = batch
        for name in ("seg_indptr", "seg_slots", "chunk_indptr", "chunk_slots", "seg_live",
                     "chunk_live"):
            getattr(static, name).copy_(getattr(info, name))
        x.normal_()
        graph.replay()
        replayed = {name: y.clone() for name, y in captured.items()}
        expected = overlapped_layer(groups, weights, x, info, "0")
        for name, y in expected.items():
            torch.testing.assert_close(replayed[name], y, atol=1e-2, rtol=1e-2, msg=name)


def test_size_helpers_match_triton() -> None:
    """The wrappers' plain-Python cdiv / next_pow2 (triton's are jit functions, microseconds a
    host call) give triton's answers."""
    import triton

    from ops.sizes import cdiv, next_pow2

    for n in range(1, 5000):
        assert next_pow2(n) == triton.next_power_of_2(n), n
        for b in (1, 3, 16, 128):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)
    assert cdiv(0, 16) == 0 and next_pow2(0) == 1


def test_per_step_args_name_kernel_parameters() -> None:
    """The scalars kept out of Triton's specialization key are the kernels' parameters (a
    misspelt name would be ignored and the variants would come back)."""
    import inspect

    from ops import (
        triton_decode_attention,
        triton_lora_embed,
        triton_lora_expand,
        triton_lora_shrink,
        triton_prefill_attention,
    )

    for module, kernel in [
        (triton_lora_shrink, "_lora_shrink_kernel"),
        (triton_lora_expand, "_lora_expand_kernel"),
        (triton_lora_embed, "_lora_embed_shrink_kernel"),
        (triton_decode_attention, "_decode_attention_kernel"),
        (triton_prefill_attention, "_prefill_attention_kernel"),
    ]:
        params = inspect.signature(getattr(module, kernel).fn).parameters
        assert module.PER_STEP_ARGS and set(module.PER_STEP_ARGS) <= set(params), kernel



@pytest.mark.parametrize("fold_decode", ["0", "1"])
def test_decode_shrink_with_slices_folded(monkeypatch, fold_decode: str) -> None:
    """LORASERVE_SHRINK_FOLD_DECODE=1 (an A/B knob of the device session) folds every slice's
    columns into one shrink tile at decode sizes too: the same t and LoRA output."""
    monkeypatch.setenv("LORASERVE_SHRINK_FOLD_DECODE", fold_decode)
    for split_k in (None, 2):
        run_case("n3-decode", torch.float32, "csgmv", 16, split_k)


@pytest.mark.parametrize("block_k", ["32", "64"])
def test_decode_shrink_with_wider_k_tiles(monkeypatch, block_k: str) -> None:
    """LORASERVE_SHRINK_DECODE_BLOCK_K (an A/B knob of the device session) sets the decode
    shrink's K tile: the same t and LoRA output, split or not."""
    monkeypatch.setenv("LORASERVE_SHRINK_DECODE_BLOCK_K", block_k)
    for split_k in (None, 2):
        run_case("n1-decode", torch.float32, "csgmv", 16, split_k)
    for bad in ("48", "wide"):
        monkeypatch.setenv("LORASERVE_SHRINK_DECODE_BLOCK_K", bad)
        with pytest.raises(ValueError, match="power of two"):
            run_case("n1-decode", torch.float32, "csgmv", 16, None)


@pytest.mark.parametrize("fold_decode", ["0", "1"])
@pytest.mark.parametrize("eager", ["0", "1"])
@pytest.mark.parametrize("backend", ["csgmv", "triton"])
def test_decode_shrink_ignores_rows_past_rank(monkeypatch, backend: str, eager: str,
                                              fold_decode: str) -> None:
    """A pool slot's rows past its adapter's rank hold anything (NaN here): the decode shrink
    neither reads them nor lets them into t, whether it masks its A loads by rank or, with
    LORASERVE_SHRINK_EAGER=1, loads them and zeroes their columns after the product; over a
    table padded for a graph (the eager kernel visits the padding's empty base entries)."""
    monkeypatch.setenv("LORASERVE_SHRINK_EAGER", eager)
    monkeypatch.setenv("LORASERVE_SHRINK_FOLD_DECODE", fold_decode)
    ranks = [1, 3, 16, 7]
    group = make_group(ranks, 16, 96, [32, 8, 8], torch.float32)
    pool = group.A.view(len(ranks), 3, 16, 96)
    for slot, rank in enumerate(ranks):
        pool[slot, :, rank:] = float("nan")
    slots = token_slots([(-1, 2), (0, 3), (2, 1), (-1, 1), (1, 4), (3, 2)])
    info = build_lora_batch_info(slots, group.slot_ranks, backend, 16, "cpu", pad_to=12)
    x = torch.randn(len(slots), 96)
    want = lora_shrink_torch(x, group.A, info, 3)
    for split_k in (None, 2):
        got = lora_shrink_triton(x, group.A, info, 3, split_k=split_k)
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
