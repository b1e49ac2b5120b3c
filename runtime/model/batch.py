"""The forward metadata of one step: plain tensors, no Python objects the model must interpret.

The runner builds a `ForwardBatch` from the scheduler's plan; the model reads it and nothing
else. Tokens of one sequence are contiguous, and sequences are ordered by adapter slot so that
each adapter's tokens form one segment (the LoRA kernels rely on that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ops.lora import LoraBatchInfo


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset for each token's K/V
    block_tables: torch.Tensor  # [B, max_blocks] int32
    kv_lens: torch.Tensor  # [B] int32: KV length of each sequence after this step
    cu_q_lens: torch.Tensor  # [B+1] int32: query token offsets
    logits_indices: torch.Tensor  # [B (+E)] int64: token rows whose logits are computed
    max_q_len: int
    is_decode: bool  # every sequence has exactly one query token
    sample_rows: torch.Tensor | None = None  # [B] rows of the logits to sample from (None: all)
    prompt_rows: torch.Tensor | None = None  # [E] logits rows that score a prompt token
    prompt_targets: torch.Tensor | None = None  # [E] the prompt token each of those scores
    prompt_owners: tuple[int, ...] = ()  # [E] index of the sequence each row belongs to
    lora: LoraBatchInfo | None = None  # per token
    lora_logits: LoraBatchInfo | None = None  # per sampled row (for lm_head LoRA)
    # Prefill attention's query tiles (a CUDA graph's static table; None: the kernel's own grid)
    attn_tiles: torch.Tensor | None = None
    q_lens: tuple[int, ...] = ()  # [B] query tokens of each sequence, on the host
    # A zero-copy decode step (runtime/runner.py, _zero_copy_step): the rows above
    # are views of the staging ring's pinned host buffer (slot staging_slot), which only the
    # decode graph's input kernel reads; row i's token is pending_tokens[pending_src[i]] where
    # that is >= 0 (the step in flight is still sampling it)
    host_staged: bool = False
    pending_src: torch.Tensor | None = None
    pending_tokens: torch.Tensor | None = None
    staging_slot: int = -1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def batch_size(self) -> int:
        return self.kv_lens.shape[0]
