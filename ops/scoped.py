"""A per-thread setting that holds inside a `with` block: the forward paths a CUDA graph capture
takes (LoRA folds, programmatic dependent launch) are set around the capture and read by the
kernel wrappers deep inside it."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class ThreadSetting(Generic[T]):
    """`get()` is `default` outside `set(value)` blocks, else the innermost block's value (per
    thread)."""

    def __init__(self, default: T) -> None:
        self._local = threading.local()
        self._default = default

    def get(self) -> T:
        return getattr(self._local, "value", self._default)

    @contextlib.contextmanager
    def set(self, value: T) -> Iterator[None]:
        before = self.get()
        self._local.value = value
        try:
            yield
        finally:
            self._local.value = before
