"""The adapter memory hierarchy: disk -> pinned host copies -> GPU slots.

States: REGISTERED (on disk only) -> LOADING (disk -> host, in a loader thread) -> IN_HOST ->
UPLOADING (host -> GPU on the copy stream) -> RESIDENT, and back down on eviction.

Two holds, never confused:
- a request's REFERENCE on an adapter version (`acquire` by name ... `release` by the version's
  key, `key_of`), from submit to finish or abort. Unload stops new references at once and
  waits for the count to reach zero; a load in place gives the name a new version and unloads
  the old one so once its references are gone;
- a slot LOCK (`lock` ... `unlock`), only while a batch that reads the slot is in flight.
  Queued requests lock nothing, so a busy adapter never starves the others of slots.

Before the copy stream overwrites a slot it waits on the slot's last-use event (recorded on the
compute stream after the last batch that read it); after the copy it records the slot's ready
event, which the compute stream waits on before the first batch that uses the slot. Nothing
here waits on the GPU: `poll()` only queries events.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from ops.settings import env_flag, env_int, reject_removed
from runtime.adapters.failures import FailedLoads, Signature, files_signature, folder_signature
from runtime.adapters.paths import (
    AdapterFolder,
    recheck_adapter_folder,
    resolve_adapter_folder,
    resolve_on_demand,
)
from runtime.adapters.peft_format import (
    AdapterConfig,
    AdapterError,
    load_peft_adapter,
    read_adapter_config,
)
from runtime.adapters.pool import (
    ALL_MODULES,
    EMBED,
    HostAdapter,
    LoraModelShape,
    LoraPool,
    RowLease,
)
from runtime.adapters.reader import ProcessReader
from runtime.config import ConfigError, ServerConfig
from runtime.errors import (
    AdapterReadError,
    EngineStoppedError,
    HostTierFullError,
    UnknownAdapterError,
)
from runtime.streams import Event, IssuedEvent, Streams

logger = logging.getLogger(__name__)
R = TypeVar("R")

MAX_NAME_CHARS = 256
MAX_RECENT_EVICTIONS = 256


class Residency(enum.Enum):
    REGISTERED = "registered"
    LOADING = "loading"
    IN_HOST = "in_host"
    UPLOADING = "uploading"
    RESIDENT = "resident"


@dataclass
class AdapterInfo:
    """One adapter as the admin API lists it. tier: "gpu", "host" or "disk"."""

    name: str
    path: str
    tier: str
    state: str
    pinned: bool
    rank: int
    target_modules: tuple[str, ...]
    refs: int
    error: str | None
    unloading: bool = False  # its requests drain; new ones are refused
    # a version replaced by a load in place (load_inplace): its requests drain on it while new
    # ones get the version that replaced it
    replaced: bool = False


UPLOAD_PARTS = ("wait", "copies", "event")

# Upload settings that A/B-tested ways of issuing uploads, since removed (they gave nothing on
# the device): setting one is an error, not a silent no-op
REMOVED_UPLOAD_SETTINGS = {
    "LORASERVE_UPLOAD_THREAD": "uploads are issued on the loop, batched "
                               "(LORASERVE_UPLOAD_BATCH=0 issues each as it starts)",
    "LORASERVE_UPLOAD_FOREACH": "batched uploads take one foreach copy for them all",
}


@dataclass
class AdapterCounters:
    """Cumulative counts for metrics. Tiers: "host" = disk -> host, "gpu" = host -> GPU."""

    loads: dict[str, int] = field(default_factory=lambda: {"host": 0, "gpu": 0})
    evictions: dict[str, int] = field(default_factory=lambda: {"host": 0, "gpu": 0})
    # Where a request's adapter was when the request arrived (acquire).
    requests_by_residency: dict[str, int] = field(
        default_factory=lambda: {"gpu": 0, "host": 0, "disk": 0}
    )
    load_failures: int = 0
    upload_failures: int = 0
    # Host time spent enqueueing uploads (the copies are asynchronous on the copy stream; this
    # is what issuing them costs the loop), in total and the longest.
    upload_enqueue_s: float = 0.0
    upload_enqueue_max_s: float = 0.0
    # the same by part: waiting on the slot's last use, the copies, the ready event; totals
    # and the longest upload's
    upload_enqueue_parts_s: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(UPLOAD_PARTS, 0.0))
    upload_enqueue_max_parts_s: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(UPLOAD_PARTS, 0.0))
    # (tier, name) of the most recent evictions, oldest first: tests check the policy's order.
    recent_evictions: list[tuple[str, str]] = field(default_factory=list)
    # (tier, seconds) of completed loads not yet drained by the metrics exporter.
    pending_latencies: list[tuple[str, float]] = field(default_factory=list)


class _HostTally:
    """Host copies held by a manager's adapters, and their bytes, kept as `_Adapter.host`
    changes: the host tier's room is checked at every load, and summing it over every adapter
    took the loop 0.4 ms a load with 600 adapters registered (on the CPU box)."""

    def __init__(self) -> None:
        self.count = 0
        self.nbytes = 0


_VERSION_UIDS = itertools.count(1)  # every registered version's own id (the prefix cache's root)


class _Adapter:
    """Bookkeeping of one registered adapter version: the name's, or one that a load in place
    replaced and whose requests still drain."""

    def __init__(self, name: str, folder: AdapterFolder, pinned: bool, config: AdapterConfig,
                 tally: _HostTally, key: str | None = None) -> None:
        self.name = name
        # what requests hold it by (AdapterManager.key_of): the name, or for a version loaded
        # in place while another held the name, "<name>:<n>" (no name holds a ':')
        self.key = key or name
        # unique over the process's life, where a key is reused (a name unloaded and loaded
        # again): the KV blocks the prefix cache keeps are rooted in it
        self.uid = next(_VERSION_UIDS)
        self.replaced = False
        self.folder = folder  # what a re-read checks again
        self.path = folder.real
        self.pinned = pinned
        self.config = config
        self._tally = tally
        self._host: HostAdapter | None = None
        self.load_task: asyncio.Task[None] | None = None
        self.slot: int | None = None
        self.refs = 0
        self.is_closing = False
        self.idle = asyncio.Event()  # set while refs == 0
        self.idle.set()
        self.last_used = 0
        self.error: str | None = None  # the last load or upload failure (`fail`), until cleared
        self.error_retryable = False  # that failure was the machine's read error
        # the adapter files' stat signature at the read that registered it: a re-read (after
        # the host copy was dropped, or a tensor-parallel worker's) of other files is refused
        self.signature: Signature = ()

    def fail(self, error: str, retryable: bool = False) -> None:
        """Record a failed load or upload; retryable: a machine read error (AdapterReadError),
        which the requests it ends report as such (a 503 the client may retry)."""
        self.error, self.error_retryable = error, retryable

    @property
    def host(self) -> HostAdapter | None:
        """The adapter's copy in the host tier (None: on disk only)."""
        return self._host

    @host.setter
    def host(self, host: HostAdapter | None) -> None:
        t = self._tally
        if self._host is not None:
            t.count, t.nbytes = t.count - 1, t.nbytes - self._host.nbytes
        if host is not None:
            t.count, t.nbytes = t.count + 1, t.nbytes + host.nbytes
        self._host = host


class _Slot:
    def __init__(self) -> None:
        self.owner: _Adapter | None = None
        self.locks = 0
        self.unlocked = asyncio.Event()
        self.unlocked.set()
        self.last_use: Event | None = None
        # set while the upload may still be running (an IssuedEvent while it waits, unissued,
        # for the next poll or admission)
        self.ready: Event | IssuedEvent | None = None
        self.assigned_at = 0
        self.upload_started = 0.0
        self.upload_bytes = 0


def resolve_pool_spec(config: ServerConfig, num_layers: int) -> tuple[int, frozenset[str]]:
    """(max rank, target modules) of the slot pool: the config's, else inferred from the
    startup adapters' configs (blocking reads: call at startup)."""
    rank, modules = config.max_lora_rank, config.lora_target_modules
    if modules is not None:
        modules = ALL_MODULES if "all" in modules else frozenset(modules)
    if rank is not None and modules is not None:
        return rank, modules
    configs = []
    for spec in config.lora_paths:
        try:
            configs.append(read_adapter_config(spec.lora_path, num_layers))
        except AdapterError as e:
            raise AdapterError(
                f"cannot infer the adapter pool from {spec.lora_name!r} ({e}); "
                "set --max-lora-rank and --lora-target-modules"
            ) from None
    if not configs:
        raise AdapterError("set --max-lora-rank and --lora-target-modules (no --lora-paths)")
    rank = rank if rank is not None else max(c.rank for c in configs)
    if modules is None:
        modules = frozenset().union(*(c.target_modules for c in configs))
    return rank, modules


# Host rows pinned beyond the tier's size: rows being filled by the loader threads, and rows
# of dropped copies whose last upload is still in flight (more are pinned on demand).
HOST_ROW_SLACK = 4
# The most of the machine's available memory the host tier may pin at start.
PIN_FRACTION_LIMIT = 0.8


def _available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# loader threads, and reader processes where reads run in processes (LORASERVE_LOADER_WORKERS
# sets another count, for A/B runs)
LOADER_WORKERS = 2


def uses_reader_processes(config: ServerConfig, pool: LoraPool) -> bool:
    """lora_loader: "process" always, "auto" when host copies are pinned (CUDA), the pool is a
    whole model's (a tensor-parallel rank's shard is read in threads) and this Python can start
    readers (memfd_create, an interpreter to run: not so when embedded)."""
    if config.lora_loader == "auto":
        return (pool.pins_host_rows and type(pool) is LoraPool
                and hasattr(os, "memfd_create") and bool(sys.executable))
    return config.lora_loader == "process"


def host_tier_rows(config: ServerConfig, row_bytes: int, available: int | None) -> int:
    """Host rows to pin at start: the tier's copies (max_loaded_loras, and as many rows as
    max_lora_host_bytes holds) and HOST_ROW_SLACK; a tier larger than PIN_FRACTION_LIMIT of the
    `available` host memory is a configuration error."""
    tier = min(config.num_lora_host_slots, config.max_lora_host_bytes // row_bytes)
    rows = tier + HOST_ROW_SLACK
    if available is not None and rows * row_bytes > PIN_FRACTION_LIMIT * available:
        raise ConfigError(
            f"the LoRA host tier ({tier} copies of {row_bytes / 2**20:.1f} MiB: max_loaded_loras "
            f"{config.num_lora_host_slots}, max_lora_host_bytes {config.max_lora_host_bytes}) "
            f"would pin {rows * row_bytes / 2**30:.1f} GiB, more than {PIN_FRACTION_LIMIT:.0%} "
            f"of the {available / 2**30:.1f} GiB of memory available: lower max_loaded_loras "
            "or max_lora_host_bytes"
        )
    return rows


class _Checked(NamedTuple):
    """An adapter folder as `_read_config` checked and read it."""

    folder: AdapterFolder
    config: AdapterConfig
    files: Signature  # its files' stat signature right after the folder's checks


class _Found(NamedTuple):
    """An on-demand name's folder as `_resolve` found it."""

    path: str  # <lora_root>/<name>, resolved
    signature: Signature  # its stat signature before the config was read
    config: _Checked


@dataclass
class _UploadJob:
    """One upload's copies into `slot` (from the host row `lease` holds), after `last_use`.
    `ready`: the IssuedEvent it reports through when issued later (with the uploads waiting
    for the next poll, the default); None when issued at once (LORASERVE_UPLOAD_BATCH=0)."""

    entry: _Adapter
    slot: int
    copies: list[tuple[Tensor, Tensor | None]]
    last_use: Event | None
    lease: RowLease
    ready: IssuedEvent | None


class AdapterManager:
    """Owns the slot pool and every adapter's residency. Call it from the event-loop thread only.

    Disk reads run in a loader thread; uploads are enqueued on the copy stream.
    """

    def __init__(
        self,
        config: ServerConfig,
        shape: LoraModelShape,
        device: torch.device,
        dtype: torch.dtype,
        streams: Streams,
        pool: LoraPool | None = None,
        stacked: Iterable[str] = (),
    ) -> None:
        """pool: the GPU slots to manage (tensor parallelism passes a rank's shard); by default
        one built from `shape` and the config, with the layer groups `stacked` names stacked
        (see runtime.adapters.pool; a pool passed in keeps its own)."""
        self.config = config
        self.shape = shape
        self.streams = streams
        if pool is None:
            max_rank, targets = resolve_pool_spec(config, shape.num_layers)
            pool = LoraPool(shape, config.max_loras_per_batch, max_rank, targets, device, dtype,
                            stacked)
        self.pool = pool
        self.loader_workers = env_int("LORASERVE_LOADER_WORKERS", LOADER_WORKERS, least=1)
        # Reads in reader processes (off this process's GIL) need host rows they can map.
        self.reader: ProcessReader | None = None
        in_processes = uses_reader_processes(config, pool)
        if in_processes:
            pool.share_host_rows()
        self.host_rows_pinned = self._reserve_host_rows()
        if in_processes:
            self.reader = ProcessReader(pool, shape, workers=self.loader_workers)
        self.counters = AdapterCounters()
        # Host-to-device upload speed, learnt from finished uploads (starts conservative).
        self.upload_bytes_per_s = 10e9
        # Test hook: called in the middle of every upload; raising simulates a failed upload.
        self.upload_fault: Callable[[str, int], None] | None = None
        # Called when a version that a load in place replaced has drained and is gone (the
        # engine refreshes the per-tier gauges then: nothing else would, on an idle server)
        self.on_version_drained: Callable[[], None] | None = None
        # Uploads wait, unissued, for the next poll(), or for a request's admission in the
        # scheduler, whichever comes first; then every upload waiting is issued in one go: one
        # wait a distinct last-use event, one foreach copy and one ready event they share. Both
        # places run while the runner thread is between launches. An upload issued as it starts
        # (LORASERVE_UPLOAD_BATCH=0: one copy call a copy) is often started by a disk read's
        # completion, which the loop runs while the runner launches a step; issuing the copies
        # then took the loop 200-356 ms at times in the 1000-adapter benchmark on the H200
        # (1.0-1.3 s of a 7 s run in all), against 4-5 ms at most and about 20 ms in all
        # batched (benchmarks/RESULTS.md). An unissued upload's slot joins no batch.
        self._batch_uploads = env_flag("LORASERVE_UPLOAD_BATCH", True)
        reject_removed(REMOVED_UPLOAD_SETTINGS)
        self._pending_uploads: list[_UploadJob] = []
        # every version by key: the names' own, and replaced ones while their requests drain
        self._adapters: dict[str, _Adapter] = {}
        self._current: dict[str, str] = {}  # name -> the key of the version it serves
        self._versions = itertools.count(2)
        self._host_tally = _HostTally()  # the host copies of the adapters in _adapters
        self._loading: dict[str, asyncio.Future[None]] = {}  # first loads in progress
        self._replacing: set[str] = set()  # names being loaded in place
        # on-demand names being resolved (their config read) on the metadata thread
        self._resolving: dict[str, asyncio.Future[_Found | None]] = {}
        self._failed = FailedLoads()  # on-demand names whose load failed, for a while
        self._loading_pinned: set[str] = set()
        self._pins_waiting: set[str] = set()  # keys of pinned adapters still without a slot
        # Reloads from disk waiting, in request order, for room in the host tier: the room is
        # held by adapters that queued requests still need (their copies are never dropped).
        self._host_waiting: dict[str, _Adapter] = {}
        self._slots = [_Slot() for _ in range(config.max_loras_per_batch)]
        self._clock = itertools.count(1)
        # Reads (the heavy part: into a host row) on loader_workers threads; the small file
        # work before each (resolving an on-demand name, reading and checking the config) on a
        # thread of its own. On one FIFO pool, a burst of requests for N new adapters queued
        # N resolves, then N config reads, ahead of the first read: on the H200, 395 new
        # adapters at once finished no read in the first half second.
        self._executor = ThreadPoolExecutor(max_workers=self.loader_workers,
                                            thread_name_prefix="lora-load")
        self._meta_executor = ThreadPoolExecutor(max_workers=1,
                                                 thread_name_prefix="lora-load-meta")
        self._tasks: set[asyncio.Task[None]] = set()
        self._is_closed = False  # close() ran: loads are refused

    def _reserve_host_rows(self) -> int:
        """Pin the host tier's rows at start (on CUDA), so that serving never pins memory:
        pinning holds the CUDA driver's locks, stalling the runner's launches and the loop's
        uploads for as long as it takes. Bytes pinned."""
        if not self.pool.pins_host_rows:
            return 0
        rows = host_tier_rows(self.config, self.pool.host_row_bytes, _available_host_bytes())
        t0 = time.perf_counter()
        pinned = self.pool.reserve_host_rows(rows)
        logger.info("pinned %.2f GiB of host memory for %d LoRA adapter copies in %.2f s",
                    pinned / 2**30, rows, time.perf_counter() - t0)
        return pinned

    # registration ------------------------------------------------------------------------

    async def load_startup_adapters(self) -> None:
        """Load config.lora_paths (trusted operator paths: lora_roots does not apply)."""
        for spec in self.config.lora_paths:
            await self.load(spec.lora_name, spec.lora_path, spec.pinned, trusted=True)

    async def load(
        self, name: str, path: str, pinned: bool = False, *, trusted: bool = False,
        config: _Checked | None = None, inplace: bool = False,
    ) -> None:
        """Register adapter `name` from `path`, read it into host memory (in a thread) and, if
        pinned, start its upload. A failed load changes nothing (but for forgetting a failed
        on-demand load of `name`: the next request tries it again). `config`: the checked
        folder and config already read (as `_read_config` gives them), for an on-demand load.

        `inplace` (vLLM's load_inplace) with `name` loaded: the new version is read beside the
        one serving, then takes the name at once: requests submitted from then on get it,
        while those already holding the old version finish on it, which is then unloaded as
        `unload` would (its pin, if any, goes with the name). Until the read ends, requests
        keep getting the old version; a failed read leaves it serving."""
        _check_name(name)
        self._failed.forget(name)
        if self._is_closed:
            raise EngineStoppedError("the server is shutting down: adapters cannot be loaded")
        current = self._named(name)
        if current is not None and current.is_closing:
            raise AdapterError(f"LoRA adapter {name!r} is being unloaded (its requests are "
                               "draining); load it again once the unload has answered")
        if not inplace and (current is not None or name in self._loading):
            raise AdapterError(f"LoRA adapter {name!r} is already loaded (load_inplace: true "
                               "replaces it)")
        if name in self._loading or name in self._replacing:
            raise AdapterError(f"LoRA adapter {name!r} is still loading; load it in place "
                               "once that load has answered")
        if pinned:
            self._check_pin_room(name)
        if current is not None:
            await self._load_in_place(current, path, pinned, trusted)
            return
        done = asyncio.get_running_loop().create_future()
        self._loading[name] = done
        if pinned:
            self._loading_pinned.add(name)
        try:
            entry = await self._load_new(name, path, pinned, trusted, config)
        finally:
            del self._loading[name]
            self._loading_pinned.discard(name)
            done.set_result(None)
        self._register(entry)
        logger.info("loaded LoRA adapter %s from %s (rank %d)", name, entry.path, entry.config.rank)

    async def _load_in_place(self, current: _Adapter, path: str, pinned: bool,
                             trusted: bool) -> None:
        """`load` of a name that `current` serves, with inplace: see there."""
        name = current.name
        self._replacing.add(name)
        if pinned:
            self._loading_pinned.add(name)
        try:
            entry = await self._load_new(name, path, pinned, trusted, None)
        finally:
            self._replacing.discard(name)
            self._loading_pinned.discard(name)
        if self._is_closed:
            raise EngineStoppedError("the server is shutting down: adapters cannot be loaded")
        # (unload refuses a name being replaced, so `current` still serves it)
        assert self._named(name) is current and not current.is_closing
        current.is_closing = current.replaced = True
        current.pinned = False  # the pin is the name's: the new version holds it
        self._pins_waiting.discard(current.key)
        self._register(entry)
        task = asyncio.get_running_loop().create_task(self._drain(current))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        logger.info("loaded LoRA adapter %s in place from %s (rank %d); the version it "
                    "replaced drains %d requests", name, entry.path, entry.config.rank,
                    current.refs)

    def _register(self, entry: _Adapter) -> None:
        """Make `entry` the version its name serves, under a key no version holds."""
        if entry.name in self._adapters:  # a replaced version of the name drains under it
            entry.key = f"{entry.name}:{next(self._versions)}"
        self._adapters[entry.key] = entry
        self._current[entry.name] = entry.key
        if entry.pinned and self._take_slot(entry, set(), is_prefetch=False) is None:
            self._pins_waiting.add(entry.key)  # poll() retries

    def _named(self, name: str) -> _Adapter | None:
        """The version `name` serves (closing while it is unloaded), if any."""
        key = self._current.get(name)
        return None if key is None else self._adapters.get(key)

    def key_of(self, name: str) -> str:
        """The key of the version `name` serves, which a request that acquired it holds it by
        (`release`, `admit`, `slot_of`... take keys): a load in place gives the name a new
        version while the old one's requests still drain on it."""
        return self._current[name]

    async def _load_new(self, name: str, path: str, pinned: bool, trusted: bool,
                        config: _Checked | None) -> _Adapter:
        roots = () if trusted else self.config.lora_roots
        allow_hub = trusted or self.config.lora_allow_hub
        folder, cfg, checked_files = config or await self._off_loop(
            self._meta_executor, self._read_config, path, roots, allow_hub
        )
        self._check_compatible(name, cfg.rank, cfg.target_modules)
        try:
            self._check_host_room(name, self.pool.host_nbytes(cfg.modules))
        except HostTierFullError:
            if pinned:
                raise  # a pinned adapter must be in host memory now; others may wait on disk
        entry = _Adapter(name, folder, pinned, cfg, self._host_tally)
        t0 = time.monotonic()
        try:
            host = await self._off_loop(self._executor, self._read_host, folder.real,
                                        checked_files)
        except AdapterError:
            self.counters.load_failures += 1
            raise
        self._check_compatible(name, host[1], host[2])
        if pinned:
            self._check_pin_room(name)
        entry.signature = host[3]
        entry.last_used = next(self._clock)
        try:
            self._make_host_room(host[0].nbytes, name)
        except HostTierFullError:
            if pinned:
                raise
            # Validated, but the host tier is held by adapters queued requests need: register
            # it on disk; a request for it reloads it when there is room.
            logger.info("LoRA adapter %s registered on disk: the host tier is full", name)
            return entry
        entry.host = host[0]
        self._count_load("host", time.monotonic() - t0)
        return entry

    async def _off_loop(self, executor: ThreadPoolExecutor, fn: Callable[..., R],
                        *args: Any) -> R:
        """fn(*args) on `executor`. Once `close` has shut it down, a job it cancelled, or one
        asked for after, is EngineStoppedError (a 503), not a cancelled or failed handler."""
        if self._is_closed:
            raise EngineStoppedError("the server is shutting down: adapters cannot be loaded")
        future = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        try:
            return await future
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._is_closed and future.cancelled() and not (task and task.cancelling()):
                raise EngineStoppedError(
                    "the server is shutting down: the adapter load was stopped") from None
            raise

    def _read_config(self, path: str, roots: tuple[str, ...], allow_hub: bool) -> _Checked:
        """Metadata thread: the folder at `path` checked (resolve_adapter_folder), its files'
        stat signature right after the checks (the weights' read compares it: a file swapped
        between the checks and the read, for a link out of the roots say, is refused), and
        its config read."""
        folder = resolve_adapter_folder(path, roots, allow_hub)
        files = files_signature(folder.real)
        return _Checked(folder, read_adapter_config(folder.real, self.shape.num_layers), files)

    def _read_host(self, path: str, checked: Signature | None = None
                   ) -> tuple[HostAdapter, int, frozenset[str], Signature]:
        """Loader thread: the adapter at `path` in a host row, its rank and target modules,
        and its files' stat signature (what a later read compares: `_check_unchanged`). A file
        that changed during the read (the signature before it is not the one after) fails it:
        the read may mix two versions; so does one changed since the folder's checks, when
        `checked` gives the signature they saw."""
        before = files_signature(path)
        if checked is not None and before != checked:
            raise AdapterError(f"the adapter files at {path} changed after the folder's checks "
                               "and before their read; load the adapter again")
        if self.reader is not None:
            host, rank, targets = self.reader.read(path)
        else:
            try:
                weights = load_peft_adapter(path, self.shape, self.pool.dtype)
                host = self.pool.build_host(weights)
                rank, targets = weights.rank, weights.target_modules
            except AdapterError:
                raise
            except Exception as e:  # I/O or allocation failures: report, never crash the loop
                raise AdapterError(f"cannot read adapter at {path}: {e}") from e
        if files_signature(path) != before:
            raise AdapterError(f"the adapter files at {path} changed while they were read; "
                               "load the adapter again once they are written")
        return host, rank, targets, before

    def _reread_host(self, folder: AdapterFolder
                     ) -> tuple[HostAdapter, int, frozenset[str], Signature]:
        """Loader thread: `_read_host` of an adapter read before, once its folder passes the
        checks of its first load again (see recheck_adapter_folder)."""
        recheck_adapter_folder(folder)
        return self._read_host(folder.real)

    async def unload(self, name: str) -> None:
        """Stop new references to `name` at once, wait for its references and slot locks to
        drop, then free its slot and host memory. The name can then be loaded again."""
        entry = self._named(name)
        if (entry is None and name in self._loading) or name in self._replacing:
            raise AdapterError(f"LoRA adapter {name!r} is still loading; unload it once its "
                               "load has answered")
        if entry is None or entry.is_closing:
            raise _unknown(name, entry)
        entry.is_closing = True
        await self._drain(entry)
        logger.info("unloaded LoRA adapter %s", name)

    async def _drain(self, entry: _Adapter) -> None:
        """Wait for a closing version's references and slot locks to drop, then free its slot
        and host memory and forget it (its name too, unless a newer version serves it)."""
        await entry.idle.wait()
        while entry.slot is not None and self._slots[entry.slot].locks:
            await self._slots[entry.slot].unlocked.wait()
        if entry.slot is not None:
            self._free_slot(entry.slot)
        entry.host = None
        del self._adapters[entry.key]
        if self._current.get(entry.name) == entry.key:
            del self._current[entry.name]
        if entry.replaced:
            logger.info("the replaced version of LoRA adapter %s drained and was unloaded",
                        entry.name)
            if self.on_version_drained is not None:
                self.on_version_drained()

    async def acquire_or_resolve(self, name: str) -> str:
        """`acquire`, loading an unknown name first from `<lora_root>/<name>` when
        lora_resolve_on_demand is on. Returns the adapter's tier as `acquire` does."""
        if name in self._loading:
            await asyncio.shield(self._loading[name])
        entry = self._named(name)
        if (entry is None or entry.is_closing) and self.config.lora_resolve_on_demand:
            # one job a name, shared by its concurrent requests: a burst of new names queues
            # one job each, not a resolve each and then a config read each behind all of them
            job = self._resolving.get(name)
            if job is None:
                if self._is_closed:
                    raise EngineStoppedError("the server is shutting down")
                job = asyncio.get_running_loop().run_in_executor(
                    self._meta_executor, self._resolve, name)
                self._resolving[name] = job
                job.add_done_callback(
                    lambda f: self._resolving.pop(name) if self._resolving.get(name) is f
                    else None)
            found = await asyncio.shield(job)
            if found is None:
                raise UnknownAdapterError(
                    f"LoRA adapter {name!r} has never been loaded, and no adapter folder of "
                    f"that name lies directly under lora_roots {list(self.config.lora_roots)} "
                    "(on-demand names must be plain folder names)", name
                )
            if self._named(name) is None:
                if name in self._loading:
                    await asyncio.shield(self._loading[name])
                else:
                    await self._load_found(name, found)
        return self.acquire(name)

    def _resolve(self, name: str) -> _Found | None:
        """Metadata thread: `<lora_root>/<name>` with its stat signature, checked folder and
        config (as `load` of that folder reads them), or None when no root holds such a
        folder. A failure is remembered (see runtime.adapters.failures), and raised again
        without a read while it stands: the stats that tell cost microseconds, here as the
        resolve's own do, off the loop (a root on a network file system may stall them)."""
        path = resolve_on_demand(name, self.config.lora_roots)
        if path is None:
            return None
        signature = folder_signature(path)  # before the read: a fix made meanwhile is seen
        remembered = self._failed.error(name, path, signature)
        if remembered is not None:
            raise remembered
        try:
            config = self._read_config(path, self.config.lora_roots, self.config.lora_allow_hub)
        except AdapterError as e:
            self._failed.remember(name, path, signature, e)
            raise
        return _Found(path, signature, config)

    async def _load_found(self, name: str, found: _Found) -> None:
        """`load` of an on-demand name `_resolve` found; a failure is remembered as there."""
        try:
            await self.load(name, found.path, config=found.config)
        except AdapterError as e:
            self._failed.remember(name, found.path, found.signature, e)
            raise

    def close(self) -> None:
        """Stop the loader threads and reader processes (shutdown). Later loads are refused
        with EngineStoppedError."""
        self._is_closed = True
        for task in self._tasks:
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._meta_executor.shutdown(wait=False, cancel_futures=True)
        if self.reader is not None:
            self.reader.close()

    # checks ------------------------------------------------------------------------------

    def _check_compatible(self, name: str, rank: int, modules: frozenset[str]) -> None:
        if rank > self.pool.max_rank:
            raise AdapterError(
                f"LoRA adapter {name!r} is incompatible with the adapter pool: its rank {rank} "
                f"exceeds --max-lora-rank {self.pool.max_rank}; raise --max-lora-rank to at "
                f"least {rank}"
            )
        missing = modules - self.pool.target_modules
        if missing and EMBED in missing and self.config.tp_size > 1:
            raise AdapterError(
                f"LoRA adapter {name!r} adapts {EMBED}, which tensor parallelism does not "
                "support (tp_size > 1)"
            )
        if missing:
            raise AdapterError(
                f"LoRA adapter {name!r} is incompatible with the adapter pool: it targets "
                f"{', '.join(sorted(missing))}, not in --lora-target-modules; add them to "
                "--lora-target-modules"
            )

    def _check_pin_room(self, name: str) -> None:
        limit = self.config.max_loras_per_batch - 1
        # (a name loaded in place: its pin moves to the new version, so it is not counted twice)
        pinned = sum(a.pinned and a.name != name for a in self._adapters.values())
        pinned += len(self._loading_pinned - {name})
        if pinned + 1 > limit:
            raise AdapterError(
                f"cannot pin LoRA adapter {name!r}: at most max_loras_per_batch - 1 = {limit} "
                "adapters can be pinned, to avoid starvation of unpinned adapters"
            )

    def _host_evictable(self, keep: str | None) -> list[_Adapter]:
        """Host copies that may be dropped, in eviction order: unreferenced first, then LRU."""
        cands = [
            a
            for a in self._adapters.values()
            if a.host is not None
            and not a.pinned
            and a.name != keep
            and not (a.slot is not None and self._slots[a.slot].ready is not None)
            # a queued request will upload from this copy: dropping it would only mean
            # reading it again (with many adapters, over and over)
            and not (a.refs > 0 and a.slot is None)
        ]
        return sorted(cands, key=lambda a: (a.refs > 0, a.last_used))

    def _host_usage(self) -> tuple[int, int]:
        """Host copies held, and their bytes."""
        return self._host_tally.count, self._host_tally.nbytes

    def _host_fits(self, count: int, used: int, nbytes: int) -> bool:
        """Whether one more host copy of `nbytes` fits beside `count` copies using `used`."""
        return (count + 1 <= self.config.num_lora_host_slots
                and used + nbytes <= self.config.max_lora_host_bytes)

    def _check_host_room(self, name: str, nbytes: int) -> None:
        budget = self.config.max_lora_host_bytes
        if nbytes > budget:
            raise AdapterError(
                f"LoRA adapter {name!r} needs {nbytes} bytes of host memory, more than "
                f"max_lora_host_bytes ({budget})"
            )
        count, used = self._host_usage()
        if self._host_fits(count, used, nbytes):
            return  # the common case: no eviction, so no walk of every adapter for victims
        evictable = self._host_evictable(name)
        min_count = count - len(evictable)
        min_used = used - sum(a.host.nbytes for a in evictable if a.host is not None)
        if min_count + 1 > self.config.num_lora_host_slots or min_used + nbytes > budget:
            raise HostTierFullError(
                f"no host memory for LoRA adapter {name!r}: pinned or uploading adapters, or "
                "adapters that queued requests wait for, hold it all (raise max_loaded_loras "
                "or max_lora_host_bytes)"
            )

    def _make_host_room(self, nbytes: int, keep: str) -> None:
        """Drop host copies (unreferenced first, then LRU) until one of `nbytes` fits."""
        self._check_host_room(keep, nbytes)
        count, used = self._host_usage()
        if self._host_fits(count, used, nbytes):
            return
        evictable = self._host_evictable(keep)
        while not self._host_fits(count, used, nbytes):
            victim = evictable.pop(0)
            assert victim.host is not None
            count, used = count - 1, used - victim.host.nbytes
            victim.host = None
            self._count_eviction("host", victim.name)
            logger.debug("evicted LoRA adapter %s from host memory", victim.name)

    # request references ------------------------------------------------------------------

    def acquire(self, name: str) -> str:
        """Take a request's reference on the version `name` serves (`key_of` gives its key)
        and prefetch it toward the GPU. Returns where the adapter was when the request
        arrived: "gpu", "host" or "disk"."""
        entry = self._named(name)
        if entry is None or entry.is_closing:
            raise _unknown(name, entry)
        entry.refs += 1
        entry.idle.clear()
        entry.last_used = next(self._clock)
        tier = self._tier(entry)
        self.counters.requests_by_residency[tier] += 1
        if entry.slot is not None:
            return tier  # on the GPU already: a dropped host copy needs no reload
        if entry.host is None:
            self._ensure_loading(entry)
        else:
            self._take_slot(entry, set(), is_prefetch=True)
        return tier

    def release(self, key: str) -> None:
        """Drop a request's reference on the version `key` (at finish or abort)."""
        entry = self._adapters.get(key)
        if entry is None or entry.refs <= 0:
            logger.error("release of LoRA adapter %s without a reference", key)
            return
        entry.refs -= 1
        if entry.refs == 0:
            entry.idle.set()

    def _host_room(self) -> int:
        """How many more host copies fit by count once droppable copies go, counting the
        reads already under way."""
        count, _ = self._host_usage()
        reading = sum(a.load_task is not None for a in self._adapters.values())
        kept = count - len(self._host_evictable(None))
        return self.config.num_lora_host_slots - kept - reading

    def _ensure_loading(self, entry: _Adapter) -> None:
        if entry.host is not None or entry.load_task is not None:
            return
        if entry.key in self._host_waiting:
            return  # poll() starts it in its turn
        if self._host_room() < 1:
            self._host_waiting[entry.key] = entry
            return
        entry.error = None  # a new attempt: the last failure no longer stands
        task = asyncio.get_running_loop().create_task(self._reload(entry))
        entry.load_task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload(self, entry: _Adapter) -> None:
        """Read an adapter evicted from host memory back from its folder, checked again. A
        failure ends in `entry.error`, with which the engine aborts its queued requests."""
        t0 = time.monotonic()
        try:
            loop = asyncio.get_running_loop()
            host, rank, targets, signature = await loop.run_in_executor(
                self._executor, self._reread_host, entry.folder
            )
            if self._adapters.get(entry.key) is not entry:
                return  # unloaded meanwhile
            _check_unchanged(entry, rank, targets, signature)
            self._make_host_room(host.nbytes, entry.name)
        except HostTierFullError:  # bytes ran out while it was read: wait for room
            self._host_waiting[entry.key] = entry
            return
        except Exception as e:  # noqa: BLE001 - keep the loop alive; reported per adapter
            # a copy read but refused gives its host row back now, not once the log record
            # that holds `e` (whose traceback holds this frame) is dropped
            host = None
            self.counters.load_failures += 1
            entry.fail(f"reload failed: {e}", retryable=isinstance(e, AdapterReadError))
            logger.error("reload of LoRA adapter %s failed: %s", entry.name, e)
            return
        finally:
            entry.load_task = None
        entry.host, entry.error = host, None
        self._count_load("host", time.monotonic() - t0)
        if entry.refs > 0 and entry.slot is None:  # requests wait for it: continue the prefetch
            self._take_slot(entry, set(), is_prefetch=True)

    # GPU slots ---------------------------------------------------------------------------

    def poll(self) -> None:
        """Issue the uploads waiting for it, mark finished uploads RESIDENT and retry pinned
        uploads. Never blocks."""
        self._issue_pending()
        for slot in self._slots:
            if slot.owner is not None and slot.ready is not None and slot.ready.query():
                slot.ready = None
                seconds = time.monotonic() - slot.upload_started
                self._count_load("gpu", seconds)
                self._learn_bandwidth(slot.upload_bytes, seconds)
        self._start_waiting_reloads()
        for key in list(self._pins_waiting):
            entry = self._adapters.get(key)
            is_done = entry is None or entry.slot is not None
            if is_done or (entry.host is not None and self._take_slot(entry, set(), False)):
                self._pins_waiting.discard(key)

    def _start_waiting_reloads(self) -> None:
        """Start queued reloads, oldest first, while the host tier has room."""
        if not self._host_waiting:
            return
        room = self._host_room()
        for key, entry in list(self._host_waiting.items()):
            live = self._adapters.get(key) is entry and not entry.is_closing
            if not live or entry.refs == 0 or entry.host is not None or entry.slot is not None:
                del self._host_waiting[key]
                continue
            if room < 1:
                return
            del self._host_waiting[key]
            self._ensure_loading(entry)
            room -= 1

    def _learn_bandwidth(self, nbytes: int, seconds: float) -> None:
        """Track host-to-device upload bandwidth. `seconds` is measured up to the poll that saw
        the upload done, so it errs long: the estimate errs low, i.e. towards waiting less."""
        if nbytes > 0 and seconds > 0:
            self.upload_bytes_per_s = 0.7 * self.upload_bytes_per_s + 0.3 * (nbytes / seconds)

    def upload_remaining_s(self, slot: int) -> float:
        """Estimated seconds until the upload into `slot` completes (0 when done)."""
        s = self._slots[slot]
        if s.ready is None or s.ready.query():
            return 0.0
        elapsed = time.monotonic() - s.upload_started
        return max(0.0, s.upload_bytes / self.upload_bytes_per_s - elapsed)

    def admit(
        self, key: str, batch_slots: set[int], overlap: bool | None, max_wait_s: float = 0.0
    ) -> int | None:
        """The slot of version `key` (`key_of`) if a request for it can join the batch being
        built, else None.

        Joins when RESIDENT; while its upload is queued on the copy stream (the compute stream
        then waits on the upload's ready event): always with overlap False, never with overlap
        True, and with overlap None (adaptive) when the upload should finish within
        `max_wait_s`, so a multi-adapter batch stays together only when that is cheap.
        An IN_HOST adapter gets a slot (free, else a victim by the eviction policy that is not
        locked, pinned, uploading or in batch_slots) and its upload starts. Call it first for
        the batch's running requests, so their slots are in batch_slots.
        """
        entry = self._adapters.get(key)
        if entry is None:
            raise _unknown(key, entry)
        if entry.slot is None:
            if entry.host is None:
                self._ensure_loading(entry)
                return None
            if self._take_slot(entry, batch_slots, is_prefetch=False) is None:
                return None
        assert entry.slot is not None
        ready = self._slots[entry.slot].ready
        if isinstance(ready, IssuedEvent) and not ready.issued:
            # waiting for the next poll: a request wants it now, and the runner is between
            # launches (the scheduler runs then), so issue it, with every other one waiting
            self._issue_pending()
            if entry.slot is None or ready.failed:
                return None  # its copies failed: the slot is free again
        uploading = ready is not None and overlap is not False and not ready.query()
        if uploading and (overlap or self.upload_remaining_s(entry.slot) > max_wait_s):
            return None
        entry.last_used = next(self._clock)
        return entry.slot

    def _take_slot(self, entry: _Adapter, batch_slots: set[int], is_prefetch: bool) -> int | None:
        """Find a slot for `entry` (evicting if needed) and start its upload."""
        slot = next((i for i, s in enumerate(self._slots) if s.owner is None), None)
        if slot is None:
            slot = self._victim(batch_slots, is_prefetch)
            if slot is None:
                return None
            victim = self._slots[slot].owner
            assert victim is not None
            victim.slot = None
            self._slots[slot].owner = None
            self._count_eviction("gpu", victim.name)
            logger.debug("evicted LoRA adapter %s from GPU slot %d", victim.name, slot)
        return self._upload(entry, slot)

    def has_slot_for(self, batch_slots: set[int]) -> bool:
        """Whether an adapter without a slot could have one next to `batch_slots`: a free slot,
        or one to evict."""
        return (any(s.owner is None for s in self._slots)
                or self._victim(batch_slots, is_prefetch=False) is not None)

    def needs_only_slot(self, key: str) -> bool:
        """Whether version `key`'s host copy is ready and it holds no slot: a freed slot is
        all a request for it waits for."""
        entry = self._adapters.get(key)
        return entry is not None and entry.slot is None and entry.host is not None

    def hurry(self, key: str) -> None:
        """A request for version `key` has waited too long and its adapter is not in host
        memory: its read goes first when the tier has room (the reads wait in request order
        otherwise)."""
        entry = self._adapters.get(key)
        if entry is None or entry.host is not None or entry.load_task is not None:
            return
        if key not in self._host_waiting:
            self._ensure_loading(entry)
        elif next(iter(self._host_waiting)) != key:
            self._host_waiting = {key: entry, **self._host_waiting}

    def drain_slot(self, steps_left: dict[int, int]) -> int | None:
        """Of the slots in `steps_left` (a batch's slots, each with the most tokens its rows
        have left to generate), the one to empty for a request that waited too long: the
        soonest empty among those whose adapter may be evicted (not pinned); None if none may."""
        cands = [i for i in steps_left if (owner := self._slots[i].owner) is not None
                 and not owner.pinned]
        return min(cands, key=lambda i: (steps_left[i], i)) if cands else None

    def _victim(self, batch_slots: set[int], is_prefetch: bool) -> int | None:
        """The slot to evict: unlocked, unpinned, resident, outside the batch. Prefetches only
        take slots nobody references; otherwise unreferenced slots go first."""
        cands = [
            i
            for i, s in enumerate(self._slots)
            if s.owner is not None
            and s.locks == 0
            and i not in batch_slots
            and not s.owner.pinned
            and s.ready is None
            and not (is_prefetch and s.owner.refs > 0)
        ]
        if not cands:
            return None
        is_fifo = self.config.lora_eviction_policy == "fifo"

        def order(i: int) -> tuple[bool, int]:
            s = self._slots[i]
            assert s.owner is not None
            return s.owner.refs > 0, s.assigned_at if is_fifo else s.owner.last_used

        return min(cands, key=order)

    def _upload(self, entry: _Adapter, slot: int) -> int | None:
        """Enqueue host -> slot copies on the copy stream, after the slot's last use: at the
        next poll or admission (the default), or here (LORASERVE_UPLOAD_BATCH=0)."""
        assert entry.host is not None
        s = self._slots[slot]
        job = _UploadJob(entry, slot, self.pool.slot_copies(slot, entry.host), s.last_use,
                         entry.host.lease, IssuedEvent() if self._batch_uploads else None)
        started = time.monotonic()
        ready: Event | IssuedEvent | None = job.ready
        if job.ready is not None:
            # the host row is reused only after the copies from it have run
            job.lease.event = job.ready
            self._pending_uploads.append(job)
        else:
            ready = self._issue([job])
            if ready is None:
                return None  # a half-written slot is never used: it stays free
        s.owner, s.ready, s.upload_started = entry, ready, started
        s.upload_bytes = entry.host.nbytes
        s.assigned_at = next(self._clock)
        entry.slot, entry.error = slot, None
        return slot

    def _issue(self, jobs: list[_UploadJob]) -> Event | None:
        """Enqueue `jobs` on the copy stream: a wait on each distinct last-use event, the
        copies (one foreach call for them all; one call a copy with LORASERVE_UPLOAD_BATCH=0),
        and one ready event recorded for all. Returns it, or None when the copies failed,
        which fails every job and reports each failure: a job that waited gives its slot
        back (one issued as it starts never had it). (An unload issues its adapter's waiting
        upload before it frees the slot: `_free_slot`.)"""
        t0 = time.perf_counter()
        try:
            with self.streams.use(self.streams.copy):
                waited: set[int] = set()
                for job in jobs:
                    if job.last_use is not None and id(job.last_use) not in waited:
                        waited.add(id(job.last_use))
                        job.last_use.wait(self.streams.copy)
                t_wait = time.perf_counter()
                copies = [c for job in jobs for c in job.copies]
                if self._batch_uploads:
                    self._copy_together(jobs[0].entry, jobs[0].slot, copies)
                else:
                    for i, (dst, src) in enumerate(copies):
                        if self.upload_fault is not None and i == len(copies) // 2:
                            self.upload_fault(jobs[0].entry.name, jobs[0].slot)
                        if src is None:
                            dst.zero_()
                        else:
                            dst.copy_(src, non_blocking=True)
                t_copies = time.perf_counter()
                ready = self.streams.event()
                ready.record(self.streams.copy)
        except Exception as e:  # noqa: BLE001 - reported per adapter, the slots stay unused
            # copies enqueued before the failure may still read the host rows
            failed = self.streams.event()
            with contextlib.suppress(Exception):
                failed.record(self.streams.copy)
                for job in jobs:
                    job.lease.event = failed
            for job in jobs:
                if job.ready is not None:
                    job.ready.set_issued(None, failed=True)
                    if self._own_ready(self._slots[job.slot].ready) is job.ready:
                        self._free_slot(job.slot)  # still its slot: a half-written slot is free
                self._upload_failed(job.entry, job.slot, e)
            return None
        self._count_enqueue(t0, t_wait, t_copies, time.perf_counter())
        for job in jobs:
            if job.ready is None:
                job.lease.event = ready  # the row is reused only after its last copy has run
            else:
                job.ready.set_issued(ready)
        return ready

    def _issue_pending(self) -> None:
        """Issue every upload waiting for the next poll in one go."""
        jobs, self._pending_uploads = self._pending_uploads, []
        if jobs:
            self._issue(jobs)

    def _copy_together(self, entry: _Adapter, slot: int,
                       copies: list[tuple[Tensor, Tensor | None]]) -> None:
        """`copies` as one foreach copy and one foreach zero (the test hook `upload_fault`, when
        set, runs between the two halves, as on the per-copy path)."""
        n = len(copies)
        halves = [copies] if self.upload_fault is None else [copies[: n // 2], copies[n // 2:]]
        for k, part in enumerate(halves):
            if k == 1:
                assert self.upload_fault is not None
                self.upload_fault(entry.name, slot)
            pairs = [(dst, src) for dst, src in part if src is not None]
            if pairs:
                torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs],
                                     non_blocking=True)
            zeros = [dst for dst, src in part if src is None]
            if zeros:
                torch._foreach_zero_(zeros)

    def _upload_failed(self, entry: _Adapter, slot: int, e: Exception) -> None:
        self.counters.upload_failures += 1
        entry.fail(f"upload failed: {e}")
        logger.error("upload of LoRA adapter %s to slot %d failed: %s", entry.name, slot, e)
        if entry.pinned:
            self._pins_waiting.add(entry.key)

    @property
    def upload_mode(self) -> str:
        """How uploads are issued: "batch" (together at the next poll or admission, the
        default) or "loop" (one call a copy, as each starts: LORASERVE_UPLOAD_BATCH=0)."""
        return "batch" if self._batch_uploads else "loop"

    def flush_uploads(self) -> None:
        """Issue every upload waiting for the next poll (tests; a no-op otherwise)."""
        self._issue_pending()

    @staticmethod
    def _own_ready(ready: Event | IssuedEvent | None) -> Event | IssuedEvent | None:
        """The ready event this manager's `_upload` made, out of what a slot holds (tensor
        parallelism wraps it): a failed batch finds its slots by it."""
        return ready

    def _count_enqueue(self, t0: float, t_wait: float, t_copies: float, t_end: float) -> None:
        c = self.counters
        parts = dict(zip(UPLOAD_PARTS, (t_wait - t0, t_copies - t_wait, t_end - t_copies),
                         strict=True))
        for k, v in parts.items():
            c.upload_enqueue_parts_s[k] += v
        c.upload_enqueue_s += t_end - t0
        if t_end - t0 > c.upload_enqueue_max_s:
            c.upload_enqueue_max_s, c.upload_enqueue_max_parts_s = t_end - t0, parts

    def _free_slot(self, slot: int) -> None:
        s = self._slots[slot]
        ready = self._own_ready(s.ready)
        if isinstance(ready, IssuedEvent) and not ready.issued:
            # an unload while its upload waits: issue it now, so that no later upload into
            # this slot can share a batch with it (a batch's zeroing runs after its copies)
            # and its host row is out of reuse only until those copies have run
            self._issue_pending()
        if s.owner is not None:
            s.owner.slot = None
        s.owner, s.ready = None, None

    def lock(self, slots: Iterable[int]) -> None:
        """A batch reading `slots` is about to be launched."""
        for i in slots:
            self._slots[i].locks += 1
            self._slots[i].unlocked.clear()

    def record_use(self, slots: Iterable[int], event: Event) -> None:
        """`event` was recorded on the compute stream after the batch that read `slots`."""
        for i in slots:
            self._slots[i].last_use = event

    def unlock(self, slots: Iterable[int]) -> None:
        """The batch that read `slots` has completed."""
        for i in slots:
            s = self._slots[i]
            assert s.locks > 0, f"unlock of slot {i} that is not locked"
            s.locks -= 1
            if s.locks == 0:
                s.unlocked.set()

    def ready_event(self, slot: int) -> Event | None:
        """The event the compute stream must wait on before reading `slot` (None: ready)."""
        return self._slots[slot].ready

    # introspection -----------------------------------------------------------------------

    def state(self, key: str) -> Residency:
        """Where version `key` (a name's key is the name until a load in place) stands."""
        entry = self._adapters.get(key)
        if entry is None:
            return Residency.LOADING if key in self._loading else Residency.REGISTERED
        return self._state(entry)

    def _state(self, entry: _Adapter) -> Residency:
        if entry.slot is not None:
            ready = self._slots[entry.slot].ready is None
            return Residency.RESIDENT if ready else Residency.UPLOADING
        if entry.host is not None:
            return Residency.IN_HOST
        return Residency.LOADING if entry.load_task is not None else Residency.REGISTERED

    def _tier(self, entry: _Adapter) -> str:
        if entry.slot is not None and self._slots[entry.slot].ready is None:
            return "gpu"
        return "host" if entry.host is not None else "disk"

    def __contains__(self, name: str) -> bool:
        """Whether `name` serves requests (registered, not being unloaded)."""
        entry = self._named(name)
        return entry is not None and not entry.is_closing

    def is_unloading(self, name: str) -> bool:
        """Whether `name` is being unloaded (its requests drain; it cannot be loaded yet)."""
        entry = self._named(name)
        return entry is not None and entry.is_closing

    def slot_of(self, key: str) -> int | None:
        entry = self._adapters.get(key)
        return entry.slot if entry is not None else None

    def uid_of(self, key: str) -> int | None:
        """Version `key`'s id, unique over the process's life (None: no such version)."""
        entry = self._adapters.get(key)
        return entry.uid if entry is not None else None

    def load_error(self, key: str) -> str | None:
        """The last load or upload error of version `key` (the scheduler may abort its
        requests)."""
        entry = self._adapters.get(key)
        return entry.error if entry is not None else None

    def load_error_retryable(self, key: str) -> bool:
        """Whether `load_error(key)` is the machine's read error (EIO, a stale handle...)."""
        entry = self._adapters.get(key)
        return entry is not None and entry.error is not None and entry.error_retryable

    def list(self) -> list[AdapterInfo]:
        return [
            AdapterInfo(
                name=a.name,
                path=a.path,
                tier=self._tier(a),
                state=self._state(a).value,
                pinned=a.pinned,
                rank=a.config.rank,
                target_modules=tuple(sorted(a.config.target_modules)),
                refs=a.refs,
                error=a.error,
                unloading=a.is_closing,
                replaced=a.replaced,
            )
            for a in self._adapters.values()
        ]

    def drain_latencies(self) -> list[tuple[str, float]]:
        """Completed loads' (tier, seconds) since the last call, for a latency histogram."""
        out, self.counters.pending_latencies = self.counters.pending_latencies, []
        return out

    def _count_load(self, tier: str, seconds: float) -> None:
        self.counters.loads[tier] += 1
        self.counters.pending_latencies.append((tier, seconds))

    def _count_eviction(self, tier: str, name: str) -> None:
        self.counters.evictions[tier] += 1
        recent = self.counters.recent_evictions
        recent.append((tier, name))
        del recent[:-MAX_RECENT_EVICTIONS]


def _check_name(name: str) -> None:
    if isinstance(name, str) and len(name) > MAX_NAME_CHARS:  # not echoed: it may be huge
        raise AdapterError(f"lora_name: must be at most {MAX_NAME_CHARS} characters "
                           f"(got {len(name)})")
    if not isinstance(name, str) or not name or ":" in name:
        raise AdapterError(
            f"lora_name: {name!r} must be a non-empty name without ':' "
            f"(at most {MAX_NAME_CHARS} characters)"
        )
    if not name.isprintable():
        raise AdapterError(f"lora_name: {name!r} must not hold control characters")
    if name != name.strip():  # " a" and "a" would look alike in every listing and log
        raise AdapterError(f"lora_name: {name!r} must not begin or end with a space")


def _check_unchanged(entry: _Adapter, rank: int, targets: frozenset[str],
                     signature: Signature) -> None:
    """Refuse a re-read of `entry` that is not the adapter registered (checked against the
    pool, listed and counted with its rank and target modules): another adapter put in its
    folder since is loaded by name anew, not slipped in under the old one's checks; nor are
    its files rewritten since in place (the name would serve other weights than it did)."""
    check_unchanged(entry.name, entry.config.rank, entry.config.target_modules, rank, targets)
    check_same_files(entry.name, entry.signature, signature)


def check_unchanged(name: str, was_rank: int, was_targets: frozenset[str], rank: int,
                    targets: frozenset[str]) -> None:
    """`_check_unchanged` of adapter `name`, first loaded with `was_rank` and `was_targets`
    (a tensor-parallel worker's read of it checks the same)."""
    if (rank, targets) != (was_rank, was_targets):
        raise AdapterError(
            f"LoRA adapter {name!r} changed on disk since it was loaded (rank {was_rank}, "
            f"targets {', '.join(sorted(was_targets))}; now rank {rank}, targets "
            f"{', '.join(sorted(targets))}): load it again in place (load_inplace), or "
            "unload it and load it again"
        )


def check_same_files(name: str, was: Signature | int, now: Signature | int) -> None:
    """Refuse a read of adapter `name` whose files' stat signature (or its digest, from
    another rank) is not the one of the read that registered it."""
    if was != now:
        raise AdapterError(
            f"LoRA adapter {name!r} changed on disk since it was loaded (its files were "
            "rewritten, replaced, added or removed): load it again in place (load_inplace), "
            "or unload it and load it again"
        )


def _unknown(name: str, entry: _Adapter | None) -> UnknownAdapterError:
    """The error for a name with no adapter to use: none registered (`entry` None), or one
    being unloaded (its name is not free again until the unload ends)."""
    if entry is None:
        return UnknownAdapterError(f"LoRA adapter {name!r} has never been loaded", name)
    return UnknownAdapterError(f"LoRA adapter {name!r} is being unloaded", name)
