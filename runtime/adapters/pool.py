"""GPU slot buffers for LoRA weights, and host copies laid out exactly like one slot.

The buffers are allocated once, zero-filled, at fixed addresses (captured CUDA graphs read
them), in the model's dtype. Each slot holds one adapter. Per layer, the modules that share an
input are fused into a group, so one LoRA launch covers q, k and v (or gate and up):

    group A: [num_slots, n * R, in]   slice i's A in rows i*R .. i*R + r_i, zero beyond r_i
    group B: [num_slots, N_total, R]  slice i's B in rows slice_offsets[i] .. [i+1], zero beyond r_i
    scalings: [num_slots, n] float32  0 for slices the adapter does not target

R is the pool's max rank. The embedding and lm_head are groups of one slice, with the embedding's
A stored transposed ([vocab, R]) so the lookup gathers rows.

A `HostAdapter` is one adapter already in that layout (pinned when the pool is on CUDA), so an
upload is a list of `pool_buf[slot].copy_(host_buf, non_blocking=True)`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from runtime.adapters.peft_format import AdapterWeights


@dataclass(frozen=True)
class LoraModelShape:
    """The base model's sizes that LoRA weights must fit (from the model config)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    q_size: int  # num_heads * head_dim
    kv_size: int  # num_kv_heads * head_dim
    vocab_size: int


GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
LAYER_MODULES: tuple[str, ...] = tuple(m for ms in GROUPS.values() for m in ms)
EMBED = "embed_tokens"
LM_HEAD = "lm_head"
ALL_MODULES: frozenset[str] = frozenset((*LAYER_MODULES, EMBED, LM_HEAD))
GLOBAL_LAYER = -1  # the layer index used for embed_tokens and lm_head


def module_dims(shape: LoraModelShape, module: str) -> tuple[int, int]:
    """(in, out) such that a module's A is [r, in] and its B is [out, r].

    For embed_tokens this is (vocab, hidden): lora_embedding_A is [r, vocab], B is [hidden, r].
    """
    h, i, q, kv, v = (
        shape.hidden_size,
        shape.intermediate_size,
        shape.q_size,
        shape.kv_size,
        shape.vocab_size,
    )
    dims = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
        EMBED: (v, h),
        LM_HEAD: (h, v),
    }
    return dims[module]


@dataclass
class LoraGroupBuffers:
    """One group's slot buffers (see the module docstring for the layout)."""

    A: Tensor  # [num_slots, n*R, in]; embed: [num_slots, vocab, R]
    B: Tensor  # [num_slots, N_total, R]
    scalings: Tensor  # [num_slots, n] float32
    slice_offsets: tuple[int, ...]  # len n+1: row offsets of each slice in B
    num_slices: int


@dataclass
class HostGroup:
    """One group of one adapter, laid out like one slot of `LoraGroupBuffers`."""

    A: Tensor  # like LoraGroupBuffers.A[slot]
    B: Tensor  # like LoraGroupBuffers.B[slot]
    scalings: Tensor  # [n] float32


@dataclass
class HostAdapter:
    """One adapter in host memory, laid out like one pool slot.

    A group is None when the adapter targets none of its modules (in that layer): the upload
    zero-fills that group's slot instead of copying zeros from host memory.
    """

    layers: list[dict[str, HostGroup | None]]
    embed: HostGroup | None
    lm_head: HostGroup | None
    rank: Tensor  # [1] int32
    nbytes: int
    is_pinned: bool


class LoraPool:
    """The fixed GPU slot buffers of every LoRA-targeted module.

    layers[l] holds only the groups with a module in `target_modules`; embed / lm_head are None
    unless targeted. slot_ranks[s] is the rank of the adapter in slot s (its max over modules).
    """

    def __init__(
        self,
        shape: LoraModelShape,
        num_slots: int,
        max_rank: int,
        target_modules: Iterable[str],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.shape = shape
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.target_modules = frozenset(target_modules)
        unknown = self.target_modules - ALL_MODULES
        if unknown:
            raise ValueError(f"unsupported LoRA target modules: {sorted(unknown)}")
        self.device = device
        self.dtype = dtype
        self.group_names = tuple(
            g for g, ms in GROUPS.items() if any(m in self.target_modules for m in ms)
        )
        self.layers: list[dict[str, LoraGroupBuffers]] = [
            {g: self._alloc(self._group_layout(g)) for g in self.group_names}
            for _ in range(shape.num_layers)
        ]
        self.embed = (
            self._alloc(self._group_layout(EMBED)) if EMBED in self.target_modules else None
        )
        self.lm_head = (
            self._alloc(self._group_layout(LM_HEAD)) if LM_HEAD in self.target_modules else None
        )
        self.slot_ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)

    # layout -------------------------------------------------------------------------------

    def _group_layout(self, group: str) -> tuple[tuple[int, int], tuple[int, int], tuple[int, ...]]:
        """(A shape per slot, B shape per slot, slice offsets) of a group."""
        R = self.max_rank
        if group == EMBED:
            vocab, hidden = module_dims(self.shape, EMBED)
            return (vocab, R), (hidden, R), (0, hidden)
        modules = (LM_HEAD,) if group == LM_HEAD else GROUPS[group]
        in_features = module_dims(self.shape, modules[0])[0]
        offsets = [0]
        for m in modules:
            offsets.append(offsets[-1] + module_dims(self.shape, m)[1])
        return (len(modules) * R, in_features), (offsets[-1], R), tuple(offsets)

    def _alloc(
        self, layout: tuple[tuple[int, int], tuple[int, int], tuple[int, ...]]
    ) -> LoraGroupBuffers:
        a_shape, b_shape, offsets = layout
        S = self.num_slots
        return LoraGroupBuffers(
            A=torch.zeros((S, *a_shape), dtype=self.dtype, device=self.device),
            B=torch.zeros((S, *b_shape), dtype=self.dtype, device=self.device),
            scalings=torch.zeros((S, len(offsets) - 1), dtype=torch.float32, device=self.device),
            slice_offsets=offsets,
            num_slices=len(offsets) - 1,
        )

    def _host_groups(self, targets: set[tuple[int, str]]) -> list[tuple[int, str]]:
        """The (layer, group) pairs an adapter targeting `targets` needs in host memory."""
        needed = []
        for layer in range(self.shape.num_layers):
            for g in self.group_names:
                if any((layer, m) in targets for m in GROUPS[g]):
                    needed.append((layer, g))
        for g in (EMBED, LM_HEAD):
            if (GLOBAL_LAYER, g) in targets:
                needed.append((GLOBAL_LAYER, g))
        return needed

    def host_nbytes(self, targets: Iterable[tuple[int, str]]) -> int:
        """Bytes of the host copy of an adapter targeting these (layer, module) pairs."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        total = 4  # the rank
        for _, g in self._host_groups(set(targets)):
            a_shape, b_shape, offsets = self._group_layout(g)
            total += elem * (a_shape[0] * a_shape[1] + b_shape[0] * b_shape[1])
            total += 4 * (len(offsets) - 1)
        return total

    @property
    def slot_nbytes(self) -> int:
        """Bytes of one slot across all buffers."""
        groups = [*(b for layer in self.layers for b in layer.values()), self.embed, self.lm_head]
        return 4 + sum(
            b.A[0].nbytes + b.B[0].nbytes + b.scalings[0].nbytes for b in groups if b is not None
        )

    # host copies --------------------------------------------------------------------------

    def build_host(self, weights: AdapterWeights) -> HostAdapter:
        """Lay `weights` out like one slot, in pinned memory when the pool is on CUDA.

        Runs in a loader thread (it copies every weight once).
        """
        pin = self.device.type == "cuda"
        needed = self._host_groups(set(weights.modules))
        layouts = {g: self._group_layout(g) for g in {g for _, g in needed}}
        numel = sum(a[0] * a[1] + b[0] * b[1] for a, b, _ in (layouts[g] for _, g in needed))
        num_scalings = sum(len(layouts[g][2]) - 1 for _, g in needed)
        flat = torch.zeros(numel, dtype=self.dtype, pin_memory=pin)
        flat_scalings = torch.zeros(num_scalings, dtype=torch.float32, pin_memory=pin)
        rank = torch.tensor([weights.rank], dtype=torch.int32)
        if pin:
            rank = rank.pin_memory()
        layers: list[dict[str, HostGroup | None]] = [
            dict.fromkeys(self.group_names) for _ in range(self.shape.num_layers)
        ]
        embed = lm_head = None
        pos = spos = 0
        for layer, g in needed:
            a_shape, b_shape, offsets = layouts[g]
            na, nb, ns = a_shape[0] * a_shape[1], b_shape[0] * b_shape[1], len(offsets) - 1
            host = HostGroup(
                A=flat[pos : pos + na].view(a_shape),
                B=flat[pos + na : pos + na + nb].view(b_shape),
                scalings=flat_scalings[spos : spos + ns],
            )
            pos, spos = pos + na + nb, spos + ns
            self._fill_group(host, layer, g, weights)
            if g == EMBED:
                embed = host
            elif g == LM_HEAD:
                lm_head = host
            else:
                layers[layer][g] = host
        nbytes = flat.nbytes + flat_scalings.nbytes + rank.nbytes
        return HostAdapter(layers, embed, lm_head, rank, nbytes, pin)

    def _fill_group(self, host: HostGroup, layer: int, group: str, weights: AdapterWeights) -> None:
        R = self.max_rank
        if group == EMBED:
            w = weights.modules[(GLOBAL_LAYER, EMBED)]
            host.A[:, : w.rank] = w.A.t()  # [vocab, r]: rows are gathered by token id
            host.B[:, : w.rank] = w.B
            host.scalings[0] = w.scaling
            return
        modules = (LM_HEAD,) if group == LM_HEAD else GROUPS[group]
        offsets = self._group_layout(group)[2]
        for i, m in enumerate(modules):
            w = weights.modules.get((layer, m))
            if w is None:
                continue  # stays zero, scaling 0
            host.A[i * R : i * R + w.rank] = w.A
            host.B[offsets[i] : offsets[i + 1], : w.rank] = w.B
            host.scalings[i] = w.scaling

    # uploads ------------------------------------------------------------------------------

    def slot_copies(self, slot: int, host: HostAdapter) -> list[tuple[Tensor, Tensor | None]]:
        """(destination, source) pairs that write `host` into `slot`; a None source means
        zero-fill the destination. Issue them on the copy stream."""
        ops: list[tuple[Tensor, Tensor | None]] = [(self.slot_ranks[slot : slot + 1], host.rank)]
        pairs = [
            (bufs, host.layers[layer][g])
            for layer, bufs_by_group in enumerate(self.layers)
            for g, bufs in bufs_by_group.items()
        ]
        if self.embed is not None:
            pairs.append((self.embed, host.embed))
        if self.lm_head is not None:
            pairs.append((self.lm_head, host.lm_head))
        for bufs, hg in pairs:
            if hg is None:
                ops += [(bufs.A[slot], None), (bufs.B[slot], None), (bufs.scalings[slot], None)]
            else:
                ops += [
                    (bufs.A[slot], hg.A),
                    (bufs.B[slot], hg.B),
                    (bufs.scalings[slot], hg.scalings),
                ]
        return ops
