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
from dataclasses import dataclass

import torch

from ops.lora import DECODE_CHUNK, PADDED_ENTRY_PROGRAMS, LoraBatchInfo
from runtime.model.batch import ForwardBatch
from runtime.model.llama import CausalLM


def graph_batch_sizes(max_bs: int) -> list[int]:
    """Captured batch sizes: every 8 up to 64, then coarser (a bigger batch is weight-bound,
    so padding it costs little, while each size is one capture at startup and one graph)."""
    sizes = [1, 2, 4, 8, *range(16, 65, 8), *range(80, 129, 16), *range(160, max_bs + 1, 32)]
    return sorted({s for s in sizes if s <= max_bs} | {max_bs})


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
    """Captured decode forwards, one per (bucket size, with/without LoRA)."""

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
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

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
        self._pad_from(0)
        variants = [False, True] if self.model.lora_pool is not None else [False]
        with torch.cuda.stream(stream):
            for bs in reversed(self.sizes):  # largest first: later graphs reuse its memory
                for with_lora in variants:
                    fb = self.buf.view(bs, self._lora_info(bs) if with_lora else None)
                    for _ in range(2):  # warm up: Triton compiles outside the capture
                        self.model(fb, self.kv_k, self.kv_v)
                    stream.synchronize()
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=self.pool, stream=stream):
                        logits = self.model(fb, self.kv_k, self.kv_v)
                    if self.pool is None:
                        self.pool = g.pool()
                    self.graphs[(bs, with_lora)] = (g, logits)
        stream.synchronize()

    def can_run(self, fb: ForwardBatch) -> bool:
        return (
            fb.is_decode
            and fb.batch_size <= self.max_bs
            and fb.block_tables.shape[1] <= self.max_blocks
        )

    def _pad_from(self, n: int) -> None:
        b = self.buf
        b.input_ids[n:].zero_()
        b.positions[n:].zero_()
        b.slot_mapping[n:].fill_(self.scratch_slot)
        b.block_tables[n:].fill_(self.scratch_block)
        b.kv_lens[n:].fill_(1)

    def replay(self, fb: ForwardBatch) -> torch.Tensor:
        """Run `fb` (a decode step) through the bucket's graph; returns logits [bs, vocab]."""
        bs = fb.batch_size
        bucket = self.sizes[bisect.bisect_left(self.sizes, bs)]
        b = self.buf
        b.input_ids[:bs].copy_(fb.input_ids)
        b.positions[:bs].copy_(fb.positions)
        b.slot_mapping[:bs].copy_(fb.slot_mapping)
        width = fb.block_tables.shape[1]
        b.block_tables[:bs, :width].copy_(fb.block_tables)
        b.kv_lens[:bs].copy_(fb.kv_lens)
        self._pad_from(bs)
        with_lora = fb.lora is not None
        if with_lora:
            info = fb.lora
            _fill_padded(b.seg_indptr, b.seg_slots, info.seg_indptr, info.seg_slots, bucket)
            _fill_padded(b.chunk_indptr, b.chunk_slots, info.chunk_indptr, info.chunk_slots, bucket)
            assert info.counts is not None, "decode tables come from build_lora_batch_info"
            b.live.copy_(info.counts)  # the real counts came with the table's own copy
        g, logits = self.graphs[(bucket, with_lora)]
        g.replay()
        return logits[:bs]


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
