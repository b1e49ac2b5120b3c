"""Tensor parallelism: rank 0 runs the engine and broadcasts every step plan and adapter upload;
ranks 1..N-1 run `worker_loop`, an identical model runner without scheduler or sampler.

Messages are a fixed header of HEADER_LEN int64 followed by one packed int64 payload, both
broadcast from rank 0 (device tensors on NCCL, host tensors on gloo). Every rank enters the
collectives in one order: rank 0 sends a message and runs the collectives that follow it under
one lock, and each worker handles its messages one at a time in a single thread.

- STEP (rank 0's runner thread): the plan, then the forward's all-reduces and logits gather,
  all under the lock. Sampling happens on rank 0 only.
- SYNC (rank 0's upload thread, `TPDriver`): the uploads queued since the last sync, then one
  all-reduce of every worker's per-slot report (copy done, copy failed, generation, read
  refused). Rank 0 keeps a slot UPLOADING until its own copy event and every worker's report
  say done, so admission waits for all ranks without the event loop ever waiting on a
  collective or the GPU.
- CAPTURE (rank 0's constructor, before anything else runs): the decode graphs' shape (largest
  batch, block-table width, scratch block); then every rank captures the same buckets in the
  same order, so the collectives of the warm-up forwards pair, and so do those inside the
  graphs at each replay. A decode step the graphs hold replays them on every rank, an
  all-reduce of each bucket's padded rows; any other step runs eagerly everywhere.
- SHUTDOWN (the thread that stops the engine): then a barrier.

A worker reads an adapter in a loader thread (no collectives there), then enqueues the copies of
its shard on its copy stream from pinned host memory, after its last enqueued step, and reports
the slot done once the copies' event has completed. It reads the adapter from disk at every
upload, long after rank 0 checked it at its first load: right before each read it repeats those
checks (the folder and its files against the lora_roots of that load, `recheck_adapter_folder`)
and compares its files' stat signature with rank 0's read's, before and after it, and the
adapter's rank and target modules after it, all of which the upload message carries: weights
rewritten in place are refused, not sharded beside rank 0's older copy. A refused read fails
the upload everywhere, as any failed read does, said as refused.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from ops.lora import LoraBatchInfo
from ops.settings import env_flag, env_int
from runtime.adapters.failures import files_signature, signature_digest
from runtime.adapters.manager import (
    AdapterManager,
    check_same_files,
    check_unchanged,
    resolve_pool_spec,
)
from runtime.adapters.paths import AdapterFolder, recheck_adapter_folder
from runtime.adapters.peft_format import AdapterError, load_peft_adapter
from runtime.adapters.pool import EMBED, HostAdapter, LoraModelShape, LoraPool
from runtime.config import ServerConfig
from runtime.engine import Engine, ModelInfo, _eos_ids, kv_block_count, resolve_device
from runtime.errors import AdapterReadError
from runtime.graphs import DecodeGraphs
from runtime.kv_cache import BlockManager, KVCache
from runtime.model.batch import ForwardBatch
from runtime.model.llama import ModelArgs
from runtime.model.loader import (
    check_supported,
    iter_safetensors,
    load_hf_config,
    load_tokenizer,
    resolve_dtype,
    resolve_model_path,
)
from runtime.model.parallel import ParallelCausalLM, ShardedLoraPool, TPGroup, check_divisible
from runtime.runner import InFlightStep, ModelRunner
from runtime.scheduler import ScheduledBatch
from runtime.streams import Event, Streams

log = logging.getLogger("loraserve.tp")

HEADER_LEN = 16
MSG_STEP, MSG_SYNC, MSG_SHUTDOWN, MSG_CAPTURE = 1, 2, 3, 4
# header fields of a step
(H_KIND, H_TOKENS, H_SEQS, H_MAX_BLOCKS, H_MAX_Q, H_DECODE, H_LOGITS, H_LORA, H_SEG, H_SEG_LEN,
 H_CHUNKS, H_SEG_L, H_SEG_LEN_L, H_CHUNKS_L, H_CHUNK_SIZE, H_PAYLOAD) = range(HEADER_LEN)
H_COMMANDS = 1  # header field of a sync: how many uploads its payload carries
# header fields of a capture
H_MAX_BS, H_GRAPH_BLOCKS, H_SCRATCH = 1, 2, 3
# Rows of a sync's report, per slot, summed over the workers.
R_DONE, R_FAILED, R_GEN, R_REFUSED, R_READ_ERROR = range(5)
REPORT_ROWS = 5
# NVLink multicast can take a host's GPUs out of service: always off, whatever the caller set.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                 "NVSHMEM_DISABLE_NVLS": "1"}
# Decode graphs at tp_size > 1, opt-in until they have run on two GPUs: "1" captures them on
# every rank (disable_cuda_graph still turns them off); unset or "0", every step runs eagerly.
TP_GRAPHS_ENV = "LORASERVE_TP_CUDA_GRAPHS"
# While uploads are in flight, rank 0 syncs this often (each sync holds off steps briefly).
SYNC_INTERVAL_S = 0.002


# ------------------------------------------------------------------------------------ setup


def init_tp(
    rank: int, world_size: int, init_method: str, device: torch.device,
    timeout: timedelta | None = None,
) -> TPGroup:
    """Join the process group: NCCL on CUDA (one GPU per rank, NVLink multicast off), gloo on
    CPU. `timeout` bounds every collective (None: torch's default)."""
    if device.type == "cuda":
        os.environ.update(MULTICAST_OFF)  # before NCCL reads its environment
        torch.cuda.set_device(rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout
    )
    return TPGroup(rank, world_size)


def free_init_method() -> str:
    """A tcp:// address on a free local port for the process group rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def rank_device(config: ServerConfig, rank: int) -> torch.device:
    device = resolve_device(config.device)
    return torch.device("cuda", rank) if device.type == "cuda" else device


@dataclass
class RankModel:
    """What every rank builds first: its model shard."""

    model: ParallelCausalLM
    full_args: ModelArgs
    lora_shape: LoraModelShape
    dtype: torch.dtype
    device: torch.device
    context: int
    hf_config: Any
    folder: Any


def build_rank_model(config: ServerConfig, tp: TPGroup) -> RankModel:
    """Load this rank's shard of the weights."""
    device = rank_device(config, tp.rank)
    folder = resolve_model_path(config.model_path)
    hf_config = load_hf_config(folder)
    check_supported(hf_config)
    dtype = resolve_dtype(config.dtype, hf_config, device.type)
    full = ModelArgs.from_hf(hf_config)
    check_divisible(full, tp.world_size)
    context = min(config.context_length or full.max_position, full.max_position)
    torch.manual_seed(config.random_seed + tp.rank)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = ParallelCausalLM(full, hf_config, tp)
    finally:
        torch.set_default_dtype(previous)
    if config.load_format == "dummy":
        model.init_dummy(config.random_seed + tp.rank)
    else:
        model.load_weights(iter_safetensors(folder, dtype, "cpu"))
    model.eval()
    model.build_rope_cache(context)
    shape = LoraModelShape(
        num_layers=full.num_layers, hidden_size=full.hidden_size,
        intermediate_size=full.intermediate_size, q_size=full.q_size, kv_size=full.kv_size,
        vocab_size=full.vocab_size,
    )
    return RankModel(model, full, shape, dtype, device, context, hf_config, folder)


def allocate_rank_kv(config: ServerConfig, rm: RankModel) -> KVCache:
    """This rank's KV cache (its kv heads only), sized after the weights and the adapter pool
    like the single-GPU engine, with the same block count on every rank."""
    a, device = rm.model.args, rm.device
    per_block = KVCache.bytes_per_block(
        a.num_layers, config.page_size, a.num_kv_heads, a.head_dim, rm.dtype
    )
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        budget = int(total * config.mem_fraction_static) - torch.cuda.memory_allocated(device)
    else:
        budget = config.kv_cache_cpu_bytes
    # Every rank must address the same blocks: take the smallest count of any rank.
    count = torch.tensor([kv_block_count(config, budget // per_block)], dtype=torch.int64,
                         device=_comm_device(device))
    dist.all_reduce(count, op=dist.ReduceOp.MIN)
    num_blocks = int(count.item())
    if num_blocks < 1:
        raise ValueError(f"mem_fraction_static/kv_cache_cpu_bytes: no room for a KV block "
                         f"({per_block} bytes each) on some rank")
    return KVCache.allocate(a.num_layers, num_blocks, config.page_size, a.num_kv_heads,
                            a.head_dim, rm.dtype, device)


def _comm_device(device: torch.device) -> torch.device:
    return device if device.type == "cuda" else torch.device("cpu")


def _pool(config: ServerConfig, rm: RankModel, tp: TPGroup) -> ShardedLoraPool:
    max_rank, targets = resolve_pool_spec(config, rm.full_args.num_layers)
    return ShardedLoraPool(rm.lora_shape, tp, config.max_loras_per_batch, max_rank,
                           tp_targets(config, targets, log_it=tp.rank == 0), rm.device, rm.dtype)


def tp_targets(config: ServerConfig, targets: frozenset[str],
               log_it: bool = True) -> frozenset[str]:
    """The pool's target modules at tp_size > 1: `lora_target_modules` "all" there means every
    module tensor parallelism adapts (SGLang's "all" works at any size), so embed_tokens is
    left out, said in the log; an adapter that adapts it is then refused at its load, by name.
    embed_tokens named explicitly stays, for ShardedLoraPool to refuse."""
    if EMBED not in targets or "all" not in (config.lora_target_modules or ()):
        return targets
    if log_it:
        log.warning("lora_target_modules all: %s is left out at tp_size %d (not supported "
                    "there); an adapter that adapts it is refused", EMBED, config.tp_size)
    return targets - {EMBED}


# ------------------------------------------------------------------------------------ messages


@dataclass(frozen=True)
class AdapterOnDisk:
    """What a worker's read of an adapter repeats of its first load on rank 0: the real folder
    with the lora_roots it was checked against, the rank and target modules it had, and the
    digest of its files' stat signature then (`signature_digest`)."""

    name: str
    folder: AdapterFolder
    rank: int
    targets: frozenset[str]
    signature: int

    @property
    def path(self) -> str:
        return self.folder.real


class ReadRefused(AdapterError):
    """A worker's read of an adapter refused: it no longer passes its first load's checks."""


@dataclass(frozen=True)
class UploadOutcome:
    """How an upload ended on every worker: error None when all copied it. retryable: some
    worker's read met the machine's read error (AdapterReadError: EIO, a stale handle...), so
    the same upload may succeed later, as such an error on rank 0's own read."""

    error: str | None
    retryable: bool = False


class TPDriver:
    """Rank 0's side of the messages. Thread safe.

    Steps are sent by the runner thread (`step`). Uploads are queued by the event-loop thread
    (`request_upload`, which never blocks) and sent by the driver's own upload thread, which
    then syncs until every worker has reported them done or failed (`outcome`).
    """

    def __init__(self, tp: TPGroup, device: torch.device, num_slots: int) -> None:
        self.tp = tp
        self.device = _comm_device(device)
        self.cuda_device = device if device.type == "cuda" else None
        self.num_slots = num_slots
        self.is_closed = False
        self.is_broken = False  # a collective failed: no more messages can be paired
        self._lock = threading.Lock()  # one message and its collectives at a time
        self._cond = threading.Condition()  # guards the upload bookkeeping below
        self._queued: list[tuple[int, int, AdapterOnDisk]] = []  # (slot, generation, what)
        self._sent: dict[int, int] = {}  # slot -> generation sent, awaiting the reports
        self._outcomes: dict[int, tuple[int, UploadOutcome]] = {}  # slot -> (generation, ...)
        self._generations = itertools.count(1)
        self._thread: threading.Thread | None = None

    def _send(self, header: list[int], payload: torch.Tensor | None) -> None:
        h = torch.tensor(header + [0] * (HEADER_LEN - len(header)), dtype=torch.int64)
        if payload is not None:
            h[H_PAYLOAD] = payload.numel()
        dist.broadcast(h.to(self.device), src=0)
        if payload is not None and payload.numel():
            dist.broadcast(payload.to(self.device, torch.int64).contiguous(), src=0)

    @contextmanager
    def step(self, fb: ForwardBatch) -> Iterator[None]:
        """Broadcast the plan of one step, then hold every other message off while the block
        runs rank 0's forward (its collectives must pair with the workers' in order)."""
        header, payload = pack_step(fb)
        with self._lock:
            self._send(header, payload)
            yield

    @contextmanager
    def capture(self, max_bs: int, max_blocks: int, scratch_block: int) -> Iterator[None]:
        """Have every worker capture decode graphs of this shape while the block captures rank
        0's (the same buckets, in the same order: their collectives pair)."""
        with self._lock:
            self._send([MSG_CAPTURE, max_bs, max_blocks, scratch_block], None)
            yield

    # uploads -----------------------------------------------------------------------------

    def request_upload(self, slot: int, adapter: AdapterOnDisk) -> int:
        """Queue an upload of `adapter` into `slot` on every worker; returns its generation,
        which `outcome` takes. A later request for the slot supersedes it."""
        with self._cond:
            generation = next(self._generations)
            if self.is_closed or self.is_broken:
                error = UploadOutcome("the tensor-parallel group is not running")
                self._outcomes[slot] = (generation, error)
                return generation
            self._queued.append((slot, generation, adapter))
            self._outcomes.pop(slot, None)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve_uploads, name="loraserve-tp-uploads", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return generation

    def outcome(self, slot: int, generation: int) -> UploadOutcome | None:
        """How upload `generation` into `slot` ended on the workers (None: not yet known)."""
        with self._cond:
            got = self._outcomes.get(slot)
        return got[1] if got is not None and got[0] == generation else None

    def _serve_uploads(self) -> None:
        """The upload thread: send queued uploads, sync until every one is reported."""
        if self.cuda_device is not None:
            torch.cuda.set_device(self.cuda_device)
        while True:
            with self._cond:
                while not self.is_closed and not self._queued and not self._sent:
                    self._cond.wait()
                if self.is_closed:
                    return
                commands, self._queued = self._queued, []
                self._sent.update((slot, gen) for slot, gen, _ in commands)
            try:
                with self._lock:
                    pending = self._sync(commands)
                report = _reduced(*pending)  # waited for outside the lock: steps go on
            except Exception as e:  # a rank is gone: fail what is in flight
                log.exception("tensor-parallel upload sync failed")
                with self._cond:
                    for slot, gen in self._sent.items():
                        self._outcomes[slot] = (gen, UploadOutcome(f"upload sync failed: {e}"))
                    self._sent.clear()
                    self.is_broken = True
                return
            with self._cond:
                self._record(report)
                if self._sent and not self._queued and not self.is_closed:
                    self._cond.wait(SYNC_INTERVAL_S)

    def _sync(self, commands: list[tuple[int, int, AdapterOnDisk]]) -> tuple[Any, torch.Tensor]:
        """Issue one SYNC message: the new uploads, then the all-reduce of the workers' reports
        [REPORT_ROWS, num_slots] (returned in flight, with its work handle)."""
        values = pack_uploads(commands)
        payload = torch.tensor(values, dtype=torch.int64) if values else None
        self._send([MSG_SYNC, len(commands)], payload)
        report = torch.zeros(REPORT_ROWS, self.num_slots, dtype=torch.int64, device=self.device)
        # Rank 0 adds zeros: its own copy is its manager's event.
        return dist.all_reduce(report, async_op=True), report

    def _record(self, report: list[list[int]]) -> None:
        """Settle the sent uploads every worker has reported (call holding _cond)."""
        workers = self.tp.world_size - 1
        for slot, gen in list(self._sent.items()):
            if report[R_GEN][slot] != workers * gen:
                continue  # a worker has not seen this generation (cannot happen: sent first)
            failed = report[R_FAILED][slot]
            if failed:
                error = f"upload failed on {failed} tensor-parallel rank(s)"
                if report[R_REFUSED][slot]:
                    error += (
                        f": {report[R_REFUSED][slot]} refused to read the adapter, which no "
                        "longer passes the checks of its first load (its folder or a file in "
                        "it swapped for a link out of lora_roots or into a system folder, "
                        "another rank or target modules in it, or its files rewritten since "
                        "rank 0 read them; that rank's log says which)"
                    )
                retryable = bool(report[R_READ_ERROR][slot])
                if retryable:
                    error += (f": {report[R_READ_ERROR][slot]} could not read the adapter's "
                              "files (the machine's read error; that rank's log says which)")
                self._outcomes[slot] = (gen, UploadOutcome(error, retryable))
            elif report[R_DONE][slot] == workers:
                self._outcomes[slot] = (gen, UploadOutcome(None))
            else:
                continue
            del self._sent[slot]

    def shutdown(self) -> None:
        """Stop the upload thread, then the workers. Blocks: call it off the event loop."""
        with self._cond:
            if self.is_closed:
                return
            self.is_closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        if self.is_broken:
            raise RuntimeError("a collective failed earlier: the workers cannot be stopped")
        with self._lock:
            self._send([MSG_SHUTDOWN], None)
            dist.barrier()  # both sides leave together: tearing down mid-transfer aborts gloo


def _reduced(work: Any, report: torch.Tensor) -> list[list[int]]:
    work.wait()
    return report.tolist()


def pack_step(fb: ForwardBatch) -> tuple[list[int], torch.Tensor]:
    """(header, payload) of a step: every int tensor of the plan, concatenated as int64."""
    parts = [fb.input_ids, fb.positions, fb.slot_mapping, fb.block_tables.reshape(-1),
             fb.kv_lens, fb.cu_q_lens, fb.logits_indices]
    header = [MSG_STEP, fb.num_tokens, fb.batch_size, fb.block_tables.shape[1], fb.max_q_len,
              int(fb.is_decode), fb.logits_indices.shape[0], int(fb.lora is not None)]
    if fb.lora is not None and fb.lora_logits is not None:
        for info in (fb.lora, fb.lora_logits):
            parts += [info.seg_indptr, info.seg_slots, info.chunk_indptr, info.chunk_slots]
        header += [fb.lora.num_segments, fb.lora.max_seg_len, fb.lora.num_chunks,
                   fb.lora_logits.num_segments, fb.lora_logits.max_seg_len,
                   fb.lora_logits.num_chunks, fb.lora.chunk_size]
    payload = torch.cat([p.to(torch.int64) for p in parts])
    return header, payload


def unpack_step(
    h: list[int], payload: torch.Tensor, slot_ranks: torch.Tensor | None, backend: str
) -> ForwardBatch:
    """The ForwardBatch rank 0 packed (payload on the compute device)."""
    T, B, M, L = h[H_TOKENS], h[H_SEQS], h[H_MAX_BLOCKS], h[H_LOGITS]
    sizes = [T, T, T, B * M, B, B + 1, L]
    lora_sizes: list[int] = []
    if h[H_LORA]:
        for s, c in ((h[H_SEG], h[H_CHUNKS]), (h[H_SEG_L], h[H_CHUNKS_L])):
            lora_sizes += [s + 1, s, c + 1, c]
    ids, pos, slots, tables, kv_lens, cu, logits_idx, *rest = payload.split(sizes + lora_sizes)
    lora = lora_logits = None
    if h[H_LORA]:
        assert slot_ranks is not None
        r = [t.to(torch.int32) for t in rest]
        # the real entry counts, which a decode graph's replay copies into its static tables
        counts = torch.tensor([h[H_SEG], h[H_CHUNKS]], dtype=torch.int32).to(payload.device)
        lora = LoraBatchInfo(r[0], r[1], slot_ranks, h[H_SEG], h[H_SEG_LEN], r[2], r[3],
                             h[H_CHUNKS], h[H_CHUNK_SIZE], backend, counts=counts)
        lora_logits = LoraBatchInfo(r[4], r[5], slot_ranks, h[H_SEG_L], h[H_SEG_LEN_L], r[6],
                                    r[7], h[H_CHUNKS_L], h[H_CHUNK_SIZE], backend)
    return ForwardBatch(
        input_ids=ids, positions=pos, slot_mapping=slots,
        block_tables=tables.to(torch.int32).view(B, M), kv_lens=kv_lens.to(torch.int32),
        cu_q_lens=cu.to(torch.int32), logits_indices=logits_idx, max_q_len=h[H_MAX_Q],
        is_decode=bool(h[H_DECODE]), lora=lora, lora_logits=lora_logits,
    )


def pack_uploads(commands: list[tuple[int, int, AdapterOnDisk]]) -> list[int]:
    """A sync's payload: per upload, [slot, generation, rank, signature, roots, targets], then
    the name, the folder, each root and each target module, each as [length, *bytes]."""
    values: list[int] = []
    for slot, gen, a in commands:
        values += [slot, gen, a.rank, a.signature, len(a.folder.roots), len(a.targets)]
        for text in (a.name, a.folder.real, *a.folder.roots, *sorted(a.targets)):
            raw = os.fsencode(text)
            values += [len(raw), *raw]
    return values


def unpack_uploads(values: list[int], count: int) -> list[tuple[int, int, AdapterOnDisk]]:
    """The (slot, generation, adapter) uploads of a sync's payload (`pack_uploads`)."""
    out, i = [], 0

    def text() -> str:
        nonlocal i
        n = values[i]
        i += 1 + n
        return os.fsdecode(bytes(values[i - n : i]))

    for _ in range(count):
        slot, gen, rank, signature, roots, targets = values[i : i + 6]
        i += 6
        name, real = text(), text()
        folder = AdapterFolder(real, tuple(text() for _ in range(roots)))
        adapter = AdapterOnDisk(name, folder, rank, frozenset(text() for _ in range(targets)),
                                signature)
        out.append((slot, gen, adapter))
    return out


# ------------------------------------------------------------------------------------ workers


@dataclass
class SlotUpload:
    """A worker's latest upload into one slot: read in a loader thread, then copied."""

    generation: int
    read: Future[HostAdapter] | None  # the disk read and sharding, until its copies are queued
    host: HostAdapter | None = None  # kept alive until the copies have run
    ready: Event | None = None  # recorded on the copy stream after the copies
    failed: bool = False
    refused: bool = False  # failed: the read was refused (ReadRefused)
    read_error: bool = False  # failed: the machine's read error (AdapterReadError)

    @property
    def is_done(self) -> bool:
        return self.ready is not None and self.ready.query()


@dataclass
class Worker:
    """Ranks 1..N-1: a model shard, its KV cache and adapter slots."""

    config: ServerConfig
    tp: TPGroup
    rank_model: RankModel
    pool: LoraPool | None
    kv: KVCache
    streams: Streams
    loader: ThreadPoolExecutor
    uploads: dict[int, SlotUpload] = field(default_factory=dict)
    last_step: Event | None = None  # recorded after the last step this rank enqueued
    graphs: DecodeGraphs | None = None  # captured at rank 0's word (MSG_CAPTURE)
    # Test hook: runs in the loader thread before each read (raising fails the upload).
    read_hook: Callable[[str, int], None] | None = None


def build_worker(config: ServerConfig, tp: TPGroup) -> Worker:
    rm = build_rank_model(config, tp)
    pool = _pool(config, rm, tp) if config.is_lora_enabled else None
    rm.model.lora_pool = pool
    loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lora-load",
                                initializer=_use_device, initargs=(rm.device,))
    return Worker(config, tp, rm, pool, allocate_rank_kv(config, rm), Streams(rm.device), loader)


def _use_device(device: torch.device) -> None:
    """Loader threads pin host memory: keep them on this rank's GPU (a new thread is on 0)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def worker_loop(worker: Worker) -> None:
    """Run every message from rank 0 until shutdown."""
    device = worker.rank_model.device
    comm = _comm_device(device)
    try:
        while True:
            header = torch.empty(HEADER_LEN, dtype=torch.int64, device=comm)
            dist.broadcast(header, src=0)
            h = header.tolist()
            payload = torch.empty(h[H_PAYLOAD], dtype=torch.int64, device=comm)
            if h[H_PAYLOAD]:
                dist.broadcast(payload, src=0)
            if h[H_KIND] == MSG_SHUTDOWN:
                dist.barrier()
                return
            if h[H_KIND] == MSG_STEP:
                _worker_step(worker, h, payload.to(device))
                _advance_uploads(worker)
            elif h[H_KIND] == MSG_CAPTURE:
                _worker_capture(worker, h)
            elif h[H_KIND] == MSG_SYNC:
                for slot, gen, adapter in unpack_uploads(payload.tolist(), h[H_COMMANDS]):
                    _start_upload(worker, slot, gen, adapter)
                _advance_uploads(worker)
                dist.all_reduce(_report(worker, comm))
    finally:
        worker.loader.shutdown(wait=False, cancel_futures=True)


@torch.inference_mode()
def _worker_step(worker: Worker, h: list[int], payload: torch.Tensor) -> None:
    pool = worker.pool
    fb = unpack_step(h, payload, pool.slot_ranks if pool else None, worker.config.lora_backend)
    # the logits are rank 0's to sample; rank 0 takes the graphs for the same steps
    if worker.graphs is not None and worker.graphs.can_run(fb):
        worker.graphs.replay(fb)
    else:
        worker.rank_model.model(fb, worker.kv.k, worker.kv.v)
    worker.last_step = worker.streams.event()
    worker.last_step.record()


def _worker_capture(worker: Worker, h: list[int]) -> None:
    """Capture this rank's decode graphs, of the shape rank 0 sent, as rank 0 captures its own."""
    kv, config = worker.kv, worker.config
    worker.graphs = DecodeGraphs(worker.rank_model.model, kv.k, kv.v, h[H_MAX_BS],
                                 h[H_GRAPH_BLOCKS], h[H_SCRATCH], config.page_size,
                                 config.lora_backend)  # as rank 0's runner builds its own
    worker.graphs.capture(worker.streams.compute)


def _start_upload(worker: Worker, slot: int, generation: int, adapter: AdapterOnDisk) -> None:
    """Begin reading this rank's shard of `adapter` (supersedes the slot's last upload: a read
    still running for it is ignored when it ends)."""
    read = worker.loader.submit(_read_shard, worker, slot, adapter)
    worker.uploads[slot] = SlotUpload(generation, read)


def _read_shard(worker: Worker, slot: int, adapter: AdapterOnDisk) -> HostAdapter:
    """Loader thread: read the adapter and lay out this rank's shard in (pinned) host memory.

    Rank 0 checked the adapter at its first load; this read may come much later (every upload
    reads from disk), when whoever can write inside a root could have swapped the folder, or a
    file in it, for a link, or put another adapter in it. So the checks of that load are made
    again right before the read, the files' stat signature compared with rank 0's read's
    before and after it (a file swapped or rewritten since, between the checks and the read
    too, has another), and the rank and target modules after it: a refusal raises
    ReadRefused."""
    if worker.read_hook is not None:
        worker.read_hook(adapter.path, slot)
    assert worker.pool is not None, "LoRA is not enabled"
    try:
        recheck_adapter_folder(adapter.folder)
        before = signature_digest(files_signature(adapter.path))
        check_same_files(adapter.name, adapter.signature, before)
    except AdapterReadError:
        raise  # the machine's, not the adapter's: the upload may succeed later
    except AdapterError as e:
        raise ReadRefused(str(e)) from None
    # values the pool's dtype cannot hold are refused, as on rank 0's reads
    weights = load_peft_adapter(adapter.path, worker.rank_model.lora_shape, worker.pool.dtype)
    try:
        check_unchanged(adapter.name, adapter.rank, adapter.targets, weights.rank,
                        weights.target_modules)
        check_same_files(adapter.name, before, signature_digest(files_signature(adapter.path)))
    except AdapterError as e:
        raise ReadRefused(str(e)) from None
    return worker.pool.build_host(weights)


def _advance_uploads(worker: Worker) -> None:
    """Queue the copies of every finished read (never waits for a read or a copy)."""
    for slot, up in worker.uploads.items():
        if up.read is not None and up.read.done():
            read, up.read = up.read, None
            try:
                up.host = read.result()
                up.ready = _copy_into_slot(worker, slot, up.host)
            except ReadRefused as e:  # reported to rank 0 in the next sync, as refused
                log.error("rank %d: upload into slot %d refused: %s", worker.tp.rank, slot, e)
                up.failed, up.refused, up.host = True, True, None
            except AdapterReadError as e:  # reported to rank 0 in the next sync, retryable
                log.error("rank %d: upload into slot %d could not read the adapter: %s",
                          worker.tp.rank, slot, e)
                up.failed, up.read_error, up.host = True, True, None
            except Exception:  # reported to rank 0 in the next sync
                log.exception("rank %d: upload into slot %d failed", worker.tp.rank, slot)
                up.failed, up.host = True, None
        if up.host is not None and up.is_done:
            up.host = None


def _copy_into_slot(worker: Worker, slot: int, host: HostAdapter) -> Event:
    """Enqueue host -> slot copies on the copy stream after this rank's last enqueued step.

    Rank 0 only overwrites a slot no batch in flight reads, and sends the upload after every
    step that read it, so the last step enqueued here covers all the slot's readers."""
    assert worker.pool is not None
    s = worker.streams
    with s.use(s.copy):
        if worker.last_step is not None:
            worker.last_step.wait(s.copy)
        for dst, src in worker.pool.slot_copies(slot, host):
            if src is None:
                dst.zero_()
            else:
                dst.copy_(src, non_blocking=True)
        ready = s.event()
        ready.record(s.copy)
    return ready


def _report(worker: Worker, device: torch.device) -> torch.Tensor:
    """[REPORT_ROWS, num_slots] int64: per slot, its latest upload is done / failed, its
    generation, whether its read was refused, and whether it met the machine's read error."""
    report = torch.zeros(REPORT_ROWS, worker.config.max_loras_per_batch, dtype=torch.int64)
    for slot, up in worker.uploads.items():
        report[R_DONE, slot] = int(up.is_done)
        report[R_FAILED, slot] = int(up.failed)
        report[R_GEN, slot] = up.generation
        report[R_REFUSED, slot] = int(up.refused)
        report[R_READ_ERROR, slot] = int(up.read_error)
    return report.to(device)


def run_worker(rank: int, world_size: int, init_method: str, config: ServerConfig) -> None:
    """Entry point of a worker process. Ctrl-C reaches the whole process group: rank 0 alone
    decides when the workers stop, so they ignore SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tp = init_tp(rank, world_size, init_method, rank_device(config, rank))
    try:
        worker_loop(build_worker(config, tp))
    finally:
        dist.destroy_process_group()
    end_worker_process()


def end_worker_process() -> NoReturn:
    """Leave a worker process that shut down cleanly at once (exit status 0), its output
    flushed. Its work is done and its process group destroyed by then, but the interpreter's
    teardown could still meet a communication thread left joinable and abort the process
    ("terminate called without an active exception", exit -6): seen once in a CI run of the
    tensor-parallel tests. An exception, instead, takes the normal way out (status 1)."""
    logging.shutdown()  # flushes every handler
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    os._exit(0)


WATCH_INTERVAL_S = 0.5


def exit_for_dead_worker(rank: int, exitcode: int) -> NoReturn:
    """Rank 0's answer to a worker that exited while the group was serving: say which and how,
    then end this process (status 1). Its next collective would wait for the missing rank
    until NCCL's timeout (10 minutes), and a group without one of its ranks serves nothing."""
    log.critical("tensor-parallel worker rank %d exited with status %s; rank 0 cannot go on "
                 "without it and exits (the worker's own output above says why)", rank, exitcode)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    os._exit(1)


class WorkerWatch:
    """Rank 0's watch over its worker processes (ranks 1..N-1 in order), from their spawn until
    `disarm` (before a shutdown asks them to exit): the first one seen exited calls
    `on_death(rank, exitcode)` (default `exit_for_dead_worker`) from the watch's thread, once.
    A worker that fails while rank 0 waits in a collective (an exception in graph capture, out
    of memory, killed) otherwise leaves rank 0 blocked there until NCCL's timeout."""

    def __init__(self, procs: list[Any], on_death: Callable[[int, int], Any] | None = None,
                 interval_s: float = WATCH_INTERVAL_S) -> None:
        self.procs = procs
        self.on_death = on_death or exit_for_dead_worker
        self.interval_s = interval_s
        self._disarmed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loraserve-tp-watch", daemon=True)

    def start(self) -> WorkerWatch:
        self._thread.start()
        return self

    def disarm(self) -> None:
        """Stop watching: the workers may exit from now on (a shutdown, or rank 0's failed
        startup killing them)."""
        self._disarmed.set()

    def _run(self) -> None:
        while not self._disarmed.wait(self.interval_s):
            for rank, p in enumerate(self.procs, start=1):
                code = p.exitcode
                if code is not None and not self._disarmed.is_set():
                    self.on_death(rank, code)
                    return


def spawn_workers(config: ServerConfig, init_method: str) -> list[Any]:
    """Start ranks 1..tp_size-1 as processes (spawned: CUDA and threads do not survive fork)."""
    ctx = mp.get_context("spawn")
    procs = []
    for rank in range(1, config.tp_size):
        p = ctx.Process(target=run_worker, args=(rank, config.tp_size, init_method, config),
                        name=f"loraserve-tp{rank}", daemon=True)
        p.start()
        procs.append(p)
    return procs


# ------------------------------------------------------------------------------------ rank 0


class TPModelRunner(ModelRunner):
    """Broadcasts each step's plan before running rank 0's own shard. Decode steps replay CUDA
    graphs captured on every rank, collectives inside; steps that prefill run eagerly."""

    def __init__(self, *args: Any, driver: TPDriver, **kw: Any) -> None:
        super().__init__(*args, **kw)
        if env_flag("LORASERVE_DECODE_ZERO_COPY", False):  # set to 1, not the default
            raise ValueError("LORASERVE_DECODE_ZERO_COPY=1 is not supported with tp_size > 1: "
                             "each step's plan is broadcast from its device tensors")
        self.zero_copy = False  # by default: decode steps stage and copy their rows
        # rank 0's results go back on its compute stream, the path the two-GPU tests ran
        # (the readback stream has not run under tensor parallelism)
        self.readback = False
        if env_flag("LORASERVE_READBACK_KERNEL", False):  # set to 1, not the default
            raise ValueError("LORASERVE_READBACK_KERNEL=1 is not supported with tp_size > 1: "
                             "rank 0 copies its results on its compute stream")
        self.results = None  # by default: copies, not the kernel readback
        if env_int("LORASERVE_DECODE_GRAPH_COPIES", 1, least=1) > 1:  # not run on two GPUs
            raise ValueError("LORASERVE_DECODE_GRAPH_COPIES above 1 is not supported with "
                             "tp_size > 1: each rank captures one decode graph a bucket")
        self.driver = driver

    def enable_cuda_graphs(
        self, block_manager: BlockManager, max_bs: int, context_length: int, max_tokens: int = 0
    ) -> None:
        """Decode graphs up to `max_bs` rows on every rank (CUDA only). `max_tokens` is
        ignored: the prefill graphs capture the single-GPU model's `hidden`, which the
        tensor-parallel model does not split, so steps that prefill stay eager."""
        super().enable_cuda_graphs(block_manager, max_bs, context_length, 0)

    def _capture_decode(self, graphs: DecodeGraphs) -> None:
        """Have every worker capture graphs of the same shape while rank 0 captures its own."""
        with self.driver.capture(graphs.max_bs, graphs.max_blocks, graphs.scratch_block):
            graphs.capture(self.streams.compute)

    def launch(self, plan: ScheduledBatch, fb: ForwardBatch) -> InFlightStep:
        # The plan was copied (and filled from the step in flight) on the compute stream:
        # broadcast it after those copies.
        with self.streams.use(self.streams.compute), self.driver.step(fb):
            return super().launch(plan, fb)


class GatheredReady(Event):
    """The ready flag of an upload at tp_size > 1: rank 0's own copy event AND every worker's
    report, which the driver's syncs gather. Never blocks; the compute stream waits on rank 0's
    copies only (a step never reads a slot before every worker has reported it done)."""

    def __init__(self, local: Event, driver: TPDriver, slot: int, generation: int) -> None:
        self.local = local
        self.driver = driver
        self.slot = slot
        self.generation = generation

    @property
    def outcome(self) -> UploadOutcome | None:
        return self.driver.outcome(self.slot, self.generation)

    def record(self, stream: torch.cuda.Stream | None = None) -> None:
        raise TypeError("a gathered ready flag is recorded by its parts")

    def query(self) -> bool:
        outcome = self.outcome
        return outcome is not None and outcome.error is None and self.local.query()

    def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        self.local.wait(stream)

    def synchronize(self) -> None:
        self.local.synchronize()


class TPAdapterManager(AdapterManager):
    """Adapter residency on rank 0, which alone decides loads, evictions and pins; every slot
    upload is repeated on every worker. A slot stays UPLOADING until rank 0's copy event and
    every worker's report say done; a failure on any rank fails the upload everywhere."""

    def __init__(self, config: ServerConfig, rm: RankModel, streams: Streams,
                 tp: TPGroup, driver: TPDriver) -> None:
        # adapters are read against the whole model; only this rank's shard of the pool exists
        super().__init__(config, rm.lora_shape, rm.device, rm.dtype, streams,
                         pool=_pool(config, rm, tp))
        self.driver = driver

    def _upload(self, entry: Any, slot: int) -> int | None:
        """Rank 0's copies as on one GPU, then the same upload queued for the workers."""
        if super()._upload(entry, slot) is None:
            return None
        s = self._slots[slot]
        assert s.ready is not None
        adapter = AdapterOnDisk(entry.name, entry.folder, entry.config.rank,
                                entry.config.target_modules, signature_digest(entry.signature))
        generation = self.driver.request_upload(slot, adapter)
        s.ready = GatheredReady(s.ready, self.driver, slot, generation)
        return slot

    @staticmethod
    def _own_ready(ready: Any) -> Any:
        """Rank 0's own ready event inside the gathered flag: a failure issuing it (in the
        batch issued at a poll) then frees the slot, as on one GPU."""
        return ready.local if isinstance(ready, GatheredReady) else ready

    def admit(
        self, name: str, batch_slots: set[int], overlap: bool | None, max_wait_s: float = 0.0
    ) -> int | None:
        """As on one GPU, except that an uploading adapter always waits: a worker's copy may
        still wait on its disk read, which no stream event can order."""
        return super().admit(name, batch_slots, True, max_wait_s)

    def poll(self) -> None:
        """Fail the uploads some worker reported failed, then mark those done everywhere."""
        for slot, s in enumerate(self._slots):
            if isinstance(s.ready, GatheredReady) and s.owner is not None:
                outcome = s.ready.outcome
                if outcome is not None and outcome.error is not None:
                    self._fail_upload(slot, outcome.error, outcome.retryable)
        super().poll()

    def _fail_upload(self, slot: int, error: str, retryable: bool = False) -> None:
        """Free the slot (no batch has read it), keep the host copy; a later request retries.
        retryable: a worker's read met the machine's read error (its requests answer 503)."""
        entry = self._slots[slot].owner
        assert entry is not None
        self._free_slot(slot)
        self.counters.upload_failures += 1
        entry.fail(error, retryable)
        log.error("upload of LoRA adapter %s to slot %d failed: %s", entry.name, slot, error)
        if entry.pinned:
            self._pins_waiting.add(entry.key)


class TPEngine(Engine):
    """The engine on rank 0 of a tensor-parallel group. `stop` also stops the workers."""

    driver: TPDriver
    workers: list[Any]
    watch: WorkerWatch | None = None  # launch's: from_group's caller watches its own workers

    @classmethod
    def from_group(cls, config: ServerConfig, tp: TPGroup, metrics: Any = None) -> TPEngine:
        """Build rank 0 once the process group exists (workers build theirs meanwhile)."""
        rm = build_rank_model(config, tp)
        driver = TPDriver(tp, rm.device, config.max_loras_per_batch)
        streams = Streams(rm.device)
        adapters = None
        if config.is_lora_enabled:
            adapters = TPAdapterManager(config, rm, streams, tp, driver)
            rm.model.lora_pool = adapters.pool
        info = ModelInfo(
            model_path=config.model_path, served_model_name=config.model_name,
            context_length=rm.context, vocab_size=rm.full_args.vocab_size,
            dtype=str(rm.dtype).removeprefix("torch."), device=rm.device.type,
            is_lora_enabled=config.is_lora_enabled,
            max_lora_rank=adapters.pool.max_rank if adapters else None,
            lora_target_modules=tuple(sorted(adapters.pool.target_modules)) if adapters else None,
        )
        kv = allocate_rank_kv(config, rm)
        tokenizer = load_tokenizer(rm.folder)
        # Engine's own runner would step the sharded model on rank 0 alone while the other
        # ranks wait for the driver: it captures no graphs and runs no warm-up steps. The
        # tensor-parallel runner that replaces it captures the decode graphs on every rank
        # (TP_GRAPHS_ENV).
        graphs = not config.disable_cuda_graph and env_flag(TP_GRAPHS_ENV, False)
        engine = cls(config.replace(disable_cuda_graph=True, skip_server_warmup=True), rm.model,
                     tokenizer, kv, BlockManager(kv.k[0].shape[0], config.page_size), adapters,
                     streams, info, _eos_ids(tokenizer, rm.folder), metrics)
        engine.config = config.replace(disable_cuda_graph=not graphs, skip_server_warmup=True)
        engine.runner = TPModelRunner(
            rm.model, kv, config.page_size, engine.sampler, rm.device, config.lora_backend,
            config.max_lora_chunk_size, streams, driver=driver,
        )
        engine.driver = driver
        engine.workers = []
        if graphs:
            engine.runner.enable_cuda_graphs(
                engine.block_manager, min(config.cuda_graph_max_bs, config.max_running_requests),
                rm.context,
            )
        return engine

    @classmethod
    def launch(cls, config: ServerConfig, metrics: Any = None) -> TPEngine:
        """Spawn ranks 1..tp_size-1, join as rank 0 in this process, build the engine."""
        device = resolve_device(config.device)
        if device.type == "cuda" and torch.cuda.device_count() < config.tp_size:
            raise ValueError(f"tp_size: {config.tp_size} needs as many GPUs, "
                             f"{torch.cuda.device_count()} visible")
        if device.type == "cuda":
            os.environ.update(MULTICAST_OFF)  # the workers inherit it
        init_method = free_init_method()
        procs = spawn_workers(config, init_method)
        # a worker failing while rank 0 builds (its graph captures pair collectives) or serves
        watch = WorkerWatch(procs).start()
        try:
            tp = init_tp(0, config.tp_size, init_method, rank_device(config, 0))
            engine = cls.from_group(config, tp, metrics)
        except BaseException:
            watch.disarm()
            for p in procs:  # they may be waiting on a collective rank 0 will never join
                p.kill()
            if dist.is_initialized():
                dist.destroy_process_group()
            raise
        engine.workers = procs
        engine.watch = watch
        return engine

    async def stop(self, drain_timeout: float = 0.0) -> None:
        await super().stop(drain_timeout)
        if self.watch is not None:
            self.watch.disarm()  # the shutdown below ends the workers
        try:  # a collective and a barrier: off the event loop
            await asyncio.to_thread(self.driver.shutdown)
        except RuntimeError as e:  # a worker already gone (killed with the process group)
            log.error("tensor-parallel workers did not shut down cleanly: %s", e)
        for p in self.workers:
            await asyncio.to_thread(p.join, 30)
        if self.workers and dist.is_initialized():
            dist.destroy_process_group()
