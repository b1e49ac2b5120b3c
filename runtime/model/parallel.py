"""Tensor-parallel decoder: the Llama definition with its weights sharded Megatron-style over
`tp` ranks, and LoRA factors sharded to match.

- column parallel (qkv by heads, gate_up by intermediate rows): each rank computes its own output
  columns, no communication. LoRA: A whole, B sharded along the output.
- row parallel (o, down): each rank holds the input columns of its heads / intermediate rows and
  the partial products are all-reduced. LoRA: A sharded along the input, the rank-r intermediate
  t = x_shard A_shard^T all-reduced, B whole (the delta is added after the base all-reduce).
- vocab parallel embedding (rows outside the rank's range masked, then all-reduced) and lm_head
  (each rank's logits columns all-gathered). The vocabulary is padded to a multiple of tp.

Every rank runs the same code on the same step plan; collectives go over the default process
group. Shapes below: T tokens, B sequences, tp ranks; `_l` sizes are one rank's share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ops.lora import LoraBatchInfo, lora_expand, lora_shrink
from runtime.adapters.peft_format import AdapterWeights, LoraModuleWeights
from runtime.adapters.pool import (
    EMBED,
    GLOBAL_LAYER,
    LM_HEAD,
    HostAdapter,
    LoraGroupBuffers,
    LoraModelShape,
    LoraPool,
)
from runtime.model.batch import ForwardBatch
from runtime.model.llama import MLP, Attention, CausalLM, ModelArgs, RotaryRows, apply_lora


@dataclass(frozen=True)
class TPGroup:
    """This process's place in the tensor-parallel group (the default process group)."""

    rank: int
    world_size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., world_size * n], rank order. On CUDA one NCCL
        all-gather into one buffer (what a decode graph captures); gloo gathers a list."""
        x = x.contiguous()
        if x.is_cuda:
            out = x.new_empty((self.world_size, *x.shape))
            dist.all_gather_into_tensor(out, x)
            return torch.cat(out.unbind(0), dim=-1)
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=-1)


def check_divisible(args: ModelArgs, tp_size: int) -> None:
    """Raise ValueError naming tp_size when the model's heads or MLP cannot be split evenly."""
    for name, value in (
        ("num_attention_heads", args.num_heads),
        ("num_key_value_heads", args.num_kv_heads),
        ("intermediate_size", args.intermediate_size),
    ):
        if value % tp_size:
            raise ValueError(f"tp_size: {tp_size} does not divide the model's {name} ({value})")


def local_vocab(vocab_size: int, tp_size: int) -> int:
    """Rows of the embedding / lm_head per rank (the vocabulary padded to a multiple of tp)."""
    return -(-vocab_size // tp_size)


def local_args(args: ModelArgs, tp_size: int) -> ModelArgs:
    """One rank's share of the model: its heads, MLP rows and vocabulary rows."""
    check_divisible(args, tp_size)
    return dataclasses.replace(
        args,
        num_heads=args.num_heads // tp_size,
        num_kv_heads=args.num_kv_heads // tp_size,
        intermediate_size=args.intermediate_size // tp_size,
        vocab_size=local_vocab(args.vocab_size, tp_size),
    )


def local_lora_shape(shape: LoraModelShape, tp_size: int) -> LoraModelShape:
    return dataclasses.replace(
        shape,
        intermediate_size=shape.intermediate_size // tp_size,
        q_size=shape.q_size // tp_size,
        kv_size=shape.kv_size // tp_size,
        vocab_size=local_vocab(shape.vocab_size, tp_size),
    )


def _rows(x: torch.Tensor, rank: int, size: int, dim: int = 0) -> torch.Tensor:
    """Rank's slice of `size` along `dim`, zero-padded when the tensor ends inside it."""
    lo = rank * size
    part = x.narrow(dim, lo, max(0, min(size, x.shape[dim] - lo)))
    if part.shape[dim] == size:
        return part
    pad = list(x.shape)
    pad[dim] = size - part.shape[dim]
    return torch.cat([part, x.new_zeros(pad)], dim=dim)


# ------------------------------------------------------------------------------------ layers


def _row_parallel_lora(
    x: torch.Tensor, y: torch.Tensor, group: LoraGroupBuffers | None,
    info: LoraBatchInfo | None, tp: TPGroup,
) -> None:
    """y += B (sum over ranks of x_shard A_shard^T): y already holds the reduced base output.
    x: [T, in_l]; A: [slots, R, in_l]; B: [slots, out, R] whole; y: [T, out]."""
    if group is None or info is None:
        return
    t = tp.all_reduce(lora_shrink(x, group.A, info, group.num_slices))  # [T, R]
    lora_expand(t, group.B, y, group.slice_offsets, group.scalings, info)


class ParallelAttention(Attention):
    """Attention over this rank's q and kv heads; o_proj is row parallel."""

    def __init__(self, args: ModelArgs, tp: TPGroup) -> None:
        super().__init__(args)
        self.tp = tp

    def project_out(self, o: torch.Tensor, fb: ForwardBatch, lora) -> torch.Tensor:
        """Row-parallel o_proj: this rank's heads' share, all-reduced; LoRA A sharded."""
        out = self.tp.all_reduce(self.o_proj(o))  # [T, hidden]
        _row_parallel_lora(o, out, lora.get("o") if lora else None, fb.lora, self.tp)
        return out


class ParallelMLP(MLP):
    """gate_up column parallel over the intermediate rows; down row parallel."""

    def __init__(self, args: ModelArgs, tp: TPGroup) -> None:
        super().__init__(args)
        self.tp = tp

    def forward(self, x, fb: ForwardBatch, lora) -> torch.Tensor:
        h = self.activation(x, fb, lora)  # [T, inter_l]
        out = self.tp.all_reduce(self.down_proj(h))  # [T, hidden]
        _row_parallel_lora(h, out, lora.get("down") if lora else None, fb.lora, self.tp)
        return out


class ParallelCausalLM(CausalLM):
    """CausalLM holding one rank's shard. `full_args` describes the whole model."""

    def __init__(self, full_args: ModelArgs, hf_config, tp: TPGroup) -> None:
        args = local_args(full_args, tp.world_size)
        super().__init__(args, hf_config)
        self.full_args = full_args
        self.tp = tp
        for layer in self.layers:
            layer.self_attn = ParallelAttention(args, tp)
            layer.mlp = ParallelMLP(args, tp)
        self.vocab_start = tp.rank * args.vocab_size

    def forward(self, fb: ForwardBatch, kv_k: list[torch.Tensor], kv_v: list[torch.Tensor]):
        """Returns logits [B, vocab] in fp32 (full vocabulary, on every rank)."""
        pool = self.lora_pool if fb.lora is not None else None
        local_ids = fb.input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.args.vocab_size)
        h = self.embed_tokens(local_ids.masked_fill(outside, 0))  # [T, hidden] partial
        h = self.tp.all_reduce(h.masked_fill(outside[:, None], 0.0))
        rope = RotaryRows(self.rope_cos, self.rope_sin, fb.positions)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, kv_k[i], kv_v[i], fb, pool.layers[i] if pool else None)
        h = self.norm(h[fb.logits_indices])  # [B, hidden]
        logits = self.lm_head(h)  # [B, vocab_l]
        if pool is not None and pool.lm_head is not None:
            apply_lora(h, logits, pool.lm_head, fb.lora_logits)
        logits = self.tp.all_gather_last(logits)  # [B, tp * vocab_l]
        return logits[:, : self.full_args.vocab_size].float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take full HF-named tensors, keep this rank's shard of each."""
        super().load_weights(self._shard(weights))

    def _shard(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        a, r = self.args, self.tp.rank
        rows = {
            "q_proj": a.q_size, "k_proj": a.kv_size, "v_proj": a.kv_size,
            "gate_proj": a.intermediate_size, "up_proj": a.intermediate_size,
            "embed_tokens": a.vocab_size, "lm_head": a.vocab_size,
        }
        cols = {"o_proj": a.q_size, "down_proj": a.intermediate_size}
        for name, w in weights:
            module = name.split(".")[-2] if "." in name else name
            if module in rows:
                w = _rows(w, r, rows[module], 0)
            elif module in cols and name.endswith("weight"):
                w = _rows(w, r, cols[module], 1)
            yield name, w.contiguous()


# ------------------------------------------------------------------------------------ LoRA


def shard_adapter(
    weights: AdapterWeights, local: LoraModelShape, rank: int
) -> AdapterWeights:
    """This rank's factors: column-parallel modules keep A and shard B's rows, row-parallel
    modules shard A's columns and keep B. Sizes in `local` are one rank's share."""
    out_rows = {
        "q_proj": local.q_size, "k_proj": local.kv_size, "v_proj": local.kv_size,
        "gate_proj": local.intermediate_size, "up_proj": local.intermediate_size,
        LM_HEAD: local.vocab_size,
    }
    in_cols = {"o_proj": local.q_size, "down_proj": local.intermediate_size}
    modules: dict[tuple[int, str], LoraModuleWeights] = {}
    for key, w in weights.modules.items():
        module = key[1]
        if module in out_rows:
            w = dataclasses.replace(w, B=_rows(w.B, rank, out_rows[module], 0).contiguous())
        elif module in in_cols:
            w = dataclasses.replace(w, A=_rows(w.A, rank, in_cols[module], 1).contiguous())
        else:
            raise ValueError(f"LoRA on {module} is not supported with tp_size > 1")
        modules[key] = w
    nbytes = sum(w.A.nbytes + w.B.nbytes for w in modules.values())
    return AdapterWeights(modules, weights.rank, weights.target_modules, nbytes)


class ShardedLoraPool(LoraPool):
    """A slot pool sized for one rank's shard; `build_host` shards full adapter weights."""

    def __init__(
        self,
        full_shape: LoraModelShape,
        tp: TPGroup,
        num_slots: int,
        max_rank: int,
        target_modules: Iterable[str],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        targets = frozenset(target_modules)
        if EMBED in targets:
            raise ValueError(f"tp_size: LoRA on {EMBED} is not supported with tp_size > 1")
        super().__init__(
            local_lora_shape(full_shape, tp.world_size), num_slots, max_rank, targets, device,
            dtype,
        )
        self.full_shape = full_shape
        self.tp = tp

    def build_host(self, weights: AdapterWeights) -> HostAdapter:
        if (GLOBAL_LAYER, EMBED) in weights.modules:
            raise ValueError(f"LoRA on {EMBED} is not supported with tp_size > 1")
        return super().build_host(shard_adapter(weights, self.shape, self.tp.rank))
