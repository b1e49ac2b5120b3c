"""Prepare inputs → forward → sample, for one scheduled step.

`prepare` turns the scheduler's plan into a `ForwardBatch` of plain tensors (built on the host,
copied with one non-blocking transfer each). `execute` runs the model and the sampler on the
compute stream and returns the sampled tokens. Nothing here touches Request state except reading
it; the engine applies the results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ops.lora import build_lora_batch_info
from runtime.graphs import DecodeGraphs
from runtime.kv_cache import BlockManager, KVCache
from runtime.model.batch import ForwardBatch
from runtime.model.llama import CausalLM
from runtime.request import Request, SamplingParams
from runtime.sampler import Sampler, SamplerOutput
from runtime.scheduler import ScheduledBatch
from runtime.streams import Streams


@dataclass
class StepResult:
    """Sampled tokens of one step, on the host."""

    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    # (sequence index, logprob, top candidates) per scored prompt token, in position order
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)


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
        self._scratch: Request | None = None

    def enable_cuda_graphs(
        self, block_manager: BlockManager, max_bs: int, context_length: int
    ) -> None:
        """Capture decode graphs for batch sizes up to `max_bs` (CUDA only). One KV block is
        set aside for the padded rows of a bucket to write into."""
        if self.device.type != "cuda":
            return
        scratch = Request(rid="cuda-graph-scratch", prompt_ids=[0], params=SamplingParams())
        block_manager.allocate(scratch, 1)
        self._scratch = scratch
        max_blocks = -(-context_length // self.block_size)
        self.graphs = DecodeGraphs(
            self.model, self.kv.k, self.kv.v, max_bs, max_blocks, scratch.block_ids[0],
            self.block_size, self.lora_backend, self.lora_chunk_size,
        )
        self.graphs.capture(self.streams.compute)

    def _to_device(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def prepare(self, plan: ScheduledBatch) -> ForwardBatch:
        """Step inputs as device tensors, copied on the compute stream (which then runs them)."""
        with self.streams.use(self.streams.compute):
            return self._prepare(plan)

    def _prepare(self, plan: ScheduledBatch) -> ForwardBatch:
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        kv_lens: list[int] = []
        cu_q_lens = [0]
        logits_indices: list[int] = []
        token_slots: list[int] = []
        max_blocks = max(len(r.block_ids) for r in plan.requests)
        block_tables: list[list[int]] = []
        bs = self.block_size
        sample_rows: list[int] = []
        prompt_rows: list[int] = []
        prompt_targets: list[int] = []
        prompt_owners: list[int] = []
        logits_slots: list[int] = []
        for i, (req, n) in enumerate(zip(plan.requests, plan.num_new_tokens)):
            start = req.num_computed_tokens
            tokens = req.token_slice(start, n)
            ids.extend(tokens)
            positions.extend(range(start, start + n))
            slot_mapping.extend(
                req.block_ids[p // bs] * bs + p % bs for p in range(start, start + n)
            )
            kv_lens.append(start + n)
            for p in req.prompt_logprob_positions(start, n):  # only with return_logprob
                prompt_rows.append(len(logits_indices))
                logits_indices.append(cu_q_lens[-1] + p - start)
                prompt_targets.append(req.prompt_ids[p + 1])
                prompt_owners.append(i)
                logits_slots.append(req.lora_slot)
            cu_q_lens.append(cu_q_lens[-1] + n)
            sample_rows.append(len(logits_indices))
            logits_indices.append(cu_q_lens[-1] - 1)
            logits_slots.append(req.lora_slot)
            token_slots.extend([req.lora_slot] * n)
            block_tables.append(req.block_ids + [0] * (max_blocks - len(req.block_ids)))
        lora = lora_logits = None
        pool = self.model.lora_pool
        if pool is not None and any(s >= 0 for s in token_slots):
            lora = build_lora_batch_info(
                token_slots, pool.slot_ranks, self.lora_backend, self.lora_chunk_size, self.device
            )
            lora_logits = build_lora_batch_info(
                logits_slots, pool.slot_ranks, self.lora_backend, self.lora_chunk_size, self.device
            )
        return ForwardBatch(
            input_ids=self._to_device(ids, torch.int64),
            positions=self._to_device(positions, torch.int64),
            slot_mapping=self._to_device(slot_mapping, torch.int64),
            block_tables=self._to_device(
                [x for row in block_tables for x in row], torch.int32
            ).view(len(block_tables), max_blocks),
            kv_lens=self._to_device(kv_lens, torch.int32),
            cu_q_lens=self._to_device(cu_q_lens, torch.int32),
            logits_indices=self._to_device(logits_indices, torch.int64),
            max_q_len=max(plan.num_new_tokens),
            is_decode=plan.is_decode,
            lora=lora,
            lora_logits=lora_logits,
            **self._prompt_scoring(sample_rows, prompt_rows, prompt_targets, prompt_owners),
        )

    def _prompt_scoring(self, sample_rows, prompt_rows, prompt_targets, prompt_owners) -> dict:
        """Extra ForwardBatch fields when some prompt tokens are scored (return_logprob)."""
        if not prompt_rows:
            return {}
        return {
            "sample_rows": self._to_device(sample_rows, torch.int64),
            "prompt_rows": self._to_device(prompt_rows, torch.int64),
            "prompt_targets": self._to_device(prompt_targets, torch.int64),
            "prompt_owners": tuple(prompt_owners),
        }

    @torch.inference_mode()
    def execute(self, plan: ScheduledBatch, fb: ForwardBatch) -> StepResult:
        """Forward and sample. Blocks the calling thread until the tokens are on the host."""
        with self.streams.use(self.streams.compute):
            if self.graphs is not None and self.graphs.can_run(fb):
                logits = self.graphs.replay(fb)  # [B, vocab] fp32
            else:
                logits = self.model(fb, self.kv.k, self.kv.v)
            if fb.sample_rows is None:
                out: SamplerOutput = self.sampler(logits, plan.requests)
                return self._to_host(out, plan.requests)
            out = self.sampler(logits[fb.sample_rows], plan.requests)
            result = self._to_host(out, plan.requests)
            result.prompt_logprobs = self._score_prompt(logits, fb, plan.requests)
            return result

    def _score_prompt(
        self, logits: torch.Tensor, fb: ForwardBatch, requests: list[Request]
    ) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """Log-prob of each scored prompt token under the raw model distribution, and the
        top candidates when the request asked for them."""
        lp = torch.log_softmax(logits[fb.prompt_rows].float(), dim=-1)  # [E, vocab]
        chosen = lp.gather(1, fb.prompt_targets[:, None]).squeeze(1).cpu().tolist()
        k = max(requests[i].top_logprobs_num for i in fb.prompt_owners)
        tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
        if k > 0:
            values, idx = (t.cpu().tolist() for t in lp.topk(k, dim=-1))
            for e, owner in enumerate(fb.prompt_owners):
                n = requests[owner].top_logprobs_num
                tops[e] = list(zip(idx[e][:n], values[e][:n]))
        return [(o, c, t) for o, c, t in zip(fb.prompt_owners, chosen, tops)]

    def _to_host(self, out: SamplerOutput, requests: list[Request]) -> StepResult:
        token_ids = out.token_ids.cpu().tolist()
        logprobs = out.logprobs.cpu().tolist() if out.logprobs is not None else None
        top = None
        if out.top_logprobs is not None:
            values, idx = (t.cpu().tolist() for t in out.top_logprobs)
            top = [
                list(zip(idx[i][: r.top_logprobs_num], values[i][: r.top_logprobs_num]))
                for i, r in enumerate(requests)
            ]
        return StepResult(token_ids, logprobs, top)
