"""Prepare inputs → launch forward and sampling → tokens back through pinned host buffers.

`prepare` turns the scheduler's plan into a `ForwardBatch` of plain tensors (built on the host,
copied with one non-blocking transfer each). A decode row whose input token is still being
sampled by the step in flight takes it from that step's device tensor, so step N+1 is prepared
and launched before step N's tokens reach the host. `launch` enqueues the forward, the sampler
and the kernels that write the results into pinned host buffers on the compute stream (or, with
LORASERVE_READBACK_KERNEL=0, non-blocking copies of them on the readback stream), records an
event after them and returns at once: nothing here waits on the GPU. `InFlightStep.result()`
reads the host buffers once the event has completed. Nothing here touches Request state except
reading it; the engine applies the results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ops.dispatch import use_triton
from ops.lora import DECODE_CHUNK, lora_batch_info, lora_tables
from ops.settings import env_flag
from ops.triton_host_write import write_to_host
from runtime.graphs import DecodeGraphs, MixedGraphs
from runtime.kv_cache import BlockManager, KVCache
from runtime.model.batch import ForwardBatch
from runtime.model.llama import CausalLM
from runtime.request import PENDING_TOKEN, Request, SamplingParams
from runtime.sampler import Sampler, SamplerOutput
from runtime.scheduler import ScheduledBatch
from runtime.staging import ResultRing, StagingRing
from runtime.streams import Event, Streams


@dataclass
class StepResult:
    """Sampled tokens of one step, on the host."""

    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    # (sequence index, logprob, top candidates) per scored prompt token, in position order
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    # each scored prompt token's rank (1: the likeliest), when a request in the step asked
    prompt_ranks: list[int] | None = None
    # token_ids_logprob's log-probs: per row (None for a row that gave none), and per scored
    # prompt token (None when no owner in the step gave any; [] for an owner that gave none)
    ids_logprobs: list[list[float] | None] | None = None
    prompt_ids_logprobs: list[list[float]] | None = None


@dataclass
class InFlightStep:
    """A launched step: its sampled tokens on the device (the next step's inputs may read
    them), the host copies of everything the engine needs, and the event after those copies."""

    plan: ScheduledBatch
    token_ids: torch.Tensor  # [B] int64 on the device: sampled tokens, one per plan row
    event: Event  # recorded after the copies into the host buffers below
    host: dict[str, torch.Tensor]  # pinned (CUDA) or plain (CPU) host copies
    # For each plan row that samples a token the engine keeps: output index it resolves.
    out_index: dict[int, int] = field(default_factory=dict)
    # Plan rows whose prompt it completes that keep no token (max_new_tokens 0): they finish
    # when it completes.
    prompt_only: list[int] = field(default_factory=list)
    top_n: list[int] = field(default_factory=list)
    prompt_owners: tuple[int, ...] = ()
    prompt_top_n: list[int] = field(default_factory=list)
    ids_n: list[int] = field(default_factory=list)  # each row's token_ids_logprob count
    prompt_ids_n: list[int] = field(default_factory=list)  # each scored prompt row's
    launched_at: float = 0.0
    slots: set[int] = field(default_factory=set)  # adapter slots it reads, locked until done

    def done(self) -> bool:
        return self.event.query()

    def result(self) -> StepResult:
        """The step's results as Python values. Only once `done()` (on CPU: always)."""
        h = self.host
        token_ids = h["tokens"].tolist()
        logprobs = h["logprobs"].tolist() if "logprobs" in h else None
        top = None
        if "top_values" in h:
            values, idx = h["top_values"].tolist(), h["top_ids"].tolist()
            top = [list(zip(idx[i][:n], values[i][:n])) for i, n in enumerate(self.top_n)]
        result = StepResult(token_ids, logprobs, top)
        if "ids_values" in h:
            values = h["ids_values"].tolist()
            result.ids_logprobs = [values[i][:n] if n else None for i, n in enumerate(self.ids_n)]
        if "prompt_chosen" in h:
            chosen = h["prompt_chosen"].tolist()
            tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
            if "prompt_top_values" in h:
                values, idx = h["prompt_top_values"].tolist(), h["prompt_top_ids"].tolist()
                tops = [list(zip(idx[e][:n], values[e][:n]))
                        for e, n in enumerate(self.prompt_top_n)]
            result.prompt_logprobs = list(zip(self.prompt_owners, chosen, tops))
            if "prompt_rank" in h:
                result.prompt_ranks = h["prompt_rank"].tolist()
            if "prompt_ids_values" in h:
                values = h["prompt_ids_values"].tolist()
                result.prompt_ids_logprobs = [values[e][:n]
                                              for e, n in enumerate(self.prompt_ids_n)]
        return result


def _rows_of(step: InFlightStep | None) -> dict[int, int]:
    """id(request) -> its row in `step` (the step in flight), empty without one."""
    return {} if step is None else {id(r): j for j, r in enumerate(step.plan.requests)}


def _pending_row(req: Request, tokens: list[int], prev_rows: dict[int, int]) -> int:
    """The row of the step in flight that samples `req`'s newest input token; only that token
    can be in flight."""
    row = prev_rows.get(id(req))
    if row is None or PENDING_TOKEN in tokens[:-1]:
        raise RuntimeError(f"request {req.rid}: input token not yet sampled")
    return row


def warmup_shapes(max_tokens: int, max_seqs: int, max_len: int) -> list[tuple[int, int]]:
    """(tokens, sequences) of the start-up steps: every power of two up to `max_tokens` (the
    prefill budget) and `max_tokens` itself, each as few sequences as `max_len` (the context
    length) allows (the longest query a tile meets) and as up to `max_seqs` short ones (the
    most rows the lm_head and the per-row kernels meet). The Triton kernels pick their tiles,
    split-K factor and query tile from the token count and the longest query, by powers of
    two, so these steps meet every variant a step of at most `max_tokens` tokens can."""
    counts = sorted({1 << i for i in range(max_tokens.bit_length()) if 1 << i <= max_tokens}
                    | {max_tokens})
    shapes = set()
    for t in counts:
        fewest = -(-t // max_len)
        if fewest <= max_seqs:
            shapes |= {(t, fewest), (t, max(fewest, min(t, max_seqs)))}
    return sorted(shapes)


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        kv_cache: KVCache,
        block_size: int,
        sampler: Sampler,
        device: torch.device,
        lora_backend: str = "csgmv",
        lora_chunk_size: int = 16,
        streams: Streams | None = None,
    ) -> None:
        self.model = model
        self.kv = kv_cache
        self.block_size = block_size
        self.sampler = sampler
        self.device = device
        self.lora_backend = lora_backend
        self.lora_chunk_size = lora_chunk_size
        self.streams = streams or Streams(device)
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        self._scratch: Request | None = None
        self.staging = StagingRing(device)
        # Base-only decode steps a decode graph runs leave their rows in pinned host memory,
        # read by the graph's input kernel (see _zero_copy_step; 0 stages and copies them)
        self.zero_copy = env_flag("LORASERVE_DECODE_ZERO_COPY", True)
        # A kernel on the compute stream writes a step's results into pinned host memory
        # (_write_back), no copy at all; LORASERVE_READBACK_KERNEL=0 copies them instead
        self.results = ResultRing(device) if env_flag("LORASERVE_READBACK_KERNEL", True) else None
        # Copies (kernel readback off) run on the readback stream (see _read_back); 0 puts
        # them on the compute stream, behind the sampler and ahead of the next step
        self.readback = env_flag("LORASERVE_READBACK_STREAM", True)
        # Eager steps that prefill are padded to a multiple of token_grid tokens (0: not
        # padded) above graph_tokens (what the prefill graphs take) up to grid_max (the
        # prefill budget, itself a size): see enable_token_grid.
        self.token_grid = self.graph_tokens = self.grid_max = 0

    def _ensure_scratch(self, block_manager: BlockManager) -> int:
        """The scratch block padded rows write their K/V into (never a sequence's, never
        read), taken on first need."""
        if self._scratch is None:
            scratch = Request(rid="padding-scratch", prompt_ids=[0], params=SamplingParams())
            block_manager.allocate(scratch, 1)
            self._scratch = scratch
        return self._scratch.block_ids[0]

    def enable_token_grid(self, block_manager: BlockManager, grid: int, max_tokens: int) -> None:
        """Pad every eager step that prefills more than the prefill graphs take to a multiple
        of `grid` tokens (or to `max_tokens`, the prefill budget, where the multiple would pass
        it). cuBLAS picks its GEMM kernel by the token count, and the first call of a kernel
        makes the host wait for the work queued on the device (benchmarks/gemm_kernels.py
        --first-use), which a served step must not do: on a grid, `grid_sizes` are all the
        counts an eager prefill can meet, and `warm_up_gemms` runs each at start. The padded
        tokens write their K/V into the scratch block and belong to no sequence (as a prefill
        graph's padding)."""
        if grid < 1 or max_tokens < 1:
            raise ValueError(f"token grid {grid} and budget {max_tokens} must be positive")
        self._ensure_scratch(block_manager)
        self.token_grid, self.grid_max = grid, max_tokens
        self.graph_tokens = self.mixed_graphs.max_tokens if self.mixed_graphs else 0

    def grid_sizes(self) -> list[int]:
        """The token counts of padded eager steps (none without a grid)."""
        g, top = self.token_grid, self.grid_max
        if not g or top <= self.graph_tokens:
            return []
        first = self.graph_tokens // g * g + g
        return sorted({*range(first, top, g), top})

    def _padded_count(self, n: int) -> int:
        """The tokens an eager step of `n` (that prefills) runs as: n itself without a grid,
        at most the prefill graphs' size, or past the budget (a step the grid never meets)."""
        g = self.token_grid
        if not g or n <= self.graph_tokens or n > self.grid_max:
            return n
        return min(-(-n // g) * g, self.grid_max)

    @torch.inference_mode()
    def warm_up_gemms(self, counts: list[int], rows: int) -> int:
        """Call every distinct projection of the first layer on each of `counts` tokens and on
        1..`rows` (an eager decode step's tokens), and lm_head on 1..`rows` rows (a step's
        sampled rows), as the forward calls them, so that served steps of those counts meet no
        cuBLAS kernel for the first time (see enable_token_grid; with the grid's sizes as
        `counts`, no eager step does). Returns the calls made."""
        counts = sorted({*counts, *range(1, rows + 1)})
        linears: dict[tuple, nn.Linear] = {}
        for m in self.model.layers[0].modules():
            if isinstance(m, nn.Linear):
                w = m.weight
                linears.setdefault((w.shape, w.stride(), w.dtype, m.bias is not None), m)
        runs = [(lin, counts) for lin in linears.values()]
        runs.append((self.model.lm_head, range(1, rows + 1)))
        calls = 0
        with self.streams.use(self.streams.compute):
            inputs: dict[tuple, torch.Tensor] = {}  # zeros by (in features, dtype), shared
            for lin, ns in runs:
                key = (lin.in_features, lin.weight.dtype)
                if key not in inputs:
                    inputs[key] = lin.weight.new_zeros((max(counts, default=1), key[0]))
                for n in ns:
                    lin(inputs[key][:n])
                    calls += 1
            inputs.clear()
            if self.streams.compute is not None:
                self.streams.compute.synchronize()
        return calls

    def enable_cuda_graphs(
        self, block_manager: BlockManager, max_bs: int, context_length: int, max_tokens: int = 0
    ) -> None:
        """Capture decode graphs for batch sizes up to `max_bs`, and graphs of steps that
        prefill up to `max_tokens` tokens (0: none) over at most `max_bs` sequences (CUDA
        only). One KV block is set aside for the padded rows of a bucket to write into."""
        if self.device.type != "cuda":
            return
        scratch = self._ensure_scratch(block_manager)
        max_blocks = -(-context_length // self.block_size)
        self.graphs = DecodeGraphs(
            self.model, self.kv.k, self.kv.v, max_bs, max_blocks, scratch,
            self.block_size, self.lora_backend,
        )
        self._capture_decode(self.graphs)
        if max_tokens > 0:
            self.mixed_graphs = MixedGraphs(
                self.model, self.kv.k, self.kv.v, max_tokens, max_bs, max_blocks,
                scratch, self.block_size, self.lora_backend, self.lora_chunk_size,
            )
            self.mixed_graphs.capture(self.streams.compute, self.graphs.pool)

    def _capture_decode(self, graphs: DecodeGraphs) -> None:
        """Capture `graphs` on the compute stream (tensor parallelism: on every rank)."""
        graphs.capture(self.streams.compute)

    def warm_up(self, block_manager: BlockManager, shapes: list[tuple[int, int]],
                vocab_size: int) -> int:
        """Run one step of each (tokens, sequences) shape on throwaway requests, with rows over
        the base model and every adapter slot (empty slots compute nothing), each followed by
        a decode step over the same requests, so that the kernels a served step can reach are
        compiled before serving. Their K/V goes into blocks freed afterwards. A shape whose
        blocks do not fit is skipped. No sequence may be longer than the context length less
        one (the decoded token's position). Returns the steps run.

        Not under inference mode: `prepare` runs outside it when serving, and a buffer it grew
        here would otherwise be an inference tensor that serving cannot write."""
        pool = self.model.lora_pool
        slots = [-1] + list(range(pool.slot_ranks.shape[0])) if pool is not None else [-1]
        params = SamplingParams(max_new_tokens=2, temperature=0.0)
        ran = 0
        bs = self.block_size
        for tokens, seqs in shapes:
            lens = [tokens // seqs + (i < tokens % seqs) for i in range(seqs)]
            need = sum(-(-(n + 1) // bs) for n in lens)  # the prompt and one decoded token
            if not block_manager.can_allocate(need):
                continue
            reqs = [
                Request(rid=f"warm-up-{i}", params=params,
                        prompt_ids=[1 + (i + j) % (vocab_size - 1) for j in range(n)])
                for i, n in enumerate(lens)
            ]
            for i, req in enumerate(reqs):
                req.lora_slot = slots[i % len(slots)]
            reqs.sort(key=lambda r: r.lora_slot)  # a plan lists its rows by slot
            try:
                for req in reqs:
                    block_manager.allocate(req, req.num_tokens + 1)
                plan = ScheduledBatch(reqs, [req.num_tokens for req in reqs])
                self.launch(plan, self.prepare(plan)).event.synchronize()
                for i, req in enumerate(reqs):
                    req.num_computed_tokens = req.num_tokens
                    req.output_ids.append(1 + i % (vocab_size - 1))
                plan = ScheduledBatch(reqs, [1] * len(reqs))
                assert plan.is_decode
                self.launch(plan, self.prepare(plan)).event.synchronize()
                ran += 2
            finally:
                for req in reqs:
                    block_manager.free(req)
        return ran

    @property
    def reserved_blocks(self) -> int:
        """KV blocks held for padded rows, the CUDA graphs' and the token grid's (never a
        sequence's)."""
        return len(self._scratch.block_ids) if self._scratch is not None else 0

    def prepare(self, plan: ScheduledBatch, prev: InFlightStep | None = None) -> ForwardBatch:
        """Step inputs as device tensors, copied on the compute stream (which then runs them).
        Input tokens still being sampled by `prev` (the step in flight) are read from its
        device tensor, on the compute stream, after it."""
        with self.streams.use(self.streams.compute):
            return self._prepare(plan, prev)

    def _prepare(self, plan: ScheduledBatch, prev: InFlightStep | None) -> ForwardBatch:
        requests, counts = plan.requests, plan.num_new_tokens
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        kv_lens: list[int] = []
        cu_q_lens = [0]
        logits_indices: list[int] = []
        token_slots: list[int] = []
        max_blocks = max(len(r.block_ids) for r in requests)
        # Rows padded with block 0 (never read: kv_lens bounds every sequence's reads).
        block_tables = np.zeros((len(requests), max_blocks), dtype=np.int32)
        bs = self.block_size
        sample_rows: list[int] = []
        prompt_rows: list[int] = []
        prompt_targets: list[int] = []
        prompt_owners: list[int] = []
        logits_slots: list[int] = []
        fill_dst: list[int] = []
        fill_src: list[int] = []
        prev_rows: dict[int, int] | None = None  # built on first need: id(request) -> row
        num_tokens = 0
        for i, (req, n) in enumerate(zip(requests, counts)):
            start = req.num_computed_tokens
            blocks = req.block_ids
            block_tables[i, : len(blocks)] = blocks
            slot = req.lora_slot
            if n == 1:  # a decode row (or a one-token chunk): no ranges to build
                num_prompt = len(req.prompt_ids)
                tok = req.prompt_ids[start] if start < num_prompt else (
                    req.output_ids[start - num_prompt])
                if tok == PENDING_TOKEN:
                    prev_rows = prev_rows if prev_rows is not None else _rows_of(prev)
                    fill_dst.append(num_tokens)
                    fill_src.append(_pending_row(req, [tok], prev_rows))
                ids.append(tok)
                positions.append(start)
                slot_mapping.append(blocks[start // bs] * bs + start % bs)
                token_slots.append(slot)
            else:
                tokens = req.token_slice(start, n)
                if req.num_pending and tokens[-1] == PENDING_TOKEN:
                    prev_rows = prev_rows if prev_rows is not None else _rows_of(prev)
                    fill_dst.append(num_tokens + n - 1)
                    fill_src.append(_pending_row(req, tokens, prev_rows))
                ids.extend(tokens)
                positions.extend(range(start, start + n))
                slot_mapping.extend(
                    blocks[p // bs] * bs + p % bs for p in range(start, start + n)
                )
                token_slots.extend([slot] * n)
            kv_lens.append(start + n)
            if req.return_logprob:
                for p in req.prompt_logprob_positions(start, n):
                    prompt_rows.append(len(logits_indices))
                    logits_indices.append(num_tokens + p - start)
                    prompt_targets.append(req.prompt_ids[p + 1])
                    prompt_owners.append(i)
                    logits_slots.append(slot)
            num_tokens += n
            cu_q_lens.append(num_tokens)
            sample_rows.append(len(logits_indices))
            logits_indices.append(num_tokens - 1)
            logits_slots.append(slot)
        if not plan.is_decode and (pad := self._padded_count(num_tokens) - num_tokens):
            # tokens of no sequence: their K/V goes to the scratch slot, never read
            ids.extend([0] * pad)
            positions.extend([0] * pad)
            slot_mapping.extend([self._scratch.block_ids[0] * bs] * pad)
            token_slots.extend([-1] * pad)
        pool = self.model.lora_pool
        tables = []
        if pool is not None and any(s >= 0 for s in logits_slots):
            # csgmv chunks: 16 rows at decode (segments are short; the graphs use 16), the
            # configured size where a step prefills (longer tiles read each adapter less often)
            chunk = DECODE_CHUNK if len(token_slots) == len(requests) else self.lora_chunk_size
            num_slots = pool.slot_ranks.shape[0]
            tables = [
                lora_tables(token_slots, num_slots, self.lora_backend, chunk),
                lora_tables(logits_slots, num_slots, self.lora_backend, DECODE_CHUNK),
            ]
        if self._zero_copy_step(plan, block_tables.shape[1], tables, prompt_rows):
            return self._host_staged(plan, ids, positions, slot_mapping, block_tables, kv_lens,
                                     fill_dst, fill_src, prev)
        i64, i32 = np.int64, np.int32
        fields = [
            (ids, i64), (positions, i64), (slot_mapping, i64), (block_tables, i32),
            (kv_lens, i32), (cu_q_lens, i32), (logits_indices, i64), (fill_dst, i64),
            (fill_src, i64), *((part, i32) for t in tables for part in t.parts),
        ]
        if prompt_rows:
            fields += [(sample_rows, i64), (prompt_rows, i64), (prompt_targets, i64)]
        (input_ids, positions_t, slot_mapping_t, block_tables_t, kv_lens_t, cu_q_lens_t,
         logits_indices_t, fill_dst_t, fill_src_t, *rest) = self.staging.stage(fields)
        if fill_dst:
            assert prev is not None
            input_ids[fill_dst_t] = prev.token_ids[fill_src_t]
        lora = lora_logits = None
        if tables:
            n = len(tables[0].parts)
            lora, lora_logits = (
                lora_batch_info(t, rest[k * n : (k + 1) * n], pool.slot_ranks)
                for k, t in enumerate(tables)
            )
            rest = rest[2 * n :]
        scoring = {}
        if prompt_rows:
            sample_rows_t, prompt_rows_t, prompt_targets_t = rest
            scoring = {
                "sample_rows": sample_rows_t, "prompt_rows": prompt_rows_t,
                "prompt_targets": prompt_targets_t, "prompt_owners": tuple(prompt_owners),
            }
        return ForwardBatch(
            input_ids=input_ids,
            positions=positions_t,
            slot_mapping=slot_mapping_t,
            block_tables=block_tables_t,
            kv_lens=kv_lens_t,
            cu_q_lens=cu_q_lens_t,
            logits_indices=logits_indices_t,
            max_q_len=max(counts),
            is_decode=plan.is_decode,
            q_lens=tuple(counts),
            lora=lora,
            lora_logits=lora_logits,
            **scoring,
        )

    def _zero_copy_step(self, plan: ScheduledBatch, width: int, tables: list,
                        prompt_rows: list[int]) -> bool:
        """Whether a step leaves its rows in pinned host memory for the decode graph's input
        kernel (ops/triton_graph_inputs.py): unless LORASERVE_DECODE_ZERO_COPY=0, a decode step
        without LoRA tables or scored prompt tokens that a decode graph takes (its batch and
        block table within the graphs'). Its input copies, the pending-token fill and the
        padding become that one kernel. Other steps stage and copy as before."""
        return (self.zero_copy and self.graphs is not None and plan.is_decode and not tables
                and not prompt_rows and self.graphs.holds(len(plan.requests), width))

    def _host_staged(self, plan: ScheduledBatch, ids: list[int], positions: list[int],
                     slot_mapping: list[int], block_tables: np.ndarray, kv_lens: list[int],
                     fill_dst: list[int], fill_src: list[int],
                     prev: InFlightStep | None) -> ForwardBatch:
        """A zero-copy decode step's ForwardBatch: its rows as views of the staging ring's
        pinned host buffer, a pending token's row pointing into the step in flight's tokens."""
        pending = np.full(len(ids), -1, dtype=np.int64)
        if fill_dst:
            assert prev is not None
            pending[fill_dst] = fill_src  # decode: token index == row index
        i64, i32 = np.int64, np.int32
        ids_t, pos_t, slot_t, bt_t, kvl_t, pending_t = self.staging.stage(
            [(ids, i64), (positions, i64), (slot_mapping, i64), (block_tables, i32),
             (kv_lens, i32), (pending, i64)], copy=False)
        n = len(ids)
        return ForwardBatch(
            input_ids=ids_t, positions=pos_t, slot_mapping=slot_t, block_tables=bt_t,
            kv_lens=kvl_t, cu_q_lens=self.graphs.buf.cu_q_lens[: n + 1],
            logits_indices=self.graphs.buf.logits_indices[:n], max_q_len=1, is_decode=True,
            q_lens=tuple(plan.num_new_tokens), host_staged=True, pending_src=pending_t,
            pending_tokens=prev.token_ids if fill_dst else None,
            staging_slot=self.staging.last_slot,
        )

    @torch.inference_mode()
    def launch(self, plan: ScheduledBatch, fb: ForwardBatch) -> InFlightStep:
        """Enqueue forward, sampling and the copies of the results to the host; returns without
        waiting for the GPU (on CPU the work has run by the time it returns)."""
        with self.streams.use(self.streams.compute):
            bucket = self.mixed_graphs.bucket_for(fb) if self.mixed_graphs else None
            # a zero-copy step passes can_run by construction (_zero_copy_step: graphs.holds)
            if self.graphs is not None and self.graphs.can_run(fb):
                logits = self.graphs.replay(fb)  # [B, vocab] in the model's dtype
                if fb.host_staged:  # its input kernel, which reads the ring's slot, is enqueued
                    self.staging.record_use(fb.staging_slot)
            elif fb.host_staged:  # its rows are in host memory, which no other path reads
                raise RuntimeError("a zero-copy decode step that the decode graphs cannot run")
            elif bucket is not None:
                logits = self.mixed_graphs.replay(fb, bucket)
            else:
                logits = self.model(fb, self.kv.k, self.kv.v)
            sample_logits = logits if fb.sample_rows is None else logits[fb.sample_rows]
            out: SamplerOutput = self.sampler(sample_logits, plan.requests)
            dev: dict[str, torch.Tensor] = {"tokens": out.token_ids}
            if out.logprobs is not None:
                dev["logprobs"] = out.logprobs
            if out.top_logprobs is not None:
                dev["top_values"], dev["top_ids"] = out.top_logprobs
            if out.ids_logprobs is not None:
                dev["ids_values"] = out.ids_logprobs
            step = InFlightStep(
                plan, out.token_ids, Event(self.device), {},
                top_n=[r.top_logprobs_num for r in plan.requests],
                # only in steps with a gather (the host's work a step stays as it was)
                ids_n=([len(r.token_ids_logprob or ()) for r in plan.requests]
                       if out.ids_logprobs is not None else []),
            )
            if fb.sample_rows is not None:
                self._score_prompt(logits, fb, plan.requests, dev, step)
            if self.results is not None:
                self._write_back(dev, step)
            else:
                self._read_back(dev, step)
            return step

    def _read_back(self, dev: dict[str, torch.Tensor], step: InFlightStep) -> None:
        """LORASERVE_READBACK_KERNEL=0: copy the step's results `dev` into pinned host buffers
        and record `step.event` after them. On CUDA the copies run on the readback stream once
        the compute stream has sampled: on the compute stream the next step's first kernel
        would wait for the copy engine (the copy's start and the kernel after it each left the
        device idle about 5 µs of batch 32's step on the H200, benchmarks/RESULTS.md fortieth
        session). The event still follows all of the step's compute work. The results' device
        memory, the compute stream's, is marked in use by the readback stream until the copies
        finish."""
        rb = self.streams.readback if self.readback else None
        if rb is not None:
            sampled = Event(self.device)
            sampled.record(self.streams.compute)
            sampled.wait(rb)
            for v in dev.values():
                v.record_stream(rb)
        with self.streams.use(rb):  # None (no readback stream): the compute stream, current
            step.host = {k: self._to_host(v) for k, v in dev.items()}
        step.event.record(rb or self.streams.compute)

    def _score_prompt(
        self, logits: torch.Tensor, fb: ForwardBatch, requests: list[Request],
        dev: dict[str, torch.Tensor], step: InFlightStep,
    ) -> None:
        """Log-prob of each scored prompt token under the raw model distribution, the top
        candidates when the request asked for them, its rank (how many tokens are likelier,
        plus 1) when one asked for that, and the log-probs of its request's token_ids_logprob
        (device tensors into `dev`)."""
        lp = torch.log_softmax(logits[fb.prompt_rows].float(), dim=-1)  # [E, vocab]
        chosen = lp.gather(1, fb.prompt_targets[:, None])
        dev["prompt_chosen"] = chosen.squeeze(1)
        step.prompt_owners = fb.prompt_owners
        if any(requests[i].prompt_ranks for i in fb.prompt_owners):
            dev["prompt_rank"] = (lp > chosen).sum(dim=-1) + 1
        ids = [requests[i].token_ids_logprob for i in fb.prompt_owners]
        gathered = self.sampler.gather_ids(lp, ids)
        if gathered is not None:
            dev["prompt_ids_values"] = gathered
            step.prompt_ids_n = [len(x or ()) for x in ids]
        step.prompt_top_n = [requests[i].prompt_top_logprobs_num for i in fb.prompt_owners]
        k = max(step.prompt_top_n)
        if k > 0:
            dev["prompt_top_values"], dev["prompt_top_ids"] = lp.topk(k, dim=-1)

    def _write_back(self, dev: dict[str, torch.Tensor], step: InFlightStep) -> None:
        """By default (LORASERVE_READBACK_KERNEL=0 copies instead: _read_back): the results
        `dev` written into a slot of the result ring's pinned host memory by one kernel each on the
        compute stream (ops/triton_host_write.py), `step.event` recorded after them there: the
        step uses no copy engine, no second stream and no pinned allocation (on the H200 the
        next graph's start came 16-18 µs a step after its input kernel on average, where the
        readback stream left 21-45 µs in about half the steps; batch 32's step was level with
        it within noise: benchmarks/RESULTS.md, forty-first session). Its host views hold until the
        ring's depth of later steps have taken slots. CPU tensors are copied into the slot
        (use_triton: the kernel under the interpreter), so the ring's slots serve CPU runs the
        same way."""
        assert self.results is not None
        values = [v.contiguous() for v in dev.values()]
        slot, host = self.results.take(values)
        for v, h in zip(values, host, strict=True):
            if use_triton(v):
                write_to_host(v, h)
            else:
                h.copy_(v)
        self.results.record_use(slot)
        step.host = dict(zip(dev, host, strict=True))
        step.event.record(self.streams.compute)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of `t`: pinned and non-blocking on CUDA (valid once the step's event
        has completed), the tensor itself on CPU."""
        if t.device.type != "cuda":
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host
