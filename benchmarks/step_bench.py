"""Decode-step and prefill-step time of the engine on dummy weights, next to the HBM floor.

One process measures the device's copy bandwidth, then the step times, so every ratio comes
from one run. A step is timed on the host clock around prepare → forward → sample → tokens on
the host, i.e. what the serving loop pays per step, not a kernel-only figure.

    python -m benchmarks.step_bench --shape llama-3.1-8b --batch 1 32 --out results.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.dummy_model import SHAPES, weight_bytes, write_dummy_model
from ops.lora import _use_pdl, fold_groups, overlap_enabled
from ops.pdl import layer_pdl
from ops.triton_decode_gemm import tma_gemm_state
from runtime.config import ServerConfig
from runtime.engine import Engine, LoopTimings
from runtime.request import Request, SamplingParams


def hbm_bandwidth(nbytes: int = 4 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (nbytes // 2) * 2 / statistics.median(times)


def make_engine(folder: Path, **overrides) -> Engine:
    cfg = {
        "model_path": str(folder), "load_format": "dummy", "device": "cuda", "dtype": "bfloat16",
        "mem_fraction_static": 0.6, "chunked_prefill_size": 8192, "max_running_requests": 256,
    }
    cfg.update(overrides)
    return Engine.from_config(ServerConfig(**cfg))


def one_step(engine: Engine) -> float:
    """Schedule, run and apply one step; seconds on the host clock."""
    t0 = time.perf_counter()
    if engine.adapters is not None:
        engine.adapters.poll()
    plan = engine.scheduler.schedule()
    while plan is None:  # warm-up: the adapters' first uploads are still on the copy stream
        time.sleep(0.001)
        engine.adapters.poll()
        plan = engine.scheduler.schedule()
    engine.run_step_blocking(plan)
    return time.perf_counter() - t0


def prefill_all(engine: Engine) -> None:
    """Step until every added request has finished its prefill."""
    while any(r.is_prefilling for r in engine.scheduler.running) or engine.scheduler.waiting:
        one_step(engine)


def clear(engine: Engine) -> None:
    """Drop every running request (and free its blocks)."""
    for r in list(engine.scheduler.running):
        engine.scheduler.remove(r)


def add_requests(engine: Engine, batch: int, prompt_len: int, loras: list[str | None]) -> None:
    g = torch.Generator().manual_seed(0)
    vocab = engine.model_info.vocab_size
    for i in range(batch):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        req = Request(rid=f"b{i}", prompt_ids=prompt, lora_name=loras[i % len(loras)],
                      params=SamplingParams(max_new_tokens=1 << 20, temperature=0.0,
                                            ignore_eos=True))
        req.outputs = asyncio.Queue()
        engine.scheduler.add(req)


def parse_lora_cases(cases: list[str], slots: int = 32) -> list[tuple[int, int]]:
    """["1x1", "32x8"] -> [(1, 1), (32, 8)]: batch size and distinct adapters of each case
    (at most the batch, and at most `slots`, the pool's max_loras_per_batch)."""
    out = []
    for case in cases:
        try:
            batch, adapters = (int(v) for v in case.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--lora-cases: {case!r} is not BATCHxADAPTERS, e.g. 32x8") from None
        if not 1 <= adapters <= min(batch, slots):
            raise SystemExit(f"--lora-cases: {case!r} needs 1 to min(batch, {slots}) adapters "
                             "(--max-loras-per-batch)")
        out.append((batch, adapters))
    return out


def decode_step_ms(engine: Engine, batch: int, prompt_len: int, steps: int,
                   loras: list[str | None] | None = None) -> dict:
    add_requests(engine, batch, prompt_len, loras or [None])
    prefill_all(engine)
    for _ in range(5):
        one_step(engine)
    times = [one_step(engine) for _ in range(steps)]
    fwd = forward_ms(engine)
    ctx = prompt_len + 5 + steps
    clear(engine)
    return {"batch": batch, "median_ms": 1e3 * statistics.median(times),
            "p10_ms": 1e3 * sorted(times)[len(times) // 10], "ctx_at_end": ctx,
            "graph_forward_ms": fwd, "adapters": len({x for x in (loras or [None]) if x})}


async def decode_in_loop(engine: Engine, batch: int, prompt_len: int, max_new: int,
                         loras: list[str | None], seed: int, on_token) -> None:
    """Submit `batch` random prompts to the serving loop (engine.start), greedy, `max_new`
    tokens each, adapters round-robin from `loras`; drain them all, calling on_token() at each
    token of the first request."""
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model_info.vocab_size
    params = SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)
    reqs = [await engine.submit(torch.randint(0, vocab, (prompt_len,), generator=g).tolist(),
                                params, loras[i % len(loras)]) for i in range(batch)]

    async def drain(i: int) -> None:
        async for _ in engine.stream(reqs[i]):
            if i == 0:
                on_token()

    await asyncio.gather(*(drain(i) for i in range(batch)))


async def loop_decode_ms(engine: Engine, batch: int, prompt_len: int, steps: int,
                         loras: list[str | None] | None = None) -> dict:
    """Steady-state decode time per step through the serving loop itself (engine.start):
    the gap between one request's consecutive tokens, median over `steps` tokens after 10
    warm-up tokens, with every request of the batch decoding; and the loop's host time a step
    over those tokens by phase (LoopTimings: little `wait` means the host bounds the loop)."""
    loras = loras or [None]
    stamps: list[float] = []
    host: dict[str, float] = {}

    def on_token() -> None:
        stamps.append(time.perf_counter())
        if len(stamps) == 10:
            engine.timings = LoopTimings()
        elif len(stamps) == 10 + steps:
            host.update(engine.timings.per_step_ms())

    await decode_in_loop(engine, batch, prompt_len, steps + 20, loras, 1, on_token)
    gaps = [b - a for a, b in itertools.pairwise(stamps[10:])][:steps]
    return {"batch": batch, "median_ms": 1e3 * statistics.median(gaps),
            "adapters": len({x for x in loras if x}), "host_ms": host}


async def loop_decode_ab(engine: Engine, batches: list[int], prompt_len: int, steps: int,
                         names: list[str]) -> list[dict]:
    """loop_decode_ms with the overlapped loop and without, side by side in one engine."""
    await engine.start()
    rows = []
    try:
        cases = [(b, None) for b in batches] + ([(1, 1), (32, 8)] if names else [])
        for b, n in cases:
            for overlap in (True, False):
                engine.overlap_schedule = overlap
                r = await loop_decode_ms(engine, b, prompt_len, steps,
                                         names[:n] if n else None)
                r["overlap"] = overlap
                rows.append(r)
    finally:
        engine.overlap_schedule = True
        await engine.stop()
    return rows


def forward_ms(engine: Engine, iters: int = 50) -> float | None:
    """Device time of the captured decode forward alone for the running batch (CUDA events),
    to split a step into GPU forward and host work around it."""
    graphs = engine.runner.graphs
    plan = engine.scheduler.schedule()
    fb = engine.runner.prepare(plan)
    if graphs is None or not graphs.can_run(fb):
        return None
    times = []
    with torch.cuda.stream(engine.streams.compute):
        for _ in range(iters + 5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graphs.replay(fb)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    return statistics.median(times[5:])


def prefill_ms(engine: Engine, batch: int, prompt_len: int, reps: int = 5,
               loras: list[str | None] | None = None) -> dict:
    times = []
    for rep in range(reps + 2):
        add_requests(engine, batch, prompt_len, loras or [None])
        torch.cuda.synchronize()
        t = one_step(engine)
        if rep >= 2:
            times.append(t)
        clear(engine)
    return {"batch": batch, "prompt": prompt_len, "median_ms": 1e3 * statistics.median(times)}


def prefill_rounds(engine: Engine, rounds: int, loras: list[str]) -> dict:
    """The prefill target side by side: base prefill of 8 x 512 tokens, then the same over the
    adapters, alternating for `rounds` rounds; each round's ratio and their median."""
    rows = []
    for _ in range(rounds):
        base = prefill_ms(engine, 8, 512)["median_ms"]
        lora = prefill_ms(engine, 8, 512, loras=loras or None)["median_ms"]
        rows.append({"base_ms": base, "lora_ms": lora, "ratio": lora / base})
        print(f"prefill 8x512: base {base:.1f} ms, over {len(loras)} adapters {lora:.1f} ms "
              f"({lora / base:.3f}x)", flush=True)
    ratio = statistics.median(r["ratio"] for r in rows)
    print(f"prefill over {len(loras)} adapters, median of {rounds} rounds: {ratio:.3f}x",
          flush=True)
    return {"rounds": rows, "median_ratio": ratio}


KERNEL_KINDS = (  # (category, substrings of kernel names), first match wins
    ("lora shrink", ("lora_shrink",)),
    ("lora expand", ("lora_expand",)),
    ("attention", ("attention", "attn", "flash")),
    ("norm", ("rmsnorm", "rms_norm")),
    ("rope + kv store", ("rope", "store_kv")),
    ("silu*mul", ("silu",)),
    ("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "ampere", "splitk")),
)


TOP_KERNELS = 14  # kernels by name in a profile's listing


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KERNEL_KINDS if any(x in low for x in keys)), "other")


def trace_events(prof) -> list[dict]:
    """The profiler's trace events (its Chrome trace's traceEvents)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        return json.loads(Path(f.name).read_text()).get("traceEvents", [])


def kernel_timeline(prof, events: list[dict] | None = None) -> list[list]:
    """The profiled kernels in start order as [stream, name (48 characters), start us (from the
    first kernel), duration us], from the profiler's trace (`events`, else exported from
    `prof`)."""
    events = trace_events(prof) if events is None else events
    kernels = [e for e in events
               if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "ts" in e]
    if not kernels:
        return []
    t0 = min(float(e["ts"]) for e in kernels)
    rows = [[e.get("args", {}).get("stream", e.get("tid")), e.get("name", "")[:48],
             round(float(e["ts"]) - t0, 2), round(float(e.get("dur", 0.0)), 2)] for e in kernels]
    return sorted(rows, key=lambda r: r[2])


def profile_steps(engine: Engine, steps: int = 5, warm: bool = True, eager: bool = True,
                  timeline: bool = False) -> dict:
    """GPU time of the running batch's next `steps` steps by kernel category (torch.profiler).
    eager: decode runs without its CUDA graphs, kernel by kernel (durations are the kernels'
    own); else the graphs replay, with what they capture (decode graphs fold LoRA expands into
    the next kernels). Per-step milliseconds, summed over kernels: the LoRA shrinks of a graph
    run beside the projections, so the sum can exceed the step."""
    from torch.profiler import ProfilerActivity, profile

    graphs = engine.runner.graphs
    if eager:
        engine.runner.graphs = None
    try:
        if warm:
            one_step(engine)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                one_step(engine)
            torch.cuda.synchronize()
    finally:
        engine.runner.graphs = graphs
    by_kind: dict[str, float] = {}
    count: dict[str, int] = {}
    by_name: dict[str, list[float]] = {}  # kernel name -> [ms a step, launches a step]
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        k = kernel_kind(e.name)
        ms = e.time_range.elapsed_us() / 1e3 / steps
        by_kind[k] = by_kind.get(k, 0.0) + ms
        count[k] = count.get(k, 0) + 1
        named = by_name.setdefault(e.name[:80], [0.0, 0.0])
        named[0] += ms
        named[1] += 1 / steps
    top = dict(sorted(by_name.items(), key=lambda kv: -kv[1][0])[:TOP_KERNELS])
    out = {"steps": steps,
           "ms_per_step": by_kind, "kernels_per_step": {k: v / steps for k, v in count.items()},
           "total_ms": sum(by_kind.values()), "top_kernels": top}
    if timeline:
        out["timeline"] = kernel_timeline(prof)
    return out


def gpu_gaps(timeline: list[list], steps: int, min_gap_us: float = 2.0,
             top: int = 12) -> dict:
    """Where the device idles, from kernel_timeline rows ([stream, name, start us, duration
    us]): busy time (the union of every stream's kernels and copies) and idle time, per step
    over `steps` steps, and the idle gaps of at least `min_gap_us` grouped by the kernels either
    side of them (the `top` largest groups by idle time), each with its median and largest
    gap."""
    if not timeline:
        return {"steps": steps, "span_us": 0.0, "busy_us": 0.0, "idle_us": 0.0, "gaps": []}
    rows = sorted(timeline, key=lambda r: r[2])
    busy = 0.0
    cur_start, cur_end, cur_last = rows[0][2], rows[0][2] + rows[0][3], rows[0][1]
    groups: dict[tuple[str, str], list] = {}  # (before, after) -> [total, count, gaps]
    for _, name, start, dur in rows[1:]:
        end = start + dur
        if start > cur_end:  # the device idled from cur_end to start
            busy += cur_end - cur_start
            gap = start - cur_end
            if gap >= min_gap_us:
                g = groups.setdefault((cur_last, name), [0.0, 0, []])
                g[0] += gap
                g[1] += 1
                g[2].append(gap)
            cur_start, cur_end, cur_last = start, end, name
        elif end >= cur_end:
            cur_end, cur_last = end, name
    busy += cur_end - cur_start
    span = cur_end - rows[0][2]  # cur_end: the latest end of all
    n = max(steps, 1)
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return {"steps": steps, "span_us": span / n, "busy_us": busy / n, "idle_us": (span - busy) / n,
            "gaps": [{"after": a, "before": b, "us_per_step": round(t / n, 2), "count": c,
                      "median_us": round(statistics.median(g), 2), "max_us": round(max(g), 2)}
                     for (a, b), (t, c, g) in ranked]}


def frontier_by_kernel(timeline: list[list], steps: int, key=None) -> dict:
    """Which kernels move the step's end, from kernel_timeline rows ([stream, name, start us,
    duration us]) in start order: each kernel's share is how far its end moves the latest end
    so far (a kernel launched early through PDL, waiting on the one ahead, counts only what it
    runs past it), idle time where the device runs nothing; per step over `steps` steps, by
    kernel name (its first 40 characters; or by key(row before, row)), largest first."""
    rows = sorted(timeline, key=lambda r: r[2])
    if not rows:
        return {"span_us": 0.0, "idle_us": 0.0, "kernels": []}
    start = frontier = rows[0][2]
    idle = 0.0
    share: dict[str, list[float]] = {}  # name -> [us, launches]
    before = None
    for row in rows:
        _, name, begin, dur = row
        end = begin + dur
        idle += max(0.0, begin - frontier)
        s = share.setdefault(name[:40] if key is None else key(before, row), [0.0, 0])
        s[0] += max(0.0, end - max(frontier, begin))
        s[1] += 1
        frontier = max(frontier, end)
        before = row
    n = max(steps, 1)
    ranked = sorted(share.items(), key=lambda kv: -kv[1][0])
    return {"span_us": (frontier - start) / n, "idle_us": idle / n,
            "kernels": [{"name": k, "us_per_step": round(v[0] / n, 2),
                         "per_step": v[1] / n} for k, v in ranked]}


def gemm_by_place(timeline: list[list], steps: int) -> list[dict]:
    """The GEMM kernels' shares of the step's end (frontier_by_kernel) by the kind of kernel
    just before each: in a base decode layer, after the norm qkv and gate_up, after attention
    o, after a GEMM down (one kernel name serves all four)."""
    def place(before, row) -> str:
        if kernel_kind(row[1]) != "gemm":
            return "(not a GEMM)"
        return "after " + (kernel_kind(before[1]) if before is not None else "nothing")

    kernels = frontier_by_kernel(timeline, steps, key=place)["kernels"]
    return [k for k in kernels if k["name"] != "(not a GEMM)"]


def graph_launch_leads(events: list[dict]) -> dict:
    """When the host launched each CUDA graph against the device, from the profiler's trace
    with CPU activity: for every cudaGraphLaunch call, `lead`: from the call's return to the end
    of the kernel ahead of the graph's first kernel on its stream (negative: the device had
    finished that kernel before the host had launched the graph, so the gap before the graph
    is the host's); `start`: from that kernel's end to the graph's first kernel. Medians and
    10th/90th percentiles in µs, and how many launches came after the kernel ahead had ended."""
    calls = {e["args"]["correlation"]: e for e in events
             if e.get("cat") == "cuda_runtime" and "GraphLaunch" in e.get("name", "")
             and "correlation" in e.get("args", {})}
    work = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
                   and "ts" in e), key=lambda e: float(e["ts"]))
    leads, starts, seen = [], [], set()
    last_end: dict = {}  # stream -> end of its latest work item so far
    for e in work:
        stream = e.get("args", {}).get("stream", e.get("tid"))
        corr = e.get("args", {}).get("correlation")
        if corr in calls and corr not in seen and stream in last_end:
            seen.add(corr)
            call = calls[corr]
            call_end = float(call["ts"]) + float(call.get("dur", 0.0))
            leads.append(last_end[stream] - call_end)
            starts.append(float(e["ts"]) - last_end[stream])
        last_end[stream] = max(last_end.get(stream, 0.0), float(e["ts"]) + float(e.get("dur", 0)))

    def spread(xs: list[float]) -> dict:
        if not xs:
            return {"median": 0.0, "p10": 0.0, "p90": 0.0}
        q = statistics.quantiles(xs, n=10) if len(xs) > 1 else [xs[0]] * 9
        return {"median": round(statistics.median(xs), 2), "p10": round(q[0], 2),
                "p90": round(q[-1], 2)}

    return {"launches": len(leads), "late": sum(x < 0 for x in leads), "lead_us": spread(leads),
            "start_us": spread(starts)}


async def profile_loop(engine: Engine, batch: int, prompt_len: int, steps: int,
                       loras: list[str | None] | None = None, host: bool = False) -> dict:
    """The serving loop (engine.start) decoding `batch` requests, profiled for `steps` tokens
    after 12 warm-up tokens: the token gap, and where the device idles between the kernels of
    consecutive steps (gpu_gaps over the profiler's kernels and copies, every stream). host:
    the host's calls too, and when it launched each graph (graph_launch_leads; the profiler's
    CPU activity adds host time of its own)."""
    from torch.profiler import ProfilerActivity, profile

    loras = loras or [None]
    # CPU activity where CUDA's is missing (a smoke run on the CPU: no kernels to read)
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]
    if host and cuda:
        activities.append(ProfilerActivity.CPU)
    prof = profile(activities=activities)
    stamps: list[float] = []

    def on_token() -> None:
        stamps.append(time.perf_counter())
        if len(stamps) == 12:
            prof.start()
        elif len(stamps) == 12 + steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            prof.stop()

    await decode_in_loop(engine, batch, prompt_len, steps + 40, loras, 2, on_token)
    gaps = [b - a for a, b in itertools.pairwise(stamps[11:12 + steps])]
    events = trace_events(prof)
    timeline = kernel_timeline(prof, events)
    out = gpu_gaps(timeline, steps)
    if host:
        out["graph_launch"] = graph_launch_leads(events)
    return {"batch": batch, "adapters": len({x for x in loras if x}),
            "token_gap_ms": 1e3 * statistics.median(gaps), **out,
            "frontier": frontier_by_kernel(timeline, steps),
            "gemm_by_place": gemm_by_place(timeline, steps)}


async def profile_loop_cases(engine: Engine, batches: list[int], prompt_len: int, steps: int,
                             names: list[str], host: bool = False) -> list[dict]:
    """profile_loop for base decode at each batch, then one adapter at batch 1 and eight at
    batch 32 when adapters are loaded."""
    await engine.start()
    try:
        cases = [(b, None) for b in batches] + ([(1, 1), (32, 8)] if names else [])
        return [await profile_loop(engine, b, prompt_len, steps, names[:n] if n else None,
                                   host)
                for b, n in cases]
    finally:
        await engine.stop()


def print_loop_profile(rows: list[dict]) -> None:
    print("serving loop, device time a step (us): busy / idle, and the largest idle gaps")
    for r in rows:
        print(f"  batch {r['batch']}, {r['adapters']} adapters: token gap "
              f"{r['token_gap_ms']:.3f} ms; span {r['span_us']:.1f} = busy {r['busy_us']:.1f} + "
              f"idle {r['idle_us']:.1f}")
        for gap in r["gaps"][:6]:
            print(f"      {gap['us_per_step']:7.2f} us/step ({gap['count']:4d}; median "
                  f"{gap.get('median_us', 0.0):.1f}, largest {gap.get('max_us', 0.0):.1f})  "
                  f"after {gap['after'][:40]!r} before {gap['before'][:40]!r}")
        if r.get("graph_launch"):
            g = r["graph_launch"]
            print(f"    graph launches: {g['launches']}, {g['late']} after the kernel ahead had "
                  f"ended; host lead {g['lead_us']['median']} us [{g['lead_us']['p10']}, "
                  f"{g['lead_us']['p90']}], start after it {g['start_us']['median']} us "
                  f"[{g['start_us']['p10']}, {g['start_us']['p90']}]")
        if r.get("frontier"):
            print("    what moves the step's end (us a step):")
            for k in r["frontier"]["kernels"][:TOP_KERNELS]:
                print(f"      {k['us_per_step']:8.1f} us ({k['per_step']:4.0f})  {k['name']}")
        if r.get("gemm_by_place"):
            print("    GEMMs by the kernel before them: " + ", ".join(
                f"{k['name']} {k['us_per_step']:.1f} us ({k['per_step']:.0f})"
                for k in r["gemm_by_place"]))


def profile_cases(engine: Engine, prompt: int, names: list[str], eager: bool = True,
                  timeline: bool = False) -> list[dict]:
    """profile_steps for base decode at batch 1 and 32, the adapter cases, and prefill (not
    with eager=False: decode graphs only); timeline: with each decode case's kernel timeline."""
    out = []
    cases = [(1, None), (32, None)] + ([(1, 1), (32, 8), (32, 32)] if names else [])
    for b, n in cases:
        add_requests(engine, b, prompt, names[:n] if n else [None])
        prefill_all(engine)
        out.append({"case": f"decode batch {b}, {n or 0} adapters{'' if eager else ', graphs'}",
                    **profile_steps(engine, eager=eager, timeline=timeline)})
        clear(engine)
    if not eager:
        return out
    for n in (None, 8) if names else (None,):
        for warm in (True, False):  # the first round compiles the prefill shapes' kernels
            add_requests(engine, 8, 512, names[:n] if n else [None])
            if warm:
                one_step(engine)
            else:
                out.append({"case": f"prefill 8x512, {n or 0} adapters",
                            **profile_steps(engine, 1, warm=False)})
            clear(engine)
    return out


def print_profile(rows: list[dict]) -> None:
    kinds = [k for k, _ in KERNEL_KINDS] + ["other"]
    print("GPU ms a step by kernel category (kernels a step in brackets):")
    for r in rows:
        parts = ", ".join(f"{k} {r['ms_per_step'][k]:.3f} ({r['kernels_per_step'][k]:.0f})"
                          for k in kinds if k in r["ms_per_step"])
        print(f"  {r['case']}: total {r['total_ms']:.3f} ms = {parts}")
        for name, (ms, n) in r.get("top_kernels", {}).items():
            print(f"      {ms:8.3f} ms ({n:4.0f})  {name}")
        if r.get("timeline"):
            f = frontier_by_kernel(r["timeline"], r.get("steps", 5))
            print(f"    what moves the step's end (us a step; span {f['span_us']:.1f}, idle "
                  f"{f['idle_us']:.1f}):")
            for k in f["kernels"][:TOP_KERNELS]:
                print(f"      {k['us_per_step']:8.1f} us ({k['per_step']:4.0f})  {k['name']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="few steps, for smoke runs")
    ap.add_argument("--disable-cuda-graph", action="store_true")
    ap.add_argument("--lora", action="store_true",
                    help="also measure 1, 8 and 32 distinct rank-16 adapters on all projections")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lora-cases", nargs="+", default=["1x1", "32x8", "32x32"],
                    metavar="BATCHxADAPTERS",
                    help="decode cases with --lora: batch size x distinct adapters (at most 32 "
                    "and at most the batch); each case's batch also gets a base row")
    ap.add_argument("--max-loras-per-batch", type=int, default=32, choices=range(8, 33),
                    metavar="8-32",
                    help="the pool's slots with --lora (the targets name 8 for the 8-adapter "
                    "case and 32 for the 32-adapter one: stacked pools read every slot's A)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure each base decode case this many times; report the median")
    ap.add_argument("--profile", action="store_true",
                    help="only a per-kernel-category GPU time breakdown of each case")
    ap.add_argument("--profile-graphs", action="store_true",
                    help="with --profile: the decode cases replayed from their CUDA graphs "
                    "(else run eagerly, kernel by kernel)")
    ap.add_argument("--timeline", action="store_true",
                    help="with --profile: also each decode case's kernels in start order, with "
                    "their streams (from the profiler's trace)")
    ap.add_argument("--profile-loop", action="store_true",
                    help="only where the device idles in the serving loop's decode steps: base "
                    "at each --batch, and with --lora 1 adapter at batch 1 and 8 at batch 32")
    ap.add_argument("--profile-host", action="store_true",
                    help="with --profile-loop: the host's calls too, and how far ahead of the "
                    "device the host launched each CUDA graph")
    ap.add_argument("--blas", choices=["cublas", "cublaslt"],
                    help="torch's preferred BLAS library for the run (default: torch's own)")
    ap.add_argument("--lt-plan", type=Path,
                    help="a plan from gemm_bench --plan-out: decode graphs capture those "
                         "projections with their fastest cuBLASLt algorithm (benchmarks/"
                         "blaslt.py; benchmarks only)")
    ap.add_argument("--prefill-rounds", type=int, default=0,
                    help="only the prefill target: this many rounds, each base prefill then "
                         "prefill over 8 adapters (5 timed steps each), side by side")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    lt_plan = None
    if a.lt_plan:
        from benchmarks.blaslt import install_plan

        lt_plan = json.loads(a.lt_plan.read_text())
        install_plan(lt_plan["plan"], count=lt_plan["lt_algos"])
        print(f"cuBLASLt plan: {len(lt_plan['plan'])} projection/batch entries", flush=True)
    if a.blas:
        torch.backends.cuda.preferred_blas_library(a.blas)
    lora_cases = parse_lora_cases(a.lora_cases, a.max_loras_per_batch) if a.lora else []
    steps = 10 if a.quick else a.steps
    bw = hbm_bandwidth()
    folder = write_dummy_model(a.shape, Path(tempfile.mkdtemp()) / a.shape)
    lora_opts = {}
    names: list[str] = []
    if a.lora:
        from benchmarks.random_adapters import ALL_LINEAR, clone_adapter, write_adapter


        # One random adapter and hard-linked clones: the step time does not depend on values.
        root = folder.parent / "adapters"
        first = write_adapter(a.shape, root / "lora0", a.rank, ALL_LINEAR, seed=0)
        paths = [first] + [clone_adapter(first, root / f"lora{i}") for i in range(1, 32)]
        names = [p.name for p in paths]
        # Loaded below, not as startup adapters: engine.start() (the serving-loop rows) would
        # load startup adapters a second time.
        lora_opts = {"enable_lora": True, "lora_target_modules": ALL_LINEAR,
                     "max_loras_per_batch": a.max_loras_per_batch, "max_loaded_loras": 32,
                     "max_lora_rank": a.rank}
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = make_engine(folder, disable_cuda_graph=a.disable_cuda_graph, **lora_opts)
    startup = {"seconds": time.perf_counter() - t0,
               "allocated_gib": torch.cuda.memory_allocated() / 2**30,
               "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
               "stacked": list(engine.adapters.pool.stacked) if engine.adapters else []}
    print(f"engine built in {startup['seconds']:.1f} s (warm-up and graph capture included), "
          f"GPU memory {startup['allocated_gib']:.2f} GiB allocated, peak "
          f"{startup['peak_allocated_gib']:.2f}; stacked groups: {startup['stacked']}",
          flush=True)
    if names:
        async def load_all() -> None:
            for p in paths:
                await engine.adapters.load(p.name, str(p))
        asyncio.run(load_all())
    if a.prefill_rounds:
        rounds = prefill_rounds(engine, a.prefill_rounds, names[:8])
        print(json.dumps(rounds, indent=2))
        if a.out:
            a.out.write_text(json.dumps({"shape": a.shape, "prefill_rounds": rounds,
                                         "device": torch.cuda.get_device_name(),
                                         "max_loras_per_batch": a.max_loras_per_batch},
                                        indent=2))
        return
    if a.profile_loop:
        loop_prof = asyncio.run(profile_loop_cases(engine, a.batch, a.prompt, steps, names,
                                                   a.profile_host))
        print_loop_profile(loop_prof)
        if a.out:
            a.out.write_text(json.dumps({"shape": a.shape, "lt_plan": lt_plan,
                                         "profile_loop": loop_prof}, indent=2))
        return
    if a.profile:
        prof = profile_cases(engine, a.prompt, names, eager=not a.profile_graphs,
                             timeline=a.timeline)
        print_profile(prof)
        if a.out:
            a.out.write_text(json.dumps({"shape": a.shape, "profile": prof}, indent=2))
        return
    w_bytes, _ = weight_bytes(a.shape)
    c = SHAPES[a.shape]
    kv_per_token = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * (
        c["hidden_size"] // c["num_attention_heads"]) * 2
    rows = []
    for b in sorted(set(a.batch) | {b for b, _ in lora_cases}):
        reps = [decode_step_ms(engine, b, a.prompt, steps) for _ in range(a.repeat)]
        r = dict(reps[0])
        r["median_ms"] = statistics.median(x["median_ms"] for x in reps)
        r["repeat_medians_ms"] = [x["median_ms"] for x in reps]
        kv_bytes = b * (a.prompt + steps // 2) * kv_per_token
        r["floor_ms"] = 1e3 * (w_bytes + kv_bytes) / bw
        r["ratio_to_floor"] = r["median_ms"] / r["floor_ms"]
        rows.append(r)
    lora_rows = []
    if names:
        from benchmarks.random_adapters import ALL_LINEAR
        per_adapter = 2 * a.rank * sum(
            sum(_dims_bytes(c, m)) for m in ALL_LINEAR) * c["num_hidden_layers"]
        for b, n in lora_cases:
            r = decode_step_ms(engine, b, a.prompt, steps, names[:n])
            base = next(x for x in rows if x["batch"] == b)
            r["base_median_ms"] = base["median_ms"]
            r["ratio_to_base"] = r["median_ms"] / base["median_ms"]
            r["adapter_bytes"] = n * per_adapter
            r["ratio_to_base_plus_bytes"] = r["median_ms"] / (
                base["median_ms"] + 1e3 * n * per_adapter / bw)
            lora_rows.append(r)
    pre = prefill_ms(engine, 8, 512)
    pre_lora = prefill_ms(engine, 8, 512, loras=names[:8]) if names else None
    loop_rows = asyncio.run(loop_decode_ab(engine, a.batch, a.prompt, steps, names))
    result = {"shape": a.shape, "startup": startup, "lt_plan": lt_plan,
              "lora_pdl": _use_pdl(torch.device("cuda")),
              "layer_pdl": layer_pdl(torch.device("cuda")),
              "lora_overlap": overlap_enabled(), "lora_fold": sorted(fold_groups()),
              "decode_gemm": tma_gemm_state(),
              "hbm_bytes_per_s": bw, "weight_bytes_no_embed": w_bytes, "decode": rows,
              "decode_loop": loop_rows, "decode_lora": lora_rows, "prefill_8x512": pre,
              "prefill_8x512_8_adapters": pre_lora, "device": torch.cuda.get_device_name(),
              "blas": a.blas or "default", "max_loras_per_batch": a.max_loras_per_batch}
    print(json.dumps(result, indent=2))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    print(f"HBM {bw / 1e12:.2f} TB/s; weights (no embedding) {w_bytes / 1e9:.2f} GB; LoRA PDL "
          f"{'on' if result['lora_pdl'] else 'off'}; shrink beside the projection in graphs "
          f"{'on' if result['lora_overlap'] else 'off'}; expands folded in decode graphs: "
          f"{', '.join(result['lora_fold']) or 'none'}; layer kernels with PDL in decode graphs "
          f"{'on' if result['layer_pdl'] else 'off'}; unfolded decode GEMMs: "
          f"{result['decode_gemm']}")
    for r in rows:
        print(f"decode batch {r['batch']:3d}: {r['median_ms']:.2f} ms/step, floor "
              f"{r['floor_ms']:.2f} ms, ratio {r['ratio_to_floor']:.2f}")
    for r in lora_rows:
        print(f"decode batch {r['batch']:3d}, {r['adapters']:2d} adapters: {r['median_ms']:.2f} ms"
              f" ({r['ratio_to_base']:.3f}x base, {r['ratio_to_base_plus_bytes']:.3f}x base+bytes)")
    for r in rows + lora_rows:
        print(f"  graph forward alone, batch {r['batch']} / {r['adapters']} adapters: "
              f"{r['graph_forward_ms']} ms")
    for r in loop_rows:
        print(f"serving loop, batch {r['batch']:3d}, {r['adapters']:2d} adapters, overlap "
              f"{'on ' if r['overlap'] else 'off'}: {r['median_ms']:.2f} ms/token")
        if r.get("host_ms"):
            print("  loop host ms a step: " + ", ".join(
                f"{k} {v:.3f}" for k, v in r["host_ms"].items() if k != "steps"))
    print(f"prefill 8x512: {pre['median_ms']:.1f} ms")
    if pre_lora:
        print(f"prefill 8x512 over 8 adapters: {pre_lora['median_ms']:.1f} ms "
              f"({pre_lora['median_ms'] / pre['median_ms']:.3f}x)")


def _dims_bytes(shape: dict, module: str) -> tuple[int, int]:
    """(in, out) of a projection: a rank-r adapter on it holds r * (in + out) values."""
    from benchmarks.random_adapters import _dims

    return _dims(shape, module)


if __name__ == "__main__":
    main()
