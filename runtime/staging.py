"""Step inputs to the device in one copy.

A step needs a dozen small integer arrays on the device (token ids, positions, KV slots, block
tables, the LoRA tables). Sent one by one, each costs a pinned allocation, a copy launch and
several releases of the GIL, which the serving loop's thread pays for every step (and waits on
whenever adapter loader threads hold the GIL). `StagingRing` writes them all into one pinned
host buffer with numpy, sends that with one non-blocking copy on the current stream, and returns
views of the device buffer.

Buffers rotate through `depth` slots: a host slot is written again only after the event of its
last copy has completed, and a device slot only after the work enqueued behind that copy (the
step that read it) has run, as the stream orders it. Steps keep their views for as long as the
work they enqueue, never across `depth` later steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from runtime.streams import Event

# Bytes: every field starts where a kernel's pointer counts as aligned (Triton compiles a
# variant per pointer alignment, so a field at an odd 8-byte offset would compile another).
ALIGN = 16
_TORCH_DTYPES = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64}


class _Slots:
    """`depth` buffer slots taken in turn, each with the event of the work that last used it:
    a slot is taken again only once that work has run (a no-op off CUDA, where work is done by
    the time it is enqueued)."""

    def __init__(self, device: torch.device, depth: int) -> None:
        self.device = device
        self.depth = depth
        self._pin = device.type == "cuda"
        self._events: list[Event | None] = [None] * depth
        self._next = 0

    def _take_slot(self) -> int:
        """The next slot, once the work that last used it has run (long done in practice)."""
        k = self._next
        self._next = (k + 1) % self.depth
        if self._events[k] is not None:
            self._events[k].synchronize()
        return k

    def record_use(self, slot: int) -> None:
        """Mark `slot` in use by the work enqueued so far on the current stream: it is taken
        again only after that work has run (a no-op off CUDA)."""
        if self._pin:
            event = self._events[slot] or Event(self.device)
            event.record()
            self._events[slot] = event


class StagingRing(_Slots):
    """One host-to-device copy a step for all of its integer inputs.

    device: where the views live (on CPU the "copy" is a memcpy into a separate buffer, so the
    views never alias the host buffer that a later step rewrites). depth: buffer pairs in
    rotation. capacity: starting bytes a slot (a bigger step grows that slot).
    """

    def __init__(self, device: torch.device, depth: int = 4, capacity: int = 1 << 16) -> None:
        assert depth >= 2, "a step's buffers must outlive the next step's writes"
        super().__init__(device, depth)
        self._host: list[torch.Tensor] = []
        self._dev: list[torch.Tensor] = []
        for _ in range(depth):
            host, dev = self._new_slot(capacity)
            self._host.append(host)
            self._dev.append(dev)
        self.last_slot = 0  # the slot the latest stage() wrote
        self.copies = 0  # host-to-device copies issued (tests count them)

    def _new_slot(self, nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A (host, device) buffer pair. Never inference tensors, wherever a slot grows: the
        ring writes them in place on every step, inside inference mode or out of it."""
        with torch.inference_mode(False):
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pin)
            return host, torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def stage(
        self, fields: Sequence[tuple[Sequence[int] | np.ndarray, np.dtype | type]],
        copy: bool = True,
    ) -> list[torch.Tensor]:
        """Each (values, dtype) field as a device tensor of that dtype (int32 or int64) and the
        values' shape (a list is 1-D), all sent in one copy on the current stream.

        copy=False: no copy; the views are of the slot's pinned host buffer, for a kernel that
        reads mapped host memory (ops/triton_graph_inputs.py). The caller then calls
        `record_use(self.last_slot)` once that kernel is enqueued: the slot is written again
        only after it has run.

        The buffer holds one region a dtype, each field padded to ALIGN bytes, so the device
        views come from one split a region: a handful of torch calls a step, whatever the
        number of fields (each call releases the GIL the serving loop then waits to get back).
        """
        arrays = [np.asarray(v, dtype=dt) for v, dt in fields]
        regions = []  # (torch dtype, byte offset, split sizes in elements, field indices)
        end = 0
        for np_dtype, dtype in _TORCH_DTYPES.items():
            members = [i for i, a in enumerate(arrays) if a.dtype == np_dtype]
            if not members:
                continue
            per_align = ALIGN // np_dtype.itemsize
            sizes = []
            for i in members:
                n = arrays[i].size
                sizes += [n, -n % per_align]
            regions.append((dtype, end, sizes, members))
            end += sum(sizes) * np_dtype.itemsize
        assert sum(len(r[3]) for r in regions) == len(arrays), "fields must be int32 or int64"
        k = self._take_slot()
        if end > self._host[k].numel():
            size = 1 << max(end - 1, 1).bit_length()
            self._host[k], self._dev[k] = self._new_slot(size)
        host_np = self._host[k].numpy()
        for _, offset, sizes, members in regions:
            for i, at in zip(members, np.cumsum([0, *sizes])[::2], strict=False):
                a = arrays[i]
                host_np[offset + at * a.itemsize : offset + (at + a.size) * a.itemsize].view(
                    a.dtype
                )[:] = a.reshape(-1)
        self.last_slot = k
        # the views' buffer: the device slot after one copy, or (copy=False) the host slot, whose
        # record_use(k) the caller makes after the kernel that reads it
        base = self._dev[k] if copy else self._host[k]
        if copy:
            if end:
                base[:end].copy_(self._host[k][:end], non_blocking=self._pin)
                self.copies += 1
            self.record_use(k)
        out: list[torch.Tensor] = [base] * len(arrays)
        for dtype, offset, sizes, members in regions:
            nbytes = sum(sizes) * dtype.itemsize
            parts = base[offset : offset + nbytes].view(dtype).split_with_sizes(sizes)
            for i, part in zip(members, parts[::2], strict=True):
                out[i] = part if arrays[i].ndim == 1 else part.view(arrays[i].shape)
        return out


class ResultRing(_Slots):
    """Pinned host buffers that kernels write a step's results into (ops/triton_host_write.py),
    in `depth` slots: a slot is handed out again only after the event recorded behind its last
    writes has completed, so a step's host views stay valid until `depth` later steps have
    taken slots (the engine reads a step's results before it launches the one after next).
    Owned here rather than taken from torch's pinned allocator, which does not know that a
    kernel writes its blocks and could hand one out again while a write is in flight."""

    def __init__(self, device: torch.device, depth: int = 4, capacity: int = 1 << 12) -> None:
        assert depth >= 3, "a step's results are read after the next step has taken a slot"
        super().__init__(device, depth)
        self._host = [self._new(capacity) for _ in range(depth)]

    def _new(self, nbytes: int) -> torch.Tensor:
        with torch.inference_mode(False):
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pin)

    def take(self, like: Sequence[torch.Tensor]) -> tuple[int, list[torch.Tensor]]:
        """The next slot and, carved from it, one host tensor of each tensor's shape and dtype
        (each at an ALIGN-byte offset). The caller enqueues the writes into them, then
        `record_use(slot)`."""
        k = self._take_slot()
        offsets, end = [], 0
        for t in like:
            offsets.append(end)
            end += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        if end > self._host[k].numel():
            self._host[k] = self._new(1 << max(end - 1, 1).bit_length())
        buf = self._host[k]
        out = [buf[at : at + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
               for t, at in zip(like, offsets, strict=True)]
        return k, out
