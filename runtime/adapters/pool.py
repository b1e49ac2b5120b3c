"""GPU slot buffers for LoRA weights, and host copies laid out exactly like one slot.

The buffers are allocated once, zero-filled, at fixed addresses (captured CUDA graphs read
them), in the model's dtype. Each slot holds one adapter. Per layer, the modules that share an
input are fused into a group, so one LoRA launch covers q, k and v (or gate and up):

    group A: [num_slots, n * R, in]   slice i's A in rows i*R .. i*R + r_i, zero beyond r_i
    group B: [num_slots, N_total, R]  slice i's B in rows slice_offsets[i] .. [i+1], zero beyond r_i
    scalings: [num_slots, n] float32  0 for slices the adapter does not target

R is the pool's max rank. The embedding and lm_head are groups of one slice, with the embedding's
A stored transposed ([vocab, R]) so the lookup gathers rows.

All of a slot's buffers are views into one row of a slot-major slab ([num_slots, slot numel],
and a float32 one for the scalings), so the buffers above are strided views whose slot stride is
a whole slot. A `HostAdapter` is one adapter laid out like one slab row (pinned when the pool is
on CUDA; groups it does not target stay zero), so an upload is three non-blocking copies: the
rank, the weights row, the scalings row. Host copies live in rows of `HostRows`, recycled once
a copy is dropped and its last upload has completed, so loads stop pinning memory once the host
tier has reached its size.

Stacked groups (`stacked`): a layer group's A may live instead below the base model's weight
of its projection, in a per-group stack [num_layers, N + num_slots * n*R, in] (N the group's
output rows, slot s's A in rows N + s*n*R .. N + (s+1)*n*R, laid out as above), whose top rows
become the base linear's weight (`adopt_base_weights`). At decode one GEMM over [W; A] then gives
the projection and every slot's shrink output at once. A shrink kernel beside the projection
does not run with it: the projections' cuBLAS kernels take a whole multiprocessor each (all 64K
registers), so the shrink runs before them, and on the H200 at 32 adapters the side-stream
shrink costs 28.8 us a layer over the projections, the stacked GEMM 11.5. The slab then holds
only B and the scalings of a stacked group; a host copy holds, after its slab row, one region
[num_layers, n*R, in] per stacked group, so a slot's A of that group is one more copy (into a
strided view of the stack). Tensor-parallel shards never stack.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from itertools import pairwise
from typing import TYPE_CHECKING, Any

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


def _group_slice(module: str) -> tuple[str, int]:
    """The group a module is fused into, and its slice index there."""
    if module in (EMBED, LM_HEAD):
        return module, 0
    group = next(g for g, ms in GROUPS.items() if module in ms)
    return group, GROUPS[group].index(module)


def _strided_views(
    buf: Tensor, base: int, starts: list[int], at: int, shape: tuple[int, ...],
    strides: tuple[int, ...],
) -> tuple[Tensor, ...]:
    """Views of `shape` and `strides` in the 1-D contiguous `buf`, which starts `base`
    elements into its storage (a host row's offset in its chunk), `at` elements past each of
    `starts` (which must be a fixed step apart): one strided view, unbound, so two torch
    calls."""
    step = starts[1] - starts[0] if len(starts) > 1 else 0
    assert all(b - a == step for a, b in pairwise(starts))
    offset = base + starts[0] + at
    return buf.as_strided((len(starts), *shape), (step, *strides), offset).unbind(0)


@dataclass
class LoraGroupBuffers:
    """One group's slot buffers (see the module docstring for the layout)."""

    A: Tensor  # [num_slots, n*R, in]; embed: [num_slots, vocab, R]
    B: Tensor  # [num_slots, N_total, R]
    scalings: Tensor  # [num_slots, n] float32
    slice_offsets: tuple[int, ...]  # len n+1: row offsets of each slice in B
    num_slices: int
    # a stacked group's layer of its stack, [N_total + num_slots*n*R, in]: the base weight in
    # rows :N_total, then A (which is a view of these rows); None when not stacked
    stack: Tensor | None = None


@dataclass
class HostGroup:
    """One group of one adapter, laid out like one slot of `LoraGroupBuffers`."""

    A: Tensor  # like LoraGroupBuffers.A[slot]
    B: Tensor  # like LoraGroupBuffers.B[slot]
    scalings: Tensor  # [n] float32


class HostAdapter:
    """One adapter in host memory, laid out like one pool slot.

    A group is None when the adapter targets none of its modules (in that layer): the upload
    zero-fills that group's slot instead of copying zeros from host memory. The per-group views
    (`layers`, `embed`, `lm_head`) are built on first use: an upload copies `flat` (and each of
    `stacks`) whole, so serving never builds them (each read would otherwise make hundreds of
    small tensor views in the serving process, each holding the GIL against the runner's
    launches).
    """

    def __init__(
        self,
        views: Callable[[], tuple[list[dict[str, HostGroup | None]], HostGroup | None,
                                  HostGroup | None]],
        rank: Tensor,
        nbytes: int,
        is_pinned: bool,
        flat: Tensor,
        flat_scalings: Tensor,
        lease: RowLease,
        stacks: dict[str, Tensor] | None = None,
    ) -> None:
        self._views_of = views
        self.rank = rank  # [1] int32
        self.nbytes = nbytes
        self.is_pinned = is_pinned
        # [slot numel] every group's A (but stacked groups') and B, laid out like one row of the
        # pool's slab
        self.flat = flat
        self.flat_scalings = flat_scalings  # [slot scalings] float32, like the scalings slab row
        # per stacked group, its A for every layer [num_layers, n*R, in], like one slot's rows
        # of the pool's stack
        self.stacks: dict[str, Tensor] = stacks if stacks is not None else {}
        # the HostRows row it lives in: returned when this copy is dropped, reused once
        # `lease`'s last upload event has completed
        self.lease = lease

    @cached_property
    def _views(
        self,
    ) -> tuple[list[dict[str, HostGroup | None]], HostGroup | None, HostGroup | None]:
        return self._views_of()

    @property
    def layers(self) -> list[dict[str, HostGroup | None]]:
        return self._views[0]

    @property
    def embed(self) -> HostGroup | None:
        return self._views[1]

    @property
    def lm_head(self) -> HostGroup | None:
        return self._views[2]


class RowLease:
    """A host copy's claim on its row (with the row's parts as views, carved once when the
    row was allocated, and where the row lies: chunk index and byte offset), and the event
    after the last upload from it (the row is reused only once that has completed)."""

    __slots__ = ("event", "parts", "row", "where")

    def __init__(self, row: Tensor, parts: tuple[Tensor, ...], where: tuple[int, int]) -> None:
        self.row = row
        self.parts = parts
        self.where = where
        self.event: Any = None  # runtime.streams.Event, or None before any upload

    def done(self) -> bool:
        return self.event is None or self.event.query()


# Pinned memory comes in chunks of up to this many bytes: the CUDA host allocator rounds every
# allocation up to a power of two, and pinning holds the driver's locks (the serving loop's
# launches and copies wait on them) for as long as it takes, in proportion to the bytes.
HOST_CHUNK_BYTES = 256 << 20
ROW_ALIGN = 256  # bytes: every row, and each of a row's parts, starts this aligned


def shared_chunk(nbytes: int, pin: bool, touch: bool = True) -> tuple[Tensor, int]:
    """`nbytes` of host memory in a memfd (so reader processes can map it from the fd; no
    /dev/shm size limit applies), registered with CUDA (pinned) when `pin`. The tensor and
    the fd; the mapping lives as long as the tensor. `touch=False` registers the pages
    untouched (benchmarks/pin_stall.py measures both)."""
    fd = os.memfd_create("loraserve-host-rows", os.MFD_CLOEXEC)
    os.ftruncate(fd, nbytes)
    chunk = torch.frombuffer(mmap.mmap(fd, nbytes), dtype=torch.uint8)
    if pin:
        if touch:
            # Fault the pages in first: registering untouched pages allocates them under the
            # driver's locks (145 against 75 ms for 256 MB on the H200, and it stalls other
            # threads' CUDA calls for as long).
            chunk.zero_()
        rc = torch.cuda.cudart().cudaHostRegister(chunk.data_ptr(), nbytes, 0)
        if int(rc) != 0:
            os.close(fd)
            raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed ({rc})")
    return chunk, fd


def _release_shared(ptrs: list[int], fds: list[int]) -> None:
    """Unregister the registered chunks (after every copy from them has run), close the fds."""
    if ptrs:
        torch.cuda.synchronize()
        for ptr in ptrs:
            torch.cuda.cudart().cudaHostUnregister(ptr)
    for fd in fds:
        os.close(fd)


class HostRows:
    """Recycled host rows of `row_bytes` bytes, pinned when `pin`, for the host copies.

    `take` returns a row, zeroed unless told otherwise; when the `HostAdapter` holding it is
    garbage (dropped from the host tier and no upload referring to it), its row returns to
    the free list, to be handed out again once the last upload from it has completed. Chunks
    grow with the number of rows in use (1, 1, 2, 4, ... rows, up to HOST_CHUNK_BYTES a chunk)
    or as `reserve` asks, and are never freed, so a host tier at its size makes no pinned
    allocation. When `shared`, chunks are memfd mappings (pinned by registering them with
    CUDA) whose fds reader processes map (`fds`). Thread-safe: loader threads take rows, and
    whichever thread drops a host copy gives its row back.
    """

    def __init__(
        self, row_bytes: int, pin: bool, carve: Callable[[Tensor], tuple[Tensor, ...]],
        shared: bool = False,
    ) -> None:
        self.row_bytes = -(-row_bytes // ROW_ALIGN) * ROW_ALIGN
        self.pin = pin
        self.shared = shared
        self.carve = carve  # a row's parts as views, made once a row (torch calls take the GIL)
        self.num_rows = 0  # rows allocated, in use or free
        self.chunk_bytes: list[int] = []
        self.fds: list[int] = []  # shared chunks' memfds, in chunk order
        self._registered: list[int] = []
        self._free: list[tuple[Tensor, tuple[Tensor, ...], tuple[int, int]]] = []
        self._draining: list[RowLease] = []  # given back, their last upload maybe in flight
        self._lock = threading.Lock()
        if shared:
            weakref.finalize(self, _release_shared, self._registered, self.fds)

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_bytes)

    def take(self, zero: bool = True) -> RowLease:
        """A free row (allocating a chunk if none is); `zero=False` when its filler zeroes it."""
        with self._lock:
            still = []
            for lease in self._draining:
                if lease.done():
                    self._free.append((lease.row, lease.parts, lease.where))
                else:
                    still.append(lease)
            self._draining = still
            if not self._free:
                self._grow()
            row, parts, where = self._free.pop()
        if zero:
            row.zero_()
        return RowLease(row, parts, where)

    def give(self, lease: RowLease) -> None:
        with self._lock:
            self._draining.append(lease)

    def shared_chunks(self) -> list[tuple[int, int]]:
        """(fd, bytes) of every shared chunk so far, in chunk order."""
        with self._lock:
            return list(zip(self.fds, self.chunk_bytes, strict=True))

    def reserve(self, rows: int) -> None:
        """Allocate rows until `rows` exist (in chunks of up to HOST_CHUNK_BYTES), so that a
        host tier of that many copies never allocates while serving."""
        with self._lock:
            while self.num_rows < rows:
                self._grow(rows - self.num_rows)

    def _grow(self, rows_wanted: int = 0) -> None:
        """Add a chunk: of `rows_wanted` rows when given, else of as many rows as exist (so
        the rows double), at most HOST_CHUNK_BYTES and at least one row."""
        want = (rows_wanted or max(1, self.num_rows)) * self.row_bytes
        cap = max(HOST_CHUNK_BYTES, self.row_bytes)
        nbytes = min(1 << max(want - 1, 1).bit_length(), cap)  # what the allocator would round to
        rows = max(1, nbytes // self.row_bytes)
        nbytes = rows * self.row_bytes
        if self.shared:
            chunk, fd = shared_chunk(nbytes, self.pin)
            self.fds.append(fd)
            if self.pin:
                self._registered.append(chunk.data_ptr())
        else:
            chunk = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        index = len(self.chunk_bytes)
        self._free += [
            (row, self.carve(row), (index, i * self.row_bytes))
            for i, row in enumerate(chunk.view(rows, self.row_bytes))
        ]
        self.num_rows += rows
        self.chunk_bytes.append(nbytes)


class LoraPool:
    """The fixed GPU slot buffers of every LoRA-targeted module.

    layers[l] holds only the groups with a module in `target_modules`; embed / lm_head are None
    unless targeted. slot_ranks[s] is the rank of the adapter in slot s (its max over modules).
    `stacked` names layer groups whose A lives in `stacks[group]` below room for the base
    weight (see the module docstring), in the pool's group order in `self.stacked`.
    """

    def __init__(
        self,
        shape: LoraModelShape,
        num_slots: int,
        max_rank: int,
        target_modules: Iterable[str],
        device: torch.device,
        dtype: torch.dtype,
        stacked: Iterable[str] = (),
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
        self._shared_rows = False  # see share_host_rows
        self.group_names = tuple(
            g for g, ms in GROUPS.items() if any(m in self.target_modules for m in ms)
        )
        wanted = set(stacked)
        not_groups = sorted(wanted - GROUPS.keys())
        if not_groups:
            raise ValueError(
                f"stacked: {not_groups} are not layer groups (those are {', '.join(GROUPS)})"
            )
        not_held = sorted(wanted - set(self.group_names))
        if not_held:
            raise ValueError(
                f"stacked: the pool holds no {not_held} group (no target module of it)"
            )
        self.stacked: tuple[str, ...] = tuple(g for g in self.group_names if g in wanted)
        # Slot-major: one row of `_slab` (and of `_slab_scalings`) holds a whole slot but its
        # stacked A rows, so an upload is one copy of a host buffer laid out the same way (and
        # one per stack); every group's A and B are views into it, [num_slots, ...] with the
        # slot stride of the slab.
        self._places: list[tuple[int, str]] = [
            (layer, g) for layer in range(shape.num_layers) for g in self.group_names
        ]
        self._places += [(GLOBAL_LAYER, g) for g in (EMBED, LM_HEAD) if g in self.target_modules]
        self._offsets: dict[tuple[int, str], tuple[int, int]] = {}
        numel = num_scalings = 0
        for place in self._places:
            _, b_shape, offsets = self._layouts[place[1]]
            self._offsets[place] = (numel, num_scalings)
            numel += self._slab_a_numel(place[1]) + b_shape[0] * b_shape[1]
            num_scalings += len(offsets) - 1
        self.slot_numel, self.slot_num_scalings = numel, num_scalings
        self._slab = torch.zeros((num_slots, numel), dtype=dtype, device=device)
        self._slab_scalings = torch.zeros(
            (num_slots, num_scalings), dtype=torch.float32, device=device
        )
        # [num_layers, N + num_slots * n*R, in] per stacked group: the base weight, then A
        self.stacks: dict[str, Tensor] = {}
        self._stack_a: dict[str, Tensor] = {}  # the A rows: [num_layers, num_slots, n*R, in]
        for g in self.stacked:
            (nR, K), (N, _), _ = self._layouts[g]
            stack = torch.zeros((shape.num_layers, N + num_slots * nR, K), dtype=dtype,
                                device=device)
            self.stacks[g] = stack
            self._stack_a[g] = stack[:, N:].unflatten(1, (num_slots, nR))
        self.layers: list[dict[str, LoraGroupBuffers]] = [
            {g: self._view(layer, g) for g in self.group_names} for layer in range(shape.num_layers)
        ]
        self.embed = self._view(GLOBAL_LAYER, EMBED) if EMBED in self.target_modules else None
        self.lm_head = self._view(GLOBAL_LAYER, LM_HEAD) if LM_HEAD in self.target_modules else None
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

    def _slab_a_numel(self, group: str) -> int:
        """Elements of a group's A in one slab row (and one layer): none for a stacked group,
        whose stack holds it."""
        if group in self.stacked:
            return 0
        a_shape = self._layouts[group][0]
        return a_shape[0] * a_shape[1]

    def _carve(
        self, flat: Tensor, flat_scalings: Tensor, layer: int, group: str,
        stack_a: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Views of one group's A, B and scalings in a slot-layout buffer: the slabs
        ([num_slots, ...] views) or one host copy (a single slot's views). A stacked group's A
        comes from `stack_a[group]`, its A for every layer: [num_layers, num_slots, n*R, in] in
        the stacks, [num_layers, n*R, in] in a host copy."""
        a_shape, b_shape, offsets = self._group_layout(group)
        pos, spos = self._offsets[(layer, group)]
        na, nb, ns = self._slab_a_numel(group), b_shape[0] * b_shape[1], len(offsets) - 1
        lead = flat.shape[:-1]
        if group in self.stacked:
            assert stack_a is not None, f"{group} is stacked: its A is not in the slab"
            A = stack_a[group][layer]
        else:
            A = flat[..., pos : pos + na].view(*lead, *a_shape)
        return (
            A,
            flat[..., pos + na : pos + na + nb].view(*lead, *b_shape),
            flat_scalings[..., spos : spos + ns],
        )

    def _view(self, layer: int, group: str) -> LoraGroupBuffers:
        """The group's buffers as views of the slabs (and of its stack when stacked)."""
        A, B, scalings = self._carve(self._slab, self._slab_scalings, layer, group, self._stack_a)
        offsets = self._group_layout(group)[2]
        stack = self.stacks[group][layer] if group in self.stacks else None
        return LoraGroupBuffers(A, B, scalings, offsets, len(offsets) - 1, stack)

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
        """Bytes of the host copy of an adapter (any targets): a whole slot, so that its
        upload is one copy (groups it does not target stay zero, with scaling 0)."""
        del targets
        return self.slot_nbytes

    @cached_property
    def slot_stack_numel(self) -> int:
        """Elements of one slot's A rows in all stacks (every layer)."""
        return sum(self.shape.num_layers * self._layouts[g][0][0] * self._layouts[g][0][1]
                   for g in self.stacked)

    @cached_property
    def slot_nbytes(self) -> int:
        """Bytes of one slot across all buffers, stacks included (and of one adapter's host
        copy). Fixed once the pool is built: cached, as every adapter load asks for it on the
        serving loop."""
        elem = self.dtype.itemsize
        return 4 + elem * (self.slot_numel + self.slot_stack_numel) + 4 * self.slot_num_scalings

    # base weights -------------------------------------------------------------------------

    @torch.no_grad()
    def adopt_base_weights(self, linears: Sequence[Mapping[str, torch.nn.Module]]) -> None:
        """Move every stacked group's base weight into the top rows of its stack: linears[l][g]
        is layer l's bias-free nn.Linear of group g (weight [N, in]), whose weight is copied
        into stacks[g][l, :N] and becomes that view (same values, so the linear's output is
        unchanged; its old storage is dropped). A weight on the meta device has no values to
        copy: it just becomes the view, for the checkpoint to be loaded into in place (the
        engine releases them so before the stacks are allocated, so that the GPU never holds a
        second copy of them). Raises ValueError, naming the group and layer, for a missing
        linear, a bias, or a weight of another shape or dtype than the stack; nothing moves
        then."""
        if self.stacked and len(linears) != self.shape.num_layers:
            raise ValueError(f"adopt_base_weights: {len(linears)} layers of linears, the pool "
                             f"has {self.shape.num_layers}")
        moves: list[tuple[torch.nn.Module, Tensor]] = []
        for g in self.stacked:
            n = self._layouts[g][1][0]
            for layer in range(self.shape.num_layers):
                where = f"stacked group {g}, layer {layer}"
                if g not in linears[layer]:  # (an nn.ModuleDict has no `get`)
                    raise ValueError(f"{where}: no base linear given")
                module = linears[layer][g]
                if getattr(module, "bias", None) is not None:
                    raise ValueError(f"{where}: the base linear has a bias (only bias-free "
                                     "projections can be stacked)")
                weight, top = module.weight, self.stacks[g][layer, :n]
                if (weight.shape, weight.dtype) != (top.shape, top.dtype):
                    raise ValueError(
                        f"{where}: base weight {tuple(weight.shape)} {weight.dtype}, the stack "
                        f"holds {tuple(top.shape)} {top.dtype}"
                    )
                moves.append((module, top))
        for module, top in moves:
            if not module.weight.is_meta:
                top.copy_(module.weight)
            module.weight = torch.nn.Parameter(top, requires_grad=False)

    # host copies --------------------------------------------------------------------------

    @cached_property
    def _layouts(self) -> dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, ...]]]:
        """`_group_layout` of every group, computed once (host copies read it often)."""
        return {g: self._group_layout(g) for g in (*GROUPS, EMBED, LM_HEAD)}

    def build_host(self, weights: AdapterWeights) -> HostAdapter:
        """Lay `weights` out like one slot row of the slabs, in pinned memory when the pool is
        on CUDA. Runs in a loader thread, whose every torch call takes the GIL from the serving
        loop: so views come for all layers at once, and one batched copy writes (and casts)
        every weight."""
        lease = self._host_rows.take()
        try:
            self.write_host_row(weights, lease.parts)
            return self.adopt_host_row(lease, set(weights.modules))
        except BaseException:
            self._host_rows.give(lease)  # never uploaded from: free at once
            raise

    @property
    def pins_host_rows(self) -> bool:
        """Whether host copies live in pinned memory (on CUDA)."""
        return self.device.type == "cuda"

    def reserve_host_rows(self, rows: int) -> int:
        """Allocate (pin, on CUDA) `rows` host rows now and return the bytes of all rows:
        pinning while serving holds the driver's locks, stalling the serving threads'
        launches and copies."""
        self._host_rows.reserve(rows)
        return self._host_rows.num_rows * self._host_rows.row_bytes

    @property
    def host_row_bytes(self) -> int:
        """Bytes of one host copy's row (its parts aligned)."""
        return self._host_rows.row_bytes

    @cached_property
    def _host_rows(self) -> HostRows:
        """Rows laid out as the weights (the slab row's part), each stacked group's A
        [num_layers, n*R, in], the scalings, then the rank, each part ROW_ALIGN-aligned."""
        def aligned(nbytes: int) -> int:
            return -(-nbytes // ROW_ALIGN) * ROW_ALIGN

        item = self.dtype.itemsize
        at_stacks = at = aligned(item * self.slot_numel)
        regions: list[tuple[str, int, tuple[int, int, int]]] = []
        for g in self.stacked:
            (nR, K) = self._layouts[g][0]
            regions.append((g, at, (self.shape.num_layers, nR, K)))
            at += aligned(item * self.shape.num_layers * nR * K)
        at_scalings = at
        at_rank = at_scalings + aligned(4 * self.slot_num_scalings)

        def carve(row: Tensor) -> tuple[Any, ...]:
            flat = row[:at_stacks].view(self.dtype)[: self.slot_numel]
            scalings = row[at_scalings:at_rank].view(torch.float32)[: self.slot_num_scalings]
            rank = row[at_rank : at_rank + 4].view(torch.int32)
            stacks = {
                g: row[pos : pos + item * L * nR * K].view(self.dtype).view(L, nR, K)
                for g, pos, (L, nR, K) in regions
            }
            return flat, scalings, rank, (flat.storage_offset(), scalings.storage_offset()), stacks

        return HostRows(at_rank + 4, pin=self.pins_host_rows, carve=carve,
                        shared=self._shared_rows)

    def take_host_row(self) -> RowLease:
        """A host row for a reader process to fill (it zeroes the row itself); hand it to
        `adopt_host_row` once filled, or back to `give_host_row`."""
        return self._host_rows.take(zero=False)

    def give_host_row(self, lease: RowLease) -> None:
        self._host_rows.give(lease)

    def share_host_rows(self) -> None:
        """Keep host rows in memfd chunks that reader processes map (`host_row_fds`): call it
        before the first host copy."""
        assert "_host_rows" not in self.__dict__, "the host rows exist already"
        self._shared_rows = True

    def host_row_fds(self) -> list[tuple[int, int]]:
        """(fd, bytes) of every shared chunk so far, in chunk order."""
        return self._host_rows.shared_chunks()

    def carve_host_row(self, row: Tensor) -> tuple[Any, ...]:
        """A row's parts (`RowLease.parts`), for a reader process's own mapping of it."""
        return self._host_rows.carve(row)

    def write_host_row(self, weights: AdapterWeights, parts: tuple[Any, ...]) -> None:
        """Write `weights` (every weight, the scalings, the rank) into a zeroed row's parts."""
        flat, flat_scalings, rank, bases, stacks = parts
        scalings = [0.0] * self.slot_num_scalings
        views: dict[tuple[str, int, int], tuple[tuple[Tensor, ...], tuple[Tensor, ...]]] = {}
        dsts: list[Tensor] = []
        srcs: list[Tensor] = []
        for (layer, module), w in weights.modules.items():
            group, i = _group_slice(module)
            if (layer, group) not in self._offsets:
                continue  # a group this pool does not hold
            if (group, i, w.rank) not in views:
                views[(group, i, w.rank)] = self._slice_views(
                    flat, bases[0], stacks, group, i, w.rank
                )
            A, B = views[(group, i, w.rank)]
            dsts += (A[max(layer, 0)], B[max(layer, 0)])
            srcs += (w.A.t() if module == EMBED else w.A, w.B)
            scalings[self._offsets[(layer, group)][1] + i] = w.scaling
        if dsts:  # one call for every copy (and cast); it refuses empty lists
            torch._foreach_copy_(dsts, srcs)
        flat_scalings.copy_(torch.tensor(scalings, dtype=torch.float32))
        rank.fill_(weights.rank)

    def adopt_host_row(self, lease: RowLease, modules: set[tuple[int, str]]) -> HostAdapter:
        """The host copy in `lease`'s filled row, of an adapter of `modules` ((layer, module)
        keys); its row is given back when the copy is garbage."""
        flat, flat_scalings, rank, bases, stacks = lease.parts
        nbytes = flat.nbytes + flat_scalings.nbytes + rank.nbytes
        nbytes += sum(a.nbytes for a in stacks.values())
        views = partial(self._host_views, flat, flat_scalings, bases, stacks, modules)
        host = HostAdapter(views, rank, nbytes, self.pins_host_rows, flat, flat_scalings, lease,
                           stacks)
        weakref.finalize(host, self._host_rows.give, lease)
        return host

    def _host_views(
        self, flat: Tensor, flat_scalings: Tensor, bases: Any, stacks: dict[str, Tensor],
        modules: set[tuple[int, str]],
    ) -> tuple[list[dict[str, HostGroup | None]], HostGroup | None, HostGroup | None]:
        """A host copy's per-group views (HostAdapter.layers, embed, lm_head)."""
        layers: list[dict[str, HostGroup | None]] = [
            dict.fromkeys(self.group_names) for _ in range(self.shape.num_layers)
        ]
        embed = lm_head = None
        groups: dict[str, list[HostGroup]] = {}
        for layer, g in self._host_groups(modules):
            if g not in groups:
                groups[g] = self._group_views(flat, flat_scalings, bases, stacks, g)
            host = groups[g][max(layer, 0)]
            if g == EMBED:
                embed = host
            elif g == LM_HEAD:
                lm_head = host
            else:
                layers[layer][g] = host
        return layers, embed, lm_head

    def _places_of(self, group: str) -> list[tuple[int, str]]:
        if group in (EMBED, LM_HEAD):
            return [(GLOBAL_LAYER, group)]
        return [(layer, group) for layer in range(self.shape.num_layers)]

    def _slice_views(
        self, flat: Tensor, base: int, stacks: dict[str, Tensor], group: str, i: int, rank: int
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Where a module of rank `rank` goes as slice i of `group` in a host copy's `flat`
        (`base` elements into its storage) and `stacks`, one view per layer (one in all for
        embed / lm_head): A [rank, in] (embed: [vocab, rank], A transposed) and B [out, rank]."""
        R = self.max_rank
        (a_rows, a_cols), _, offsets = self._layouts[group]
        starts = [self._offsets[p][0] for p in self._places_of(group)]
        b_at = self._slab_a_numel(group) + offsets[i] * R
        B = _strided_views(
            flat, base, starts, b_at, (offsets[i + 1] - offsets[i], rank), (R, 1)
        )
        if group == EMBED:  # [vocab, rank]: the lookup gathers rows by token id
            return _strided_views(flat, base, starts, 0, (a_rows, rank), (R, 1)), B
        if group in self.stacked:  # [num_layers, n*R, in]
            return stacks[group][:, i * R : i * R + rank].unbind(0), B
        A = _strided_views(flat, base, starts, i * R * a_cols, (rank, a_cols), (a_cols, 1))
        return A, B

    def _group_views(
        self, flat: Tensor, flat_scalings: Tensor, bases: tuple[int, int],
        stacks: dict[str, Tensor], group: str,
    ) -> list[HostGroup]:
        """A group's views in a host copy (as `_carve` gives them), one per layer (one in all
        for embed / lm_head)."""
        a_shape, b_shape, offsets = self._layouts[group]
        places = self._places_of(group)
        starts = [self._offsets[p][0] for p in places]
        scaling_starts = [self._offsets[p][1] for p in places]
        if group in self.stacked:
            As = stacks[group].unbind(0)
        else:
            As = _strided_views(flat, bases[0], starts, 0, a_shape, (a_shape[1], 1))
        b_at = self._slab_a_numel(group)
        return [
            HostGroup(*views)
            for views in zip(
                As,
                _strided_views(flat, bases[0], starts, b_at, b_shape, (b_shape[1], 1)),
                _strided_views(
                    flat_scalings, bases[1], scaling_starts, 0, (len(offsets) - 1,), (1,)
                ),
                strict=True,
            )
        ]

    # uploads ------------------------------------------------------------------------------

    def slot_copies(self, slot: int, host: HostAdapter) -> list[tuple[Tensor, Tensor | None]]:
        """(destination, source) pairs that write `host` into `slot`: the rank, the slot's row
        of the weight slab, its row of the scalings slab, then per stacked group the slot's A
        rows of every layer ([num_layers, n*R, in], strided: on CUDA the copy stages through a
        contiguous device buffer, all on the current stream). Issue them on the copy stream."""
        copies: list[tuple[Tensor, Tensor | None]] = [
            (self.slot_ranks[slot : slot + 1], host.rank),
            (self._slab[slot], host.flat),
            (self._slab_scalings[slot], host.flat_scalings),
        ]
        for g in self.stacked:
            copies.append((self._stack_a[g][:, slot], host.stacks[g]))
        return copies
