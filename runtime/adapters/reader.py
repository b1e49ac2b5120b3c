"""Adapter reads in child processes, off the serving process's GIL.

A read (parse and validate the PEFT files, convert the weights, lay them out in a host row) is
some thousands of small Python and torch calls. In a thread of the serving process each of them
holds the GIL against the runner thread, whose every kernel launch gives the GIL up and must
wait to get it back, and against the event loop. So, on CUDA, host rows live in memfd chunks
(`HostRows(shared=True)`) that reader processes map, and a read is one message each way: the
adapter's path and its row's place go out; the child zeroes and fills the row, and sends back
the adapter's rank, target modules and (layer, module) keys, or the error that names what is
wrong with it. The serving process then only makes the host copy's views.

A reader that dies (killed, out of memory) while reading fails that read with an AdapterError and
is replaced; one found dead while idle is replaced before the next read. Other reads and the
server go on.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import queue
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

import torch

from runtime.adapters.peft_format import AdapterError, load_peft_adapter
from runtime.adapters.pool import HostAdapter, LoraModelShape, LoraPool
from runtime.errors import AdapterReadError

READER_THREADS = 2  # torch intra-op threads of a reader (conversions of large adapters)
STOP_TIMEOUT_S = 5.0


@dataclass
class _Reader:
    proc: subprocess.Popen[bytes]
    conn: Connection
    chunks_sent: int = 0  # shared chunks whose fds it has


class ProcessReader:
    """`workers` reader processes filling `pool`'s shared host rows (see the module doc).
    `read` blocks: call it from a loader thread, at most `workers` at once usefully.

    Readers are plain `python -c` children joined by a socket pair, not multiprocessing's
    spawn: spawn re-runs the parent's main script in the child, which a script that builds an
    engine at top level (no `if __name__ == "__main__"` guard) would then do again."""

    def __init__(self, pool: LoraPool, shape: LoraModelShape, workers: int = 2) -> None:
        self.pool = pool
        # the layout of `pool`'s host rows: the readers' own pools are built from it
        self._spec = (shape, pool.max_rank, tuple(sorted(pool.target_modules)),
                      str(pool.dtype).removeprefix("torch."), pool.stacked)
        self._idle: queue.SimpleQueue[_Reader] = queue.SimpleQueue()
        self._all: list[_Reader] = []
        self.restarts = 0
        for _ in range(workers):
            self._idle.put(self._start())

    def _start(self) -> _Reader:
        ours, theirs = socket.socketpair()
        code = (f"import sys; sys.path[:0] = {sys.path!r}; "
                f"from runtime.adapters.reader import _main; _main({theirs.fileno()})")
        try:
            proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(theirs.fileno(),),
                                    stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        conn.send(self._spec)
        reader = _Reader(proc, conn)
        self._all.append(reader)
        return reader

    def read(self, path: str) -> tuple[HostAdapter, int, frozenset[str]]:
        """Read the adapter at `path` into a host row: (host copy, rank, target modules).
        Raises AdapterError, naming what is wrong, for a bad adapter or a failed reader."""
        reader = self._idle.get()
        if reader.proc.poll() is not None:  # died while idle: this read need not fail for it
            reader = self._replace(reader)
        lease = self.pool.take_host_row()
        try:
            try:
                self._send_chunks(reader)
                reader.conn.send(("read", path, *lease.where))
                reply = reader.conn.recv()
            except (EOFError, OSError) as e:
                reader = self._replace(reader)
                raise AdapterError(
                    f"cannot read adapter at {path}: its reader process failed ({e!r})"
                ) from None
            if reply[0] == "error":
                raise (AdapterReadError if reply[2] else AdapterError)(reply[1])
        except BaseException:
            self.pool.give_host_row(lease)
            raise
        finally:
            self._idle.put(reader)
        _, rank, targets, keys = reply
        return self.pool.adopt_host_row(lease, set(keys)), rank, targets

    def _send_chunks(self, reader: _Reader) -> None:
        """Pass the reader the fds of the shared chunks it has not mapped yet."""
        for fd, nbytes in self.pool.host_row_fds()[reader.chunks_sent :]:
            reader.conn.send(("chunk", nbytes))
            reduction.send_handle(reader.conn, fd, reader.proc.pid)
            reader.chunks_sent += 1

    def _replace(self, reader: _Reader) -> _Reader:
        reader.proc.kill()
        reader.proc.wait(STOP_TIMEOUT_S)
        reader.conn.close()
        self._all.remove(reader)
        self.restarts += 1
        return self._start()

    def pids(self) -> list[int]:
        return [r.proc.pid for r in self._all]

    def close(self) -> None:
        for reader in self._all:
            with contextlib.suppress(OSError):
                reader.conn.send(("stop",))
        for reader in self._all:
            try:
                reader.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                reader.proc.kill()
                reader.proc.wait(STOP_TIMEOUT_S)
            reader.conn.close()
        self._all.clear()


def _main(fd: int) -> None:
    """A reader process's entry: its settings come first over the socket."""
    conn = Connection(fd)
    try:
        spec = conn.recv()
    except (EOFError, OSError):
        return
    _serve(conn, spec)


def _serve(conn: Connection, spec: tuple[Any, ...]) -> None:
    """A reader process: map chunks as their fds come, fill rows as reads come."""
    shape, max_rank, targets, dtype, stacked = spec
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is the server's to handle
    torch.set_num_threads(READER_THREADS)
    # Layout only: on the meta device the pool allocates nothing.
    pool = LoraPool(shape, 1, max_rank, targets, torch.device("meta"), getattr(torch, dtype),
                    stacked)
    row_bytes = pool.host_row_bytes
    chunks: list[torch.Tensor] = []
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the server has gone
        if msg[0] == "stop":
            return
        if msg[0] == "chunk":
            fd = reduction.recv_handle(conn)
            chunks.append(torch.frombuffer(mmap.mmap(fd, msg[1]), dtype=torch.uint8))
            os.close(fd)  # the mapping stays
            continue
        _, path, index, offset = msg
        try:
            row = chunks[index][offset : offset + row_bytes]
            row.zero_()
            weights = load_peft_adapter(path, shape, getattr(torch, dtype))
            pool.write_host_row(weights, pool.carve_host_row(row))
            reply: tuple[Any, ...] = ("ok", weights.rank, weights.target_modules,
                                      list(weights.modules))
        except AdapterError as e:
            reply = ("error", str(e), isinstance(e, AdapterReadError))
        except Exception as e:  # noqa: BLE001 - I/O, memory: reported for this adapter only
            reply = ("error", f"cannot read adapter at {path}: {e}", False)
        conn.send(reply)
