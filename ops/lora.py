"""Multi-LoRA compute: y += scaling * (x A^T) B^T for a batch whose tokens belong to many adapters.

The runner groups each adapter's tokens contiguously ("segments"); base-model tokens form
segments of slot -1, which no op touches. Weights live in the adapter pool's fixed GPU buffers:

- linear group with n slices (qkv: 3, gate_up: 2, o/down/lm_head: 1):
  A: [num_slots, n * R, in] (slice i in rows i*R .. i*R + rank), B: [num_slots, N_total, R]
  (slice i in rows slice_offsets[i] .. slice_offsets[i+1]), scalings: [num_slots, n] float32;
- embedding: A_emb: [num_slots, vocab, R] (A transposed for row gathers), B_emb as a linear
  group with n = 1;
- slot_ranks: [num_slots] int32, every column at or beyond a slot's rank is zero.

Every op dispatches on the device: torch on CPU (the `*_torch` references), Triton on CUDA
(the `*_triton` wrappers, which also run on CPU tensors under TRITON_INTERPRET=1). Backends differ
in how rows are cut into programs: "triton" gives each segment its programs (rows strided over
several when segments are long), "csgmv" cuts segments into chunks of `chunk_size` rows, one
tile each. Neither syncs with the host, so both can be captured in CUDA graphs.
"""

import functools
import itertools
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ops.dispatch import num_sms, use_triton
from ops.scoped import ThreadSetting
from ops.triton_lora_fold import LoraFold

BACKENDS = ("csgmv", "triton")
# Programs along the entry axis for a padded table: a CUDA graph's table is padded to its
# bucket, so one program an entry would launch mostly empty programs at large buckets.
PADDED_ENTRY_PROGRAMS = 32
DECODE_CHUNK = 16  # csgmv chunk rows of decode tables (CUDA graphs capture with it)
# Steps that prefill cut csgmv segments into chunks of PREFILL_CHUNK_TILES tiles of chunk_size
# rows (max_lora_chunk_size): the shrink gives each tile a program, and the entry expand gives
# each program EXPAND_TILES tiles of one chunk (every few tiles of it), so it loads that
# adapter's B tile once for them. At 8 x 512 tokens over 8 adapters the expand alone took 6.67 ms
# a step this way against 7.96 with a program a tile (H200, benchmarks/RESULTS.md, expand_sweep).
PREFILL_CHUNK_TILES = 8
EXPAND_TILES = 4
# Steps of at most this many tokens expand over row blocks (triton_lora_expand_rows), larger
# ones over the row table's entries; 0 turns the row-block expand off (benchmark comparisons).
ROWS_EXPAND_MAX_TOKENS = int(os.environ.get("LORASERVE_ROWS_EXPAND_MAX_TOKENS", "512"))
# Inside CUDA graph captures the LoRA shrink runs on a side stream while the base projection
# runs (linear_lora); LORASERVE_LORA_OVERLAP=0 (read when a forward is captured) captures the
# serial path instead, for A/B runs. Eager steps run serially: at prefill the overlap measured
# no gain (benchmarks/RESULTS.md), and at decode sizes the fork and join's host calls would
# cost more than they hide.
# Inside decode graph captures (`capture_paths(fold=True)`) the groups LORASERVE_LORA_FOLD
# names (comma-separated, read when a forward is captured; default all four, "0": none) leave
# their expand to the next kernel (ops/triton_lora_fold.py): qkv's to rotary+K/V store, gate_up's
# to SiLU*up, o's and down's to the next add+RMSNorm. On the H200 at Llama-3.1-8B shapes the
# graph forward with all four took 5.32 / 6.27 / 6.89 ms at batch 1 over 1 adapter, batch 32
# over 8 and over 32, against 5.34 / 6.36 / 7.08 folding qkv and gate_up only in the same run;
# an earlier run measured 5.46 / 6.67 / 8.02 with no fold (benchmarks/RESULTS.md).
FOLD_GROUPS = ("qkv", "o", "gate_up", "down")
DEFAULT_FOLD = FOLD_GROUPS


@dataclass
class LoraBatchInfo:
    """Tokens grouped by adapter. All tensors on the compute device."""

    seg_indptr: Tensor  # [S+1] int32, token offsets of segments
    seg_slots: Tensor  # [S] int32, GPU slot of each segment, -1 = base model rows (no LoRA)
    slot_ranks: Tensor  # [num_slots] int32
    num_segments: int
    max_seg_len: int
    # csgmv: segments cut into chunks of at most chunk_size rows
    chunk_indptr: Tensor  # [C+1] int32 token offsets of chunks
    chunk_slots: Tensor  # [C] int32 slot per chunk (-1 = base)
    num_chunks: int
    chunk_size: int
    backend: str  # "csgmv" or "triton"
    # Padded tables (CUDA graphs): how many leading entries are real, [1] int32 on the device,
    # and how many programs the kernels launch along the entry axis, each looping over the real
    # entries; None: one program an entry.
    seg_live: Tensor | None = None
    chunk_live: Tensor | None = None
    entry_programs: int | None = None
    # [2] int32 on the device: segments and chunks before any padding (build_lora_batch_info)
    counts: Tensor | None = None


def _segments(token_slots: list[int]) -> tuple[list[int], list[int]]:
    """Runs of equal slots -> (indptr [S+1], slots [S]); an adapter may form only one run."""
    indptr, slots = [0], []
    for slot, run in itertools.groupby(token_slots):
        indptr.append(indptr[-1] + sum(1 for _ in run))
        slots.append(slot)
    adapter_runs = [s for s in slots if s >= 0]
    if len(adapter_runs) != len(set(adapter_runs)):
        raise ValueError(f"adapter tokens are not contiguous: segment slots {slots}")
    return indptr, slots


def _chunks(indptr: list[int], slots: list[int], chunk_size: int) -> tuple[list[int], list[int]]:
    """Cut every segment into chunks of at most chunk_size rows."""
    chunk_indptr, chunk_slots = [0], []
    for lo, hi, slot in zip(indptr, indptr[1:], slots):
        for start in range(lo, hi, chunk_size):
            chunk_indptr.append(min(start + chunk_size, hi))
            chunk_slots.append(slot)
    return chunk_indptr, chunk_slots


def _pad(indptr: list[int], slots: list[int], count: int) -> tuple[list[int], list[int]]:
    """Append empty base entries up to `count` (fixed grid sizes for CUDA graphs)."""
    if len(slots) > count:
        raise ValueError(f"{len(slots)} entries do not fit pad_to={count}")
    extra = count - len(slots)
    return indptr + [indptr[-1]] * extra, slots + [-1] * extra


@dataclass
class LoraTables:
    """A batch's segment and chunk tables on the host: `parts` holds seg_indptr [S+1],
    seg_slots [S], chunk_indptr [C+1], chunk_slots [C] and the real counts [2] (segments and
    chunks before any padding). The runner sends them with the rest of a step's inputs."""

    parts: tuple[list[int], ...]
    num_segments: int
    num_chunks: int
    max_seg_len: int
    chunk_size: int
    backend: str
    pad_to: int | None


def lora_tables(
    token_slots: list[int],
    num_slots: int,
    backend: str,
    chunk_size: int,
    pad_to: int | None = None,
) -> LoraTables:
    """Segments and chunks of a batch (host work only; `lora_batch_info` makes the batch info
    from the parts once they are on the device).

    token_slots: per-token GPU slot (-1 = base model) in token order; each adapter's tokens
    must be one contiguous run (ValueError otherwise; base runs may repeat).
    chunk_size: power of two in 16..128. pad_to: if given, segments and chunks are padded with
    empty base entries to exactly this many, so grids stay fixed across CUDA-graph replays.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown LoRA backend {backend!r}, expected one of {BACKENDS}")
    if chunk_size not in (16, 32, 64, 128):
        raise ValueError(f"chunk_size must be a power of two in 16..128, got {chunk_size}")
    if token_slots and not -1 <= min(token_slots) <= max(token_slots) < num_slots:
        raise ValueError(f"slot ids must be in -1..{num_slots - 1}")
    seg_indptr, seg_slots = _segments(token_slots)
    chunk_indptr, chunk_slots = _chunks(seg_indptr, seg_slots, chunk_rows(chunk_size))
    max_seg_len = max((b - a for a, b in itertools.pairwise(seg_indptr)), default=0)
    live = [len(seg_slots), len(chunk_slots)]
    if pad_to is not None:
        seg_indptr, seg_slots = _pad(seg_indptr, seg_slots, pad_to)
        chunk_indptr, chunk_slots = _pad(chunk_indptr, chunk_slots, pad_to)
    return LoraTables(
        (seg_indptr, seg_slots, chunk_indptr, chunk_slots, live), len(seg_slots),
        len(chunk_slots), max_seg_len, chunk_size, backend, pad_to,
    )


def lora_batch_info(
    tables: LoraTables, parts: Sequence[Tensor], slot_ranks: Tensor
) -> LoraBatchInfo:
    """The batch info over `parts`, `tables.parts` as int32 tensors on the compute device.
    slot_ranks: [num_slots] int32, kept as is when already on that device (the pool updates it
    in place)."""
    seg_indptr, seg_slots, chunk_indptr, chunk_slots, counts = parts
    assert seg_slots.shape == (tables.num_segments,) and counts.dtype == torch.int32
    padded = tables.pad_to is not None
    return LoraBatchInfo(
        seg_indptr=seg_indptr,
        seg_slots=seg_slots,
        slot_ranks=slot_ranks.to(device=counts.device, dtype=torch.int32),
        num_segments=tables.num_segments,
        max_seg_len=tables.max_seg_len,
        chunk_indptr=chunk_indptr,
        chunk_slots=chunk_slots,
        num_chunks=tables.num_chunks,
        chunk_size=tables.chunk_size,
        backend=tables.backend,
        seg_live=counts[0:1] if padded else None,
        chunk_live=counts[1:2] if padded else None,
        entry_programs=min(tables.pad_to, PADDED_ENTRY_PROGRAMS) if padded else None,
        counts=counts,
    )


def build_lora_batch_info(
    token_slots: list[int],
    slot_ranks: Tensor,
    backend: str,
    chunk_size: int,
    device: torch.device | str,
    pad_to: int | None = None,
) -> LoraBatchInfo:
    """`lora_tables` and `lora_batch_info` with a copy of their own to `device`, for callers
    outside the serving loop (the runner sends the tables with the rest of a step's inputs)."""
    tables = lora_tables(token_slots, slot_ranks.shape[0], backend, chunk_size, pad_to)
    packed = torch.tensor([x for part in tables.parts for x in part], dtype=torch.int32)
    device = torch.device(device)
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    else:
        packed = packed.to(device)
    parts = packed.split_with_sizes([len(part) for part in tables.parts])
    return lora_batch_info(tables, parts, slot_ranks)


# ---------------------------------------------------------------------------------------------
# torch references (the CPU path): one matmul per segment and slice, over the slot's rank only


def _host_segments(info: LoraBatchInfo) -> list[tuple[int, int, int, int]]:
    """(first row, end row, slot, rank) of every adapter segment; reads tensors on the host."""
    indptr, slots = info.seg_indptr.tolist(), info.seg_slots.tolist()
    ranks = info.slot_ranks.tolist()
    return [
        (lo, hi, slot, ranks[slot])
        for lo, hi, slot in zip(indptr, indptr[1:], slots)
        if slot >= 0 and hi > lo
    ]


def lora_shrink_torch(x: Tensor, A: Tensor, info: LoraBatchInfo, num_slices: int) -> Tensor:
    """t = x A[slot]^T per segment. x: [T, in]; A: [num_slots, n*R, in] -> t: [T, n*R], x.dtype,
    zero for base rows and for columns at or beyond the slot's rank."""
    num_tokens, in_dim = x.shape
    rank_pad = A.shape[1] // num_slices
    t = x.new_zeros((num_tokens, A.shape[1]))
    for lo, hi, slot, rank in _host_segments(info):
        a = A[slot].view(num_slices, rank_pad, in_dim)[:, :rank].float()  # [n, rank, in]
        prod = torch.einsum("ti,nri->tnr", x[lo:hi].float(), a)
        t[lo:hi].view(hi - lo, num_slices, rank_pad)[:, :, :rank] = prod.to(t.dtype)
    return t


def lora_expand_torch(
    t: Tensor,
    B: Tensor,
    y: Tensor,
    slice_offsets: tuple[int, ...],
    scalings: Tensor,
    info: LoraBatchInfo,
) -> None:
    """y[:, off_i:off_i+1] += scalings[slot, i] * t[:, i*R : i*R+rank]
    B[slot, off_i:off_i+1, :rank]^T.

    t: [T, n*R]; B: [num_slots, N_total, R]; y: [T, N_total] in place; base rows untouched."""
    rank_pad = B.shape[2]
    scale = scalings.tolist()
    for lo, hi, slot, rank in _host_segments(info):
        for i, (n_lo, n_hi) in enumerate(itertools.pairwise(slice_offsets)):
            t_slice = t[lo:hi, i * rank_pad : i * rank_pad + rank].float()
            delta = t_slice @ B[slot, n_lo:n_hi, :rank].float().T
            y_view = y[lo:hi, n_lo:n_hi]
            y_view.copy_(y_view.float() + scale[slot][i] * delta)


def lora_embed_shrink_torch(ids: Tensor, A_emb: Tensor, info: LoraBatchInfo) -> Tensor:
    """t[i] = A_emb[slot_i, ids[i]]. ids: [T]; A_emb: [num_slots, vocab, R] -> t: [T, R]."""
    t = A_emb.new_zeros((ids.shape[0], A_emb.shape[2]))
    for lo, hi, slot, rank in _host_segments(info):
        t[lo:hi, :rank] = A_emb[slot, ids[lo:hi].long(), :rank]
    return t


def apply_lora_torch(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    y: Tensor,
    slice_offsets: tuple[int, ...],
    scalings: Tensor,
    info: LoraBatchInfo,
) -> None:
    """y += LoRA delta of x (shrink then expand), torch reference."""
    t = lora_shrink_torch(x, A, info, len(slice_offsets) - 1)
    lora_expand_torch(t, B, y, slice_offsets, scalings, info)


# ---------------------------------------------------------------------------------------------
# Triton path


@dataclass(frozen=True)
class LoraRowTable:
    """The rows each program works on: segments (triton backend) or chunks (csgmv)."""

    indptr: Tensor
    slots: Tensor
    num_entries: int
    block_m: int
    m_progs: int
    live: Tensor | None = None  # [1] int32: entries that are real (None: all of them)
    entry_progs: int = 0  # programs along entries (0: num_entries)


def chunk_rows(chunk_size: int) -> int:
    """Rows of a csgmv chunk: chunk_size for decode tables (DECODE_CHUNK), else
    PREFILL_CHUNK_TILES tiles of chunk_size rows."""
    return chunk_size if chunk_size == DECODE_CHUNK else chunk_size * PREFILL_CHUNK_TILES


def lora_row_table(info: LoraBatchInfo) -> LoraRowTable:
    """Rows per program for info.backend: chunks in BLOCK_M = chunk_size tiles, one program a
    tile (csgmv), or segments whose rows are strided over m_progs programs (triton)."""
    if info.backend == "csgmv":
        tiles = chunk_rows(info.chunk_size) // info.chunk_size
        m_progs = max(1, min(tiles, -(-info.max_seg_len // info.chunk_size)))
        return LoraRowTable(
            info.chunk_indptr, info.chunk_slots, info.num_chunks, info.chunk_size, m_progs,
            info.chunk_live, _entry_progs(info, info.num_chunks),
        )
    # max_seg_len only sizes the grid; the kernels stride over all rows whatever it is
    block_m = min(64, max(16, 1 << max(info.max_seg_len - 1, 0).bit_length()))
    m_progs = max(1, -(-info.max_seg_len // block_m))
    return LoraRowTable(
        info.seg_indptr, info.seg_slots, info.num_segments, block_m, m_progs, info.seg_live,
        _entry_progs(info, info.num_segments),
    )


def _entry_progs(info: LoraBatchInfo, num_entries: int) -> int:
    if info.entry_programs is None:
        return num_entries
    return max(1, min(info.entry_programs, num_entries))


def uses_rows_expand(num_tokens: int, chunk_size: int) -> bool:
    """Whether the expand runs over row blocks (each program covers 16 rows whatever their
    adapters, so many adapters of a row or two each cost no more programs than one; see
    ops/triton_lora_expand.py): for steps of up to ROWS_EXPAND_MAX_TOKENS tokens, and for every
    decode and logits table (chunks of DECODE_CHUNK rows) whatever its size, so that the entry
    expand serves only prefill tables of more tokens, whose variants the warm-up's prefill
    shapes meet. ROWS_EXPAND_MAX_TOKENS = 0 turns the row-block expand off."""
    if ROWS_EXPAND_MAX_TOKENS <= 0:
        return False
    return num_tokens <= ROWS_EXPAND_MAX_TOKENS or chunk_size == DECODE_CHUNK


@functools.lru_cache(maxsize=16)
def _use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch for the shrink and expand: on CUDA sm_90+ when
    LORASERVE_ENABLE_PDL=1 (off by default: on the H200 it helped some cases and hurt others,
    by different amounts from run to run, benchmarks/RESULTS.md). Each kernel waits for its
    predecessor before touching activations, so it stays correct in eager mode and inside CUDA
    graphs."""
    if device.type != "cuda" or os.environ.get("LORASERVE_ENABLE_PDL", "0") != "1":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _shrink_partials(
    x: Tensor,
    A: Tensor,
    info: LoraBatchInfo,
    num_slices: int,
    split_k: int | None,
    out: Tensor | None = None,
    pdl: bool | None = None,
    table: LoraRowTable | None = None,
    blocks: tuple[int, int, bool] | None = None,
) -> Tensor:
    """Split-K partials of the shrink, [split_k, T, n*R] (see triton_lora_shrink); the split
    count is capped at what one expand program sums in a single load. table: info's row table
    when the caller has it already; blocks: the shrink's tiling instead of its heuristic."""
    from ops.triton_lora_expand import expand_max_splits
    from ops.triton_lora_shrink import triton_lora_shrink

    table = table or lora_row_table(info)
    return triton_lora_shrink(
        x,
        A,
        info.slot_ranks,
        table.indptr,
        table.slots,
        table.num_entries,
        num_slices,
        table.block_m,
        table.m_progs,
        live=table.live,
        entry_progs=table.entry_progs,
        split_k=split_k,
        num_sms=num_sms(x.device),
        out=out,
        max_split=expand_max_splits(table.block_m, A.shape[1] // num_slices),
        pdl=_use_pdl(x.device) if pdl is None else pdl,
        blocks=blocks,
    )


def lora_shrink_triton(
    x: Tensor,
    A: Tensor,
    info: LoraBatchInfo,
    num_slices: int,
    split_k: int | None = None,
    out: Tensor | None = None,
    pdl: bool | None = None,
) -> Tensor:
    """Triton lora_shrink for info.backend. x: [T, in]; A: [num_slots, n*R, in] -> [T, n*R].

    split_k: K splits (None = heuristic); with more than one the fp32 partials are summed here
    (apply_lora_triton leaves that sum to the expand kernel instead).
    out: optional [T, n*R] buffer in x.dtype to write into (then returned).
    pdl: programmatic dependent launch (None = LORASERVE_ENABLE_PDL on CUDA sm_90+)."""
    if split_k == 1 and out is not None:
        return _shrink_partials(x, A, info, num_slices, 1, out.unsqueeze(0), pdl)[0]
    partials = _shrink_partials(x, A, info, num_slices, split_k, pdl=pdl)
    t = partials[0] if partials.shape[0] == 1 else partials.sum(0).to(x.dtype)
    return t if out is None else out.copy_(t)


def lora_expand_triton(
    t: Tensor,
    B: Tensor,
    y: Tensor,
    slice_offsets: tuple[int, ...],
    scalings: Tensor,
    info: LoraBatchInfo,
    pdl: bool | None = None,
    table: LoraRowTable | None = None,
    block_n: int | None = None,
) -> None:
    """Triton lora_expand for info.backend. t: [T, n*R] (any float dtype) or split-K partials
    [splits, T, n*R], summed as they are loaded; B: [num_slots, N_total, R]; y: [T, N_total] in
    place; scalings: [num_slots, n]. pdl: programmatic dependent launch (None =
    LORASERVE_ENABLE_PDL on CUDA sm_90+). table: info's row table when the caller has it
    already; block_n: the output tile width instead of the heuristic's."""
    from ops.triton_lora_expand import triton_lora_expand, triton_lora_expand_rows

    if uses_rows_expand(y.shape[0], info.chunk_size):
        triton_lora_expand_rows(
            t, B, y, tuple(slice_offsets), scalings, info.slot_ranks, info.seg_indptr,
            info.seg_slots, info.num_segments, num_sms=num_sms(y.device),
            pdl=_use_pdl(y.device) if pdl is None else pdl, block_n=block_n, live=info.seg_live,
        )
        return
    table = table or lora_row_table(info)
    # csgmv: EXPAND_TILES tiles of a chunk a program, strided (one B tile load for them)
    m_progs = -(-table.m_progs // EXPAND_TILES) if info.backend == "csgmv" else table.m_progs
    triton_lora_expand(
        t,
        B,
        y,
        tuple(slice_offsets),
        scalings,
        info.slot_ranks,
        table.indptr,
        table.slots,
        table.num_entries,
        table.block_m,
        m_progs,
        live=table.live,
        entry_progs=table.entry_progs,
        num_sms=num_sms(y.device),
        pdl=_use_pdl(y.device) if pdl is None else pdl,
        block_n=block_n,
    )


def lora_embed_shrink_triton(
    ids: Tensor, A_emb: Tensor, info: LoraBatchInfo, out: Tensor | None = None
) -> Tensor:
    """Triton lora_embed_shrink. ids: [T]; A_emb: [num_slots, vocab, R] -> t: [T, R]
    (written into `out` when given)."""
    from ops.triton_lora_embed import triton_lora_embed_shrink

    table = lora_row_table(info)
    block_m = min(table.block_m, 32)  # a gather: small tiles keep many rows in flight
    m_progs = table.m_progs * (table.block_m // block_m)
    return triton_lora_embed_shrink(
        ids,
        A_emb,
        info.slot_ranks,
        table.indptr,
        table.slots,
        table.num_entries,
        block_m,
        m_progs,
        out=out,
    )


def apply_lora_triton(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    y: Tensor,
    slice_offsets: tuple[int, ...],
    scalings: Tensor,
    info: LoraBatchInfo,
    split_k: int | None = None,
    pdl: bool | None = None,
    shrink_blocks: tuple[int, int, bool] | None = None,
    expand_block_n: int | None = None,
) -> None:
    """y += LoRA delta of x in two launches: the shrink writes split-K partials (fp32 when split),
    the expand sums them as it loads them (no rounding of t to x.dtype) and adds into y.
    pdl: programmatic dependent launch (None = LORASERVE_ENABLE_PDL on CUDA sm_90+).
    shrink_blocks (BLOCK_N, BLOCK_K, fold) and expand_block_n force the kernels' tiling instead
    of their heuristics (benchmark sweeps)."""
    table = lora_row_table(info)  # once for both kernels
    partials = _shrink_partials(
        x, A, info, len(slice_offsets) - 1, split_k, pdl=pdl, table=table, blocks=shrink_blocks
    )
    lora_expand_triton(
        partials, B, y, slice_offsets, scalings, info, pdl=pdl, table=table,
        block_n=expand_block_n,
    )


class _SideStream:
    """A device's second stream with the two events of a fork and a join. The events are reused:
    a wait takes the event's latest record at the time it is issued, and each record is waited
    on before the next one."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)
        self.fork = torch.cuda.Event()
        self.join = torch.cuda.Event()


_side_streams = threading.local()  # per thread: each thread forks from its own current stream


def _side_stream(device: torch.device) -> _SideStream:
    streams = _side_streams.__dict__.setdefault("by_device", {})
    if device not in streams:
        side = _SideStream(device)
        for event in (side.fork, side.join):  # created now: not inside a graph capture
            event.record(side.stream)
        streams[device] = side
    return streams[device]


def prepare_side_stream(device: torch.device) -> None:
    """Create this thread's side stream and its events for CUDA `device` (with its index)
    ahead of a CUDA graph capture (creating them inside one is not a capturable call)."""
    if device.type == "cuda":
        _side_stream(device)


_capture_fold = ThreadSetting(False)


def capture_paths(fold: bool):
    """Around a CUDA graph capture and the warm-up forwards before it (which compile its
    kernels): inside, `folds_lora` says whether the forward folds LoRA expands into the next
    kernels (fold: decode graphs; prefill graphs keep their expands, whose tiles share an
    adapter's B over many rows)."""
    return _capture_fold.set(fold)


_capture_stack = ThreadSetting(False)


def stack_paths(stack: bool):
    """Around a decode graph capture (and its warm-up): inside, `stacks_lora` says whether the
    forward takes a stacked group's projection and shrink as one GEMM over the pool's stack
    (runtime/graphs.py captures both ways and picks per step: `stack_wins`)."""
    return _capture_stack.set(stack)


def stacks_lora() -> bool:
    return _capture_stack.get()


def stack_wins(num_segments: int, num_slots: int) -> bool:
    """Whether a decode step over `num_segments` row segments (distinct adapters, base rows one
    more) runs faster as the stacked GEMM, which reads every one of the pool's `num_slots`
    slots' A, than with the shrink kernel, whose cost grows with the distinct adapters: from
    a third of the slots on. (On the H200, Llama-3.1-8B shapes, rank 16, a 32-slot pool: the
    stacked GEMM took 11.5 us a layer over the projections; the shrink 5.2 over one adapter,
    10.4 over 8, 28.8 over 32; benchmarks/RESULTS.md, seventeenth session.)"""
    return 3 * num_segments >= num_slots


def fold_groups() -> frozenset[str]:
    """The groups LORASERVE_LORA_FOLD names (default DEFAULT_FOLD; "0": none)."""
    raw = os.environ.get("LORASERVE_LORA_FOLD", ",".join(DEFAULT_FOLD)).strip()
    if raw in ("", "0"):
        return frozenset()
    names = frozenset(n.strip() for n in raw.split(","))
    unknown = names - set(FOLD_GROUPS)
    if unknown:
        raise ValueError(f"LORASERVE_LORA_FOLD: unknown groups {sorted(unknown)}, expected some "
                         f"of {FOLD_GROUPS}")
    return names


def folds_lora(x: Tensor) -> frozenset[str]:
    """The groups whose expand a forward over x folds into the next kernel: those of
    `fold_groups` inside `capture_paths(fold=True)` on CUDA, else none."""
    if not (_capture_fold.get() and use_triton(x)):
        return frozenset()
    return fold_groups()


def lora_row_slots(info: LoraBatchInfo, num_tokens: int) -> Tensor:
    """[num_tokens] int32: each row's slot from the segment table (-1: base rows and rows past
    the table), on the device with no host sync (capturable)."""
    rows = torch.arange(num_tokens, dtype=torch.int32, device=info.seg_indptr.device)
    entry = torch.searchsorted(info.seg_indptr[1:], rows, right=True, out_int32=True)
    slots = info.seg_slots[entry.clamp_(max=max(info.num_segments - 1, 0))]
    return torch.where(entry < info.num_segments, slots, -1)


def overlap_enabled() -> bool:
    """Whether CUDA graph captures run the LoRA shrink beside the projection: unless
    LORASERVE_LORA_OVERLAP=0."""
    return os.environ.get("LORASERVE_LORA_OVERLAP", "1") != "0"


def overlaps_shrink(x: Tensor) -> bool:
    """Whether linear_lora runs the shrink for input x on a side stream: on CUDA, inside a CUDA
    graph capture, when `overlap_enabled` (the environment is read only inside captures)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing() and overlap_enabled()


def linear_lora(
    x: Tensor,
    base: Callable[[Tensor], Tensor],
    A: Tensor,
    B: Tensor,
    slice_offsets: tuple[int, ...],
    scalings: Tensor,
    info: LoraBatchInfo,
    overlap: bool | None = None,
) -> Tensor:
    """base(x) + scalings * (x A^T) B^T per segment and slice. overlap (None: `overlaps_shrink`)
    runs the shrink on a side stream while base(x) runs on the current one (CUDA only): the
    shrink needs only x, so at decode its latency-bound programs run beside the weight-bound
    projection instead of after it; the expand then adds into base's output on the current
    stream. The partials are allocated on the current stream before the fork, and the current
    stream waits for the shrink before the expand, so no buffer is reused while the side stream
    may still touch it. Captured into a CUDA graph, the fork and join become parallel branches.
    Without overlap: base(x), then apply_lora."""
    if not (overlaps_shrink(x) if overlap is None else overlap):
        y = base(x)
        apply_lora(x, A, B, y, slice_offsets, scalings, info)
        return y
    table = lora_row_table(info)
    y, partials = _base_and_shrink(x, base, A, info, len(slice_offsets) - 1, table, True)
    lora_expand_triton(partials, B, y, slice_offsets, scalings, info, table=table)
    return y


def _base_and_shrink(
    x: Tensor,
    base: Callable[[Tensor], Tensor],
    A: Tensor,
    info: LoraBatchInfo,
    num_slices: int,
    table: LoraRowTable,
    overlap: bool,
    presum: bool = False,
) -> tuple[Tensor, Tensor]:
    """(base(x), the shrink's partials), the shrink on the side stream beside base(x) when
    `overlap` (see linear_lora), else after it. presum (`fold_presum`): the partials summed
    into one split there too, by torch.sum (for consumers that would each sum them again)."""
    partials = _shrink_partials_buffer(x, A, info, num_slices, table)
    split_k = partials.shape[0]
    t = partials
    if presum and split_k > 1:  # allocated here: the buffer belongs to this stream
        t = partials.new_empty((1, *partials.shape[1:]))

    def shrink() -> None:
        _shrink_partials(x, A, info, num_slices, split_k, out=partials, table=table)
        if t is not partials:
            torch.sum(partials, dim=0, keepdim=True, out=t)

    if not overlap:
        y = base(x)
        shrink()
        return y, t
    side = _side_stream(x.device)
    main = torch.cuda.current_stream(x.device)
    side.fork.record(main)
    side.stream.wait_event(side.fork)
    with torch.cuda.stream(side.stream):
        shrink()
    side.join.record(side.stream)
    y = base(x)
    main.wait_event(side.join)
    return y, t


def linear_lora_fold(
    x: Tensor,
    base: Callable[[Tensor], Tensor],
    A: Tensor,
    B: Tensor,
    slice_offsets: tuple[int, ...],
    scalings: Tensor,
    info: LoraBatchInfo,
    row_slots: Tensor,
    stack: Tensor | None = None,
    stack_mm: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, LoraFold]:
    """(base(x), the LoRA delta left for the next kernel): linear_lora without its expand. The
    shrink runs beside base(x) as linear_lora runs it (inside captures, unless
    LORASERVE_LORA_OVERLAP=0); row_slots: `lora_row_slots` of the step.

    stack: the pool's stacked buffer of this group and layer ([N + num_slots * n*R, in]: the
    base weight's rows, then every slot's A; runtime/adapters/pool.py), whose first N rows are
    base's weight: then one GEMM over it gives base(x) and every slot's t, and there is no
    shrink launch. (On the H200 the projections' cuBLAS kernels take a whole multiprocessor a
    program, so a shrink beside them runs before them, not with them: at 32 adapters the stacked
    GEMM costs 11.5 us a layer over the projections, the shrink 28.8; benchmarks/RESULTS.md.)
    stack_mm(x, stack): that GEMM, if not F.linear (the decode GEMM, runtime/model/llama.py);
    it may return split-K partials, fp32 [S, T, N + num_slots * n*R]: then base(x) is returned
    as its partials [S, T, N] for the next norm to sum, and the fold's t keeps S splits."""
    if stack is not None:
        n_out, t_cols = slice_offsets[-1], A.shape[1]
        if stack.shape != (n_out + A.shape[0] * t_cols, x.shape[1]):
            raise ValueError(f"stack {tuple(stack.shape)} does not hold {n_out} base rows and "
                             f"{A.shape[0]} slots of {t_cols} A rows over {x.shape[1]} inputs")
        y_all = (stack_mm or torch.nn.functional.linear)(x, stack)
        if y_all.dim() == 2:
            y_all = y_all.unsqueeze(0)
        fold = LoraFold(y_all[:, :, n_out:], B, scalings, row_slots, tuple(slice_offsets), info,
                        t_slot_stride=t_cols)
        y = y_all[:, :, :n_out]
        return (y if y.shape[0] > 1 else y[0]), fold
    table = lora_row_table(info)
    y, t = _base_and_shrink(
        x, base, A, info, len(slice_offsets) - 1, table, overlaps_shrink(x), fold_presum()
    )
    return y, LoraFold(t, B, scalings, row_slots, tuple(slice_offsets), info)


def fold_presum() -> bool:
    """Whether a folded group's shrink partials are summed into one split beside the
    projection (torch.sum, one small launch on the side stream), so that each consumer program
    loads one t row instead of summing every split again: yes unless LORASERVE_FOLD_PRESUM=0.
    (Summing them inside the shrink kernel instead, each tile's last split adding them, measured
    slower on the device: benchmarks/RESULTS.md, thirteenth session.)"""
    return os.environ.get("LORASERVE_FOLD_PRESUM", "1") != "0"


def apply_fold(y: Tensor, fold: LoraFold | None) -> Tensor:
    """y += the fold's delta with a plain expand (for a consumer that does not fold); y."""
    if fold is not None:
        lora_expand_triton(fold_rows_t(fold), fold.B, y, fold.slice_offsets, fold.scalings,
                           fold.info)
    return y


def fold_rows_t(fold: LoraFold) -> Tensor:
    """The fold's t as the expand reads it, [splits, T, n*R]: a stacked t
    (`LoraFold.t_slot_stride`) narrowed to each row's own slot (base rows read slot 0's
    columns, which the expand never uses)."""
    if not fold.t_slot_stride:
        return fold.t
    width = fold.t_slot_stride
    cols = fold.row_slots.clamp(min=0).long()[:, None] * width
    cols = cols + torch.arange(width, device=cols.device)
    # split-K partials of a stacked GEMM: their sum, as the unsplit GEMM would have stored it
    t = fold.t[0] if fold.t.shape[0] == 1 else fold.t.sum(0).to(fold.B.dtype)
    return t.gather(1, cols).unsqueeze(0)


def _shrink_partials_buffer(
    x: Tensor, A: Tensor, info: LoraBatchInfo, num_slices: int, table: LoraRowTable
) -> Tensor:
    """The [split_k, T, n*R] buffer `_shrink_partials` would allocate for x, on the current
    stream."""
    from ops.triton_lora_expand import expand_max_splits
    from ops.triton_lora_shrink import shrink_partials_buffer

    return shrink_partials_buffer(
        x, A, num_slices, table.block_m, table.m_progs, table.num_entries, table.entry_progs,
        num_sms(x.device), expand_max_splits(table.block_m, A.shape[1] // num_slices),
    )


# ---------------------------------------------------------------------------------------------
# public entry points: CPU -> torch, CUDA -> Triton


def lora_shrink(x: Tensor, A: Tensor, info: LoraBatchInfo, num_slices: int) -> Tensor:
    """t = x A[slot]^T per segment. x: [T, in]; A: [num_slots, n*R, in] -> t: [T, n*R] in
    x.dtype; base rows are zero."""
    if use_triton(x):
        return lora_shrink_triton(x, A, info, num_slices)
    return lora_shrink_torch(x, A, info, num_slices)


def lora_expand(
    t: Tensor,
    B: Tensor,
    y: Tensor,
    slice_offsets: tuple[int, ...],
    scalings: Tensor,
    info: LoraBatchInfo,
) -> None:
    """y[:, off_i:off_i+1] += scalings[slot, i] * t[:, i*R:(i+1)*R] @ B[slot, off_i:off_i+1, :]^T.

    t: [T, n*R]; B: [num_slots, N_total, R]; y: [T, N_total] in place; base rows untouched."""
    if use_triton(y):
        lora_expand_triton(t, B, y, slice_offsets, scalings, info)
    else:
        lora_expand_torch(t, B, y, slice_offsets, scalings, info)


def lora_embed_shrink(ids: Tensor, A_emb: Tensor, info: LoraBatchInfo) -> Tensor:
    """t[i] = A_emb[slot_i, ids[i]]. ids: [T]; A_emb: [num_slots, vocab, R] -> t: [T, R]."""
    if use_triton(A_emb):
        return lora_embed_shrink_triton(ids, A_emb, info)
    return lora_embed_shrink_torch(ids, A_emb, info)


def apply_lora(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    y: Tensor,
    slice_offsets: tuple[int, ...],
    scalings: Tensor,
    info: LoraBatchInfo,
) -> None:
    """y += scalings * (x A^T) B^T per segment and slice: lora_shrink then lora_expand, keeping
    the split-K sum in fp32 on CUDA. x: [T, in]; A: [num_slots, n*R, in];
    B: [num_slots, N_total, R]; y: [T, N_total] in place; scalings: [num_slots, n] float32."""
    if use_triton(y):
        apply_lora_triton(x, A, B, y, slice_offsets, scalings, info)
    else:
        apply_lora_torch(x, A, B, y, slice_offsets, scalings, info)
