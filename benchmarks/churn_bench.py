"""Adapter churn: TTFT under Poisson load with more busy adapters than GPU slots, for overlap
loading off / on / default next to a server with every adapter resident; and the LoRA serving
doc's four-adapter example (one prefill batch per adapter, loading small against prefill).

    python -m benchmarks.churn_bench --out benchmarks/results/churn.json  # H200: about 4 min
    python -m benchmarks.churn_bench --quick                              # CPU, tiny model

Churn: Llama-3.1-8B shapes with random bf16 weights, 16 rank-64 adapters on all seven
projections, uniform popularity, 256-token prompts of random ids, 128 output tokens
(ignore_eos). The all-resident server (`max_loras_per_batch` 16) first serves a closed burst,
whose request throughput is its capacity; every configuration then serves Poisson arrivals at
80% of it. The churn servers have 8 slots and 16 host slots, and each repetition starts with
every adapter in host memory. Requests go through the engine's Python API (`submit`/`stream`)
in-process; TTFT is taken on the client side from the call to `submit` to the first token. A run
stops `--max-drain-s` after its last arrival: requests still without a token then count with
the TTFT they had reached (a lower bound, reported as `num_censored`).

The doc's example: four adapters (rank 8: uploads take far less than a prefill), a few long
prompts each, all submitted at once with every adapter in host memory; its figure is the time
to the last first token. Every configuration runs `--reps` times; tables show the median.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import workloads as wl
from benchmarks.random_adapters import ALL_LINEAR, clone_adapter, write_adapter
from benchmarks.serve_bench import latency_stats
from benchmarks.step_bench import make_engine
from runtime.config import LoraPathSpec
from runtime.engine import Engine
from runtime.request import SamplingParams

# Overlap loading settings by name: enable_lora_overlap_loading's three values.
OVERLAP: dict[str, bool | None] = {"off": False, "on": True, "default": None}
ALL_RESIDENT = "all-resident"
LOAD_FRACTION = 0.8  # Poisson rate, as a fraction of the all-resident capacity
GOAL_TTFT_VS_RESIDENT = 2.0  # median TTFT of the default policy within 2x all-resident
GOAL_DEFAULT_VS_BEST = 1.05  # default <= 1.05x min(off, on)


@dataclass(frozen=True)
class Settings:
    """Everything that shapes a run; `FULL` is the issue's benchmark, `QUICK` a CPU smoke run."""

    shape: str  # a benchmarks.dummy_model shape, or "tiny" (tests/models.py make_model)
    device: str
    dtype: str
    num_adapters: int = 16
    rank: int = 64
    churn_slots: int = 8
    host_slots: int = 16
    prompt_len: int = 256
    output_len: int = 128
    burst_requests: int = 256
    arrival_s: float = 6.0  # seconds of Poisson arrivals per run
    num_requests: int | None = None  # per run; None: rate * arrival_s
    max_drain_s: float = 6.0
    reps: int = 3
    warmup_output_len: int = 16
    max_running_requests: int = 256
    mem_fraction_static: float = 0.4
    doc_adapters: int = 4
    doc_rank: int = 8
    doc_requests_per_adapter: int = 4
    doc_prompt_len: int = 256
    seed: int = 0


FULL = Settings(shape="llama-3.1-8b", device="cuda", dtype="bfloat16")
QUICK = Settings(
    shape="tiny", device="cpu", dtype="float32", rank=8, prompt_len=16, output_len=8,
    burst_requests=32, arrival_s=1.0, max_drain_s=3.0, warmup_output_len=4,
    max_running_requests=32, doc_rank=4, doc_requests_per_adapter=2, doc_prompt_len=32,
)


@dataclass
class Sample:
    """One request seen from the client: times on the perf_counter clock."""

    lora: str | None
    sent: float
    first_token: float | None = None
    finished: float | None = None
    output_tokens: int = 0


# ---------------------------------------------------------------- models and adapters

@dataclass(frozen=True)
class Files:
    model: Path
    adapters: list[Path]  # the churn adapters, lora0 ..
    doc_adapters: list[Path]  # the doc example's small adapters


def write_files(s: Settings, root: Path) -> Files:
    """The model folder, `num_adapters` rank-`rank` adapters and `doc_adapters` small ones."""
    if s.shape == "tiny":
        from tests.models import make_adapter, make_model

        model = make_model(root / "model")

        def one(folder: Path, rank: int) -> Path:
            return make_adapter(model, folder, rank=rank, targets="all-linear", seed=1)
    else:
        from benchmarks.dummy_model import write_dummy_model

        model = write_dummy_model(s.shape, root / "model")

        def one(folder: Path, rank: int) -> Path:
            return write_adapter(s.shape, folder, rank, ALL_LINEAR, seed=1)

    def family(prefix: str, count: int, rank: int) -> list[Path]:
        first = one(root / prefix / f"{prefix}0", rank)
        return [first] + [clone_adapter(first, root / prefix / f"{prefix}{i}")
                          for i in range(1, count)]

    return Files(model, family("lora", s.num_adapters, s.rank),
                 family("doc", s.doc_adapters, s.doc_rank))


def specs_of(paths: list[Path]) -> tuple[LoraPathSpec, ...]:
    return tuple(LoraPathSpec(p.name, str(p)) for p in paths)


def build_engine(s: Settings, files: Files, adapters: list[Path], slots: int,
                 overlap: bool | None, rank: int, **kw: Any) -> Engine:
    return make_engine(
        files.model, device=s.device, dtype=s.dtype, lora_paths=specs_of(adapters),
        max_loras_per_batch=slots, max_loaded_loras=max(slots, s.host_slots),
        max_lora_rank=rank, enable_lora_overlap_loading=overlap,
        mem_fraction_static=s.mem_fraction_static, max_running_requests=s.max_running_requests,
        random_seed=s.seed, **kw,
    )


def free_device_memory() -> float | None:
    """Collect a finished engine; GB still allocated on the GPU (None on CPU)."""
    gc.collect()
    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated() / 1e9


# ---------------------------------------------------------------- clients

async def send(engine: Engine, sample: Sample, prompt: list[int], params: SamplingParams) -> None:
    """Submit one request and stream it, noting the first token and the end on `sample`."""
    req = await engine.submit(prompt, params, sample.lora)
    async for out in engine.stream(req):
        if out.new_token_ids and sample.first_token is None:
            sample.first_token = time.perf_counter()
        sample.output_tokens = len(out.output_token_ids)
        if out.finished:
            sample.finished = time.perf_counter()


async def serve(engine: Engine, prompts: list[list[int]], loras: list[str | None],
                arrivals: list[float], params: SamplingParams,
                max_drain_s: float | None) -> tuple[list[Sample], float, float]:
    """Send each request at its arrival offset; stop `max_drain_s` after the last arrival
    (None: wait for all), aborting what is left. Returns (samples, start, end)."""
    samples = [Sample(lora, math.nan) for lora in loras]
    tasks = []
    start = time.perf_counter()
    for sample, prompt, offset in zip(samples, prompts, arrivals, strict=True):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sample.sent = time.perf_counter()
        tasks.append(asyncio.create_task(send(engine, sample, prompt, params)))
    timeout = None if max_drain_s is None else max(0.0, start + arrivals[-1] + max_drain_s
                                                    - time.perf_counter())
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    end = time.perf_counter()
    for t in pending:
        t.cancel()  # the stream's cleanup aborts the request
    await asyncio.gather(*pending, return_exceptions=True)
    for t in done:
        t.result()  # a failed submit is a broken benchmark: raise it
    while engine.scheduler.has_work:
        await asyncio.sleep(0.005)
    return samples, start, end


def run_figures(samples: list[Sample], start: float, end: float) -> dict[str, Any]:
    """TTFT statistics (ms; requests without a token count with the TTFT they had reached at
    the cut, a lower bound) and throughput over the run."""
    ttfts = [(x.first_token if x.first_token is not None else end) - x.sent for x in samples]
    finishes = [x.finished for x in samples if x.finished is not None]
    # Up to the last completion, or to the cut when requests were still running there.
    last = end if len(finishes) < len(samples) else max(finishes)
    duration = max(last - start, 1e-9)
    figures: dict[str, Any] = latency_stats(ttfts, "ttft", [99])
    figures.update(
        num_requests=len(samples), num_completed=len(finishes),
        num_censored=sum(x.first_token is None for x in samples),
        duration_s=duration, request_throughput=len(finishes) / duration,
        output_throughput=sum(x.output_tokens for x in samples) / duration,
        max_ttft_ms=1e3 * max(ttfts),
    )
    return figures


def workload(prompt_len: int, names: list[str], num: int, rate: float, seed: int,
             vocab: int) -> tuple[list[list[int]], list[str | None], list[float]]:
    """Uniform adapters, fixed-length random prompts, arrivals at `rate` (inf: all at once).
    The same seed gives every configuration the same requests."""
    rng = np.random.default_rng(seed)
    loras = wl.sample_adapters(names, num, "uniform", rng)
    prompts = wl.random_token_prompts([prompt_len] * num, vocab, rng)
    arrivals = wl.arrival_times(num, rate, 1.0, rng)
    return prompts, loras, arrivals


def params_for(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


async def reset_to_host(engine: Engine, paths: list[Path]) -> None:
    """Unload and reload every adapter that holds a GPU slot, so all start in host memory."""
    assert engine.adapters is not None
    on_gpu = [p for p in paths if engine.adapters.slot_of(p.name) is not None]
    for p in on_gpu:
        await engine.unload_adapter(p.name)
    await asyncio.gather(*(engine.load_adapter(p.name, str(p)) for p in on_gpu))
    assert all(engine.adapters.slot_of(p.name) is None for p in paths)


async def warm_up(engine: Engine, s: Settings, names: list[str], output_len: int) -> None:
    """Two requests per adapter at once: compiles kernels, fills the step-time estimate the
    adaptive policy reads, and (with a slot per adapter) leaves every adapter resident."""
    loras: list[str | None] = [n for n in names for _ in range(2)]
    rng = np.random.default_rng(12345)
    prompts = wl.random_token_prompts([s.prompt_len] * len(loras), engine.model_info.vocab_size,
                                      rng)
    await serve(engine, prompts, loras, [0.0] * len(loras), params_for(output_len), None)


def median_of(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The median of each figure across repetitions."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    return {k: float(statistics.median(r[k] for r in runs)) for k in keys}


# ---------------------------------------------------------------- churn

def run_churn_config(s: Settings, files: Files, label: str, rate: float | None,
                     log: Callable[[str], None]) -> dict[str, Any]:
    """One engine for one configuration: warm-up, then `reps` Poisson runs. For the
    all-resident server (rate None) the closed burst that sets the rate comes first."""
    names = [p.name for p in files.adapters]
    is_resident = label == ALL_RESIDENT
    slots = s.num_adapters if is_resident else s.churn_slots
    overlap = None if is_resident else OVERLAP[label]

    async def go() -> dict[str, Any]:
        t0 = time.perf_counter()
        engine = build_engine(s, files, files.adapters, slots, overlap, s.rank)
        out: dict[str, Any] = {"slots": slots, "overlap": overlap,
                               "engine_build_s": time.perf_counter() - t0}
        await engine.start()
        try:
            vocab = engine.model_info.vocab_size
            await warm_up(engine, s, names, s.warmup_output_len)
            run_rate = rate
            if is_resident:
                assert engine.adapters is not None
                out["resident_after_warmup"] = sum(
                    engine.adapters.slot_of(n) is not None for n in names)
                prompts, loras, arrivals = workload(s.prompt_len, names, s.burst_requests,
                                                    math.inf, s.seed + 100, vocab)
                samples, start, end = await serve(engine, prompts, loras, arrivals,
                                                  params_for(s.output_len), None)
                out["capacity"] = run_figures(samples, start, end)
                run_rate = LOAD_FRACTION * out["capacity"]["request_throughput"]
                log(f"capacity {out['capacity']['request_throughput']:.2f} req/s "
                    f"(burst of {s.burst_requests}); Poisson rate {run_rate:.2f} req/s")
            assert run_rate is not None
            num = s.num_requests or max(8, round(run_rate * s.arrival_s))
            out.update(rate=run_rate, num_requests_per_run=num, runs=[])
            for rep in range(s.reps):
                if not is_resident:
                    await reset_to_host(engine, files.adapters)
                assert engine.adapters is not None
                uploads = engine.adapters.counters.loads["gpu"]
                prompts, loras, arrivals = workload(s.prompt_len, names, num, run_rate,
                                                    s.seed + rep, vocab)
                samples, start, end = await serve(engine, prompts, loras, arrivals,
                                                  params_for(s.output_len), s.max_drain_s)
                figures = run_figures(samples, start, end)
                figures["adapter_uploads"] = engine.adapters.counters.loads["gpu"] - uploads
                out["runs"].append(figures)
                log(f"{label} rep {rep}: median TTFT {figures['median_ttft_ms']:.1f} ms, "
                    f"p99 {figures['p99_ttft_ms']:.1f} ms, {figures['request_throughput']:.2f} "
                    f"req/s, censored {figures['num_censored']}/{figures['num_requests']}")
            out["median"] = median_of(out["runs"])
            return out
        finally:
            await engine.stop()

    result = asyncio.run(go())
    result["gpu_gb_after_release"] = free_device_memory()
    if result["gpu_gb_after_release"] is not None:
        log(f"{label}: {result['gpu_gb_after_release']:.2f} GB left on the GPU after release")
    return result


# ---------------------------------------------------------------- the doc's example

def run_doc_config(s: Settings, files: Files, label: str,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """Every doc adapter's requests submitted at once, each adapter in host memory; decode
    graphs off since every request stops at its first token."""
    names = [p.name for p in files.doc_adapters]
    k = s.doc_requests_per_adapter
    loras: list[str | None] = [n for n in names for _ in range(k)]

    async def one_round(engine: Engine, seed: int) -> dict[str, Any]:
        await reset_to_host(engine, files.doc_adapters)
        rng = np.random.default_rng(seed)
        prompts = wl.random_token_prompts([s.doc_prompt_len] * len(loras),
                                          engine.model_info.vocab_size, rng)
        steps = engine.scheduler.counters.num_steps
        samples, _, _ = await serve(engine, prompts, loras, [0.0] * len(loras), params_for(1),
                                    None)
        ttfts = [1e3 * (x.first_token - x.sent) for x in samples if x.first_token is not None]
        assert len(ttfts) == len(samples), "a request of the doc example got no token"
        return {"last_ttft_ms": max(ttfts), "mean_ttft_ms": statistics.fmean(ttfts),
                "num_steps": engine.scheduler.counters.num_steps - steps}

    async def go() -> dict[str, Any]:
        engine = build_engine(s, files, files.doc_adapters, s.doc_adapters, OVERLAP[label],
                              s.doc_rank, disable_cuda_graph=True)
        await engine.start()
        try:
            await one_round(engine, 999)  # warm-up: kernels and the step-time estimate
            runs = [await one_round(engine, s.seed + rep) for rep in range(s.reps)]
        finally:
            await engine.stop()
        log(f"doc example {label}: last TTFT "
            f"{statistics.median(r['last_ttft_ms'] for r in runs):.1f} ms")
        return {"overlap": OVERLAP[label], "runs": runs, "median": median_of(runs)}

    result = asyncio.run(go())
    result["gpu_gb_after_release"] = free_device_memory()
    if result["gpu_gb_after_release"] is not None:
        log(f"{label}: {result['gpu_gb_after_release']:.2f} GB left on the GPU after release")
    return result


# ---------------------------------------------------------------- goals and report

def goals(churn: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    """Each goal with its figures and whether it is met."""
    med = {k: v["median"]["median_ttft_ms"] for k, v in churn.items()}
    best = min(med["off"], med["on"])
    doc_last = {k: v["median"]["last_ttft_ms"] for k, v in doc.items()}
    doc_best = min(doc_last["off"], doc_last["on"])
    ratio = med["default"] / med[ALL_RESIDENT]
    return {
        "churn_median_ttft_vs_all_resident": {
            "ratio": {k: med[k] / med[ALL_RESIDENT] for k in OVERLAP},
            "goal": GOAL_TTFT_VS_RESIDENT, "met": ratio <= GOAL_TTFT_VS_RESIDENT},
        "churn_default_vs_best": {
            "default_ms": med["default"], "best_ms": best, "ratio": med["default"] / best,
            "goal": GOAL_DEFAULT_VS_BEST, "met": med["default"] <= GOAL_DEFAULT_VS_BEST * best},
        "doc_default_vs_best": {
            "default_ms": doc_last["default"], "best_ms": doc_best,
            "ratio": doc_last["default"] / doc_best, "goal": GOAL_DEFAULT_VS_BEST,
            "met": doc_last["default"] <= GOAL_DEFAULT_VS_BEST * doc_best},
    }


def format_table(result: dict[str, Any]) -> str:
    s = result["settings"]
    churn, doc, g = result["churn"], result["doc_example"], result["goals"]
    resident = churn[ALL_RESIDENT]
    lines = [
        (f"churn: {s['shape']}, {s['num_adapters']} adapters of rank {s['rank']} on all seven "
         f"projections, {s['churn_slots']} slots, {s['prompt_len']}/{s['output_len']} tokens"),
        (f"capacity {resident['capacity']['request_throughput']:.2f} req/s (closed burst of "
         f"{s['burst_requests']}, all resident); Poisson at {resident['rate']:.2f} req/s, "
         f"{resident['num_requests_per_run']} requests a run, median of {s['reps']}"),
        (f"{'config':<14}{'median TTFT ms':>16}{'p99 TTFT ms':>14}{'req/s':>9}"
         f"{'x resident':>12}{'censored':>10}{'uploads':>9}"),
    ]
    base = resident["median"]["median_ttft_ms"]
    for label, r in churn.items():
        m = r["median"]
        lines.append(
            f"{label:<14}{m['median_ttft_ms']:>16.1f}{m['p99_ttft_ms']:>14.1f}"
            f"{m['request_throughput']:>9.2f}{m['median_ttft_ms'] / base:>12.2f}"
            f"{m['num_censored']:>10.0f}{m['adapter_uploads']:>9.0f}")
    a, b = g["churn_median_ttft_vs_all_resident"], g["churn_default_vs_best"]
    lines.append(f"goal: default median TTFT <= {a['goal']:g}x all-resident: "
                 f"{a['ratio']['default']:.2f}x  {_verdict(a['met'])}")
    lines.append(f"goal: default <= {b['goal']:g}x min(off, on): {b['default_ms']:.1f} vs "
                 f"{b['best_ms']:.1f} ms ({b['ratio']:.3f}x)  {_verdict(b['met'])}")
    lines.append("")
    lines.append(f"doc example: {s['doc_adapters']} adapters of rank {s['doc_rank']}, "
                 f"{s['doc_requests_per_adapter']} x {s['doc_prompt_len']}-token prompts each, "
                 "submitted at once, adapters in host memory")
    lines.append(f"{'config':<14}{'last TTFT ms':>14}{'mean TTFT ms':>14}{'steps':>7}")
    for label, r in doc.items():
        m = r["median"]
        lines.append(f"{label:<14}{m['last_ttft_ms']:>14.1f}{m['mean_ttft_ms']:>14.1f}"
                     f"{m['num_steps']:>7.0f}")
    d = g["doc_default_vs_best"]
    lines.append(f"goal: default <= {d['goal']:g}x min(off, on): {d['default_ms']:.1f} vs "
                 f"{d['best_ms']:.1f} ms ({d['ratio']:.3f}x)  {_verdict(d['met'])}")
    return "\n".join(lines)


def _verdict(met: bool) -> str:
    return "MET" if met else "NOT MET"


def run(s: Settings, root: Path, log: Callable[[str], None]) -> dict[str, Any]:
    t0 = time.perf_counter()
    files = write_files(s, root)
    log(f"files written in {time.perf_counter() - t0:.1f} s")
    churn = {ALL_RESIDENT: run_churn_config(s, files, ALL_RESIDENT, None, log)}
    rate = churn[ALL_RESIDENT]["rate"]
    for label in OVERLAP:
        churn[label] = run_churn_config(s, files, label, rate, log)
    doc = {label: run_doc_config(s, files, label, log) for label in OVERLAP}
    device = torch.cuda.get_device_name() if s.device == "cuda" else "cpu"
    return {"settings": asdict(s), "device": device, "churn": churn, "doc_example": doc,
            "goals": goals(churn, doc), "wall_s": time.perf_counter() - t0}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU, tiny model: a smoke run")
    ap.add_argument("--arrival-s", type=float, help="seconds of Poisson arrivals per run")
    ap.add_argument("--num-requests", type=int, help="requests per run (default: rate x "
                    "arrival-s)")
    ap.add_argument("--max-drain-s", type=float, help="a run stops this long after its last "
                    "arrival")
    ap.add_argument("--burst-requests", type=int, help="requests of the capacity burst")
    ap.add_argument("--reps", type=int, help="repetitions of each configuration")
    ap.add_argument("--out", type=Path, help="write the JSON result here")
    return ap


def settings_from(a: argparse.Namespace) -> Settings:
    s = QUICK if a.quick else FULL
    changes = {k: getattr(a, k) for k in ("arrival_s", "num_requests", "max_drain_s",
                                          "burst_requests", "reps") if getattr(a, k) is not None}
    return replace(s, **changes)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = build_parser().parse_args(argv)
    s = settings_from(a)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    with tempfile.TemporaryDirectory(prefix="churn_bench_") as tmp:
        result = run(s, Path(tmp), log)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2))
    print(format_table(result))
    print(f"wall time {result['wall_s']:.1f} s")
    return result


if __name__ == "__main__":
    main()
