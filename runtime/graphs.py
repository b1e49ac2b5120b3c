"""Decode under CUDA graphs at bucketed batch sizes.

All inputs a captured graph reads live in one `GraphBuffers` of static tensors; a replay copies
the step's values into their first `bs` rows and pads the rest with a harmless row (position 0,
writing its K/V into a scratch block no sequence owns). LoRA weights sit in the adapter pool's
fixed buffers and per-token segment metadata in static tensors padded to the bucket size, so one
graph serves any mix of resident adapters. Each bucket has two graphs: one with LoRA work and one
without, so a step with no adapter rows skips LoRA entirely.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ops.lora import (
    DECODE_CHUNK,
    PADDED_ENTRY_PROGRAMS,
    LoraBatchInfo,
    capture_paths,
    chunk_rows,
    prepare_side_stream,
    stack_paths,
    stack_wins,
)
from ops.pdl import decode_scope
from ops.settings import env_flag, env_int
from ops.splitk import decode_splits, splitk_scope
from ops.triton_decode_gemm import gemm_splits, in_gemm_rows
from ops.triton_graph_inputs import write_graph_inputs
from ops.triton_prefill_attention import prefill_block_m, prefill_tile_bound, prefill_tile_table
from runtime.model.batch import ForwardBatch
from runtime.model.llama import CausalLM


def graph_batch_sizes(max_bs: int) -> list[int]:
    """Captured batch sizes: every 8 up to 64, then coarser (a bigger batch is weight-bound,
    so padding it costs little, while each size is one capture at startup and one graph)."""
    sizes = [1, 2, 4, 8, *range(16, 65, 8), *range(80, 129, 16), *range(160, max_bs + 1, 32)]
    return sorted({s for s in sizes if s <= max_bs} | {max_bs})


DECODE_CUBLASLT_MIN_BS = 16  # LORASERVE_DECODE_CUBLASLT_MIN_BS's default


def decode_blas(bs: int, with_lora: bool) -> str | None:
    """The BLAS library a decode graph is captured with: "cublaslt" for graphs of at least
    LORASERVE_DECODE_CUBLASLT_MIN_BS rows (default 16; 0 turns it off), base-only and LoRA
    graphs alike unless LORASERVE_DECODE_CUBLASLT_LORA=0; else None (torch's own route).

    On the H200 (benchmarks/RESULTS.md, nineteenth session: eight processes with it, six
    without) cuBLASLt picks faster o and down kernels at batch 32: the serving loop's base step
    there took 4.96-5.02 ms against 5.04-5.09, the 32-adapter graph forward 6.08 against
    6.23-6.27, and the 8-adapter step was level in a 32-slot pool and 0.03-0.08 ms faster in an
    8-slot one. Below 16 rows it was level or slower (fourteenth session)."""
    min_bs = env_int("LORASERVE_DECODE_CUBLASLT_MIN_BS", DECODE_CUBLASLT_MIN_BS)
    lora_too = env_flag("LORASERVE_DECODE_CUBLASLT_LORA", True)
    if min_bs <= 0 or (with_lora and not lora_too) or bs < min_bs:
        return None
    return "cublaslt"


def graph_splits(bs: int, with_lora: bool) -> int:
    """The split-K slices of a decode graph's o and down projections (ops/splitk.py): those
    LORASERVE_DECODE_SPLITK sets for base-only graphs on torch's own BLAS route, else 0. On the
    H200 (twentieth session) the partials took 0.03-0.04 ms off the loop's batch-1 step; at
    batch 32, where cuBLASLt's o and down kernels do not split K, they added 0.03-0.06 ms.
    Base-only graphs whose projections take ops/triton_decode_gemm.py's kernel split as
    LORASERVE_DECODE_GEMM_SPLIT says instead."""
    if with_lora:
        return 0
    if in_gemm_rows(bs):
        return gemm_splits()  # the Triton GEMM's own split (ops/triton_decode_gemm.py)
    if decode_blas(bs, with_lora) is not None:
        return 0
    return decode_splits()


@contextlib.contextmanager
def blas_library(name: str | None):
    """torch's preferred BLAS library set to `name` inside (None: left as it is)."""
    if name is None:
        yield
        return
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def capture_graph(
    forward: Callable[[], torch.Tensor], stream: torch.cuda.Stream, pool, fold: bool = False,
    decode: bool = False,
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Warm `forward` up twice (Triton compiles outside the capture), then capture it on
    `stream` into memory pool `pool` (None: a new one); returns the graph and its output.
    fold: the forward folds LoRA expands into the next kernels (ops.lora.capture_paths), in
    the warm-up too, so the capture compiles nothing. decode: a decode forward, whose layer
    kernels launch with programmatic dependent launch (ops.pdl.decode_scope)."""
    with capture_paths(fold), decode_scope(decode):
        for _ in range(2):
            forward()
        stream.synchronize()
        prepare_side_stream(stream.device)  # LoRA shrinks fork onto it inside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool, stream=stream):
            out = forward()
    return g, out


@dataclass
class GraphBuffers:
    input_ids: torch.Tensor  # [max_bs] int64
    positions: torch.Tensor  # [max_bs] int64
    slot_mapping: torch.Tensor  # [max_bs] int64
    block_tables: torch.Tensor  # [max_bs, max_blocks] int32
    kv_lens: torch.Tensor  # [max_bs] int32
    cu_q_lens: torch.Tensor  # [max_bs + 1] int32 (0..max_bs)
    logits_indices: torch.Tensor  # [max_bs] int64 (0..max_bs-1)
    seg_indptr: torch.Tensor  # [max_bs + 1] int32
    seg_slots: torch.Tensor  # [max_bs] int32
    chunk_indptr: torch.Tensor  # [max_bs + 1] int32
    chunk_slots: torch.Tensor  # [max_bs] int32
    live: torch.Tensor  # [2] int32: real segments, real chunks (the rest is padding)

    @classmethod
    def allocate(cls, max_bs: int, max_blocks: int, device: torch.device) -> GraphBuffers:
        def z(*shape, dtype=torch.int64):
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(
            input_ids=z(max_bs), positions=z(max_bs), slot_mapping=z(max_bs),
            block_tables=z(max_bs, max_blocks, dtype=torch.int32),
            kv_lens=torch.ones(max_bs, dtype=torch.int32, device=device),
            cu_q_lens=torch.arange(max_bs + 1, dtype=torch.int32, device=device),
            logits_indices=torch.arange(max_bs, dtype=torch.int64, device=device),
            seg_indptr=z(max_bs + 1, dtype=torch.int32),
            seg_slots=torch.full((max_bs,), -1, dtype=torch.int32, device=device),
            chunk_indptr=z(max_bs + 1, dtype=torch.int32),
            chunk_slots=torch.full((max_bs,), -1, dtype=torch.int32, device=device),
            live=z(2, dtype=torch.int32),
        )

    def view(self, bs: int, lora: LoraBatchInfo | None) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:bs], positions=self.positions[:bs],
            slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs],
            kv_lens=self.kv_lens[:bs], cu_q_lens=self.cu_q_lens[: bs + 1],
            logits_indices=self.logits_indices[:bs], max_q_len=1, is_decode=True,
            lora=lora, lora_logits=lora,
        )


class DecodeGraphs:
    """Captured decode forwards, one per (bucket size, variant): without LoRA (False), with it
    (True), and, where the pool stacks groups, with the stacked GEMMs ("stacked": from the
    buckets on whose rows can span enough adapters for `stack_wins`).

    LORASERVE_DECODE_GRAPH_COPIES=N (opt-in, default 1) captures each N times and replays the
    copies in turn, so no executable is launched twice in a row: graphs whose kernels launch
    with PDL started 100 µs or more after the kernel ahead in a tenth of benchmarks/graph_gap.py's
    rounds on the H200 (forty-first session), and the serving loop's gap before the decode graph
    averaged 16-18 µs a step against a 2.9 µs median; whether that follows replaying one
    executable back to back is what the copies test (phase s53b). Tensor-parallel runners
    refuse more than one."""

    def __init__(
        self,
        model: CausalLM,
        kv_k: list[torch.Tensor],
        kv_v: list[torch.Tensor],
        max_bs: int,
        max_blocks: int,
        scratch_block: int,
        block_size: int,
        lora_backend: str,
    ) -> None:
        self.model, self.kv_k, self.kv_v = model, kv_k, kv_v
        self.device = next(model.parameters()).device
        self.max_bs, self.max_blocks = max_bs, max_blocks
        self.scratch_slot = scratch_block * block_size
        self.scratch_block = scratch_block
        self.sizes = graph_batch_sizes(max_bs)
        self.buf = GraphBuffers.allocate(max_bs, max_blocks, self.device)
        self.lora_backend = lora_backend
        self.graphs: dict[tuple[int, bool | str], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # LORASERVE_DECODE_GRAPH_COPIES: the further captures of each key, and the copy its
        # next replay takes (0: the one in `graphs`)
        self.copies = env_int("LORASERVE_DECODE_GRAPH_COPIES", 1, least=1, most=4)
        self.spares: dict[tuple[int, bool | str], list[tuple[torch.cuda.CUDAGraph,
                                                             torch.Tensor]]] = {}
        self._turn: dict[tuple[int, bool | str], int] = {}
        self.pool = None
        self.num_replays = 0

    def _lora_info(self, bs: int) -> LoraBatchInfo | None:
        lora_pool = self.model.lora_pool
        if lora_pool is None:
            return None
        b = self.buf
        # Decode: one token per sequence, so at most bs segments and bs chunks.
        return LoraBatchInfo(
            seg_indptr=b.seg_indptr[: bs + 1], seg_slots=b.seg_slots[:bs],
            slot_ranks=lora_pool.slot_ranks, num_segments=bs, max_seg_len=bs,
            chunk_indptr=b.chunk_indptr[: bs + 1], chunk_slots=b.chunk_slots[:bs], num_chunks=bs,
            chunk_size=DECODE_CHUNK, backend=self.lora_backend,
            seg_live=b.live[0:1], chunk_live=b.live[1:2],
            entry_programs=min(bs, PADDED_ENTRY_PROGRAMS),
        )

    @torch.inference_mode()
    def capture(self, stream: torch.cuda.Stream) -> None:
        self._pad_rows(0)
        lora_pool = self.model.lora_pool
        with torch.cuda.stream(stream):
            for bs in reversed(self.sizes):  # largest first: later graphs reuse its memory
                variants: list[bool | str] = [False]
                if lora_pool is not None:
                    variants.append(True)
                    if lora_pool.stacks and stack_wins(bs, lora_pool.num_slots):
                        variants.append("stacked")
                for variant in variants:
                    with_lora = variant is not False
                    fb = self.buf.view(bs, self._lora_info(bs) if with_lora else None)
                    for copy in range(self.copies):
                        with blas_library(decode_blas(bs, with_lora)), \
                                stack_paths(variant == "stacked"), \
                                splitk_scope(graph_splits(bs, with_lora)):
                            g, logits = capture_graph(
                                lambda fb=fb: self.model(fb, self.kv_k, self.kv_v), stream,
                                self.pool, fold=with_lora, decode=True,
                            )
                        if self.pool is None:
                            self.pool = g.pool()
                        if copy == 0:
                            self.graphs[(bs, variant)] = (g, logits)
                        else:
                            self.spares.setdefault((bs, variant), []).append((g, logits))
        stream.synchronize()

    def can_run(self, fb: ForwardBatch) -> bool:
        return fb.is_decode and self.holds(fb.batch_size, fb.block_tables.shape[1])

    def holds(self, batch: int, width: int) -> bool:
        """Whether a decode step of `batch` rows and a `width`-block table fits the graphs."""
        return batch <= self.max_bs and width <= self.max_blocks

    def _pad_rows(self, n: int, end: int | None = None) -> None:
        """Rows n to `end` (all rows by default) as padding: token 0 at position 0 of one
        scratch-block token, its K/V written to the scratch slot. A bucket's graph reads its
        own rows only, so a replay pads up to its bucket and a full bucket pads nothing (five
        fill launches a step less at the buckets' sizes)."""
        b = self.buf
        b.input_ids[n:end].zero_()
        b.positions[n:end].zero_()
        b.slot_mapping[n:end].fill_(self.scratch_slot)
        b.block_tables[n:end].fill_(self.scratch_block)
        b.kv_lens[n:end].fill_(1)

    def _write_inputs(self, fb: ForwardBatch, bucket: int) -> None:
        """The static inputs of `fb`'s rows and the padding up to `bucket`: from a zero-copy
        step's pinned host rows in one kernel (which also fills its pending tokens), else by
        copies from the staged device rows."""
        b = self.buf
        if fb.host_staged:
            names = ("input_ids", "positions", "slot_mapping", "kv_lens", "block_tables")
            write_graph_inputs(
                {k: getattr(b, k) for k in names}, {k: getattr(fb, k) for k in names},
                fb.pending_src, fb.pending_tokens, bucket, self.scratch_slot,
                self.scratch_block,
            )
            return
        bs = fb.batch_size
        b.input_ids[:bs].copy_(fb.input_ids)
        b.positions[:bs].copy_(fb.positions)
        b.slot_mapping[:bs].copy_(fb.slot_mapping)
        width = fb.block_tables.shape[1]
        b.block_tables[:bs, :width].copy_(fb.block_tables)
        b.kv_lens[:bs].copy_(fb.kv_lens)
        if bs < bucket:
            self._pad_rows(bs, bucket)

    def replay(self, fb: ForwardBatch) -> torch.Tensor:
        """Run `fb` (a decode step) through the bucket's graph; returns logits [bs, vocab]."""
        bs = fb.batch_size
        bucket = self.sizes[bisect.bisect_left(self.sizes, bs)]
        self._write_inputs(fb, bucket)
        b = self.buf
        with_lora = fb.lora is not None
        if with_lora:
            info = fb.lora
            _fill_padded(b.seg_indptr, b.seg_slots, info.seg_indptr, info.seg_slots, bucket)
            _fill_padded(b.chunk_indptr, b.chunk_slots, info.chunk_indptr, info.chunk_slots, bucket)
            assert info.counts is not None, "decode tables come from lora_batch_info"
            b.live.copy_(info.counts)  # the real counts came with the table's own copy
        variant: bool | str = with_lora
        if with_lora and (bucket, "stacked") in self.graphs and stack_wins(
                fb.lora.num_segments, self.model.lora_pool.num_slots):
            variant = "stacked"
        g, logits = self._take((bucket, variant))
        g.replay()
        self.num_replays += 1
        return logits[:bs]

    def _take(self, key: tuple[int, bool | str]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The graph of `key` whose turn it is: its copies in rotation (one without spares)."""
        spares = self.spares.get(key)
        if not spares:
            return self.graphs[key]
        turn = self._turn.get(key, 0)
        self._turn[key] = (turn + 1) % (len(spares) + 1)
        return self.graphs[key] if turn == 0 else spares[turn - 1]


def _fill_padded(
    indptr: torch.Tensor, slots: torch.Tensor, src_indptr: torch.Tensor, src_slots: torch.Tensor,
    bucket: int,
) -> None:
    """Copy n runs into static buffers; the rest become one base run up to `bucket`, then empty
    runs, so offsets stay monotonic and padded rows get no LoRA."""
    n = src_slots.shape[0]
    indptr[: n + 1].copy_(src_indptr)
    indptr[n + 1 :].fill_(bucket)
    slots[:n].copy_(src_slots)
    slots[n:].fill_(-1)


def graph_token_sizes(max_tokens: int) -> list[int]:
    """Captured token counts of steps that prefill: every 16 up to 128, every 32 up to 256,
    then every 64 (a bigger step is compute-bound, so padding costs in proportion and a
    finer grid would only add captures)."""
    if max_tokens <= 0:
        return []
    sizes = [*range(16, 129, 16), *range(160, 257, 32), *range(320, max_tokens + 1, 64)]
    return sorted({s for s in sizes if s <= max_tokens} | {max_tokens})


@dataclass
class MixedBuffers:
    """Static inputs of the prefill graphs: token rows up to max_tokens, sequences up to
    max_seqs, the attention tile table and the LoRA tables, each padded per bucket."""

    input_ids: torch.Tensor  # [max_tokens] int64
    positions: torch.Tensor  # [max_tokens] int64
    slot_mapping: torch.Tensor  # [max_tokens] int64
    block_tables: torch.Tensor  # [max_seqs, max_blocks] int32
    kv_lens: torch.Tensor  # [max_seqs] int32
    cu_q_lens: torch.Tensor  # [max_seqs + 1] int32
    logits_indices: torch.Tensor  # [max_seqs] int64
    attn_tiles: torch.Tensor  # [max_tiles] int32
    seg_indptr: torch.Tensor  # [max_entries + 1] int32
    seg_slots: torch.Tensor  # [max_entries] int32
    chunk_indptr: torch.Tensor  # [max_entries + 1] int32
    chunk_slots: torch.Tensor  # [max_entries] int32
    live: torch.Tensor  # [2] int32: real segments, real chunks

    @classmethod
    def allocate(
        cls, max_tokens: int, max_seqs: int, max_blocks: int, max_tiles: int, max_entries: int,
        device: torch.device,
    ) -> MixedBuffers:
        def z(*shape, dtype=torch.int32):
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(
            input_ids=z(max_tokens, dtype=torch.int64), positions=z(max_tokens, dtype=torch.int64),
            slot_mapping=z(max_tokens, dtype=torch.int64),
            block_tables=z(max_seqs, max_blocks), kv_lens=z(max_seqs), cu_q_lens=z(max_seqs + 1),
            logits_indices=z(max_seqs, dtype=torch.int64),
            attn_tiles=torch.full((max_tiles,), -1, dtype=torch.int32, device=device),
            seg_indptr=z(max_entries + 1),
            seg_slots=torch.full((max_entries,), -1, dtype=torch.int32, device=device),
            chunk_indptr=z(max_entries + 1),
            chunk_slots=torch.full((max_entries,), -1, dtype=torch.int32, device=device),
            live=z(2),
        )


@dataclass(frozen=True)
class MixedBucket:
    """One captured shape: `tokens` query rows over at most `seqs` sequences."""

    tokens: int
    seqs: int
    tiles: int  # attention tile-table entries
    block_m: int  # the attention's query tile rows at max_q_len = tokens
    segments: int  # LoRA table entries
    chunks: int


class MixedGraphs:
    """Captured forwards of steps that prefill (chunks, possibly with decode rows), one per
    (token bucket, with/without LoRA), up to the final norm: the step's real rows then go
    through lm_head eagerly, so a graph holds no [rows, vocab] buffer and pads no logits.

    A replay copies the step into the static buffers and pads the rest: padded tokens write
    their K/V into the scratch block and belong to no sequence, padded sequences have no
    query tokens and no attention tiles, padded LoRA entries are empty base runs.
    """

    def __init__(
        self,
        model: CausalLM,
        kv_k: list[torch.Tensor],
        kv_v: list[torch.Tensor],
        max_tokens: int,
        max_seqs: int,
        max_blocks: int,
        scratch_block: int,
        block_size: int,
        lora_backend: str,
        lora_chunk_size: int,
    ) -> None:
        self.model, self.kv_k, self.kv_v = model, kv_k, kv_v
        p = next(model.parameters())
        self.device = p.device
        a = model.args
        self.group = a.num_heads // a.num_kv_heads
        self.max_blocks = max_blocks
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        self.lora_backend, self.chunk_size = lora_backend, lora_chunk_size
        self.buckets: list[MixedBucket] = []
        for t in graph_token_sizes(max_tokens):
            seqs = min(t, max_seqs)
            block_m = prefill_block_m(t, self.group, a.head_dim, p.dtype)
            segments = seqs + 1  # one run per sequence at most, and the padding's base run
            self.buckets.append(MixedBucket(
                t, seqs, max(1, prefill_tile_bound(t, seqs, self.group, block_m)), block_m,
                segments, segments + -(-t // chunk_rows(lora_chunk_size)),
            ))
        self.sizes = [b.tokens for b in self.buckets]
        self.max_tokens = self.sizes[-1] if self.sizes else 0
        self.max_seqs = max((b.seqs for b in self.buckets), default=0)
        self.buf = MixedBuffers.allocate(
            max(self.max_tokens, 1), max(self.max_seqs, 1), max_blocks,
            max((b.tiles for b in self.buckets), default=1),
            max((b.chunks for b in self.buckets), default=1), self.device,
        )
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_replays = 0

    def _lora_info(self, k: MixedBucket) -> LoraBatchInfo | None:
        lora_pool = self.model.lora_pool
        if lora_pool is None:
            return None
        b = self.buf
        return LoraBatchInfo(
            seg_indptr=b.seg_indptr[: k.segments + 1], seg_slots=b.seg_slots[: k.segments],
            slot_ranks=lora_pool.slot_ranks, num_segments=k.segments, max_seg_len=k.tokens,
            chunk_indptr=b.chunk_indptr[: k.chunks + 1], chunk_slots=b.chunk_slots[: k.chunks],
            num_chunks=k.chunks, chunk_size=self.chunk_size, backend=self.lora_backend,
            seg_live=b.live[0:1], chunk_live=b.live[1:2],
            entry_programs=min(k.chunks, PADDED_ENTRY_PROGRAMS),
        )

    def view(self, k: MixedBucket, lora: LoraBatchInfo | None) -> ForwardBatch:
        b = self.buf
        return ForwardBatch(
            input_ids=b.input_ids[: k.tokens], positions=b.positions[: k.tokens],
            slot_mapping=b.slot_mapping[: k.tokens], block_tables=b.block_tables[: k.seqs],
            kv_lens=b.kv_lens[: k.seqs], cu_q_lens=b.cu_q_lens[: k.seqs + 1],
            logits_indices=b.logits_indices[: k.seqs], max_q_len=k.tokens, is_decode=False,
            lora=lora, lora_logits=None, attn_tiles=b.attn_tiles[: k.tiles],
        )

    @torch.inference_mode()
    def capture(self, stream: torch.cuda.Stream, pool=None) -> None:
        """Capture every bucket (largest first), sharing `pool` (the decode graphs')."""
        self._clear()
        variants = [False, True] if self.model.lora_pool is not None else [False]
        with torch.cuda.stream(stream):
            for k in reversed(self.buckets):
                for with_lora in variants:
                    fb = self.view(k, self._lora_info(k) if with_lora else None)
                    g, hidden = capture_graph(
                        lambda fb=fb: self.model.hidden(fb, self.kv_k, self.kv_v), stream, pool
                    )
                    if pool is None:
                        pool = g.pool()
                    self.graphs[(k.tokens, with_lora)] = (g, hidden)
        stream.synchronize()

    def _clear(self) -> None:
        """Every row padding: no sequence has tokens, every token writes the scratch slot."""
        b = self.buf
        b.input_ids.zero_()
        b.positions.zero_()
        b.slot_mapping.fill_(self.scratch_slot)
        b.block_tables.fill_(self.scratch_block)
        b.kv_lens.fill_(1)
        b.cu_q_lens.zero_()
        b.logits_indices.zero_()
        b.attn_tiles.fill_(-1)

    def bucket_for(self, fb: ForwardBatch) -> MixedBucket | None:
        """The smallest bucket that holds `fb`, or None when it must run eagerly."""
        if (
            fb.is_decode
            or not self.buckets
            or fb.num_tokens > self.max_tokens
            or fb.sample_rows is not None  # scored prompt tokens: logits of many rows
            or fb.block_tables.shape[1] > self.max_blocks
            or len(fb.q_lens) != fb.batch_size
            or (fb.lora is not None and fb.lora.chunk_size != self.chunk_size)
        ):
            return None
        k = self.buckets[bisect.bisect_left(self.sizes, fb.num_tokens)]
        return k if fb.batch_size <= k.seqs else None

    def stage(self, fb: ForwardBatch, k: MixedBucket) -> ForwardBatch:
        """Copy `fb` into the static buffers, padded to bucket `k`; returns the bucket's view
        (what the graph reads; CPU tests run it eagerly)."""
        self._copy_in(fb, k)
        return self.view(k, self._lora_info(k) if fb.lora is not None else None)

    def _copy_in(self, fb: ForwardBatch, k: MixedBucket) -> None:
        b = self.buf
        n, bs = fb.num_tokens, fb.batch_size
        b.input_ids[:n].copy_(fb.input_ids)
        b.positions[:n].copy_(fb.positions)
        b.slot_mapping[:n].copy_(fb.slot_mapping)
        b.input_ids[n : k.tokens].zero_()
        b.positions[n : k.tokens].zero_()
        b.slot_mapping[n : k.tokens].fill_(self.scratch_slot)
        width = fb.block_tables.shape[1]
        b.block_tables[:bs, :width].copy_(fb.block_tables)
        b.block_tables[bs : k.seqs].fill_(self.scratch_block)
        b.kv_lens[:bs].copy_(fb.kv_lens)
        b.kv_lens[bs : k.seqs].fill_(1)
        b.cu_q_lens[: bs + 1].copy_(fb.cu_q_lens)
        b.cu_q_lens[bs + 1 : k.seqs + 1].fill_(n)
        b.logits_indices[:bs].copy_(fb.logits_indices)
        b.logits_indices[bs : k.seqs].zero_()
        tiles = prefill_tile_table(fb.q_lens, self.group, k.block_m, pad_to=k.tiles)
        b.attn_tiles[: k.tiles].copy_(_host_int32(tiles, self.device), non_blocking=True)
        if fb.lora is not None:
            info = fb.lora
            _fill_padded(b.seg_indptr[: k.segments + 1], b.seg_slots[: k.segments],
                         info.seg_indptr, info.seg_slots, k.tokens)
            _fill_padded(b.chunk_indptr[: k.chunks + 1], b.chunk_slots[: k.chunks],
                         info.chunk_indptr, info.chunk_slots, k.tokens)
            assert info.counts is not None, "step tables come from lora_batch_info"
            b.live.copy_(info.counts)

    def replay(self, fb: ForwardBatch, k: MixedBucket) -> torch.Tensor:
        """Run `fb` (a step that prefills) through bucket k's graph; returns logits [B, vocab]
        in the model's dtype, lm_head run eagerly over the real rows."""
        self._copy_in(fb, k)
        g, hidden = self.graphs[(k.tokens, fb.lora is not None)]
        g.replay()
        self.num_replays += 1
        return self.model.logits(hidden[: fb.batch_size], fb)


def _host_int32(values: list[int], device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.int32)
    return t.pin_memory() if device.type == "cuda" else t
