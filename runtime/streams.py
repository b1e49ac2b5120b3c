"""CUDA streams and events behind a thin wrapper that is a no-op on CPU.

The engine runs forward passes on a compute stream and adapter uploads on a copy stream; with
LORASERVE_READBACK_KERNEL=0 each step's results go back to the host on a readback stream (by
default a kernel on the compute stream writes them). Events order them on the GPU. On CPU
every operation is synchronous, so the same code paths run in CI: events are always complete
and waits do nothing.

Only `Event.synchronize` blocks the calling thread (for shutdown and tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class Event:
    """A point in a stream's work. On CPU it is always complete."""

    def __init__(self, device: torch.device) -> None:
        self._event = torch.cuda.Event() if device.type == "cuda" else None
        self._device = device

    def record(self, stream: torch.cuda.Stream | None = None) -> None:
        """Mark the current end of `stream`'s work (default: the current stream)."""
        if self._event is not None:
            self._event.record(stream or torch.cuda.current_stream(self._device))

    def query(self) -> bool:
        """True when all work recorded before this event has finished. Never blocks."""
        return self._event is None or self._event.query()

    def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make `stream` (default: the current stream) wait for this event, GPU-side."""
        if self._event is not None:
            (stream or torch.cuda.current_stream(self._device)).wait_event(self._event)

    def synchronize(self) -> None:
        """Block the calling thread until the event completes (shutdown and tests only)."""
        if self._event is not None:
            self._event.synchronize()


class IssuedEvent:
    """The ready event of work issued later (adapter uploads waiting for the next poll or
    admission): incomplete until the issuer has recorded an event and set it here (a batch of
    uploads shares one), and never complete when the work failed. Loop-thread only."""

    def __init__(self) -> None:
        self.event: Event | None = None
        self.failed = False
        self.issued = False

    def set_issued(self, event: Event | None, failed: bool = False) -> None:
        """Called by the issuer with the event it recorded, or after the work failed."""
        self.event, self.failed, self.issued = event, failed, True

    def query(self) -> bool:
        return self.issued and not self.failed and self.event is not None and self.event.query()

    def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """As Event.wait; only once issued (before, there is nothing recorded to wait on)."""
        assert self.issued and not self.failed and self.event is not None, (
            "waiting on work not issued")
        self.event.wait(stream)

    def synchronize(self) -> None:
        """As Event.synchronize; only once issued (nothing else would ever issue it)."""
        assert self.issued and not self.failed and self.event is not None, (
            "waiting on work not issued")
        self.event.synchronize()


class Streams:
    """The engine's streams: `compute` (forward passes), `copy` (adapter uploads) and
    `readback` (each step's results copied to the host when the kernel readback is off, so
    the next step's kernels do not queue behind the copy engine).

    All are None on CPU, where `use(None)` is a no-op context.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.compute: torch.cuda.Stream | None = None
        self.copy: torch.cuda.Stream | None = None
        self.readback: torch.cuda.Stream | None = None
        if self.is_cuda:
            self.compute = torch.cuda.Stream(device)
            self.copy = torch.cuda.Stream(device)
            self.readback = torch.cuda.Stream(device)

    def event(self) -> Event:
        """A new, unrecorded event on this device."""
        return Event(self.device)

    @contextlib.contextmanager
    def use(self, stream: torch.cuda.Stream | None) -> Iterator[None]:
        """Make `stream` current inside the block (no-op for None)."""
        if stream is None:
            yield
            return
        with torch.cuda.stream(stream):
            yield
