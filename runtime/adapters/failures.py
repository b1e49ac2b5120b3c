"""On-demand adapter names whose load failed, remembered for a short while.

With lora_resolve_on_demand, a request naming an unknown adapter resolves `<root>/<name>` and
reads its config on the one metadata thread that every load's config read waits for. A folder
whose load failed (a config whose regular expression runs out its 1 s budget, truncated
weights) was read again for every request naming it: whoever can write in a root could make
each request cost that thread a second, starving every other load. So the error is answered
again without a read while the folder and its adapter files are unchanged (the same stat
signature), for FAILURE_MEMORY_S at most.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from runtime.adapters.peft_format import BIN_FILE, CONFIG_FILE, SAFETENSORS_FILE, AdapterError

# How long a failure stands while its folder is unchanged: long enough that a name requested
# over and over is read once in that while, short enough that a fix the signature misses (on a
# file system whose times are coarse) is seen soon.
FAILURE_MEMORY_S = 30.0
MAX_REMEMBERED_FAILURES = 1024  # names; the least recently failed are forgotten first

# (mtime_ns, size, inode) of the folder and of each adapter file in it (None: missing)
Signature = tuple[tuple[int, int, int] | None, ...]


def folder_signature(folder: str) -> Signature:
    """The stat signature of `folder`: replacing, editing or adding an adapter file changes it.
    Blocking (a few stats): call it from a worker thread."""
    return (_stat(folder), *files_signature(folder))


def files_signature(folder: str) -> Signature:
    """The stat signature of the adapter files in `folder` (not of the folder itself, whose
    time changes with any file added beside them): rewriting, replacing, adding or removing
    one changes it. Blocking (a few stats): call it from a worker thread."""
    return tuple(_stat(os.path.join(folder, f)) for f in (CONFIG_FILE, SAFETENSORS_FILE,
                                                          BIN_FILE))


def signature_digest(signature: Signature) -> int:
    """A signature as one non-negative int64 (56 bits), to send to other ranks: inode numbers
    may not fit an int64 themselves."""
    return int.from_bytes(hashlib.blake2b(repr(signature).encode(), digest_size=7).digest(),
                          "little")


def _stat(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@dataclass(frozen=True)
class _Failure:
    folder: str
    signature: Signature
    message: str
    at: float  # time.monotonic() when it failed


class FailedLoads:
    """The failures remembered, by name, least recently failed first. The loop and the
    metadata thread both use it: a lock guards it."""

    def __init__(self) -> None:
        self._failures: OrderedDict[str, _Failure] = OrderedDict()
        self._lock = threading.Lock()

    def error(self, name: str, folder: str, signature: Signature) -> AdapterError | None:
        """The error remembered for `name`, while it stands for `folder` as it is now
        (`signature`); None: load it."""
        with self._lock:
            failure = self._failures.get(name)
            if failure is None:
                return None
            is_old = time.monotonic() - failure.at >= FAILURE_MEMORY_S
            if is_old or (failure.folder, failure.signature) != (folder, signature):
                del self._failures[name]
                return None
            return AdapterError(failure.message)

    def remember(self, name: str, folder: str, signature: Signature,
                 error: AdapterError) -> None:
        """Remember that `name`, from `folder` as `signature` found it before the read, failed
        with `error`. Only a plain AdapterError (the adapter is refused): a full host tier
        and the machine's read errors (AdapterReadError: EIO, a stale handle...) pass, and a
        missing folder costs no read."""
        if type(error) is not AdapterError:
            return
        with self._lock:
            self._failures.pop(name, None)
            self._failures[name] = _Failure(folder, signature, str(error), time.monotonic())
            while len(self._failures) > MAX_REMEMBERED_FAILURES:
                self._failures.popitem(last=False)

    def forget(self, name: str) -> None:
        """An explicit load of `name`: the next on-demand request reads its folder again."""
        with self._lock:
            self._failures.pop(name, None)
