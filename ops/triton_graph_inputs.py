"""A decode graph's static inputs written from a step's staged rows in one launch.

A decode step that a CUDA graph replays needs its token ids, positions, KV slots, KV lengths and
block table in the graph's static buffers, the tokens the step in flight is still sampling
filled in, and the rows between the batch and its bucket padded. Done with torch that is a
host-to-device copy, a gather and an index-put for the pending tokens, five copies and the
padding fills: eight or more launches, each with the device idle at the copy engine's hand-offs
(about 20 µs of batch 32's step outside the graph on the H200, benchmarks/RESULTS.md
thirty-ninth session). A zero-copy decode step (runtime/runner.py; LORASERVE_DECODE_ZERO_COPY=0
turns them off) leaves its rows in the staging ring's pinned host buffer and this kernel reads
them from there (mapped host memory: no copy launch) and writes every static row of the bucket
itself (5.5 µs of batch 32's step, fortieth session).

One program a row of the bucket: rows under the batch copy their staged values (a pending
token taken from the tokens of the step in flight), the rest get the padding the graphs
capture with (token 0 at position 0, K/V to the scratch slot, block table all scratch block,
KV length 1). Rows past the bucket are not the bucket's graph's and are left as they are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.sizes import next_pow2


@triton.jit(do_not_specialize=["batch", "width", "max_blocks", "stride_src", "stride_dst",
                                "scratch_slot", "scratch_block"])
def _graph_inputs_kernel(
    ids_src,  # [batch] int64 staged token ids (PENDING where pending_src says so)
    pos_src,  # [batch] int64
    slot_src,  # [batch] int64
    kvl_src,  # [batch] int32
    bt_src,  # [batch, width] int32, row stride stride_src
    pending_src,  # [batch] int64: index into prev_tokens of a pending token, else -1
    prev_tokens,  # [>= 1] int64: the tokens of the step in flight
    ids_dst,
    pos_dst,
    slot_dst,
    kvl_dst,
    bt_dst,  # [max_bs, max_blocks] int32, row stride stride_dst
    batch,
    width,
    max_blocks,
    stride_src,
    stride_dst,
    scratch_slot,
    scratch_block,
    BLOCK_W: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_W)
    dst_row = bt_dst + row.to(tl.int64) * stride_dst
    if row < batch:
        # every load before any store: a store may alias a later load as far as the compiler
        # knows, so interleaving them would make each host-memory read wait on the last one's
        # round trip over the bus
        token = tl.load(ids_src + row)
        pending = tl.load(pending_src + row)
        pos = tl.load(pos_src + row)
        slot = tl.load(slot_src + row)
        kvl = tl.load(kvl_src + row)
        src_row = bt_src + row.to(tl.int64) * stride_src
        keep = cols < width
        first = tl.load(src_row + cols, mask=keep)
        if pending >= 0:
            token = tl.load(prev_tokens + pending)
        tl.store(ids_dst + row, token)
        tl.store(pos_dst + row, pos)
        tl.store(slot_dst + row, slot)
        tl.store(kvl_dst + row, kvl)
        tl.store(dst_row + cols, first, mask=keep)
        for c0 in range(BLOCK_W, width, BLOCK_W):
            c = c0 + cols
            keep = c < width
            tl.store(dst_row + c, tl.load(src_row + c, mask=keep), mask=keep)
    else:
        tl.store(ids_dst + row, tl.zeros([], dtype=tl.int64))
        tl.store(pos_dst + row, tl.zeros([], dtype=tl.int64))
        tl.store(slot_dst + row, tl.zeros([], dtype=tl.int64) + scratch_slot)
        tl.store(kvl_dst + row, tl.full([], 1, dtype=tl.int32))
        fill = tl.full([BLOCK_W], 0, dtype=tl.int32) + scratch_block
        for c0 in range(0, max_blocks, BLOCK_W):
            c = c0 + cols
            tl.store(dst_row + c, fill, mask=c < max_blocks)


def write_graph_inputs(
    dst: dict[str, torch.Tensor],
    src: dict[str, torch.Tensor],
    pending_src: torch.Tensor,
    prev_tokens: torch.Tensor | None,
    bucket: int,
    scratch_slot: int,
    scratch_block: int,
) -> None:
    """Rows 0..bucket-1 of the static buffers `dst` (input_ids, positions, slot_mapping: int64
    [max_bs]; kv_lens int32 [max_bs]; block_tables int32 [max_bs, max_blocks]) from the staged
    rows `src` (the same names, [batch] and [batch, width], on the device or in pinned host
    memory), pending tokens from `prev_tokens`, the rest padded. One launch on the current
    stream."""
    ids, bt = src["input_ids"], src["block_tables"]
    batch, width = bt.shape
    dst_bt = dst["block_tables"]
    max_bs, max_blocks = dst_bt.shape
    if not 1 <= batch <= bucket <= max_bs:
        raise ValueError(f"batch {batch} and bucket {bucket} must satisfy 1 <= batch <= bucket "
                         f"<= {max_bs}")
    if width > max_blocks:
        raise ValueError(f"block table width {width} exceeds the graphs' {max_blocks}")
    for name in ("input_ids", "positions", "slot_mapping", "kv_lens"):
        if src[name].shape != (batch,) or src[name].dtype != dst[name].dtype:
            raise ValueError(f"{name}: staged {tuple(src[name].shape)} {src[name].dtype} does not "
                             f"match {batch} rows of {dst[name].dtype}")
    if bt.dtype != torch.int32 or (width and bt.stride(1) != 1) or pending_src.shape != (batch,):
        raise ValueError("block_tables must be int32 rows, pending_src one index a row")
    _graph_inputs_kernel[(bucket,)](
        ids, src["positions"], src["slot_mapping"], src["kv_lens"], bt, pending_src,
        ids if prev_tokens is None else prev_tokens,
        dst["input_ids"], dst["positions"], dst["slot_mapping"], dst["kv_lens"], dst_bt,
        batch, width, max_blocks, max(bt.stride(0), 1), dst_bt.stride(0), scratch_slot,
        scratch_block, BLOCK_W=min(128, next_pow2(max(max_blocks, 16))),
    )
