"""Many adapters, S-LoRA's setting: request throughput with requests spread uniformly over 1000
rank-8 adapters on q_proj and v_proj, against the same workload over 8 adapters, one server.

The server resolves adapters on demand from one folder (`lora_roots`), keeps up to 128 in host
memory (`max_loaded_loras`) and 32 on the GPU (`max_loras_per_batch`), so the 1000-adapter
workload reads adapters from disk, evicts from both tiers and uploads on the copy stream while it
serves. Two measurements per workload, through the engine's Python API:

- saturated: every request submitted at once; request throughput = requests / makespan;
- Poisson: arrivals at LOAD_FRACTION of the 8-adapter saturated throughput; achieved request
  throughput and TTFT.

    python -m benchmarks.many_adapters --out many.json
    python -m benchmarks.many_adapters --quick        # tiny model on CPU, a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import math
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.churn_bench import free_device_memory, params_for, run_figures, serve, workload
from benchmarks.loop_profile import (
    THREADS,
    CompileLog,
    LongLaunches,
    LoopStallDumps,
    StackSampler,
)
from benchmarks.random_adapters import clone_adapter, write_adapter
from benchmarks.step_bench import make_engine
from runtime.engine import Engine, LoopTimings

LOAD_FRACTION = 0.8
TIMELINE_EVERY_S = 0.1  # a run's counters are read this often (its timeline)
GOAL_KEEP = 0.9  # the many-adapter workload keeps >= 90% of the 8-adapter throughput
TARGETS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class Settings:
    shape: str  # a benchmarks.dummy_model shape, or "tiny"
    device: str
    dtype: str
    num_adapters: int = 1000
    few_adapters: int = 8
    rank: int = 8
    max_loras_per_batch: int = 32
    max_loaded_loras: int = 128
    prompt_len: int = 256
    output_len: int = 128
    num_requests: int = 512
    max_running_requests: int = 256
    mem_fraction_static: float = 0.6
    seed: int = 0
    lora_loader: str = "auto"


FULL = Settings(shape="llama-3.1-8b", device="cuda", dtype="bfloat16")
QUICK = Settings(shape="tiny", device="cpu", dtype="float32", num_adapters=40, few_adapters=4,
                 rank=4, max_loras_per_batch=4, max_loaded_loras=8, prompt_len=16,
                 output_len=8, num_requests=48, max_running_requests=32)


def write_files(s: Settings, root: Path) -> tuple[Path, Path]:
    """The model folder and a folder of `num_adapters` adapters (one random, the rest
    hard-linked clones: throughput does not depend on the values)."""
    adapters = root / "adapters"
    if s.shape == "tiny":
        from tests.models import make_adapter, make_model

        model = make_model(root / "model", "llama", layers=2)
        first = make_adapter(model, adapters / "lora0", rank=s.rank, targets=list(TARGETS),
                             seed=1)
    else:
        from benchmarks.dummy_model import write_dummy_model

        model = write_dummy_model(s.shape, root / "model")
        first = write_adapter(s.shape, adapters / "lora0", s.rank, TARGETS, seed=1)
    for i in range(1, s.num_adapters):
        clone_adapter(first, adapters / f"lora{i}")
    return model, adapters


def build(s: Settings, model: Path, adapters: Path) -> Engine:
    opts: dict[str, Any] = {
        "device": s.device, "dtype": s.dtype, "enable_lora": True, "max_lora_rank": s.rank,
        "lora_target_modules": TARGETS, "lora_roots": (str(adapters),),
        "lora_resolve_on_demand": True, "max_loras_per_batch": s.max_loras_per_batch,
        "max_loaded_loras": s.max_loaded_loras, "max_running_requests": s.max_running_requests,
        "lora_loader": s.lora_loader,
        # a saturated run submits every request at once: the queue must hold them all
        "max_queued_requests": max(4096, s.num_requests),
    }
    if s.device == "cpu":
        opts |= {"kv_cache_cpu_bytes": 1 << 26, "disable_cuda_graph": True}
    else:
        opts["mem_fraction_static"] = s.mem_fraction_static
    return make_engine(model, **opts)


def summarize_kernels(kernels: list[tuple[str, float, float]], steps: int,
                      window_s: float) -> dict[str, Any]:
    """GPU time by kernel category (benchmarks.step_bench.kernel_kind) from (name, start us,
    end us) records: ms a step over `steps` steps, and the share of the window in which at least
    one kernel ran (near 100 %: the GPU bounds the loop; well below: the host does)."""
    from benchmarks.step_bench import gpu_gaps, kernel_kind

    by_kind: dict[str, float] = {}
    for name, t0, t1 in kernels:
        by_kind[kind] = by_kind.get(kind := kernel_kind(name), 0.0) + (t1 - t0) / 1e3
    busy = gpu_gaps([[None, name, t0, t1 - t0] for name, t0, t1 in kernels], 1)["busy_us"]
    per_step = max(1, steps)
    return {"steps": steps, "window_s": window_s, "gpu_busy": busy / 1e6 / window_s,
            "ms_per_step": {k: v / per_step for k, v in sorted(by_kind.items())},
            "gpu_ms_per_step": busy / 1e3 / per_step}


async def kernel_window(engine: Engine, start_s: float, window_s: float) -> dict[str, Any]:
    """Every CUDA kernel the process runs from `start_s` to `start_s + window_s` into a run
    (CUDA-graph replays included), by category (summarize_kernels)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    await asyncio.sleep(start_s)
    steps = engine.scheduler.counters.num_steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        await asyncio.sleep(window_s)
        wall = time.perf_counter() - t0
        steps = engine.scheduler.counters.num_steps - steps
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == DeviceType.CUDA]
    return summarize_kernels(kernels, steps, wall)


# who spends the upload enqueue time, by the manager's upload mode
UPLOAD_ISSUERS = {"loop": "loop", "batch": "loop (together at each poll or admission)"}


@contextlib.contextmanager
def gc_pause_log(pauses: list[float]) -> Iterator[None]:
    """Append the duration of every garbage collection while inside to `pauses`."""
    started: list[float] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            pauses.append(time.perf_counter() - started.pop())

    gc.callbacks.append(callback)
    try:
        yield
    finally:
        gc.callbacks.remove(callback)


# the CUDA caching allocator's counters a run reports: device allocations and frees (a free
# synchronizes the device), and retries after a failed allocation (which free the cache)
ALLOCATOR_STATS = ("num_device_alloc", "num_device_free", "num_alloc_retries",
                   "num_sync_all_streams")


def allocator_stats(engine: Engine) -> dict[str, int]:
    if engine.device.type != "cuda":
        return {}
    import torch

    stats = torch.cuda.memory_stats(engine.device)
    return {k: stats.get(k, 0) for k in ALLOCATOR_STATS}


def timeline_point(engine: Engine, start: float) -> tuple[float, ...]:
    """(seconds since `start`, disk loads, uploads, steps, rows, prefill steps), cumulative."""
    assert engine.adapters is not None
    loads, c = engine.adapters.counters.loads, engine.scheduler.counters
    return (time.perf_counter() - start, loads["host"], loads["gpu"], c.num_steps, c.num_rows,
            c.num_prefill_steps)


@contextlib.contextmanager
def count_timeline(engine: Engine, out: list[tuple[float, ...]],
                   progress_s: float = 0.0) -> Iterator[None]:
    """Append a timeline_point every TIMELINE_EVERY_S while inside, from a thread of its own:
    a task on the loop would sample late whenever the loop stalls (the counters are plain
    integers, read without the loop's help). With progress_s, print the counters that often
    (a run cut short by a time limit still tells how far it got)."""
    start, stop = time.perf_counter(), threading.Event()
    printed = [0.0]

    def sample() -> None:
        while not stop.wait(TIMELINE_EVERY_S * (len(out) + 1) - (time.perf_counter() - start)):
            point = timeline_point(engine, start)
            out.append(point)
            if progress_s and point[0] - printed[0] >= progress_s:
                _, loads, uploads, steps, rows, _ = (b - a for a, b in zip(out[0], point))
                print(f"  at {point[0]:.0f} s: {steps} steps, "
                      f"{rows / max(steps, 1):.1f} rows a step, {loads} disk loads, "
                      f"{uploads} uploads, {engine.scheduler.num_running} running, "
                      f"{engine.scheduler.num_waiting} waiting", flush=True)
                printed[0] = point[0]

    out.append(timeline_point(engine, start))
    thread = threading.Thread(target=sample, name="many-timeline", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# the loop's phases a step trace records (every LoopTimings field but the step count)
STEP_PHASES = tuple(k for k in asdict(LoopTimings()) if k != "steps")


@contextlib.contextmanager
def step_trace(engine: Engine, steps: range, out: list[dict[str, Any]]) -> Iterator[None]:
    """Record the steps the loop schedules while inside whose index (0: the first) is in
    `steps`, as each is admitted: its index, when (perf_counter), its rows, tokens, prefilling
    rows and distinct adapter slots, the queue then (waiting, running), the adapters read and
    uploaded since entering, the loop's host time by phase so far (ms; a step's phases are the
    differences to the next record)."""
    admitted = engine._on_admitted
    assert engine.adapters is not None
    loads, sched, timings = engine.adapters.counters.loads, engine.scheduler, engine.timings
    host0, gpu0 = loads["host"], loads["gpu"]
    seen = itertools.count()

    def trace(plan: Any) -> None:
        if (i := next(seen)) in steps:
            out.append({
                "step": i, "t": time.perf_counter(), "rows": len(plan.requests),
                "tokens": plan.num_tokens,
                "prefill_rows": sum(r.is_prefilling for r in plan.requests),
                "adapters": len(plan.slots), "waiting": sched.num_waiting,
                "running": sched.num_running, "disk_loads": loads["host"] - host0,
                "uploads": loads["gpu"] - gpu0,
                "loop_ms": {k: 1e3 * getattr(timings, k) for k in STEP_PHASES}})
        admitted(plan)

    engine._on_admitted = trace  # type: ignore[method-assign]
    try:
        yield
    finally:
        del engine._on_admitted  # the class's method again


def step_trace_table(trace: list[dict[str, Any]], start: float) -> list[dict[str, Any]]:
    """step_trace's records with `t` from the run's start and each step's host ms by phase
    (to the next record; the last record, without a next, keeps none)."""
    rows = []
    for i, r in enumerate(trace):
        row = {**r, "t": r["t"] - start}
        del row["loop_ms"]
        if i + 1 < len(trace):
            nxt = trace[i + 1]["loop_ms"]
            row["loop_ms"] = {k: nxt[k] - r["loop_ms"][k] for k in STEP_PHASES}
        rows.append(row)
    return rows


def timeline_table(points: list[tuple[float, ...]], samples: list[Any], start: float,
                   every_s: float) -> list[dict[str, float]]:
    """Per `every_s` bucket of a run: disk loads, uploads, steps, rows a step, prefill steps
    (from count_timeline's points), and first tokens and completions (from the samples)."""
    rows = []
    stride = max(1, round(every_s / TIMELINE_EVERY_S))
    for a, b in itertools.pairwise(points[:-1:stride] + points[-1:]):
        d = [y - x for x, y in zip(a, b, strict=True)]
        t0, t1 = a[0], b[0]
        rows.append({
            "t": t0, "disk_loads": d[1], "uploads": d[2], "steps": d[3],
            "rows_per_step": d[4] / max(1, d[3]), "prefill_steps": d[5],
            "first_tokens": sum(x.first_token is not None and t0 <= x.first_token - start < t1
                                for x in samples),
            "completions": sum(x.finished is not None and t0 <= x.finished - start < t1
                               for x in samples)})
    return rows


async def one_run(engine: Engine, s: Settings, names: list[str], rate: float,
                  seed: int, profile: bool = False,
                  kernels: tuple[float, float] | None = None,
                  stall_dumps_s: float | None = None, trace_steps: range = range(0),
                  long_launch_s: float | None = None, progress_s: float = 0.0) -> dict[str, Any]:
    prompts, loras, arrivals = workload(s.prompt_len, names, s.num_requests, rate, seed,
                                        engine.model_info.vocab_size)
    assert engine.adapters is not None
    counters = engine.adapters.counters
    loads = dict(counters.loads)
    enqueue_s, counters.upload_enqueue_max_s = counters.upload_enqueue_s, 0.0
    counters.upload_enqueue_max_parts_s = dict.fromkeys(counters.upload_enqueue_parts_s, 0.0)
    parts_s = dict(counters.upload_enqueue_parts_s)
    gc_pauses: list[float] = []  # the collector's pauses in this run, any thread
    c = engine.scheduler.counters
    steps, rows, prefill_steps = c.num_steps, c.num_rows, c.num_prefill_steps
    timings = replace(engine.timings)
    allocator = allocator_stats(engine)
    async with contextlib.AsyncExitStack() as stack:
        sampler = stack.enter_context(StackSampler(THREADS, 2e-3)) if profile else None
        stalls = (await stack.enter_async_context(LoopStallDumps(stall_dumps_s))
                  if stall_dumps_s else None)
        stack.enter_context(gc_pause_log(gc_pauses))
        compile_log = stack.enter_context(CompileLog())
        window = asyncio.create_task(kernel_window(engine, *kernels)) if kernels else None
        points: list[tuple[float, ...]] = []
        trace: list[dict[str, Any]] = []
        if trace_steps:
            stack.enter_context(step_trace(engine, trace_steps, trace))
        launches = (stack.enter_context(LongLaunches(engine, long_launch_s))
                    if long_launch_s else None)
        with count_timeline(engine, points, progress_s):
            samples, start, end = await serve(engine, prompts, loras, arrivals,
                                              params_for(s.output_len), None)
        points.append(timeline_point(engine, start))  # the last, partial bucket's end
    figures = run_figures(samples, start, end)
    figures["timeline"] = timeline_table(points, samples, start, 0.5)
    if trace_steps:
        figures["step_trace"] = step_trace_table(trace, start)
    figures["allocator"] = {k: v - allocator[k] for k, v in allocator_stats(engine).items()}
    if stalls is not None:  # every thread's stack in the loop's longest stalls
        figures["loop_stalls"] = [{"at_s": at, "ms": 1e3 * gap, "threads": threads}
                                  for at, gap, threads in stalls.stalls]
        print(stalls.report(), flush=True)
    if launches is not None:  # the runner's stacks in its long launches
        figures["long_launches"] = launches.long
        print(launches.report(), flush=True)
    if window is not None:  # GPU time a step by kernel category, a window into the run
        figures["kernels"] = await window
    figures["distinct_adapters"] = len(set(loras))
    figures["compiles"] = compile_log.summary()  # Triton variants first met in this run
    figures["disk_loads"] = counters.loads["host"] - loads["host"]
    figures["uploads"] = counters.loads["gpu"] - loads["gpu"]
    # host time spent issuing those uploads' copies (they run on the copy stream)
    figures["upload_issuer"] = UPLOAD_ISSUERS[engine.adapters.upload_mode]
    figures["upload_enqueue_ms"] = {
        "total": 1e3 * (counters.upload_enqueue_s - enqueue_s),
        "mean": 1e3 * (counters.upload_enqueue_s - enqueue_s) / max(1, figures["uploads"]),
        "max": 1e3 * counters.upload_enqueue_max_s,
        "parts_total": {k: 1e3 * (v - parts_s[k])
                        for k, v in counters.upload_enqueue_parts_s.items()},
        "parts_of_max": {k: 1e3 * v for k, v in counters.upload_enqueue_max_parts_s.items()}}
    figures["gc_pause_ms"] = {"count": len(gc_pauses), "total": 1e3 * sum(gc_pauses),
                              "max": 1e3 * max(gc_pauses, default=0.0)}
    # what bounds throughput: rows a step (the adapter cap limits a many-adapter batch) and
    # how many steps prefill (those run eagerly on CUDA)
    figures["steps"] = c.num_steps - steps
    figures["mean_rows_per_step"] = (c.num_rows - rows) / max(1, figures["steps"])
    figures["prefill_step_fraction"] = (c.num_prefill_steps - prefill_steps) / max(
        1, figures["steps"])
    # the loop's host time a step by phase (ms): a loop that seldom waits on the GPU is
    # bound by the host
    now = engine.timings
    figures["loop_ms"] = LoopTimings(**{
        k: getattr(now, k) - getattr(timings, k) for k in asdict(now)}).per_step_ms()
    if sampler is not None:  # where the loop's and the runner's Python time went
        figures["profile"] = sampler.top(15)
        print(sampler.report(15), flush=True)
    return figures


def run(s: Settings, root: Path, log, profile: bool = False,
        kernels: tuple[float, float] | None = None, poisson: bool = True,
        stall_dumps_s: float | None = None, trace_steps: range = range(0),
        long_launch_s: float | None = None, progress_s: float = 0.0) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, adapters = write_files(s, root)
    log(f"wrote the model and {s.num_adapters} adapters in {time.perf_counter() - t0:.1f} s")
    few = [f"lora{i}" for i in range(s.few_adapters)]
    many = [f"lora{i}" for i in range(s.num_adapters)]

    async def go() -> dict[str, Any]:
        t_build = time.perf_counter()
        engine = build(s, model, adapters)
        await engine.start()
        log(f"engine built and started in {time.perf_counter() - t_build:.1f} s")
        try:
            await one_run(engine, replace(s, num_requests=2 * s.few_adapters, output_len=4),
                          few, math.inf, 999)  # warm-up: kernels, the few adapters resident
            out: dict[str, Any] = {}
            for label, names in (("few", few), ("many", many)):
                out[label] = {"saturated": await one_run(engine, s, names, math.inf, s.seed,
                                                         profile, kernels, stall_dumps_s,
                                                         trace_steps, long_launch_s,
                                                         progress_s)}
                sat = out[label]["saturated"]
                if "step_trace" in sat:
                    log(f"{label} saturated, steps {trace_steps.start}-{trace_steps.stop - 1} "
                        "(t ms: rows, tokens, prefilling "
                        "rows, adapters, waiting, running, disk loads, uploads so far; host ms "
                        "schedule+prepare, launch (the runner's CPU in it), wait, "
                        "postprocess): " + "; ".join(
                            f"{1e3 * r['t']:.0f}: {r['rows']} {r['tokens']} "
                            f"{r['prefill_rows']} {r['adapters']} {r['waiting']} "
                            f"{r['running']} {r['disk_loads']} {r['uploads']}" + (
                                "; {:.1f} {:.1f} ({:.1f}) {:.1f} {:.1f}".format(
                                    r["loop_ms"]["schedule"] + r["loop_ms"]["prepare"],
                                    r["loop_ms"]["launch"], r["loop_ms"]["launch_cpu"],
                                    r["loop_ms"]["wait"], r["loop_ms"]["postprocess"])
                                if "loop_ms" in r else "")
                            for r in sat["step_trace"]))
                if "kernels" in sat:
                    k = sat["kernels"]
                    log(f"{label} saturated, kernels over {k['steps']} steps: GPU busy "
                        f"{100 * k['gpu_busy']:.0f} % of {k['window_s']:.1f} s, "
                        f"{k['gpu_ms_per_step']:.2f} ms a step: " + ", ".join(
                            f"{c} {v:.2f}" for c, v in k["ms_per_step"].items()))
                log(f"{label} saturated, by half second (t s: disk loads, uploads, steps, "
                    "rows a step, prefill steps, first tokens, completions): " + "; ".join(
                        f"{r['t']:.1f}: {r['disk_loads']} {r['uploads']} {r['steps']} "
                        f"{r['rows_per_step']:.0f} {r['prefill_steps']} {r['first_tokens']} "
                        f"{r['completions']}" for r in sat["timeline"]))
                log(f"{label} saturated: {sat['request_throughput']:.2f} req/s, "
                    f"{sat['mean_rows_per_step']:.1f} rows a step, "
                    f"{100 * sat['prefill_step_fraction']:.0f} % of steps prefill, "
                    f"{sat['compiles']['total']} Triton compiles; loop ms a "
                    f"step: " + ", ".join(f"{k} {v:.2f}" for k, v in sat["loop_ms"].items()))
            if not poisson:
                return out
            rate = LOAD_FRACTION * out["few"]["saturated"]["request_throughput"]
            for label, names in (("few", few), ("many", many)):
                out[label]["poisson"] = await one_run(engine, s, names, rate, s.seed + 1,
                                                      profile)
                p = out[label]["poisson"]
                log(f"{label} Poisson at {rate:.2f} req/s: {p['request_throughput']:.2f} req/s, "
                    f"median TTFT {p['median_ttft_ms']:.1f} ms, "
                    f"{p['compiles']['total']} Triton compiles")
            out["poisson_rate"] = rate
            return out
        finally:
            await engine.stop()

    result: dict[str, Any] = {"settings": asdict(s), **asyncio.run(go())}
    result["gpu_gb_after_release"] = free_device_memory()
    for kind in ("saturated", "poisson") if poisson else ("saturated",):
        keep = (result["many"][kind]["request_throughput"]
                / result["few"][kind]["request_throughput"])
        result[f"keep_{kind}"] = {"ratio": keep, "goal": GOAL_KEEP, "met": keep >= GOAL_KEEP}
    result["wall_s"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny model on CPU (smoke run)")
    ap.add_argument("--num-requests", type=int)
    ap.add_argument("--max-loras-per-batch", type=int,
                    help="GPU adapter slots (S-LoRA's setting: 32); a larger cap shows what "
                         "the kernels give when a uniform many-adapter batch may be as large "
                         "as an 8-adapter one")
    ap.add_argument("--max-loaded-loras", type=int, help="host copies (S-LoRA's setting: 128)")
    ap.add_argument("--profile", action="store_true",
                    help="sample the loop's and the runner thread's stacks in every measured run")
    ap.add_argument("--kernel-window", type=float, nargs=2, metavar=("START_S", "SECONDS"),
                    help="CUDA only: profile every kernel in this window of each saturated run "
                         "and report GPU ms a step by kernel category and the GPU's busy share")
    ap.add_argument("--stall-dumps-ms", type=float,
                    help="dump every thread's stack whenever the event loop stays away this "
                         "long in a saturated run (faulthandler's watchdog, no GIL needed)")
    ap.add_argument("--saturated-only", action="store_true", help="skip the Poisson runs")
    ap.add_argument("--trace-steps", type=int, default=0, metavar="N",
                    help="record N steps of each saturated run as they are admitted (rows, "
                         "tokens, adapters, queue, loads so far, host ms by phase)")
    ap.add_argument("--trace-from", type=int, default=0, metavar="K",
                    help="--trace-steps: the first step recorded (0: the run's first)")
    ap.add_argument("--long-launch-ms", type=float,
                    help="sample the runner's stack in every launch of each saturated run and "
                         "report those of launches this long (and their pinned allocations)")
    ap.add_argument("--lora-loader", choices=("auto", "process", "thread"), default="auto",
                    help="where adapter files are read (the server option of that name)")
    ap.add_argument("--switch-interval-ms", type=float,
                    help="CPython's GIL switch interval for the runs (the engine lowers it to "
                         "0.5 ms at start, and keeps a lower one set before)")
    ap.add_argument("--output-len", type=int, help="new tokens a request (default 128)")
    ap.add_argument("--progress-s", type=float, default=0.0, metavar="S",
                    help="print the counters of each saturated run every S seconds")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if a.switch_interval_ms is not None:
        if a.switch_interval_ms <= 0:
            ap.error("--switch-interval-ms must be positive")
        sys.setswitchinterval(a.switch_interval_ms / 1e3)
    if a.kernel_window and a.quick:
        ap.error("--kernel-window profiles CUDA kernels; --quick runs on the CPU")
    s = QUICK if a.quick else FULL
    if a.num_requests:
        s = replace(s, num_requests=a.num_requests)
    if a.output_len:
        s = replace(s, output_len=a.output_len)
    if a.max_loras_per_batch:
        s = replace(s, max_loras_per_batch=a.max_loras_per_batch,
                    max_loaded_loras=max(s.max_loaded_loras, a.max_loras_per_batch))
    if a.max_loaded_loras:
        s = replace(s, max_loaded_loras=a.max_loaded_loras)
    s = replace(s, lora_loader=a.lora_loader)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(s, Path(tmp), lambda m: print(m, flush=True), a.profile,
                     tuple(a.kernel_window) if a.kernel_window else None,
                     poisson=not a.saturated_only,
                     stall_dumps_s=a.stall_dumps_ms / 1e3 if a.stall_dumps_ms else None,
                     trace_steps=range(a.trace_from, a.trace_from + a.trace_steps),
                     long_launch_s=a.long_launch_ms / 1e3 if a.long_launch_ms else None,
                     progress_s=a.progress_s)
    result["switch_interval_s"] = sys.getswitchinterval()  # as the engine left it
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    print(f"GIL switch interval {1e3 * result['switch_interval_s']:.3g} ms")
    print(f"{s.num_adapters} vs {s.few_adapters} adapters of rank {s.rank} on "
          f"{', '.join(TARGETS)}, {s.num_requests} requests of {s.prompt_len}/{s.output_len} "
          f"tokens, max_loras_per_batch {s.max_loras_per_batch}, max_loaded_loras "
          f"{s.max_loaded_loras}")
    for kind in ("saturated", "poisson") if not a.saturated_only else ("saturated",):
        f, m, k = result["few"][kind], result["many"][kind], result[f"keep_{kind}"]
        print(f"{kind:<10} few {f['request_throughput']:.2f} req/s, many "
              f"{m['request_throughput']:.2f} req/s ({m['disk_loads']} disk loads, "
              f"{m['uploads']} uploads; issuing them took the {m['upload_issuer']} "
              f"{m['upload_enqueue_ms']['total']:.0f} ms, {m['upload_enqueue_ms']['mean']:.2f} "
              f"each on average, at most {m['upload_enqueue_ms']['max']:.2f}): keeps "
              f"{100 * k['ratio']:.0f}% "
              f"(goal >= {100 * GOAL_KEEP:.0f}%: {'MET' if k['met'] else 'NOT MET'})")
        for name, r in (("few", f), ("many", m)):
            up, gcp = r["upload_enqueue_ms"], r["gc_pause_ms"]
            print(f"  {name}: upload enqueue ms by part, total "
                  + ", ".join(f"{p} {v:.1f}" for p, v in up["parts_total"].items())
                  + "; the longest upload's "
                  + ", ".join(f"{p} {v:.2f}" for p, v in up["parts_of_max"].items())
                  + f"; {gcp['count']} garbage collections, {gcp['total']:.1f} ms, the longest "
                  f"{gcp['max']:.2f}" + "".join(f"; {k} {v}" for k, v in r["allocator"].items()))
    return result


if __name__ == "__main__":
    main()
