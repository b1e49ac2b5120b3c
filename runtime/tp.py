"""Tensor parallelism: rank 0 runs the engine and broadcasts every step plan and adapter upload;
ranks 1..N-1 run `worker_loop`, an identical model runner without scheduler or sampler.

Messages are a fixed header of HEADER_LEN int64 followed by one packed int64 payload, both
broadcast from rank 0 (device tensors on NCCL, host tensors on gloo). Rank 0 sends a message
under a lock, so the runner thread (steps), the loop thread (uploads) and shutdown never
interleave their collectives. Sampling happens on rank 0 only.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ops.lora import LoraBatchInfo
from runtime.adapters.manager import AdapterManager, resolve_pool_spec
from runtime.adapters.peft_format import load_peft_adapter
from runtime.adapters.pool import LoraModelShape, LoraPool
from runtime.config import ServerConfig
from runtime.engine import Engine, ModelInfo, _eos_ids, resolve_device
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
from runtime.runner import ModelRunner, StepResult
from runtime.scheduler import ScheduledBatch
from runtime.streams import Streams

log = logging.getLogger("loraserve.tp")

HEADER_LEN = 16
MSG_STEP, MSG_UPLOAD, MSG_SHUTDOWN = 1, 2, 3
# header fields of a step
(H_KIND, H_TOKENS, H_SEQS, H_MAX_BLOCKS, H_MAX_Q, H_DECODE, H_LOGITS, H_LORA, H_SEG, H_SEG_LEN,
 H_CHUNKS, H_SEG_L, H_SEG_LEN_L, H_CHUNKS_L, H_CHUNK_SIZE, H_PAYLOAD) = range(HEADER_LEN)
H_SLOT, H_PATH_LEN = 1, 2  # header fields of an upload


# ------------------------------------------------------------------------------------ setup


def init_tp(
    rank: int, world_size: int, init_method: str, device: torch.device,
    timeout: timedelta | None = None,
) -> TPGroup:
    """Join the process group: NCCL on CUDA (one GPU per rank, NVLink multicast off), gloo on
    CPU. `timeout` bounds every collective (None: torch's default)."""
    if device.type == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
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
    count = torch.tensor([budget // per_block], dtype=torch.int64, device=_comm_device(device))
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
    return ShardedLoraPool(rm.lora_shape, tp, config.max_loras_per_batch, max_rank, targets,
                           rm.device, rm.dtype)


# ------------------------------------------------------------------------------------ messages


class TPDriver:
    """Rank 0's side of the messages. Thread safe: one message at a time."""

    def __init__(self, tp: TPGroup, device: torch.device) -> None:
        self.tp = tp
        self.device = _comm_device(device)
        self._lock = threading.Lock()
        self.is_closed = False

    def _send(self, header: list[int], payload: torch.Tensor | None) -> None:
        h = torch.tensor(header + [0] * (HEADER_LEN - len(header)), dtype=torch.int64)
        if payload is not None:
            h[H_PAYLOAD] = payload.numel()
        dist.broadcast(h.to(self.device), src=0)
        if payload is not None and payload.numel():
            dist.broadcast(payload.to(self.device, torch.int64).contiguous(), src=0)

    def send_step(self, fb: ForwardBatch) -> None:
        """Broadcast the plan of one step (call right before rank 0's own forward)."""
        header, payload = pack_step(fb)
        with self._lock:
            self._send(header, payload)

    def upload(self, slot: int, path: str) -> str | None:
        """Every worker reads `path` and writes its shard into `slot`. Returns None when all
        succeeded, else an error message (a failure on any rank fails the upload)."""
        data = torch.tensor(list(os.fsencode(path)), dtype=torch.int64)
        with self._lock:
            self._send([MSG_UPLOAD, slot, data.numel()], data)
            failed = torch.zeros(1, dtype=torch.int64, device=self.device)
            dist.all_reduce(failed)
        n = int(failed.item())
        return None if n == 0 else f"upload failed on {n} tensor-parallel rank(s)"

    def shutdown(self) -> None:
        with self._lock:
            if self.is_closed:
                return
            self.is_closed = True
            self._send([MSG_SHUTDOWN], None)
            dist.barrier()  # both sides leave together: tearing down mid-transfer aborts gloo


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
        lora = LoraBatchInfo(r[0], r[1], slot_ranks, h[H_SEG], h[H_SEG_LEN], r[2], r[3],
                             h[H_CHUNKS], h[H_CHUNK_SIZE], backend)
        lora_logits = LoraBatchInfo(r[4], r[5], slot_ranks, h[H_SEG_L], h[H_SEG_LEN_L], r[6],
                                    r[7], h[H_CHUNKS_L], h[H_CHUNK_SIZE], backend)
    return ForwardBatch(
        input_ids=ids, positions=pos, slot_mapping=slots,
        block_tables=tables.to(torch.int32).view(B, M), kv_lens=kv_lens.to(torch.int32),
        cu_q_lens=cu.to(torch.int32), logits_indices=logits_idx, max_q_len=h[H_MAX_Q],
        is_decode=bool(h[H_DECODE]), lora=lora, lora_logits=lora_logits,
    )


# ------------------------------------------------------------------------------------ workers


@dataclass
class Worker:
    """Ranks 1..N-1: a model shard, its KV cache and adapter slots."""

    config: ServerConfig
    tp: TPGroup
    rank_model: RankModel
    pool: LoraPool | None
    kv: KVCache


def build_worker(config: ServerConfig, tp: TPGroup) -> Worker:
    rm = build_rank_model(config, tp)
    pool = _pool(config, rm, tp) if config.is_lora_enabled else None
    rm.model.lora_pool = pool
    return Worker(config, tp, rm, pool, allocate_rank_kv(config, rm))


def worker_loop(worker: Worker) -> None:
    """Run every message from rank 0 until shutdown."""
    device = worker.rank_model.device
    comm = _comm_device(device)
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
        elif h[H_KIND] == MSG_UPLOAD:
            path = os.fsdecode(bytes(payload.tolist()))
            failed = torch.tensor([int(not _worker_upload(worker, h[H_SLOT], path))],
                                  dtype=torch.int64, device=comm)
            dist.all_reduce(failed)


@torch.inference_mode()
def _worker_step(worker: Worker, h: list[int], payload: torch.Tensor) -> None:
    pool = worker.pool
    fb = unpack_step(h, payload, pool.slot_ranks if pool else None, worker.config.lora_backend)
    worker.rank_model.model(fb, worker.kv.k, worker.kv.v)  # the logits are rank 0's to sample


def _worker_upload(worker: Worker, slot: int, path: str) -> bool:
    """Read the adapter, lay out this rank's shard, copy it into `slot`. False on failure."""
    try:
        assert worker.pool is not None, "LoRA is not enabled"
        weights = load_peft_adapter(path, worker.rank_model.lora_shape)
        host = worker.pool.build_host(weights)
        for dst, src in worker.pool.slot_copies(slot, host):
            if src is None:
                dst.zero_()
            else:
                dst.copy_(src)
        return True
    except Exception:  # reported to rank 0 through the flag
        log.exception("rank %d: upload of %s to slot %d failed", worker.tp.rank, path, slot)
        return False


def run_worker(rank: int, world_size: int, init_method: str, config: ServerConfig) -> None:
    """Entry point of a worker process. Ctrl-C reaches the whole process group: rank 0 alone
    decides when the workers stop, so they ignore SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tp = init_tp(rank, world_size, init_method, rank_device(config, rank))
    try:
        worker_loop(build_worker(config, tp))
    finally:
        dist.destroy_process_group()


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
    """Broadcasts each step's plan before running rank 0's own shard. No CUDA graphs (the
    collectives run eagerly)."""

    def __init__(self, *args: Any, driver: TPDriver, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.driver = driver

    def enable_cuda_graphs(self, block_manager: BlockManager, max_bs: int, context: int) -> None:
        return

    def execute(self, plan: ScheduledBatch, fb: ForwardBatch) -> StepResult:
        # The plan was copied on the compute stream: broadcast it after those copies.
        with self.streams.use(self.streams.compute):
            self.driver.send_step(fb)
        return super().execute(plan, fb)


class TPAdapterManager(AdapterManager):
    """Adapter residency on rank 0; every slot upload is repeated on every worker."""

    def __init__(self, config: ServerConfig, rm: RankModel, streams: Streams,
                 tp: TPGroup, driver: TPDriver) -> None:
        super().__init__(config, rm.lora_shape, rm.device, rm.dtype, streams)
        self.pool = _pool(config, rm, tp)  # replaces the unsharded pool built above
        self.driver = driver

    def _upload(self, entry: Any, slot: int) -> int | None:
        error = self.driver.upload(slot, entry.path)
        if error is None:
            return super()._upload(entry, slot)
        self.counters.upload_failures += 1
        entry.error = error
        log.error("upload of LoRA adapter %s to slot %d failed: %s", entry.name, slot, error)
        if entry.pinned:
            self._pins_waiting.add(entry.name)
        return None


class TPEngine(Engine):
    """The engine on rank 0 of a tensor-parallel group. `stop` also stops the workers."""

    driver: TPDriver
    workers: list[Any]

    @classmethod
    def from_group(cls, config: ServerConfig, tp: TPGroup, metrics: Any = None) -> TPEngine:
        """Build rank 0 once the process group exists (workers build theirs meanwhile)."""
        rm = build_rank_model(config, tp)
        driver = TPDriver(tp, rm.device)
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
        engine = cls(config.replace(disable_cuda_graph=True), rm.model, tokenizer, kv,
                     BlockManager(kv.k[0].shape[0], config.page_size), adapters, streams, info,
                     _eos_ids(tokenizer, rm.folder), metrics)
        engine.runner = TPModelRunner(
            rm.model, kv, config.page_size, engine.sampler, rm.device, config.lora_backend,
            config.max_lora_chunk_size, streams, driver=driver,
        )
        engine.driver = driver
        engine.workers = []
        return engine

    @classmethod
    def launch(cls, config: ServerConfig, metrics: Any = None) -> TPEngine:
        """Spawn ranks 1..tp_size-1, join as rank 0 in this process, build the engine."""
        device = resolve_device(config.device)
        if device.type == "cuda" and torch.cuda.device_count() < config.tp_size:
            raise ValueError(f"tp_size: {config.tp_size} needs as many GPUs, "
                             f"{torch.cuda.device_count()} visible")
        init_method = free_init_method()
        procs = spawn_workers(config, init_method)
        try:
            tp = init_tp(0, config.tp_size, init_method, rank_device(config, 0))
            engine = cls.from_group(config, tp, metrics)
        except BaseException:
            for p in procs:  # they may be waiting on a collective rank 0 will never join
                p.kill()
            if dist.is_initialized():
                dist.destroy_process_group()
            raise
        engine.workers = procs
        return engine

    async def stop(self, drain_timeout: float = 0.0) -> None:
        await super().stop(drain_timeout)
        try:
            self.driver.shutdown()
        except RuntimeError as e:  # a worker already gone (killed with the process group)
            log.error("tensor-parallel workers did not shut down cleanly: %s", e)
        for p in self.workers:
            p.join(timeout=30)
        if self.workers and dist.is_initialized():
            dist.destroy_process_group()

