"""LoRA shrink on CUDA: t = x A^T for every segment of tokens, all slices of a module in one launch.

Work is described by a row table (`indptr`, `slots`): entry e covers token rows
indptr[e]..indptr[e+1] of adapter slot slots[e] (-1 = base model rows). The table is the
segment list (triton backend) or the chunk list (csgmv backend); the kernel is the same.

Grid: (entries * m_progs, num_slices * n_tiles, split_k).
- Axis 0: an entry's rows are strided over `m_progs` programs in BLOCK_M tiles, so every row is
  covered whatever `m_progs` is (it is only a hint from the largest segment; a captured CUDA graph
  stays correct when later segments are longer). One group of programs an entry, or, for a table
  padded to a CUDA graph's bucket, `entry_progs` groups that loop over the real entries (their
  count read from the device).
- Axis 1: output columns of one slice, BLOCK_N at a time. Tiles at or beyond the slot's rank
  skip the K loop and store zeros, so a rank-1 adapter reads one row of A per slice. Past decode
  sizes, when every slice's columns fit in one tile, that tile spans them all ("fold"), so x is
  read once instead of once a slice.
- Axis 2: split-K. At decode the whole op is a read of r x in weights per adapter, bound by
  latency, not bandwidth: many splits keep each program's share of A to a load or two. Each split
  writes its own fp32 partial (plain stores: deterministic, no memset); the expand kernel sums
  them as it loads them, so a LoRA application is two launches.

With USE_PDL (programmatic dependent launch, sm_90+), the kernel may start while the previous
kernel on the stream finishes: it reads only the row table before `gdc_wait`, and lets the
expand launch early so the expand can fetch its B tiles meanwhile.
"""

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ops.sizes import cdiv, next_pow2

MAX_PARTIAL_ROWS = 2048  # split_k * tokens: the fp32 partials stay a small L2-resident buffer


# Scalars that change from step to step: Triton would otherwise compile a variant per value
# class (1, multiple of 16, other), and eager steps would meet new ones while serving. Strides
# and the K span of a split stay specialized: their divisibility by 16 is what lets the
# compiler prove pointers aligned and issue vector loads (unspecialized, the 32-adapter decode
# step took 18.2 ms instead of 11.6 on the H200, PDL on in both).
PER_STEP_ARGS = ["num_entries", "entry_progs", "m_progs"]


@triton.jit(do_not_specialize=PER_STEP_ARGS)
def _lora_shrink_kernel(
    x_ptr,
    a_ptr,
    out_ptr,
    indptr_ptr,
    slots_ptr,
    ranks_ptr,
    live_ptr,
    num_entries,
    entry_progs,
    K,
    R,
    k_per_split,
    stride_xm,
    stride_xk,
    stride_as,
    stride_ar,
    stride_ak,
    stride_os,
    stride_om,
    stride_on,
    m_progs,
    N_TILES: tl.constexpr,
    NUM_SLICES: tl.constexpr,
    FOLD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    HAS_LIVE: tl.constexpr,
    EAGER: tl.constexpr,  # A loads wait on the slot alone (`eager_loads`)
):
    pid_m = tl.program_id(0)
    first_entry = pid_m // m_progs
    m_prog = pid_m % m_progs
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    if FOLD:  # one tile spans every slice's columns: x is read once, not once a slice
        slice_id = 0
        n_start = pid_n * BLOCK_N
    else:
        slice_id = pid_n // N_TILES
        n_start = (pid_n % N_TILES) * BLOCK_N

    if HAS_LIVE and not EAGER:
        num_live = tl.load(live_ptr)
    else:  # EAGER: a padded table's extra entries are empty base runs, cheap to visit
        num_live = num_entries
    if USE_PDL:
        gdc_launch_dependents()
        if first_entry < num_live:  # programs with no entry exit at once
            gdc_wait()  # x may come from the previous kernel; out may alias its buffers
    offs_n = n_start + tl.arange(0, BLOCK_N)
    out_cols = out_ptr + split * stride_os + (slice_id * R + offs_n)[None, :] * stride_on
    k_lo = split * k_per_split
    k_end = tl.minimum(k_lo + k_per_split, K)

    # entries first_entry, first_entry + entry_progs, ... (one each unless the table is padded)
    for entry in range(first_entry, num_live, entry_progs):
        row_start = tl.load(indptr_ptr + entry)
        row_end = tl.load(indptr_ptr + entry + 1)
        slot = tl.load(slots_ptr + entry)
        # base rows (slot -1) get rank 0: no weight reads, zeros stored
        rank = tl.where(slot >= 0, tl.load(ranks_ptr + tl.maximum(slot, 0)), 0)
        if FOLD:  # column c is slice c // R, rank column c % R
            n_store = offs_n < NUM_SLICES * R
            n_rank = n_store & (offs_n % R < rank)
        else:
            n_store = offs_n < R
            n_rank = offs_n < rank
        if EAGER:  # load every column of a slot's tile; columns past its rank are zeroed after
            n_live = n_store
            k_hi = tl.where(slot >= 0, k_end, k_lo)
        elif FOLD:
            n_live = n_rank
            k_hi = tl.where(rank > 0, k_end, k_lo)
        else:
            n_live = n_rank
            k_hi = tl.where(n_start < rank, k_end, k_lo)
        a_rows = (
            a_ptr + slot.to(tl.int64) * stride_as + (slice_id * R + offs_n)[None, :] * stride_ar
        )
        for m0 in range(row_start + m_prog * BLOCK_M, row_end, m_progs * BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_live = offs_m < row_end
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_live = offs_k < k_hi
                x_tile = tl.load(
                    x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_live[:, None] & k_live[None, :],
                    other=0.0,
                ).to(tl.float32)
                a_tile = tl.load(
                    a_rows + offs_k[:, None] * stride_ak,
                    mask=k_live[:, None] & n_live[None, :],
                    other=0.0,
                ).to(tl.float32)
                acc = tl.dot(x_tile, a_tile, acc, input_precision=DOT_PRECISION)
            if EAGER:
                acc = tl.where(n_rank[None, :], acc, 0.0)
            tl.store(
                out_cols + offs_m[:, None].to(tl.int64) * stride_om,
                acc.to(out_ptr.dtype.element_ty),
                mask=m_live[:, None] & n_store[None, :],
            )


def eager_loads(num_tokens: int) -> bool:
    """LORASERVE_SHRINK_EAGER=1 (an opt-in A/B knob, for decode sizes of up to 64 tokens): the
    kernel's A loads wait on the entry's slot alone, not on its rank nor on a padded table's
    live count, which cuts two dependent round trips to memory out of a program's start; the
    columns past the slot's rank are loaded too and zeroed after the product (more bytes only
    where a pool holds ranks below its padded rank)."""
    return num_tokens <= 64 and os.environ.get("LORASERVE_SHRINK_EAGER", "0") == "1"


def shrink_split_k(
    num_tokens: int, num_programs: int, num_k_blocks: int, num_sms: int, max_split: int
) -> int:
    """Split-K factor, a power of two: as many splits as K blocks allow (decode is latency-bound,
    so a program should read one or two tiles of A), while the grid stays within eight waves
    (programs of empty or base entries are cheap but not free), the partials within
    MAX_PARTIAL_ROWS rows and the split count within `max_split` (what the expand sums in one
    load)."""
    split = 1
    while (
        split * 2 <= min(num_k_blocks, max_split)
        and num_programs * split * 2 <= 8 * num_sms
        and num_tokens * split * 2 <= MAX_PARTIAL_ROWS
    ):
        split *= 2
    return split


def shrink_blocks(
    num_tokens: int, rank_pad: int, k_dim: int, block_m: int, num_slices: int = 1
) -> tuple[int, int, bool]:
    """(BLOCK_N, BLOCK_K, fold) of the shrink: narrow rank tiles at decode sizes (more programs,
    fewer bytes each); past decode sizes, every slice's columns in one tile when they fit in 64
    (fold: x is read once for all slices), wider K tiles while the tile stays small.
    Two opt-in A/B knobs for decode sizes (measured in benchmarks/RESULTS.md, sixteenth
    session, or prepared for the next): LORASERVE_SHRINK_FOLD_DECODE=1 folds there too, and
    LORASERVE_SHRINK_DECODE_BLOCK_K sets the K tile."""
    decode = num_tokens <= 64  # the knobs are read at decode sizes only (no cost at prefill)
    fold_decode = decode and os.environ.get("LORASERVE_SHRINK_FOLD_DECODE", "0") == "1"
    fold = (not decode or fold_decode) and num_slices > 1 and num_slices * rank_pad <= 64
    if fold:
        block_n = max(16, next_pow2(num_slices * rank_pad))
    else:
        block_n = 16 if num_tokens <= 64 else min(64, max(16, next_pow2(rank_pad)))
    block_k = 128 if block_m * block_n <= 1024 else 64
    decode_k = os.environ.get("LORASERVE_SHRINK_DECODE_BLOCK_K", "").strip() if decode else ""
    if decode_k:
        block_k = int(decode_k) if decode_k.isdigit() else 0
        if block_k < 16 or block_k & (block_k - 1):
            raise ValueError(f"LORASERVE_SHRINK_DECODE_BLOCK_K: {decode_k!r} is not a power of "
                             "two of at least 16")
    return block_n, min(block_k, max(16, next_pow2(k_dim))), fold


def triton_lora_shrink(
    x: torch.Tensor,
    A: torch.Tensor,
    slot_ranks: torch.Tensor,
    indptr: torch.Tensor,
    slots: torch.Tensor,
    num_entries: int,
    num_slices: int,
    block_m: int,
    m_progs: int,
    split_k: int | None = None,
    num_sms: int = 132,
    out: torch.Tensor | None = None,
    max_split: int = 32,
    pdl: bool = False,
    blocks: tuple[int, int, bool] | None = None,
    live: torch.Tensor | None = None,
    entry_progs: int = 0,
) -> torch.Tensor:
    """t partials = x A^T per row-table entry.

    x: [T, K] (any float dtype, any strides). A: [num_slots, num_slices * R, K].
    slot_ranks: [num_slots] int32 (<= R). indptr: [num_entries + 1] int32 row offsets,
    slots: [num_entries] int32 (-1 = base rows), both on x's device.
    block_m: rows per tile (power of two >= 16); m_progs: programs per entry (>= 1).
    split_k: K splits (None = heuristic capped at max_split, or out.shape[0] when out is given).
    out: optional buffer for the result (shape and dtype as returned).
    pdl: launch as a programmatic dependent launch (CUDA sm_90+ only).
    blocks: (BLOCK_N, BLOCK_K, fold) instead of shrink_blocks' choice (benchmark sweeps).
    live: [1] int32 on x's device, how many leading entries are real (a padded table), or None.
    entry_progs: programs along the entry axis, each looping over entries (0: num_entries).
    Returns: [split_k, T, num_slices * R], x.dtype when split_k == 1 else float32; columns at or
    beyond a slot's rank and rows of base entries are zero. Partials must be summed over dim 0.
    """
    num_tokens, k_dim = x.shape
    assert A.dim() == 3 and A.shape[2] == k_dim, f"A {tuple(A.shape)} vs x {tuple(x.shape)}"
    assert A.shape[1] % num_slices == 0, f"A rows {A.shape[1]} not a multiple of {num_slices}"
    assert slot_ranks.shape == (A.shape[0],), "slot_ranks must be [num_slots]"
    assert indptr.shape == (num_entries + 1,) and slots.shape == (num_entries,)
    assert block_m >= 16 and block_m & (block_m - 1) == 0 and m_progs >= 1
    assert x.device == A.device == indptr.device == slots.device == slot_ranks.device
    assert not pdl or x.is_cuda, "programmatic dependent launch needs CUDA"
    assert live is None or (live.shape == (1,) and live.device == x.device)
    entry_progs = min(entry_progs or num_entries, num_entries)
    rank_pad = A.shape[1] // num_slices
    block_n, block_k, fold, n_tiles, num_k_blocks, heuristic = _plan(
        num_tokens, k_dim, A.shape[1], num_slices, block_m, m_progs, entry_progs, num_sms,
        max_split, blocks,
    )
    if split_k is None:
        split_k = heuristic if out is None else out.shape[0]
    if out is None:
        split_k = max(1, min(split_k, num_k_blocks))  # surplus splits would only store zeros
        out = _partials(x, A.shape[1], split_k)
    out_dtype = x.dtype if split_k == 1 else torch.float32
    out_shape = (split_k, num_tokens, A.shape[1])
    assert out.shape == out_shape and out.dtype == out_dtype, f"out must be {out_shape} {out_dtype}"
    assert out.device == x.device
    if num_tokens == 0 or num_entries == 0:
        return out.zero_()
    grid = (entry_progs * m_progs, (1 if fold else num_slices) * n_tiles, split_k)
    _lora_shrink_kernel[grid](
        x,
        A,
        out,
        indptr,
        slots,
        slot_ranks,
        indptr if live is None else live,
        num_entries,
        entry_progs,
        k_dim,
        rank_pad,
        cdiv(num_k_blocks, split_k) * block_k,
        x.stride(0),
        x.stride(1),
        A.stride(0),
        A.stride(1),
        A.stride(2),
        out.stride(0) if split_k > 1 else 0,  # one split: never multiplied, one key
        out.stride(1),
        out.stride(2),
        m_progs,
        N_TILES=n_tiles,
        NUM_SLICES=num_slices,
        FOLD=fold,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        USE_PDL=pdl,
        HAS_LIVE=live is not None,
        EAGER=eager_loads(num_tokens),
        num_warps=4,
        num_stages=3,
        launch_pdl=pdl,
    )
    return out


def _plan(
    num_tokens: int, k_dim: int, a_rows: int, num_slices: int, block_m: int, m_progs: int,
    entry_progs: int, num_sms: int, max_split: int, blocks: tuple[int, int, bool] | None,
) -> tuple[int, int, bool, int, int, int]:
    """(BLOCK_N, BLOCK_K, fold, column tiles, K blocks, heuristic split) of a shrink;
    entry_progs as the kernel launches them."""
    rank_pad = a_rows // num_slices
    block_n, block_k, fold = blocks or shrink_blocks(
        num_tokens, rank_pad, k_dim, block_m, num_slices
    )
    n_tiles = cdiv(num_slices * rank_pad if fold else rank_pad, block_n)
    num_k_blocks = cdiv(k_dim, block_k)
    programs = entry_progs * m_progs * (1 if fold else num_slices) * n_tiles
    split = shrink_split_k(num_tokens, programs, num_k_blocks, num_sms, max_split)
    return block_n, block_k, fold, n_tiles, num_k_blocks, max(1, min(split, num_k_blocks))


def _partials(x: torch.Tensor, a_rows: int, split_k: int) -> torch.Tensor:
    """[split_k, T, a_rows] on the current stream: x.dtype for one split, else float32.
    Rows are padded to a multiple of 16, so the split stride is one whatever the token count
    (Triton specializes integers on divisibility by 16: an odd count would compile a variant of
    its own, and of the expand that reads these partials, while serving)."""
    num_tokens = x.shape[0]
    rows = num_tokens + (-num_tokens % 16)
    dtype = x.dtype if split_k == 1 else torch.float32
    return torch.empty((split_k, rows, a_rows), dtype=dtype, device=x.device)[:, :num_tokens]


def shrink_partials_buffer(
    x: torch.Tensor,
    A: torch.Tensor,
    num_slices: int,
    block_m: int,
    m_progs: int,
    num_entries: int,
    entry_progs: int = 0,
    num_sms: int = 132,
    max_split: int = 32,
) -> torch.Tensor:
    """The partials buffer triton_lora_shrink would allocate for these arguments (heuristic
    split and tiling), allocated now on the current stream: passed back as `out`, the shrink
    can then run on another stream while the buffer belongs to this one."""
    entry_progs = min(entry_progs or num_entries, num_entries)
    split_k = _plan(x.shape[0], x.shape[1], A.shape[1], num_slices, block_m, m_progs,
                    entry_progs, num_sms, max_split, None)[-1]
    return _partials(x, A.shape[1], split_k)
