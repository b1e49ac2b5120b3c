"""LoRA expand on CUDA: y[:, slice] += scaling * t[:, slice] B[slot, slice]^T, in place.

Same row table as the shrink (segments or chunks; slot -1 = base rows, which are never touched).
Grid: (entries * m_progs, output tiles of all slices together). Slices of uneven width (q, k, v)
are tiled separately, so no tile straddles two slices and no program idles: the tile index is
mapped to its slice with a few scalar compares against cumulative tile counts. The inner loop
runs over the slot's rank only, BLOCK_K at a time.

`t` is either the shrink's split-K partials [splits, T, n*R] (fp32), summed here as they are
loaded (SPLIT_BLOCK splits in one 3-D load, so the sum costs one round trip to L2 and no launch),
or a plain [T, n*R] in any float dtype (one split). Either is upcast after loading.

Axis 0 has one program an entry, or, for a table padded to a CUDA graph's bucket, fewer
programs that loop over the real entries (their count read from the device), so a large bucket
launches no mostly-empty programs.

For a table of chunks (csgmv) a program may sweep several row tiles of one chunk, loading the
adapter's B tile once for them. With one split (ONE_SPLIT) and ranks within one BLOCK_K
(MULTI_K off), the row loop holds no inner loop.

With USE_PDL (programmatic dependent launch, sm_90+), the kernel starts while the shrink runs:
programs with no entry exit at once, the others wait for the shrink's partials and the base
output y before touching them.
"""

import dataclasses
import itertools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from ops.sizes import cdiv, next_pow2

MAX_SLICES = 4
MAX_SUM_ELEMENTS = 2048  # SPLIT_BLOCK * BLOCK_M * BLOCK_K: more costs registers (sm_90: 96 at
# 16 x 16 x 8, 168 at x 16, 248 at x 32) and so occupancy, which the empty programs of a padded
# decode grid need


@triton.jit
def _pick(i, v0, v1, v2, v3):
    return tl.where(i == 0, v0, tl.where(i == 1, v1, tl.where(i == 2, v2, v3)))


@triton.jit
def _load_t(
    t_cols,
    offs_m,
    m_live,
    offs_r,
    r_live,
    splits,
    stride_ts,
    stride_tm,
    stride_tr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
    ONE_SPLIT: tl.constexpr = False,
):
    """[BLOCK_M, BLOCK_K] fp32 tile of t, the sum of its `splits` partials (ONE_SPLIT: t has
    one, and no loop is left around the load, so the loop that calls this may be pipelined)."""
    if ONE_SPLIT:
        one = offs_m[:, None].to(tl.int64) * stride_tm + offs_r[None, :] * stride_tr
        return tl.load(t_cols + one, mask=m_live[:, None] & r_live[None, :], other=0.0).to(
            tl.float32
        )
    offs_s = tl.arange(0, SPLIT_BLOCK)
    rows = offs_m[None, :, None].to(tl.int64) * stride_tm + offs_r[None, None, :] * stride_tr
    mask = m_live[None, :, None] & r_live[None, None, :]
    tile = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for s0 in range(0, splits, SPLIT_BLOCK):
        s = s0 + offs_s
        part = tl.load(
            t_cols + s[:, None, None].to(tl.int64) * stride_ts + rows,
            mask=(s < splits)[:, None, None] & mask,
            other=0.0,
        )
        tile += tl.sum(part.to(tl.float32), axis=0)
    return tile


# Scalars that change from step to step: Triton would otherwise compile a variant per value
# class (1, multiple of 16, other), and eager steps would meet new ones while serving. Strides
# and the K span of a split stay specialized: their divisibility by 16 is what lets the
# compiler prove pointers aligned and issue vector loads (unspecialized, the 32-adapter decode
# step took 18.2 ms instead of 11.6 on the H200, PDL on in both).
PER_STEP_ARGS = ["num_entries", "entry_progs", "splits", "m_progs"]


@triton.jit(do_not_specialize=PER_STEP_ARGS)
def _lora_expand_kernel(
    t_ptr,
    b_ptr,
    y_ptr,
    scalings_ptr,
    indptr_ptr,
    slots_ptr,
    ranks_ptr,
    live_ptr,
    num_entries,
    entry_progs,
    R,
    splits,
    off0,
    off1,
    off2,
    off3,
    off4,
    tiles1,
    tiles2,
    tiles3,
    stride_ts,
    stride_tm,
    stride_tr,
    stride_bs,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    stride_ss,
    stride_si,
    m_progs,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    HAS_LIVE: tl.constexpr,
    MULTI_K: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    first_entry = pid_m // m_progs
    m_prog = pid_m % m_progs
    pid_n = tl.program_id(1)
    slice_id = (pid_n >= tiles1).to(tl.int32) + (pid_n >= tiles2) + (pid_n >= tiles3)
    tile_in_slice = pid_n - _pick(slice_id, 0, tiles1, tiles2, tiles3)
    n_lo = _pick(slice_id, off0, off1, off2, off3)
    n_hi = _pick(slice_id, off1, off2, off3, off4)
    offs_n = n_lo + tile_in_slice * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = offs_n < n_hi

    t_cols = t_ptr + slice_id * R * stride_tr
    offs_r0 = tl.arange(0, BLOCK_K)
    if HAS_LIVE:
        num_live = tl.load(live_ptr)
    else:
        num_live = num_entries
    if USE_PDL:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if first_entry < num_live:  # programs with no entry exit at once
            gdc_wait()  # the shrink's partials and the base y are complete from here on

    # entries first_entry, first_entry + entry_progs, ... (one each unless the table is padded)
    for entry in range(first_entry, num_live, entry_progs):
        row_start = tl.load(indptr_ptr + entry)
        row_end = tl.load(indptr_ptr + entry + 1)
        slot = tl.load(slots_ptr + entry)
        # base rows: an empty row range, so y is neither read nor written there
        row_end = tl.where(slot >= 0, row_end, row_start)
        first_row = row_start + m_prog * BLOCK_M
        slot_safe = tl.maximum(slot, 0)
        rank = tl.where(first_row < row_end, tl.load(ranks_ptr + slot_safe), 0)
        scaling = tl.load(scalings_ptr + slot_safe * stride_ss + slice_id * stride_si)
        b_cols = (
            b_ptr + slot_safe.to(tl.int64) * stride_bs + offs_n[None, :].to(tl.int64) * stride_bn
        )
        # the first rank block of B, shared by every row tile
        r0_live = offs_r0 < rank
        b_first = tl.load(
            b_cols + offs_r0[:, None] * stride_br,
            mask=r0_live[:, None] & n_live[None, :],
            other=0.0,
        ).to(tl.float32)
        m_step = m_progs * BLOCK_M
        y_cols = y_ptr + offs_n[None, :] * stride_yn
        for m0 in range(first_row, row_end, m_step):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_live = offs_m < row_end
            y_ptrs = y_cols + offs_m[:, None].to(tl.int64) * stride_ym
            y_mask = m_live[:, None] & n_live[None, :]
            t_tile = _load_t(
                t_cols, offs_m, m_live, offs_r0, r0_live, splits, stride_ts, stride_tm,
                stride_tr, BLOCK_M, BLOCK_K, SPLIT_BLOCK, ONE_SPLIT,
            )
            acc = tl.dot(t_tile, b_first, input_precision=DOT_PRECISION)
            for r0 in range(BLOCK_K, rank if MULTI_K else 0, BLOCK_K):
                offs_r = r0 + tl.arange(0, BLOCK_K)
                r_live = offs_r < rank
                t_tile = _load_t(
                    t_cols, offs_m, m_live, offs_r, r_live, splits, stride_ts, stride_tm,
                    stride_tr, BLOCK_M, BLOCK_K, SPLIT_BLOCK, ONE_SPLIT,
                )
                b_tile = tl.load(
                    b_cols + offs_r[:, None] * stride_br,
                    mask=r_live[:, None] & n_live[None, :],
                    other=0.0,
                ).to(tl.float32)
                acc = tl.dot(t_tile, b_tile, acc, input_precision=DOT_PRECISION)
            y_old = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
            tl.store(y_ptrs, (y_old + scaling * acc).to(y_ptr.dtype.element_ty), mask=y_mask)


@dataclasses.dataclass(frozen=True)
class ExpandTuning:
    """Launch settings of the entry expand that benchmark sweeps vary."""

    num_warps: int = 4
    num_stages: int = 2


def expand_block_k(rank_pad: int) -> int:
    """Rank columns per inner step of the expand (one step covers ranks up to 64)."""
    return min(64, max(16, next_pow2(rank_pad)))


def expand_max_splits(block_m: int, rank_pad: int) -> int:
    """Most split-K partials the expand sums in one load; a shrink should split no further."""
    return max(1, MAX_SUM_ELEMENTS // (block_m * expand_block_k(rank_pad)))


def _expand_block_n(
    num_programs_per_tile: int, widths: list[int], num_sms: int, num_splits: int
) -> int:
    """Widest output tile that still gives two waves of programs: 128 when t has one split
    (prefill: measured 13.7 ms against 15.1 ms at 64 for 8 x 512 tokens over 8 adapters on an
    H200, benchmarks/RESULTS.md), else 64 at most (summing split-K partials, 128 took 248
    registers a thread on sm_90, which the empty programs of a padded decode grid pay for)."""
    for block_n in (128, 64, 32) if num_splits == 1 else (64, 32):
        tiles = sum(cdiv(w, block_n) for w in widths)
        if num_programs_per_tile * tiles >= 2 * num_sms:
            return block_n
    return 16 if max(widths) <= 16 else 32


def _checked_partials(
    t: torch.Tensor,
    B: torch.Tensor,
    y: torch.Tensor,
    slice_offsets: tuple[int, ...],
    scalings: torch.Tensor,
    slot_ranks: torch.Tensor,
    pdl: bool,
    live: torch.Tensor | None,
) -> torch.Tensor:
    """Both expand wrappers' checks of their shared arguments; t as partials [splits, T, n*R]."""
    num_slices = len(slice_offsets) - 1
    assert t.dim() in (2, 3), "t must be [T, n * R] or [splits, T, n * R]"
    partials = t if t.dim() == 3 else t.unsqueeze(0)
    num_splits, num_tokens, t_cols = partials.shape
    assert 1 <= num_slices <= MAX_SLICES, f"{num_slices} slices, at most {MAX_SLICES}"
    assert B.dim() == 3 and y.dim() == 2, "B must be [num_slots, N_total, R], y [T, N_total]"
    rank_pad = B.shape[2]
    assert t_cols == num_slices * rank_pad, f"t has {t_cols} columns, want {num_slices}*{rank_pad}"
    assert slice_offsets[0] == 0 and slice_offsets[-1] == B.shape[1] == y.shape[1]
    assert all(a < b for a, b in itertools.pairwise(slice_offsets)), "empty slice"
    assert y.shape[0] == num_tokens and num_splits >= 1
    assert scalings.shape == (B.shape[0], num_slices), f"scalings {tuple(scalings.shape)}"
    assert slot_ranks.shape == (B.shape[0],)
    assert t.device == B.device == y.device == scalings.device == slot_ranks.device
    assert not pdl or y.is_cuda, "programmatic dependent launch needs CUDA"
    assert live is None or (live.shape == (1,) and live.device == y.device)
    return partials


def _slice_tiles(slice_offsets: tuple[int, ...], block_n: int) -> tuple[list[int], list[int], int]:
    """The kernels' slice arguments for tiles of block_n columns, each slice tiled on its own:
    (off0..off4, tiles1..tiles3 (cumulative tile counts; unused slices never reached), tiles in
    all)."""
    num_slices = len(slice_offsets) - 1
    counts = [cdiv(b - a, block_n) for a, b in itertools.pairwise(slice_offsets)]
    cum = [sum(counts[: i + 1]) for i in range(num_slices)]
    tiles = cum[:-1] + [1 << 30] * (MAX_SLICES - num_slices)
    offs = list(slice_offsets) + [slice_offsets[-1]] * (MAX_SLICES + 1 - len(slice_offsets))
    return offs, tiles[:3], cum[-1]


def triton_lora_expand(
    t: torch.Tensor,
    B: torch.Tensor,
    y: torch.Tensor,
    slice_offsets: tuple[int, ...],
    scalings: torch.Tensor,
    slot_ranks: torch.Tensor,
    indptr: torch.Tensor,
    slots: torch.Tensor,
    num_entries: int,
    block_m: int,
    m_progs: int,
    num_sms: int = 132,
    pdl: bool = False,
    block_n: int | None = None,
    live: torch.Tensor | None = None,
    entry_progs: int = 0,
    tuning: ExpandTuning | None = None,
) -> None:
    """y[rows, off_i:off_{i+1}] += scalings[slot, i] * t[rows, i*R:i*R+rank]
    B[slot, off_i.., :rank]^T.

    t: [T, n * R] in any float dtype, or split-K partials [splits, T, n * R] that are summed.
    B: [num_slots, N_total, R]. y: [T, N_total], updated in place (any strides).
    slice_offsets: n + 1 Python ints, 0 .. N_total, n <= 4. scalings: [num_slots, n] float32.
    slot_ranks: [num_slots] int32. indptr: [num_entries + 1] int32, slots: [num_entries] int32
    (-1 = base rows: left untouched). block_m: power of two >= 16; m_progs >= 1.
    pdl: launch as a programmatic dependent launch (CUDA sm_90+ only).
    block_n: output tile width instead of the heuristic's (benchmark sweeps).
    live: [1] int32 on y's device, how many leading entries are real (a padded table), or None.
    entry_progs: programs along the entry axis, each looping over entries (0: num_entries).
    tuning: launch settings instead of the defaults (benchmark sweeps).
    """
    tuning = tuning or ExpandTuning()
    partials = _checked_partials(t, B, y, slice_offsets, scalings, slot_ranks, pdl, live)
    num_splits, num_tokens, _ = partials.shape
    rank_pad = B.shape[2]
    assert indptr.shape == (num_entries + 1,) and slots.shape == (num_entries,)
    assert block_m >= 16 and block_m & (block_m - 1) == 0 and m_progs >= 1
    assert indptr.device == slots.device == y.device
    if num_tokens == 0 or num_entries == 0:
        return
    entry_progs = min(entry_progs or num_entries, num_entries)
    widths = [b - a for a, b in itertools.pairwise(slice_offsets)]
    block_n = block_n or _expand_block_n(entry_progs * m_progs, widths, num_sms, num_splits)
    offs, tiles, num_tiles = _slice_tiles(slice_offsets, block_n)
    split_block = min(next_pow2(num_splits), expand_max_splits(block_m, rank_pad))
    low_precision = t.dtype != torch.float32 or B.dtype != torch.float32
    grid = (entry_progs * m_progs, num_tiles)
    _lora_expand_kernel[grid](
        partials,
        B,
        y,
        scalings,
        indptr,
        slots,
        slot_ranks,
        indptr if live is None else live,
        num_entries,
        entry_progs,
        rank_pad,
        num_splits,
        *offs,
        *tiles,
        partials.stride(0) if num_splits > 1 else 0,  # one split: never multiplied, one key
        partials.stride(1),
        partials.stride(2),
        B.stride(0),
        B.stride(1),
        B.stride(2),
        y.stride(0),
        y.stride(1),
        scalings.stride(0),
        scalings.stride(1),
        m_progs,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=expand_block_k(rank_pad),
        SPLIT_BLOCK=split_block,
        DOT_PRECISION="tf32" if low_precision else "ieee",
        USE_PDL=pdl,
        HAS_LIVE=live is not None,
        MULTI_K=rank_pad > expand_block_k(rank_pad),
        ONE_SPLIT=num_splits == 1,
        num_warps=tuning.num_warps,
        num_stages=tuning.num_stages,
        launch_pdl=pdl,
    )


# ---------------------------------------------------------------------------------------------
# Row-block expand: for batches of few rows an adapter (decode over many adapters)
#
# The entry kernel above gives each (entry, output tile) pair a program, and each pair is a chain
# of dependent loads (table, slot, rank, B, t, y) for a handful of rows. Over many adapters with
# a row or two each, that is thousands of short programs (or, for a padded table, loops of them),
# and their latency, not bytes, sets the time (H200: 27 us an application at batch 32 over 32
# adapters against 3 us at batch 1, benchmarks/RESULTS.md). Here a program covers BLOCK_M
# consecutive rows whatever their adapters: it finds each row's segment by counting the segments
# that end at or before it, and
# - when every live row of the block has one slot (long segments: prefill, few adapters), loads
#   that slot's B tile once and multiplies it on the tensor cores;
# - else gathers each row's own B tile (rows of one slot share it through L1) and reduces over
#   the rank on the CUDA cores, R_CHUNK rank columns at a time.
# Grid: (cdiv(T, BLOCK_M), output tiles of all slices together), fixed for a token count, so a
# CUDA graph's grid holds whatever its batch's adapters are.

ROWS_BLOCK_M = 16
ROWS_BLOCK_E = 64  # segment ends compared per step of the segment search
GATHER_ELEMENTS = 8192  # BLOCK_M * BLOCK_N * R_CHUNK of one gathered B load (64 fp32 registers
# a thread at 4 warps)

ROWS_PER_STEP_ARGS = ["num_tokens", "num_entries", "splits"]


@triton.jit(do_not_specialize=ROWS_PER_STEP_ARGS)
def _lora_expand_rows_kernel(
    t_ptr,
    b_ptr,
    y_ptr,
    scalings_ptr,
    indptr_ptr,
    slots_ptr,
    ranks_ptr,
    live_ptr,
    num_tokens,
    num_entries,
    R,
    splits,
    off0,
    off1,
    off2,
    off3,
    off4,
    tiles1,
    tiles2,
    tiles3,
    stride_ts,
    stride_tm,
    stride_tr,
    stride_bs,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    stride_ss,
    stride_si,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    R_CHUNK: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
    GATHER_SPLIT_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    HAS_LIVE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slice_id = (pid_n >= tiles1).to(tl.int32) + (pid_n >= tiles2) + (pid_n >= tiles3)
    tile_in_slice = pid_n - _pick(slice_id, 0, tiles1, tiles2, tiles3)
    n_lo = _pick(slice_id, off0, off1, off2, off3)
    n_hi = _pick(slice_id, off1, off2, off3, off4)
    offs_n = n_lo + tile_in_slice * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = offs_n < n_hi
    t_cols = t_ptr + slice_id * R * stride_tr

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in = offs_m < num_tokens
    if HAS_LIVE:  # a padded table: entries past the live count are never read
        num_live = tl.load(live_ptr)
    else:
        num_live = num_entries
    # each row's segment: how many live segments end at or before it (rows past them: none)
    entry = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for e0 in range(0, num_entries, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        ends = tl.load(indptr_ptr + 1 + offs_e, mask=offs_e < num_entries, other=2147483647)
        ends = tl.where(offs_e < num_live, ends, 2147483647)
        entry += tl.sum((ends[None, :] <= offs_m[:, None]).to(tl.int32), axis=1)
    slot = tl.load(slots_ptr + entry, mask=m_in & (entry < num_live), other=-1)
    m_live = m_in & (slot >= 0)
    if USE_PDL:
        gdc_wait()  # t and y come from the kernels before this one
    if tl.sum(m_live.to(tl.int32), axis=0) > 0:
        slot_safe = tl.maximum(slot, 0)
        rank = tl.where(m_live, tl.load(ranks_ptr + slot_safe, mask=m_live, other=0), 0)
        scale = tl.load(
            scalings_ptr + slot_safe * stride_ss + slice_id * stride_si, mask=m_live, other=0.0
        )
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
        y_mask = m_live[:, None] & n_live[None, :]
        y_old = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
        first = tl.min(tl.where(m_live, slot, 2147483647), axis=0)
        last = tl.max(slot, axis=0)
        # (the branches name their tiles apart: the compiler unifies a name's type across them)
        if first == last:  # one adapter in the whole block: its B tile once, on the tensor cores
            offs_rd = tl.arange(0, BLOCK_R)
            t_dot = _load_t(
                t_cols, offs_m, m_live, offs_rd, offs_rd < R, splits, stride_ts, stride_tm,
                stride_tr, BLOCK_M, BLOCK_R, SPLIT_BLOCK,
            )
            t_dot = tl.where(offs_rd[None, :] < rank[:, None], t_dot, 0.0)
            b_dot = tl.load(
                b_ptr + first.to(tl.int64) * stride_bs + offs_n[None, :].to(tl.int64) * stride_bn
                + offs_rd[:, None] * stride_br,
                mask=(offs_rd < R)[:, None] & n_live[None, :],
                other=0.0,
            ).to(tl.float32)
            acc = tl.dot(t_dot, b_dot, input_precision=DOT_PRECISION)
        else:  # each row its own B tile
            b_rows = b_ptr + slot_safe[:, None, None].to(tl.int64) * stride_bs
            b_rows += offs_n[None, :, None].to(tl.int64) * stride_bn
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r0 in tl.static_range(0, BLOCK_R, R_CHUNK):
                offs_rg = r0 + tl.arange(0, R_CHUNK)
                t_g = _load_t(
                    t_cols, offs_m, m_live, offs_rg, offs_rg < R, splits, stride_ts, stride_tm,
                    stride_tr, BLOCK_M, R_CHUNK, GATHER_SPLIT_BLOCK,
                )
                t_g = tl.where(offs_rg[None, :] < rank[:, None], t_g, 0.0)
                b_g = tl.load(
                    b_rows + offs_rg[None, None, :] * stride_br,
                    mask=y_mask[:, :, None] & (offs_rg < R)[None, None, :],
                    other=0.0,
                ).to(tl.float32)
                acc += tl.sum(b_g * t_g[:, None, :], axis=2)
        tl.store(
            y_ptrs, (y_old + scale[:, None] * acc).to(y_ptr.dtype.element_ty), mask=y_mask
        )


def _rows_block_n(row_blocks: int, widths: list[int], num_sms: int) -> int:
    """Widest output tile that still gives two waves of programs (32 at the least)."""
    for block_n in (128, 64):
        if row_blocks * sum(cdiv(w, block_n) for w in widths) >= 2 * num_sms:
            return block_n
    return 32


def triton_lora_expand_rows(
    t: torch.Tensor,
    B: torch.Tensor,
    y: torch.Tensor,
    slice_offsets: tuple[int, ...],
    scalings: torch.Tensor,
    slot_ranks: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    num_segments: int,
    num_sms: int = 132,
    pdl: bool = False,
    block_n: int | None = None,
    live: torch.Tensor | None = None,
) -> None:
    """triton_lora_expand over row blocks instead of table entries (see above); same arguments,
    with the segment table (seg_indptr [S+1], seg_slots [S] int32, -1 = base rows) in place of
    the row table. live: [1] int32 on y's device, how many leading segments are real (a padded
    table), or None (all of them)."""
    partials = _checked_partials(t, B, y, slice_offsets, scalings, slot_ranks, pdl, live)
    num_splits, num_tokens, _ = partials.shape
    rank_pad = B.shape[2]
    assert seg_indptr.shape == (num_segments + 1,) and seg_slots.shape == (num_segments,)
    assert seg_indptr.device == seg_slots.device == y.device
    if num_tokens == 0 or num_segments == 0:
        return
    widths = [b - a for a, b in itertools.pairwise(slice_offsets)]
    row_blocks = cdiv(num_tokens, ROWS_BLOCK_M)
    block_n = block_n or _rows_block_n(row_blocks, widths, num_sms)
    offs, tiles, num_tiles = _slice_tiles(slice_offsets, block_n)
    block_r = max(16, next_pow2(rank_pad))
    r_chunk = max(1, min(block_r, GATHER_ELEMENTS // (ROWS_BLOCK_M * block_n)))
    low_precision = t.dtype != torch.float32 or B.dtype != torch.float32
    _lora_expand_rows_kernel[(row_blocks, num_tiles)](
        partials,
        B,
        y,
        scalings,
        seg_indptr,
        seg_slots,
        slot_ranks,
        seg_indptr if live is None else live,
        num_tokens,
        num_segments,
        rank_pad,
        num_splits,
        *offs,
        *tiles,
        partials.stride(0) if num_splits > 1 else 0,  # one split: never multiplied, one key
        partials.stride(1),
        partials.stride(2),
        B.stride(0),
        B.stride(1),
        B.stride(2),
        y.stride(0),
        y.stride(1),
        scalings.stride(0),
        scalings.stride(1),
        BLOCK_M=ROWS_BLOCK_M,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        R_CHUNK=r_chunk,
        BLOCK_E=ROWS_BLOCK_E,
        SPLIT_BLOCK=min(next_pow2(num_splits),
                        max(1, MAX_SUM_ELEMENTS // (ROWS_BLOCK_M * block_r))),
        GATHER_SPLIT_BLOCK=min(
            next_pow2(num_splits), max(1, MAX_SUM_ELEMENTS // (ROWS_BLOCK_M * r_chunk))
        ),
        DOT_PRECISION="tf32" if low_precision else "ieee",
        USE_PDL=pdl,
        HAS_LIVE=live is not None,
        num_warps=4,
        num_stages=2,
        launch_pdl=pdl,
    )
