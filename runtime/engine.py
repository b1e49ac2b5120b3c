"""The engine: owns the model, KV cache, scheduler, adapters and runner, and runs the
cooperative loop: poll adapters → schedule → run the step (awaited, off the loop thread) →
postprocess. `submit()` + `stream()` is the Python API; the HTTP layer is a client of it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ops.settings import env_flag, env_int
from runtime.adapters.manager import AdapterInfo, AdapterManager, Residency, resolve_pool_spec
from runtime.adapters.pool import GROUPS, LAYER_MODULES, LoraModelShape, LoraPool
from runtime.config import ServerConfig
from runtime.errors import (
    EngineStoppedError,
    QueueFullError,
    UnknownAdapterError,
    ValidationError,
)
from runtime.kv_cache import BlockManager, KVCache
from runtime.model.llama import CausalLM, ModelArgs
from runtime.model.loader import (
    check_supported,
    iter_safetensors,
    load_hf_config,
    load_tokenizer,
    resolve_dtype,
    resolve_model_path,
)
from runtime.request import (
    FinishReason,
    Request,
    RequestOutput,
    RequestStatus,
    SamplingParams,
    new_rid,
)
from runtime.runner import InFlightStep, ModelRunner, StepResult, warmup_shapes
from runtime.sampler import Sampler
from runtime.scheduler import ScheduledBatch, Scheduler
from runtime.streams import Event, Streams

log = logging.getLogger("loraserve.engine")

STEP_LOG_INTERVAL_S = 10.0
MAX_TOP_LOGPROBS = 20  # top candidates a token, output or prompt
# token_ids_logprob's ids a request, at most: each output token and scored prompt position
# answers one log-prob an id, so the answer stays bounded as MAX_TOP_LOGPROBS keeps it
MAX_TOKEN_IDS_LOGPROB = 128

# How long a thread may hold the GIL while another waits for it (see Engine.start).
GIL_SWITCH_INTERVAL_S = 0.0005

# LORASERVE_EAGER_TOKEN_GRID=N pads eager prefill steps to a multiple of N tokens
# (ModelRunner.enable_token_grid; 64 matches the prefill graphs' grid above 256 tokens). Off
# by default: on the device it removed the first served steps' waits on cuBLAS, but the
# 1000-adapter run kept 89-94 % with it against 93-95 % without (benchmarks/RESULTS.md).
TOKEN_GRID_ENV = "LORASERVE_EAGER_TOKEN_GRID"


def freeze_startup_objects() -> bool:
    """Collect, then move every object alive now (the model, the imported libraries: some 400k
    objects) out of the cyclic garbage collector's reach, as the engine starts serving: a full
    collection walks them all (0.18-0.22 s on the 2-core CPU box) while no thread runs, and the
    allocations of serving (requests, on-demand adapter loads) set one off from time to time.
    Objects freed by their reference counts are freed as before. LORASERVE_GC_FREEZE=0 leaves
    the collector as it is. Returns whether it froze."""
    if not env_flag("LORASERVE_GC_FREEZE", True):
        return False
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.info("moved %d startup objects out of the garbage collector's reach in %.2f s",
             gc.get_freeze_count(), time.perf_counter() - t0)
    return True


@dataclass(frozen=True)
class ModelInfo:
    model_path: str
    served_model_name: str
    context_length: int
    vocab_size: int
    dtype: str
    device: str
    is_lora_enabled: bool
    max_lora_rank: int | None
    lora_target_modules: tuple[str, ...] | None


@dataclass
class LoopTimings:
    """Host seconds the serving loop spent in each phase, summed over its steps. `wait` is
    time blocked on the GPU: a loop with little of it is bound by the host."""

    steps: int = 0
    schedule: float = 0.0
    prepare: float = 0.0
    launch: float = 0.0  # enqueueing the forward and sampler (runner thread)
    wait: float = 0.0
    postprocess: float = 0.0
    # CPU time the runner thread spent in those launches: the rest of `launch` it waited (for
    # the GIL while other threads ran Python, or blocked in the driver). CUDA spins in a
    # synchronising call, so a wait there counts as CPU time (many_adapters --long-launch-ms)
    launch_cpu: float = 0.0

    def per_step_ms(self) -> dict[str, float]:
        n = max(self.steps, 1)
        return {k: 1e3 * v / n for k, v in asdict(self).items() if k != "steps"} | {
            "steps": self.steps}


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_steps: int
    num_preemptions: int
    generated_tokens: int
    tokens_per_second: float


@dataclass
class Submission:
    """One request for `Engine.submit_many`: `Engine.submit`'s arguments."""

    prompt_ids: list[int]
    params: SamplingParams
    lora_name: str | None = None
    rid: str | None = None
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start: int = 1
    # the prompt tokens' own top candidates, when not `top_logprobs_num` (vLLM's
    # prompt_logprobs asks for its own number), and each scored token's rank
    prompt_top_logprobs_num: int | None = None
    prompt_logprob_ranks: bool = False
    # SGLang's: with return_logprob, these ids' log-probs at each scored prompt position and
    # each output token
    token_ids_logprob: list[int] | None = None
    # vLLM's: with the prefix cache, only requests of the same salt share cached blocks
    cache_salt: str | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but no CUDA device is available")
    return torch.device(name)


class Engine:
    def __init__(
        self,
        config: ServerConfig,
        model: CausalLM,
        tokenizer: Any,
        kv_cache: KVCache,
        block_manager: BlockManager,
        adapters: AdapterManager | None,
        streams: Streams,
        info: ModelInfo,
        eos_token_ids: set[int],
        metrics: Any = None,
    ) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.kv_cache = kv_cache
        self.block_manager = block_manager
        self.adapters = adapters
        if adapters is not None:
            adapters.on_version_drained = lambda: self._report_adapters(force=True)
        self.streams = streams
        self.model_info = info
        self.eos_token_ids = eos_token_ids
        self.metrics = metrics
        self.device = next(model.parameters()).device
        self.sampler = Sampler(info.vocab_size, eos_token_ids, self.device)
        self.runner = ModelRunner(
            model, kv_cache, config.page_size, self.sampler, self.device,
            config.lora_backend, config.max_lora_chunk_size, streams,
        )
        if not config.disable_cuda_graph:
            self.runner.enable_cuda_graphs(  # no step is larger than max_running_requests
                block_manager,
                min(config.cuda_graph_max_bs, config.max_running_requests),
                info.context_length,
                min(config.cuda_graph_max_tokens, config.chunked_prefill_size),
            )
        # Eager prefill steps on a token grid that the warm-up covers (opt-in; see
        # TOKEN_GRID_ENV)
        if grid := env_int(TOKEN_GRID_ENV, 0, least=0):
            self.runner.enable_token_grid(block_manager, grid, config.chunked_prefill_size)
        if self.device.type == "cuda" and not config.skip_server_warmup:
            self.warm_up()
        block_manager.prefix_cache = config.enable_prefix_caching
        self.scheduler = Scheduler(
            block_manager, config.max_running_requests, config.chunked_prefill_size,
            adapters, config.enable_lora_overlap_loading, info.context_length,
        )
        self.requests: dict[str, Request] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._froze = False  # whether start() froze the startup objects (freeze_startup_objects)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraserve-runner")
        # Blocks on a launched step's event so that the loop thread never does.
        self._waiter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraserve-wait")
        self._last_complete = 0.0
        self.num_overlapped_steps = 0  # steps launched while the previous one was in flight
        # Seconds the loop spent in each phase (LoopTimings): where a step's host time goes.
        self.timings = LoopTimings()
        self.overlap_schedule = not config.disable_overlap_schedule  # benchmarks flip it
        self._accepting = True
        # Unloads draining their adapter's requests, whoever waits for them (unload_adapter)
        self._unloads: set[asyncio.Task[None]] = set()
        self._generated_tokens = 0
        self._last_log = (time.monotonic(), 0)
        # Where each queued request's adapter was at arrival, reported when it is admitted.
        self._residency: dict[str, str] = {}
        self._seen_failures = 0
        self._seen_evictions: dict[str, int] = {}
        if adapters is not None and self.device.type != "cuda":
            # The Triton kernels only run on CUDA; on CPU every backend is the torch reference.
            log.info("LoRA backend %s runs as torch on CPU", config.lora_backend)

    def warm_up(self) -> int:
        """Compile, before serving, the kernel variants the first requests would otherwise
        wait for: steps larger than the prefill graphs, and the lm_head over a step's rows, run
        eagerly, and their Triton kernels compile per tile shape on first use (seconds each on
        an 8B model). Runs at construction on CUDA unless `skip_server_warmup`; returns the
        steps run."""
        t0 = time.perf_counter()
        c = self.config
        shapes = warmup_shapes(c.chunked_prefill_size, c.max_running_requests,
                               max(1, self.model_info.context_length - 1))  # room to decode
        ran = self.runner.warm_up(self.block_manager, shapes, self.model_info.vocab_size)
        t1 = time.perf_counter()
        # cuBLAS waits for the device the first time it runs a kernel: the GEMMs of eager
        # decode steps and of lm_head over a step's rows run here, and with the token grid
        # those of every eager prefill step
        sizes = self.runner.grid_sizes()
        calls = self.runner.warm_up_gemms(sizes, c.max_running_requests)
        log.info("warm-up: %d steps of up to %d tokens in %.1f s; %d GEMMs over %d token "
                 "counts in %.1f s", ran, c.chunked_prefill_size, t1 - t0, calls, len(sizes),
                 time.perf_counter() - t1)
        return ran

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: ServerConfig, metrics: Any = None) -> Engine:
        if config.tp_size > 1:  # rank 0 here, the other ranks in processes it spawns
            if env_int(TOKEN_GRID_ENV, 0, least=0):  # the ranks' runners pad no steps
                raise ValueError(f"{TOKEN_GRID_ENV}: not supported at tp_size > 1; unset it")
            from runtime.tp import TPEngine

            return TPEngine.launch(config, metrics)
        device = resolve_device(config.device)
        folder = resolve_model_path(config.model_path)
        hf_config = load_hf_config(folder)
        check_supported(hf_config)
        dtype = resolve_dtype(config.dtype, hf_config, device.type)
        args = ModelArgs.from_hf(hf_config)
        context = min(config.context_length or args.max_position, args.max_position)
        torch.manual_seed(config.random_seed)
        model = _build_model(args, hf_config, dtype, device)
        pool = None
        if config.is_lora_enabled:
            # The pool comes before the weights: the groups it stacks hold their base weights
            # in their stacks, which the checkpoint is then loaded into in place.
            shape = LoraModelShape(
                num_layers=args.num_layers, hidden_size=args.hidden_size,
                intermediate_size=args.intermediate_size, q_size=args.q_size,
                kv_size=args.kv_size, vocab_size=args.vocab_size,
            )
            max_rank, targets = resolve_pool_spec(config, args.num_layers)
            stacked = lora_stack_groups(args, device, targets)
            _release_weights(model.lora_linears(), stacked, device)
            pool = LoraPool(shape, config.max_loras_per_batch, max_rank, targets, device, dtype,
                            stacked)
            pool.adopt_base_weights(model.lora_linears())  # under their groups' A slots
        if config.load_format == "dummy":
            model.init_dummy(config.random_seed)
        else:
            model.load_weights(iter_safetensors(folder, dtype, str(device)))
        model.eval()
        model.build_rope_cache(context)
        tokenizer = load_tokenizer(folder)
        streams = Streams(device)
        adapters = None
        if pool is not None:
            adapters = AdapterManager(config, pool.shape, device, dtype, streams, pool=pool)
            model.lora_pool = adapters.pool
        kv, bm = _allocate_kv(config, args, dtype, device)
        info = ModelInfo(
            model_path=config.model_path,
            served_model_name=config.model_name,
            context_length=context,
            vocab_size=args.vocab_size,
            dtype=str(dtype).removeprefix("torch."),
            device=device.type,
            is_lora_enabled=config.is_lora_enabled,
            max_lora_rank=adapters.pool.max_rank if adapters else None,
            lora_target_modules=tuple(sorted(adapters.pool.target_modules)) if adapters else None,
        )
        return cls(config, model, tokenizer, kv, bm, adapters, streams, info,
                   _eos_ids(tokenizer, folder), metrics)

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self._task is not None:
            return
        # The runner thread launches steps while this loop serves HTTP and streams: at CPython's
        # default 5 ms switch interval, each time the loop wakes it waits up to 5 ms for the GIL
        # from a launching runner thread (set here, not by the server alone, so that anything
        # driving the engine in-process, the benchmarks included, measures what the server does).
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        self._froze = freeze_startup_objects()
        if self.adapters is not None:
            await self.adapters.load_startup_adapters()  # operator paths: lora_roots don't apply
            self._report_adapters(force=True)
        self._task = asyncio.create_task(self._loop(), name="loraserve-engine")
        log.info("engine started: %s on %s (%s), %d KV blocks of %d tokens",
                 self.model_info.served_model_name, self.model_info.device,
                 self.model_info.dtype, self.block_manager.num_blocks, self.config.page_size)

    async def stop(self, drain_timeout: float = 0.0) -> None:
        """Refuse new requests, let running ones finish for up to `drain_timeout` seconds,
        abort the rest, stop the loop."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while self.scheduler.has_work and time.monotonic() < deadline and self._task:
            await asyncio.sleep(0.01)
        for rid in list(self.requests):
            self.abort(rid, "server shutting down")
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for task in list(self._unloads):  # a slot a cancelled step held stays locked
            task.cancel()
        self._thread.shutdown(wait=True)
        self._waiter.shutdown(wait=True)
        if self.adapters is not None:
            self.adapters.close()
        if self._froze:  # what this engine left behind becomes collectable again
            gc.unfreeze()
            self._froze = False

    # ---------------------------------------------------------------- requests
    async def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        lora_name: str | None = None,
        rid: str | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        logprob_start: int = 1,
    ) -> Request:
        """Validate and enqueue. Raises ValidationError, AdapterError, QueueFullError or
        EngineStoppedError; on success the request holds a name reference on its adapter.

        With `return_logprob`, the prompt tokens from `logprob_start` on are scored (the first
        token never is; a start at or past the prompt's end scores none): the positions before
        it get no logits row, so a client asking for the last prompt token's logprob, or for
        the output's alone, does not pay for the whole prompt's [tokens, vocab] logits."""
        (req,) = await self.submit_many([Submission(
            prompt_ids, params, lora_name, rid, return_logprob, top_logprobs_num,
            logprob_start)])
        return req

    async def submit_many(self, items: Sequence[Submission]) -> list[Request]:
        """Submit every item, or none (as `submit`, whose errors it raises). Every item is
        validated and takes its adapter's name reference before any is queued, so one that
        fails (an unknown adapter, a bad prompt, a rid in use) leaves no trace: nothing of
        the others is queued, run, or counted in the metrics as an aborted request."""
        if not self._accepting:
            raise EngineStoppedError("the server is shutting down")
        checked = []
        for i, item in enumerate(items):
            checked.append(self._validate(item.prompt_ids, item.params, item.rid))
            self._check_logprob_asks(item)
            if item.rid is not None and any(o.rid == item.rid for o in items[:i]):
                raise ValidationError("rid", f"the rid {item.rid!r} twice in one request")
        self._check_room(len(items))
        reqs: list[Request] = []
        residencies: list[str] = []
        try:
            for item, (prompt_ids, params) in zip(items, checked, strict=True):
                req = self._new_request(item, prompt_ids, params)
                residency, req.adapter_key = await self._acquire(item.lora_name)
                residencies.append(residency)
                reqs.append(req)
            # An adapter's load or on-demand resolve may have been awaited: check again what
            # another submit or a shutdown may have changed meanwhile.
            self._check_room(len(items))
            for req in reqs:
                if req.rid in self.requests:
                    raise ValidationError("rid", f"a request with rid {req.rid!r} is already "
                                          "running")
        except BaseException:
            for req in reqs:
                if req.adapter is not None and self.adapters is not None:
                    self.adapters.release(req.adapter)
            raise
        for req, residency in zip(reqs, residencies, strict=True):
            self.requests[req.rid] = req
            self._residency[req.rid] = residency
            self.scheduler.add(req)
            if self.metrics is not None:
                self.metrics.request_queued(req.lora_name)
        self._wake.set()
        return reqs

    def _check_room(self, num_items: int) -> None:
        if not self._accepting:
            raise EngineStoppedError("the server is shutting down")
        if self.scheduler.num_waiting + num_items > self.config.max_queued_requests:
            raise QueueFullError(f"{self.scheduler.num_waiting} requests are already queued")

    async def _acquire(self, lora_name: str | None) -> tuple[str, str | None]:
        """Take a request's reference on the version `lora_name` serves: where the adapter
        was ("base" for the base model), and the version's key (None for the base model)."""
        if lora_name is None:
            return "base", None
        if self.adapters is None:  # no adapter of that name, as for an unknown one
            raise UnknownAdapterError(
                f"LoRA adapter {lora_name!r} does not exist: LoRA is not enabled on this "
                "server", lora_name)
        residency = await self.adapters.acquire_or_resolve(lora_name)
        # (acquire_or_resolve's last step, acquire, and this run with no await between: the
        # version acquired is the one the name serves now)
        return residency, self.adapters.key_of(lora_name)

    @staticmethod
    def _new_request(item: Submission, prompt_ids: list[int], params: SamplingParams) -> Request:
        req = Request(
            rid=item.rid or new_rid(), prompt_ids=list(prompt_ids), params=params,
            lora_name=item.lora_name, return_logprob=item.return_logprob,
            top_logprobs_num=item.top_logprobs_num, prompt_top_n=item.prompt_top_logprobs_num,
            prompt_ranks=item.prompt_logprob_ranks,
            token_ids_logprob=list(item.token_ids_logprob) if item.token_ids_logprob else None,
            cache_salt=item.cache_salt,
        )
        skipped = min(max(item.logprob_start, 1), len(req.prompt_ids))
        if skipped > 1:  # scoring starts where these end (Request.prompt_logprob_positions)
            req.input_logprobs = [None] * skipped
            req.input_top_logprobs = [[] for _ in range(skipped)]
            req.input_ranks = [None] * skipped
            req.input_ids_logprobs = [[] for _ in range(skipped)]
        req.outputs = asyncio.Queue()
        return req

    def _check_logprob_asks(self, item: Submission) -> None:
        """The counts of top candidates (output and prompt) and token_ids_logprob's ids."""
        for name, n in (("top_logprobs_num", item.top_logprobs_num),
                        ("prompt_top_logprobs_num", item.prompt_top_logprobs_num or 0)):
            if not 0 <= n <= MAX_TOP_LOGPROBS:
                raise ValidationError(name, f"must be between 0 and {MAX_TOP_LOGPROBS}")
        ids = item.token_ids_logprob
        if ids is None:
            return
        vocab = self.model_info.vocab_size
        if not ids or any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab
                          for t in ids):
            raise ValidationError("token_ids_logprob", f"must be a non-empty list of token "
                                  f"ids in [0, {vocab})")
        if len(ids) > MAX_TOKEN_IDS_LOGPROB:
            raise ValidationError("token_ids_logprob", f"{len(ids)} ids; at most "
                                  f"{MAX_TOKEN_IDS_LOGPROB}")
        if not item.return_logprob:
            raise ValidationError("token_ids_logprob", "needs return_logprob")

    def _validate(
        self, prompt_ids: list[int], params: SamplingParams, rid: str | None
    ) -> tuple[list[int], SamplingParams]:
        """Check a request; return the prompt and parameters it runs with (_fit_context)."""
        params.validate(self.model_info.vocab_size)
        if not prompt_ids:
            raise ValidationError("prompt", "the prompt is empty")
        vocab = self.model_info.vocab_size
        if any((not isinstance(t, int)) or isinstance(t, bool) or t < 0 or t >= vocab
               for t in prompt_ids):
            raise ValidationError("input_ids", f"token ids must be integers in [0, {vocab})")
        if rid is not None and rid in self.requests:
            raise ValidationError("rid", f"a request with rid {rid!r} is already running")
        allowed = params.allowed_token_ids
        if allowed and params.min_new_tokens > 0 and set(allowed) <= (
                set(params.stop_token_ids) | self.eos_token_ids):
            # under min_new_tokens the sampler masks these ids: nothing would be left to choose
            # (its message names no other field: the two APIs spell min_new_tokens apart)
            raise ValidationError("allowed_token_ids", "holds only stop and end-of-sequence "
                                  "ids, none of which may be chosen before the minimum of "
                                  "new tokens")
        return self._fit_context(prompt_ids, params)

    def _fit_context(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> tuple[list[int], SamplingParams]:
        """The prompt and parameters a request runs with, so that prompt + new tokens stay
        within the context length (and the prompt within the KV cache).

        A prompt that leaves no room to generate, or a max_new_tokens the client asked for
        past the context, is a ValidationError; with `allow_auto_truncate` the prompt keeps
        its first tokens instead and max_new_tokens (min_new_tokens with it) is lowered to the
        room left. A max_new_tokens the client left to its default
        (`SamplingParams.is_max_new_tokens_default`) is lowered to the room left in either
        mode."""
        ctx = self.model_info.context_length
        kv_tokens = self.block_manager.num_blocks * self.config.page_size
        longest = min(ctx, kv_tokens) - 1  # a prompt leaves room for at least one new token
        truncate = self.config.allow_auto_truncate
        hint = " (or start the server with --allow-auto-truncate to cut the request to fit)"
        n = len(prompt_ids)
        if n > longest:
            if not truncate:
                what = f"the context length of {ctx}" if n >= ctx else (
                    f"the KV cache of {kv_tokens}")
                raise ValidationError(
                    "prompt", f"{n} prompt tokens leave no room to generate within {what} "
                    f"tokens: shorten the prompt{hint}")
            log.warning("prompt of %d tokens cut to its first %d (allow_auto_truncate)", n,
                        longest)
            prompt_ids = prompt_ids[:longest]
            n = longest
        room = ctx - n
        if params.max_new_tokens <= room:
            return prompt_ids, params
        if not (truncate or params.is_max_new_tokens_default):
            raise ValidationError(
                "max_new_tokens", f"{n} prompt tokens + max_new_tokens {params.max_new_tokens}"
                f" = {n + params.max_new_tokens} tokens exceed the context length of {ctx} "
                f"tokens: ask for at most {room} new tokens or shorten the prompt{hint}")
        if not params.is_max_new_tokens_default:
            log.warning("max_new_tokens %d lowered to %d: %d prompt tokens in a context of %d "
                        "(allow_auto_truncate)", params.max_new_tokens, room, n, ctx)
        return prompt_ids, replace(
            params, max_new_tokens=room, min_new_tokens=min(params.min_new_tokens, room))

    async def stream(self, req: Request) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until it finishes; stopping early aborts it."""
        assert req.outputs is not None
        try:
            while True:
                out = await req.outputs.get()
                yield out
                if out.finished:
                    return
        finally:
            if not req.is_finished:
                self.abort(req.rid, "client went away")

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, lora_name: str | None = None, **kw
    ) -> AsyncIterator[RequestOutput]:
        req = await self.submit(prompt_ids, params, lora_name, **kw)
        async for out in self.stream(req):
            yield out

    def abort(self, rid: str, message: str = "aborted", retryable: bool = False) -> bool:
        """Abort request `rid` with `message`; retryable: the reason is transient (the answer
        may be retried, a 503 on the OpenAI routes)."""
        req = self.requests.get(rid)
        if req is None or req.is_finished:
            return False
        req.error_retryable = retryable
        self._finish(req, FinishReason.ABORT, error=message)
        self._emit(req, [], None, None)
        return True

    # ---------------------------------------------------------------- adapters
    async def load_adapter(self, name: str, path: str, pinned: bool = False,
                           inplace: bool = False) -> None:
        """Load adapter `name` from `path`; `inplace` replaces a loaded `name` with a new
        version, its requests in flight finishing on the old one (AdapterManager.load)."""
        if self.adapters is None:
            raise ValidationError("lora_name", "LoRA is not enabled on this server")
        if not self._accepting:  # as submit: nothing new once the drain has begun
            raise EngineStoppedError("the server is shutting down")
        await self.adapters.load(name, path, pinned, inplace=inplace)
        self._report_adapters(force=True)

    async def unload_adapter(self, name: str) -> None:
        """Unload `name` once its requests have drained. The unload runs to its end even if
        the caller stops waiting (an HTTP client that disconnects cancels its handler):
        cancelled half-way, it left the name refusing requests, unloads and loads for good."""
        if self.adapters is None:
            raise ValidationError("lora_name", "LoRA is not enabled on this server")
        task = asyncio.ensure_future(self.adapters.unload(name))
        self._unloads.add(task)
        task.add_done_callback(self._unload_done)
        await asyncio.shield(task)

    def _unload_done(self, task: asyncio.Task[None]) -> None:
        self._unloads.discard(task)
        if not task.cancelled() and task.exception() is None:
            self._report_adapters(force=True)

    def list_adapters(self) -> list[AdapterInfo]:
        return self.adapters.list() if self.adapters else []

    def loaded_adapters(self) -> dict[str, str]:
        """name -> path of each adapter name (being unloaded too; not the versions a load in
        place replaced, whose requests drain)."""
        return {a.name: a.path for a in self.list_adapters() if not a.replaced}

    def stats(self) -> EngineStats:
        c = self.scheduler.counters
        now, tokens = time.monotonic(), self._generated_tokens
        t0, n0 = self._last_log
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            # The CUDA graphs' scratch block is reserved at start: not usable, not in use.
            kv_blocks_used=self.block_manager.num_used_blocks - self.runner.reserved_blocks,
            kv_blocks_total=self.block_manager.num_blocks - self.runner.reserved_blocks,
            num_steps=c.num_steps,
            num_preemptions=c.num_preemptions,
            generated_tokens=tokens,
            tokens_per_second=(tokens - n0) / max(now - t0, 1e-6),
        )

    # ---------------------------------------------------------------- the loop
    async def _loop(self) -> None:
        """Schedule and launch step N+1 while step N runs on the GPU, then take N's tokens.

        Step N+1's decode rows read the tokens step N is still sampling straight from the
        device, so the GPU runs the steps back to back while the CPU schedules, prepares and
        postprocesses. Without overlap (`disable_overlap_schedule`, or a step in flight whose
        requests use repetition/frequency/presence penalties or bad words of several tokens,
        which read the host's token lists) each step completes before the next one is
        scheduled.
        """
        loop = asyncio.get_running_loop()
        inflight: InFlightStep | None = None
        while True:
            if self.adapters is not None:
                self.adapters.poll()
                self._abort_failed_adapters()
                self._report_adapters()
            if inflight is not None and not self._may_overlap(inflight):
                await self._complete(loop, inflight)
                inflight = None
                continue
            t0 = time.perf_counter()
            plan = self.scheduler.schedule()
            self.timings.schedule += time.perf_counter() - t0
            if plan is None:
                if inflight is not None:
                    await self._complete(loop, inflight)
                    inflight = None
                    continue
                self._wake.clear()
                timeout = 0.002 if self.scheduler.has_work else None
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    pass
                continue
            self._on_admitted(plan)
            step = await self._launch(loop, plan, inflight)
            if inflight is not None:
                await self._complete(loop, inflight)
            inflight = step
            self._maybe_log()
            await asyncio.sleep(0)  # let HTTP handlers run between steps

    def _may_overlap(self, step: InFlightStep) -> bool:
        """Whether the next step may be scheduled before `step`'s tokens are on the host."""
        if not self.overlap_schedule:
            return False
        return not any(r.params.reads_outputs for r in step.plan.requests)

    async def _launch(
        self, loop: asyncio.AbstractEventLoop, plan: ScheduledBatch, prev: InFlightStep | None
    ) -> InFlightStep | None:
        """Prepare `plan` (reading `prev`'s tokens on the device where it must) and launch it
        in the runner thread; its adapter slots stay locked until it completes. On failure its
        requests are aborted with the error and None is returned."""
        slots = plan.slots
        self._before_step(slots)
        t = self.timings
        try:
            t0 = time.perf_counter()
            fb = self.runner.prepare(plan, prev)
            t1 = time.perf_counter()
            step = await loop.run_in_executor(self._thread, self._launch_counted, plan, fb)
            t.prepare += t1 - t0
            t.launch += time.perf_counter() - t1
            t.steps += 1
        except Exception as e:  # a failed step must not stop the loop (nor hang its clients)
            log.exception("step failed; aborting its %d requests", len(plan.requests))
            self._after_step(slots)
            for req in plan.requests:
                self.abort(req.rid, f"internal error in the forward step: {e}")
            return None
        step.launched_at = time.monotonic()
        step.slots = slots
        self.num_overlapped_steps += prev is not None
        self._record_use(slots)
        self._advance(step)
        return step

    def _launch_counted(self, plan: ScheduledBatch, fb: Any) -> InFlightStep:
        """Runner thread: runner.launch, its CPU time counted (timings.launch_cpu)."""
        c0 = time.thread_time()
        try:
            return self.runner.launch(plan, fb)
        finally:
            self.timings.launch_cpu += time.thread_time() - c0

    @staticmethod
    def _advance(step: InFlightStep) -> None:
        """Count a launched step's tokens as computed and reserve the output each sampling row
        will resolve (a placeholder until the step's tokens reach the host). A request with
        max_new_tokens 0 reserves none: like SGLang, it only prefills its prompt (to score it,
        with return_logprob) and finishes when the step completes."""
        for i, (req, n) in enumerate(zip(step.plan.requests, step.plan.num_new_tokens)):
            if req.is_finished:  # aborted while the launch ran
                continue
            req.num_computed_tokens += n
            if req.num_computed_tokens < req.num_tokens:  # a prefill chunk: samples nothing
                continue
            if req.awaits_finish:
                step.prompt_only.append(i)
            else:
                step.out_index[i] = req.add_pending()

    async def _complete(self, loop: asyncio.AbstractEventLoop, step: InFlightStep) -> None:
        """Wait (in a waiter thread, never on the loop) for `step`'s event, then apply its
        tokens."""
        t0 = time.perf_counter()
        try:
            if not step.done():
                await loop.run_in_executor(self._waiter, step.event.synchronize)
            result = step.result()
        except Exception as e:
            log.exception("step failed; aborting its %d requests", len(step.plan.requests))
            for req in step.plan.requests:
                self.abort(req.rid, f"internal error in the forward step: {e}")
            return
        finally:
            self._unlock(step.slots)
        t1 = time.perf_counter()
        now = time.monotonic()
        self.scheduler.observe_step(now - max(step.launched_at, self._last_complete))
        self._last_complete = now
        self._postprocess(step, result)
        self.timings.wait += t1 - t0
        self.timings.postprocess += time.perf_counter() - t1

    def run_step_blocking(self, plan: ScheduledBatch) -> None:
        """Launch `plan`, wait for it and apply its tokens, on the calling thread (benchmarks
        and tests drive steps one at a time with this; the server uses `_loop`)."""
        slots = plan.slots
        self._before_step(slots)
        try:
            step = self.runner.launch(plan, self.runner.prepare(plan))
            step.slots = slots
            self._record_use(slots)
        except BaseException:
            self._after_step(slots)
            raise
        self._advance(step)
        step.event.synchronize()
        self._unlock(slots)
        self._postprocess(step, step.result())

    def _before_step(self, slots: set[int]) -> None:
        if self.adapters is None or not slots:
            return
        self.adapters.lock(slots)
        for s in slots:
            ev = self.adapters.ready_event(s)
            if ev is not None:
                ev.wait(self.streams.compute)

    def _record_use(self, slots: set[int]) -> None:
        """The launched step's last-use event on its slots (a copy into them waits for it)."""
        if self.adapters is None or not slots:
            return
        ev = Event(self.device)
        ev.record(self.streams.compute)
        self.adapters.record_use(slots, ev)

    def _unlock(self, slots: set[int]) -> None:
        if self.adapters is not None and slots:
            self.adapters.unlock(slots)

    def _after_step(self, slots: set[int]) -> None:
        self._record_use(slots)
        self._unlock(slots)

    def _abort_failed_adapters(self) -> None:
        """Abort queued requests whose adapter failed to load or upload, with that error, so
        they never wait forever (a later request for the adapter retries the load)."""
        assert self.adapters is not None
        c = self.adapters.counters
        failures = c.load_failures + c.upload_failures
        if failures == self._seen_failures:
            return
        self._seen_failures = failures
        on_gpu = (Residency.RESIDENT, Residency.UPLOADING)
        for req in list(self.scheduler.waiting):
            key = req.adapter
            if key is None:
                continue
            error = self.adapters.load_error(key)
            if error is not None and self.adapters.state(key) not in on_gpu:
                self.abort(req.rid, f"LoRA adapter {req.lora_name!r} could not be loaded: "
                           f"{error}", retryable=self.adapters.load_error_retryable(key))

    def _report_adapters(self, force: bool = False) -> None:
        """Hand the manager's load latencies and evictions to the metrics (draining them even
        without metrics, so they never pile up); refresh the per-tier gauges on change."""
        assert self.adapters is not None
        latencies = self.adapters.drain_latencies()
        evictions = self.adapters.counters.evictions
        changed = force or bool(latencies) or evictions != self._seen_evictions
        if self.metrics is None or not changed:
            self._seen_evictions = dict(evictions)
            return
        for tier, seconds in latencies:
            self.metrics.adapter_loaded(tier, seconds)
        for tier, count in evictions.items():
            for _ in range(count - self._seen_evictions.get(tier, 0)):
                self.metrics.adapter_evicted(tier)
        self._seen_evictions = dict(evictions)
        adapters = self.adapters.list()
        by_tier = {t: sum(a.tier == t for a in adapters) for t in ("gpu", "host", "disk")}
        self.metrics.set_adapters_by_tier(**by_tier, pinned=sum(a.pinned for a in adapters))

    def flush_cache(self) -> int:
        """Empty the prefix cache (requests running keep their blocks); returns the number of
        blocks it held."""
        n = self.block_manager.flush()
        log.info("prefix cache flushed: %d blocks", n)
        return n

    def _on_admitted(self, plan: ScheduledBatch) -> None:
        now = time.monotonic()
        for req in plan.requests:
            if req.admitted_time is None:
                req.admitted_time = now
                residency = self._residency.pop(req.rid, "base")
                if self.metrics is not None:
                    self.metrics.request_admitted(req.lora_name, now - req.arrival_time, residency)
                    if self.block_manager.prefix_cache:
                        self.metrics.prefix_cache_looked_up(
                            req.lora_name, req.num_prompt_tokens, req.cached_tokens)

    def _postprocess(self, step: InFlightStep, result: StepResult) -> None:
        plan = step.plan
        now = time.monotonic()
        ranks = result.prompt_ranks
        for e, (i, lp, top) in enumerate(result.prompt_logprobs):
            plan.requests[i].input_logprobs.append(lp)
            plan.requests[i].input_top_logprobs.append(top)
            if ranks is not None and plan.requests[i].prompt_ranks:
                plan.requests[i].input_ranks.append(ranks[e])
            if result.prompt_ids_logprobs is not None and plan.requests[i].token_ids_logprob:
                plan.requests[i].input_ids_logprobs.append(result.prompt_ids_logprobs[e])
        for i in step.prompt_only:  # after the prompt logprobs, whose last ones this step scored
            req = plan.requests[i]
            if not req.is_finished:
                self._finish(req, FinishReason.LENGTH)
                self._emit(req, [], None, None, with_prompt_logprobs=req.return_logprob)
        for i, index in step.out_index.items():
            req = plan.requests[i]
            if req.is_finished:  # aborted, or stopped by an earlier step, while this one ran
                continue
            tok = result.token_ids[i]
            req.resolve(index, tok)
            self._generated_tokens += 1
            lp = [result.logprobs[i]] if req.return_logprob and result.logprobs else None
            top = [result.top_logprobs[i]] if result.top_logprobs and req.top_logprobs_num else None
            ids_lp = result.ids_logprobs[i] if result.ids_logprobs is not None else None
            if req.first_token_time is None:
                req.first_token_time = now
                if self.metrics is not None:
                    self.metrics.first_token(req.lora_name, now - req.arrival_time)
            elif self.metrics is not None and req.last_token_time is not None:
                self.metrics.inter_token(req.lora_name, now - req.last_token_time)
            req.last_token_time = now
            first = req.num_resolved_outputs == 1
            self._check_finish(req, tok)
            self._emit(req, [tok], lp, top, with_prompt_logprobs=first and req.return_logprob,
                       ids_lp=None if ids_lp is None else [ids_lp])

    def _check_finish(self, req: Request, tok: int) -> None:
        p = req.params
        n_out = req.num_resolved_outputs
        if n_out >= p.min_new_tokens:
            if tok in p.stop_token_ids:
                return self._finish(req, FinishReason.STOP, matched=tok)
            if not p.ignore_eos and tok in self.eos_token_ids:
                return self._finish(req, FinishReason.STOP, matched=tok)
            if p.stop:
                hit = self._match_stop_string(req)
                if hit is not None:
                    return self._finish(req, FinishReason.STOP, matched=hit)
        if n_out >= p.max_new_tokens or (
            req.num_prompt_tokens + n_out >= self.model_info.context_length
        ):
            return self._finish(req, FinishReason.LENGTH)

    def _match_stop_string(self, req: Request) -> str | None:
        """The first stop string in the text of the newest output tokens, if any. A byte-level
        BPE may spend a token on each UTF-8 byte (an emoji is 4), so the window holds as many
        tokens as the longest stop string has bytes, and 2 more."""
        longest = max(len(s.encode()) for s in req.params.stop)
        tail = self.tokenizer.decode(
            req.resolved_output_ids[-(longest + 2):],
            skip_special_tokens=req.params.skip_special_tokens,
        )
        return next((s for s in req.params.stop if s in tail), None)

    def _finish(self, req: Request, reason: FinishReason, matched=None, error=None) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.matched_stop = matched
        req.error = error
        req.drop_pending()  # a step in flight may still sample for it: its token is dropped
        self.scheduler.remove(req)
        self.requests.pop(req.rid, None)
        self._residency.pop(req.rid, None)
        if req.adapter is not None and self.adapters is not None:
            self.adapters.release(req.adapter)
        if self.metrics is not None:
            self.metrics.request_finished(
                req.lora_name, req.num_prompt_tokens, req.num_output_tokens,
                time.monotonic() - req.arrival_time, reason.value,
            )

    def _emit(
        self, req: Request, new: list[int], lp, top, with_prompt_logprobs: bool = False,
        ids_lp: list[list[float]] | None = None,
    ) -> None:
        assert req.outputs is not None
        req.outputs.put_nowait(RequestOutput(
            rid=req.rid, new_token_ids=new, output_token_ids=req.resolved_output_ids,
            prompt_tokens=req.num_prompt_tokens, finished=req.is_finished,
            finish_reason=req.finish_reason, matched_stop=req.matched_stop,
            new_logprobs=lp, new_top_logprobs=top, error=getattr(req, "error", None),
            input_logprobs=list(req.input_logprobs) if with_prompt_logprobs else None,
            input_top_logprobs=list(req.input_top_logprobs) if with_prompt_logprobs else None,
            input_ranks=(list(req.input_ranks) if with_prompt_logprobs and req.prompt_ranks
                         else None),
            new_ids_logprobs=ids_lp, cached_tokens=req.cached_tokens,
            input_ids_logprobs=(list(req.input_ids_logprobs)
                                if with_prompt_logprobs and req.token_ids_logprob else None),
        ))

    def _maybe_log(self) -> None:
        now = time.monotonic()
        t0, _ = self._last_log
        if now - t0 < STEP_LOG_INTERVAL_S:
            return
        s = self.stats()
        resident = sum(1 for a in self.list_adapters() if a.tier == "gpu")
        log.info("step: running %d, queued %d, %.1f tok/s, KV %.1f%%, resident adapters %d",
                 s.num_running, s.num_waiting, s.tokens_per_second,
                 100.0 * self.block_manager.usage, resident)
        if self.metrics is not None:
            self.metrics.set_running_waiting(s.num_running, s.num_waiting)
            self.metrics.set_kv_usage(self.block_manager.usage)
            if self.adapters is not None:
                self._report_adapters(force=True)
        self._last_log = (now, self._generated_tokens)


def lora_stack_groups(args: ModelArgs, device: torch.device,
                      targets: Iterable[str] = LAYER_MODULES) -> tuple[str, ...]:
    """The LoRA layer groups whose adapter A the pool stacks under the base weight's rows, so
    that a decode graph can take one GEMM for a projection and every slot's shrink
    (ops.lora.linear_lora_fold, chosen per step by ops.lora.stack_wins): every group but a
    qkv with a bias (Qwen2's: the stacked GEMM adds none), on CUDA (where decode graphs fold
    LoRA), unless LORASERVE_LORA_STACK=0; LORASERVE_LORA_STACK=1 stacks on any device; only
    groups with a module among the pool's `targets`. (Tensor parallelism builds its own pools,
    unstacked.)"""
    raw = os.environ.get("LORASERVE_LORA_STACK", "").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"LORASERVE_LORA_STACK: {raw!r} is not 0 or 1")
    if raw == "0" or (raw == "" and device.type != "cuda"):
        return ()
    targets = frozenset(targets)
    return tuple(g for g, modules in GROUPS.items()
                 if not targets.isdisjoint(modules) and not (g == "qkv" and args.qkv_bias))


def _release_weights(linears: list[dict[str, torch.nn.Module]], groups: tuple[str, ...],
                     device: torch.device) -> list[torch.nn.Module]:
    """Before the pool allocates its stacks, drop the (not yet loaded) base weights of
    `groups`, which the stacks will hold: each becomes a meta tensor of its shape and dtype,
    and on CUDA the freed blocks go back to the device, so the stacks never sit beside a
    second copy of them (an 8B model's four groups are 13 GB). Returns the modules released."""
    released = [layer[g] for layer in linears for g in groups]
    for module in released:
        module.weight = torch.nn.Parameter(module.weight.detach().to("meta"), requires_grad=False)
    if released and device.type == "cuda":
        torch.cuda.empty_cache()
    return released


def _build_model(args: ModelArgs, hf_config, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """Construct the parameters directly in their dtype on the device (no fp32 host copy)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return CausalLM(args, hf_config)
    finally:
        torch.set_default_dtype(previous)


def kv_block_count(config: ServerConfig, fit: int) -> int:
    """The KV cache's blocks: the `fit` blocks memory allows, at most max_total_tokens'."""
    if config.max_total_tokens is None:
        return fit
    return min(fit, config.max_total_tokens // config.page_size)


def _allocate_kv(
    config: ServerConfig, args: ModelArgs, dtype: torch.dtype, device: torch.device
) -> tuple[KVCache, BlockManager]:
    per_block = KVCache.bytes_per_block(
        args.num_layers, config.page_size, args.num_kv_heads, args.head_dim, dtype
    )
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        budget = int(total * config.mem_fraction_static) - torch.cuda.memory_allocated(device)
    else:
        budget = config.kv_cache_cpu_bytes
    num_blocks = kv_block_count(config, budget // per_block)
    if num_blocks < 1:
        raise ValueError(
            "mem_fraction_static/kv_cache_cpu_bytes: no room for a single KV block "
            f"({per_block} bytes each)"
        )
    kv = KVCache.allocate(args.num_layers, num_blocks, config.page_size, args.num_kv_heads,
                          args.head_dim, dtype, device)
    return kv, BlockManager(num_blocks, config.page_size)


def _eos_ids(tokenizer: Any, folder) -> set[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(folder)
        eos = gen.eos_token_id
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except (OSError, ValueError):  # no generation_config.json: the tokenizer's eos is all
        pass
    return ids
