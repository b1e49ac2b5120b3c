"""Errors the engine raises to its callers. The HTTP layer maps each to a status code."""

from __future__ import annotations

from runtime.request import ValidationError

__all__ = [
    "AdapterError",
    "AdapterReadError",
    "EngineStoppedError",
    "HostTierFullError",
    "QueueFullError",
    "UnknownAdapterError",
    "ValidationError",
]


class AdapterError(ValueError):
    """An adapter operation failed: bad files, incompatible with the pool, name in use..."""


class AdapterReadError(AdapterError):
    """An adapter's files could not be read for the machine's reasons, not the adapter's (an
    I/O error, a stale network handle, no memory or file handles left): HTTP 503, and an
    on-demand load's failure memory (runtime.adapters.failures) does not keep it."""


class HostTierFullError(AdapterError):
    """The host adapter tier has no room that can be freed now (pinned adapters, uploads and
    adapters that queued requests need hold it)."""


class UnknownAdapterError(AdapterError):
    """A request or unload names an adapter that is not registered, or is being unloaded
    (HTTP 404 for models). `name`: the adapter's name."""

    def __init__(self, message: str, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


class QueueFullError(RuntimeError):
    """`max_queued_requests` requests are already waiting (HTTP 503 with Retry-After)."""


class EngineStoppedError(RuntimeError):
    """The engine is draining or stopped and takes no new requests (HTTP 503)."""
