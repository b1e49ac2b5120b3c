"""CPU smoke tests of the serving benchmark, its workloads and the HF PEFT baseline.

The serving benchmark runs --quick against a real `python -m runtime` (tiny Llama, two
adapters) through both endpoints; the baseline runs --quick on a tiny model, and with
--compare-engine our engine's greedy outputs must equal HF PEFT's row for row.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from benchmarks import hf_baseline, serve_bench
from benchmarks import workloads as wl
from tests.live import LiveServer, running_server
from tests.models import make_adapter, make_model

NAMES = ["a", "b", "c", "d", "e"]
QUICK_REQUESTS = serve_bench.QUICK["num_prompts"]
METRIC_KEYS = [f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el")
               for s in ("mean", "median", "p99")] + [
    "request_throughput", "input_throughput", "output_throughput", "request_goodput"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("bench")
    model = make_model(root / "model")
    adapters = {f"lora{i}": make_adapter(model, root / "loras" / f"lora{i}", seed=i + 1)
                for i in range(2)}
    return model, adapters


@pytest.fixture(scope="module")
def live(tiny: tuple[Path, dict[str, Path]],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    model, adapters = tiny
    specs = [{"lora_name": n, "lora_path": str(p)} for n, p in adapters.items()]
    root = tmp_path_factory.mktemp("server")
    with running_server(root, model, model.parent / "loras", lora_paths=specs,
                        max_loras_per_batch=2) as server:
        yield server


# ---------------------------------------------------------------- serve_bench, live

@pytest.mark.parametrize("backend", serve_bench.BACKENDS)
def test_serve_bench_quick(live: LiveServer, backend: str, tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    serve_bench.main(["--base-url", live.url, "--backend", backend, "--quick", "--num-loras",
                      "2", "--slo-ttft-ms", "60000", "--out", str(out), "--disable-tqdm"])
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    for key in METRIC_KEYS:
        assert math.isfinite(run[key]) and run[key] >= 0, key
    assert run["failed"] == 0, run["errors"]
    assert run["completed"] == run["good_requests"] == QUICK_REQUESTS
    assert run["total_output_tokens"] == QUICK_REQUESTS * serve_bench.QUICK["output_len"]
    assert run["total_input_tokens"] == QUICK_REQUESTS * serve_bench.QUICK["input_len"]
    assert set(run["requests_per_adapter"]) <= {"lora0", "lora1"}
    assert sum(run["requests_per_adapter"].values()) == QUICK_REQUESTS
    assert run["mean_ttft_ms"] <= run["mean_e2el_ms"]


def test_serve_bench_text_base_sweep_plots(live: LiveServer, tmp_path: Path) -> None:
    """Word prompts, lengths drawn, half the requests on the base model, a two-rate sweep with
    a concurrency cap, per-request records and plots."""
    result = serve_bench.main([
        "--base-url", live.url, "--quick", "--num-loras", "2", "--base-fraction", "0.5",
        "--prompt-format", "text", "--len-dist", "uniform", "--request-rate", "50", "inf",
        "--max-concurrency", "3", "--save-detailed", "--plot-dir", str(tmp_path),
        "--disable-tqdm", "--out", str(tmp_path / "serve.json"),
    ])
    assert [r["request_rate"] for r in result["runs"]] == [50.0, "inf"]
    for run in result["runs"]:
        assert run["failed"] == 0, run["errors"]
        records = run["requests"]
        assert len(records) == QUICK_REQUESTS and all(r["prompt_tokens"] > 0 for r in records)
        assert run["total_output_tokens"] == sum(r["output_tokens"] for r in records)
    expected = {"latency_cdf.png", "rate_sweep.png"}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        expected = set()
    assert {Path(p).name for p in result.get("plots", [])} == expected
    assert all((tmp_path / name).stat().st_size > 0 for name in expected)
    # the same plots drawn again from the saved file (how a device run's plots are made)
    replot = serve_bench.main(["--plot-from", str(tmp_path / "serve.json"),
                               "--plot-dir", str(tmp_path / "again")])
    assert {Path(p).name for p in replot["plots"]} == expected
    assert all((tmp_path / "again" / name).stat().st_size > 0 for name in expected)


def test_server_command_adds_address_and_adapters(tmp_path: Path) -> None:
    cmd, url = serve_bench.server_command("--model-path /m --port 4321", tmp_path, ["x", "y"],
                                          None)
    assert cmd[1:3] == ["-m", "runtime"]
    assert url == "http://127.0.0.1:4321"
    i = cmd.index("--lora-paths")
    assert cmd[i + 1:i + 3] == [f"x={tmp_path / 'x'}", f"y={tmp_path / 'y'}"]
    assert cmd[cmd.index("--max-loras-per-batch") + 1] == "2"


def test_metrics_goodput_and_tpot() -> None:
    fast = serve_bench.RequestResult("a", True, ttft=0.01, e2el=0.11, itl=[0.05, 0.05],
                                     prompt_tokens=4, output_tokens=3)
    slow = serve_bench.RequestResult(None, True, ttft=0.5, e2el=0.7, itl=[0.1, 0.1],
                                     prompt_tokens=4, output_tokens=3)
    failed = serve_bench.RequestResult("a", False, error="HTTP 500")
    m = serve_bench.compute_metrics([fast, slow, failed], 2.0, [99.0], slo_ttft_ms=100.0)
    assert (m["completed"], m["failed"], m["good_requests"]) == (2, 1, 1)
    assert m["request_goodput"] == pytest.approx(0.5)
    assert m["mean_tpot_ms"] == pytest.approx((50 + 100) / 2)
    assert m["total_output_tokens"] == 6 and m["output_throughput"] == pytest.approx(3.0)
    assert m["requests_per_adapter"] == {"a": 2, "__base__": 1}
    assert m["errors"] == ["HTTP 500"]


# ---------------------------------------------------------------- workloads

def rng() -> np.random.Generator:
    return np.random.default_rng(int(torch.randint(0, 1 << 30, ())))


def test_popularity_identical_and_distinct() -> None:
    assert set(wl.sample_adapters(NAMES, 50, "identical", rng())) == {"a"}
    distinct = wl.sample_adapters(NAMES, len(NAMES), "distinct", rng())
    assert sorted(distinct) == NAMES
    cycled = wl.sample_adapters(NAMES, 3 * len(NAMES), "distinct", rng())
    assert Counter(cycled) == {n: 3 for n in NAMES}


@pytest.mark.parametrize(("kind", "kw"), [("skewed", {"zipf_alpha": 1.5}),
                                          ("powerlaw", {"alpha": 0.3})])
def test_popularity_skewed_kinds_favour_the_first_names(kind: str, kw: dict) -> None:
    counts = Counter(wl.sample_adapters(NAMES, 4000, kind, rng(), **kw))
    ranked = [n for n, _ in counts.most_common()]
    assert ranked[:2] == ["a", "b"]
    assert counts["a"] > 2 * counts["c"]


def test_popularity_uniform_and_base_fraction() -> None:
    counts = Counter(wl.sample_adapters(NAMES, 5000, "uniform", rng(), base_fraction=0.2))
    assert 800 <= counts[None] <= 1200
    assert all(700 <= counts[n] <= 900 for n in NAMES)
    assert wl.sample_adapters([], 4, "uniform", rng(), base_fraction=1.0) == [None] * 4
    with pytest.raises(ValueError, match="popularity"):
        wl.sample_adapters(NAMES, 4, "zipf", rng())


@pytest.mark.parametrize("dist", wl.LENGTH_DISTS)
def test_lengths_within_bounds(dist: str) -> None:
    spec = wl.LengthSpec(64, dist, ratio=0.25, sigma=1.0)
    lengths = wl.sample_lengths(spec, 3000, rng())
    lo, hi = spec.bounds
    assert all(isinstance(x, int) and lo <= x <= hi for x in lengths)
    assert abs(np.mean(lengths) - 64) < 6
    if dist == "lognormal":
        assert (lo, hi) == (1, wl.LOGNORMAL_MAX_FACTOR * 64) and len(set(lengths)) > 50


def test_arrivals() -> None:
    assert wl.arrival_times(5, math.inf, 1.0, rng()) == [0.0] * 5
    times = wl.arrival_times(4000, 20.0, 1.0, rng())
    assert times == sorted(times) and times[0] == 0.0
    assert times[-1] / 3999 == pytest.approx(1 / 20, rel=0.1)


def test_random_prompts() -> None:
    ids = wl.random_token_prompts([3, 7], 50, rng())
    assert [len(p) for p in ids] == [3, 7] and all(10 <= t < 50 for p in ids for t in p)
    words = wl.random_text_prompts([4], rng())
    assert len(words[0].split()) == 4


def test_mtbench_questions() -> None:
    try:
        wl.mtbench_file()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    questions = wl.mtbench_questions()
    assert len(questions) == 80 and all(isinstance(q, str) and q for q in questions)
    prompts = wl.mtbench_prompts(100, rng())
    assert len(prompts) == 100 and set(prompts) == set(questions)


# ---------------------------------------------------------------- HF baseline

def test_hf_baseline_quick_matches_engine(tiny: tuple[Path, dict[str, Path]],
                                          tmp_path: Path) -> None:
    model, adapters = tiny
    out = tmp_path / "hf.json"
    hf_baseline.main(["--quick", "--model-path", str(model), "--adapters",
                      *map(str, adapters.values()), "--compare-engine", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["hf"]) == set(result["engine"]) == set(hf_baseline.VARIANTS)
    for name, c in result["comparison"].items():
        assert c["outputs_equal"], (name, c["mismatched_rows"])
        assert c["engine_over_hf_tokens_per_s"] > 0
    for summary in [*result["hf"].values(), *result["engine"].values()]:
        assert summary["output_tokens_per_s"] > 0 and summary["ms_per_step"] > 0
    # ours runs before PEFT is attached; its loop's host time is reported by phase
    assert result["order"] == "engine first"
    assert result["engine_loop_ms"]["steps"] > 0 and result["engine_loop_ms"]["launch"] > 0


def test_dummy_weights_copied_into_engine(tiny: tuple[Path, dict[str, Path]]) -> None:
    """The --dummy-shape path: HF's random weights drawn without HF's init, then copied into
    an engine built with load_format dummy; greedy outputs agree (fp32, CPU)."""
    model_folder, _ = tiny
    model = hf_baseline.hf_dummy_model(model_folder, torch.float32, torch.device("cpu"), seed=3)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    works = hf_baseline.make_workloads(model.config.vocab_size, 3, 12, 5, [], seed=1)
    ref = hf_baseline.hf_generate(model, works["base"], 5, 0)  # no PEFT: plain generate
    config = hf_baseline.engine_config(model_folder, {}, "cpu", "float32", is_dummy=True)
    engine = hf_baseline.build_engine(config, list(model.state_dict().items()))
    ours = hf_baseline.run_engine(engine, works, reps=1)
    assert ours["base"].outputs == ref


def test_responsiveness_quick() -> None:
    from benchmarks.responsiveness import main

    result = main(["--quick"])
    assert result["idle"]["n"] == result["busy"]["n"] == 30
    assert result["busy"]["max_ms"] < 5000


def test_many_adapters_quick(tmp_path: Path) -> None:
    """The many-adapter benchmark end to end on CPU: both workloads measured, the spread one
    really read adapters from disk and uploaded them, every request completed."""
    from benchmarks import many_adapters

    out = tmp_path / "many.json"
    result = many_adapters.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["settings"]["num_adapters"] == 40
    for label in ("few", "many"):
        for kind in ("saturated", "poisson"):
            r = result[label][kind]
            assert r["num_completed"] == r["num_requests"] == 48
            assert math.isfinite(r["request_throughput"]) and r["request_throughput"] > 0
    assert result["many"]["saturated"]["distinct_adapters"] > 4
    assert result["many"]["saturated"]["disk_loads"] > 0
    assert result["many"]["saturated"]["uploads"] > 0
    assert result["many"]["saturated"]["loop_ms"]["steps"] == result["many"]["saturated"]["steps"]
    for label in ("few", "many"):  # the timeline's buckets add up to the run's totals
        r = result[label]["saturated"]
        line = r["timeline"]
        assert line and [b["t"] for b in line] == sorted(b["t"] for b in line)
        assert sum(b["completions"] for b in line) == r["num_completed"]
        assert sum(b["uploads"] for b in line) == r["uploads"]
        assert sum(b["steps"] for b in line) == r["steps"]
    assert isinstance(result["keep_poisson"]["met"], bool)
    # a batch holds at most max_loras_per_batch (4) distinct adapters: with 40 adapters and
    # one request each mostly, the many-adapter batches are smaller than the few-adapter ones
    few, many = result["few"]["saturated"], result["many"]["saturated"]
    assert many["steps"] > 0 and 0 < many["prefill_step_fraction"] <= 1
    assert 1 <= many["mean_rows_per_step"] < few["mean_rows_per_step"] <= 32


def test_step_trace_records_the_steps_in_its_range() -> None:
    """Steps 2 and 3 of a range(2, 4) trace, with their indices and the queue and loads at
    each; every admitted plan still reaches the engine's own hook; the hook is the class's
    again afterwards."""
    from types import SimpleNamespace

    from benchmarks.many_adapters import STEP_PHASES, step_trace

    seen: list[int] = []

    class FakeEngine:
        def _on_admitted(self, plan) -> None:
            seen.append(plan.num_tokens)

    engine = FakeEngine()
    engine.adapters = SimpleNamespace(counters=SimpleNamespace(loads={"host": 3, "gpu": 1}))
    engine.scheduler = SimpleNamespace(num_waiting=7, num_running=2)
    engine.timings = SimpleNamespace(**dict.fromkeys(STEP_PHASES, 0.0))
    out: list[dict] = []
    with step_trace(engine, range(2, 4), out):  # type: ignore[arg-type]
        for n in range(6):
            engine.adapters.counters.loads["host"] += 1
            engine._on_admitted(SimpleNamespace(requests=[SimpleNamespace(is_prefilling=True)],
                                                num_tokens=10 + n, slots={0}))
    assert seen == [10, 11, 12, 13, 14, 15]
    assert [(r["step"], r["tokens"], r["disk_loads"]) for r in out] == [(2, 12, 3), (3, 13, 4)]
    assert out[0]["waiting"] == 7 and out[0]["prefill_rows"] == 1
    assert "_on_admitted" not in vars(engine)


def test_many_adapters_cap_flag(tmp_path: Path) -> None:
    """--max-loras-per-batch raises the batch's adapter cap (and the host tier with it): a
    uniform many-adapter batch then holds more rows a step than at the default cap.
    --saturated-only skips the Poisson runs. --trace-steps records each run's first steps."""
    from benchmarks import many_adapters

    wide = many_adapters.main(["--quick", "--max-loras-per-batch", "16", "--saturated-only",
                               "--lora-loader", "process", "--trace-steps", "5"])
    trace = wide["many"]["saturated"]["step_trace"]
    assert len(trace) == 5 and [r["t"] for r in trace] == sorted(r["t"] for r in trace)
    assert trace[0]["prefill_rows"] == trace[0]["rows"] > 0  # the first step prefills
    assert sum(r["tokens"] for r in trace) >= sum(r["rows"] for r in trace)
    assert all("loop_ms" in r for r in trace[:-1]) and "loop_ms" not in trace[-1]
    assert trace[-1]["uploads"] >= trace[0]["uploads"] >= 0
    assert all(r["loop_ms"]["launch"] > 0 for r in trace[:-1])
    # the runner's CPU time in a launch is part of the launch's wall time
    assert all(0 < r["loop_ms"]["launch_cpu"] <= r["loop_ms"]["launch"] + 0.5
               for r in trace[:-1])
    assert wide["few"]["saturated"]["step_trace"][0]["adapters"] >= 1
    assert "poisson" not in wide["many"] and "keep_poisson" not in wide
    assert wide["settings"]["max_loras_per_batch"] == 16
    assert wide["settings"]["lora_loader"] == "process"  # reads in reader processes on CPU
    assert wide["many"]["saturated"]["num_completed"] == 48
    assert wide["many"]["saturated"]["disk_loads"] > 4
    assert wide["settings"]["max_loaded_loras"] >= 16
    # at the quick default cap (4) a step holds about 5 rows; at 16, about 21
    assert wide["many"]["saturated"]["mean_rows_per_step"] > 10


def test_load_threads_quick() -> None:
    """The per-thread CPU time of on-demand loads: every name loads into the host tier, and
    the tally is by thread name."""
    from benchmarks import load_threads

    result = load_threads.main(["--quick"])
    assert result["names"] == 12 and result["host_copies"] == 13  # and lora0, loaded first
    assert all(v > 0 for v in result["cpu_ms_a_load"].values())
    assert result["wall_s"] > 0


def test_gil_probe_quick() -> None:
    """The GIL probe measures a small call alone, beside loader threads and beside reader
    processes, and both kinds of reader really read; and an upload's copies' issue."""
    from benchmarks import gil_probe

    result = gil_probe.main(["--quick"])
    assert result["one_read_ms"] > 0
    for kind in ("alone", "threads", "processes"):
        assert result[kind]["calls"] > 0 and result[kind]["p99_us"] >= result[kind]["median_us"]
    assert result["threads"]["loads_per_s"] > 0 and result["processes"]["loads_per_s"] > 0
    # an upload's copies timed both ways beside 0, 1 and 2 busy threads
    assert sorted(result["upload_calls"]) == [0, 1, 2]
    assert all(r["per_copy_us"] > 0 and r["foreach_us"] > 0
               for r in result["upload_calls"].values())


def test_loop_profile_quick() -> None:
    """The loop profile on CPU: the measured batch's steps are timed by phase and the runner
    thread was sampled while it launched (its frames are the model's and sampler's)."""
    from benchmarks import loop_profile

    result = loop_profile.main(["--quick", "--interval-ms", "0.2"])
    loop = result["loop_ms"]
    assert loop["steps"] >= 8 and loop["launch"] > 0 and result["output_tokens_per_s"] > 0
    runner = result["profile"]["runner"]
    assert runner["samples"] > 0 and runner["leaves"] and 0 < runner["busy_fraction"] <= 1
    # shares are rounded to 4 decimals, up to 15 of them: their sum may pass 1 by 15 * 5e-5
    assert 0 < sum(share for *_, share in runner["leaves"]) <= 1.0 + 1e-3
    # the loop thread and the adapter loaders are sampled too; on this tiny CPU batch they are
    # busy too briefly for a count to be assured
    assert set(result["profile"]) == {"runner", "loop", "adapter loads"}
    assert result["compiles"]["total"] == 0  # the interpreter compiles nothing


def test_long_launches_keep_only_long_launches_and_their_stacks() -> None:
    """A launch past the threshold is kept with the runner's frames at the time (here a
    Python busy loop it called, and a sleep's caller); a short one is counted, not kept; the
    engine's method is its own again afterwards."""
    from types import SimpleNamespace

    from benchmarks.loop_profile import LongLaunches

    def spin_for(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    def sleep_for(seconds: float) -> None:
        time.sleep(seconds)

    class FakeEngine:
        def _launch_counted(self, plan, fb):
            fb(plan.seconds)
            return plan.seconds

    engine = FakeEngine()

    def plan(seconds: float) -> SimpleNamespace:
        return SimpleNamespace(seconds=seconds, requests=[0, 1], num_tokens=7)

    with LongLaunches(engine, threshold_s=0.05, interval_s=1e-3) as launches:  # type: ignore[arg-type]
        assert engine._launch_counted(plan(0.002), spin_for) == 0.002
        engine._launch_counted(plan(0.12), spin_for)
        engine._launch_counted(plan(0.08), sleep_for)
    assert "_launch_counted" not in vars(engine)
    assert launches.launches == 3 and [r["launch"] for r in launches.long] == [2, 3]
    spun, slept = launches.long
    assert spun["ms"] >= 120 and spun["cpu_ms"] >= 60 and spun["rows"] == 2
    assert slept["cpu_ms"] < 0.5 * slept["ms"]
    assert spun["samples"] >= 10 and slept["samples"] >= 10
    assert spun["stacks"][0][0].startswith("spin_for")
    assert slept["stacks"][0][0].startswith("sleep_for")
    assert "2 of 3 launches took 50 ms or more" in launches.report()


def test_loop_stall_dumps_catch_the_stall_and_the_other_threads() -> None:
    """A loop blocked for 250 ms is one stall, dumped while it lasts: the loop's frame is the
    blocking call's, a busy thread's frames are its work's, an idle one is counted idle; a
    loop that keeps coming back within the threshold makes no dump."""
    import threading

    from benchmarks.loop_profile import IDLE, LoopStallDumps

    stop = threading.Event()

    def busy_worker() -> None:
        while not stop.is_set():
            sum(range(1000))

    async def go() -> tuple[LoopStallDumps, LoopStallDumps]:
        worker = threading.Thread(target=busy_worker, name="busy-worker")
        idle = threading.Thread(target=stop.wait, name="idle-worker")
        worker.start()
        idle.start()
        try:
            async with LoopStallDumps(after_s=0.1) as quiet:
                for _ in range(10):
                    await asyncio.sleep(0.01)
            async with LoopStallDumps(after_s=0.1) as stalled:
                await asyncio.sleep(0.03)
                time.sleep(0.25)  # noqa: ASYNC251 - the stall, on purpose
                await asyncio.sleep(0.03)
        finally:
            stop.set()
            worker.join()
            idle.join()
        return quiet, stalled

    quiet, stalled = asyncio.run(go())
    assert quiet.stalls == []
    assert len(stalled.stalls) == 1 and not stalled.unmatched
    at, gap, threads = stalled.stalls[0]
    assert 0.24 <= gap < 1.0 and 0 <= at < 0.2
    assert "time.sleep(0.25)" not in threads["MainThread"][0]  # frames, not source lines
    assert threads["MainThread"][0].startswith("go (test_benchmarks.py:")
    assert any(f.startswith("busy_worker (") for f in threads["busy-worker"])
    assert IDLE.match(threads["idle-worker"][0])
    report = stalled.report()
    assert report.startswith("1 loop stalls of 100 ms or more")
    assert "busy-worker: " in report and "idle-worker" in report.splitlines()[-1]


def test_compile_log_records_chains_and_restores() -> None:
    """CompileLog installs Triton's post-compile hook for its block only, passes each compile on
    to a hook set before it, and counts compiles per kernel."""
    import triton

    from benchmarks.loop_profile import CompileLog

    seen = []
    knobs = triton.knobs.runtime
    before = knobs.jit_post_compile_hook
    knobs.jit_post_compile_hook = lambda **kw: seen.append(kw["repr"])
    try:
        fn = type("Fn", (), {"name": "k1"})()
        with CompileLog() as log:
            for name, r in [("k1", "a"), ("k2", "b"), ("k1", "c")]:
                fn.name = name
                knobs.jit_post_compile_hook(key=r, repr=r, fn=fn, compile={"constants": {}},
                                            is_manual_warmup=False, already_compiled=False)
        summary = log.summary()
        assert summary["total"] == 3 and seen == ["a", "b", "c"]
        assert list(summary["per_kernel"]) == ["k1", "k2"]
        assert summary["per_kernel"]["k1"]["count"] == 2
        assert knobs.jit_post_compile_hook is not log._hook
    finally:
        knobs.jit_post_compile_hook = before


def test_host_overhead_step_figures() -> None:
    """schedule, prepare and postprocess of a decode step are each timed (the smoke run CI
    makes of host_overhead's step figures)."""
    from benchmarks.host_overhead import step_prep_ms

    ms = step_prep_ms(8, iters=20, rounds=1)
    assert set(ms) == {"schedule_ms", "prepare_ms", "postprocess_ms"}
    assert all(0 < v < 1e3 for v in ms.values())


def test_kernel_window_summary() -> None:
    """many_adapters' kernel window: GPU time a step by category, and the busy share counts
    overlapping kernels once (the union of their intervals)."""
    from benchmarks.many_adapters import main, summarize_kernels

    kernels = [("_lora_expand_kernel", 0.0, 400.0), ("nvjet_gemm", 200.0, 1000.0),
               ("_rmsnorm_kernel", 1500.0, 1600.0)]  # us; 1.1 ms busy of a 2 ms window
    k = summarize_kernels(kernels, steps=2, window_s=2e-3)
    assert k["gpu_busy"] == pytest.approx(0.55)
    assert k["gpu_ms_per_step"] == pytest.approx(0.55)
    assert k["ms_per_step"] == pytest.approx({"lora expand": 0.2, "gemm": 0.4, "norm": 0.05})
    with pytest.raises(SystemExit):
        main(["--quick", "--kernel-window", "1", "2"])


def test_step_bench_lora_cases_parse() -> None:
    """step_bench --lora-cases: BATCHxADAPTERS, adapters at most the batch and the pool's slots
    (--max-loras-per-batch, 32 by default)."""
    from benchmarks.step_bench import parse_lora_cases

    assert parse_lora_cases(["1x1", "32x8", "16X4"]) == [(1, 1), (32, 8), (16, 4)]
    for bad in ("3x", "2x4", "64x33", "ax1"):
        with pytest.raises(SystemExit, match="--lora-cases"):
            parse_lora_cases([bad])
    assert parse_lora_cases(["32x8"], slots=8) == [(32, 8)]
    with pytest.raises(SystemExit, match="max-loras-per-batch"):
        parse_lora_cases(["32x9"], slots=8)


def test_step_bench_kernel_timeline() -> None:
    """--timeline reads the profiler's trace: kernels (and copies) only, in start order, times
    from the first one, with their streams."""
    from benchmarks.step_bench import kernel_timeline

    events = [
        {"cat": "kernel", "name": "gemm", "ts": 105.0, "dur": 10.0, "args": {"stream": 7}},
        {"cat": "cpu_op", "name": "aten::mm", "ts": 90.0, "dur": 50.0},
        {"cat": "kernel", "name": "shrink", "ts": 100.5, "dur": 3.25, "args": {"stream": 9}},
        {"cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 120.0, "dur": 1.0, "tid": 7},
    ]

    class Prof:
        def export_chrome_trace(self, path: str) -> None:
            Path(path).write_text(json.dumps({"traceEvents": events}))

    assert kernel_timeline(Prof()) == [[9, "shrink", 0.0, 3.25], [7, "gemm", 4.5, 10.0],
                                       [7, "Memcpy DtoD", 19.5, 1.0]]


def test_step_bench_graph_launch_leads() -> None:
    """--profile-host: each cudaGraphLaunch call against the graph's first kernel (by the
    call's correlation id) and the kernel ahead of it on its stream: a call that returned
    before that kernel ended leads by the difference, one after it is late (negative); the
    graph's later kernels and the other streams' work do not count."""
    from benchmarks.step_bench import graph_launch_leads

    def kernel(name, ts, dur, corr, stream=7):
        return {"cat": "kernel", "name": name, "ts": ts, "dur": dur,
                "args": {"stream": stream, "correlation": corr}}

    def launch(ts, dur, corr):
        return {"cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": ts, "dur": dur,
                "args": {"correlation": corr}}

    events = [
        launch(10.0, 5.0, 100), kernel("inputs", 50.0, 5.0, 99), kernel("embed", 71.0, 2.0, 100),
        kernel("norm", 73.0, 2.0, 100), kernel("copy", 60.0, 30.0, 98, stream=9),
        launch(120.0, 5.0, 200), kernel("inputs", 100.0, 5.0, 199),
        kernel("embed", 130.0, 2.0, 200),
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 1.0, "dur": 1.0,
         "args": {"correlation": 99}},
    ]
    out = graph_launch_leads(events)
    assert out["launches"] == 2 and out["late"] == 1
    leads, starts = sorted([55.0 - 15.0, 105.0 - 125.0]), sorted([16.0, 25.0])
    assert out["lead_us"]["median"] == pytest.approx(sum(leads) / 2)
    assert out["start_us"]["median"] == pytest.approx(sum(starts) / 2)
    assert graph_launch_leads([])["launches"] == 0


def test_step_bench_frontier_by_kernel() -> None:
    """Each kernel's share of the step is how far it moves the latest end: a kernel launched
    early (PDL) under the one ahead counts only what it runs past it; gaps are idle."""
    from benchmarks.step_bench import frontier_by_kernel

    timeline = [  # [stream, name, start us, duration us], two steps
        [7, "gemm", 0.0, 10.0], [7, "norm", 8.0, 4.0], [7, "gemm", 12.0, 10.0],
        [7, "gemm", 30.0, 10.0], [7, "norm", 38.0, 4.0], [7, "gemm", 42.0, 10.0],
    ]
    out = frontier_by_kernel(timeline, steps=2)
    assert out["span_us"] == 26.0 and out["idle_us"] == 4.0
    assert out["kernels"] == [{"name": "gemm", "us_per_step": 20.0, "per_step": 2.0},
                              {"name": "norm", "us_per_step": 2.0, "per_step": 1.0}]
    assert frontier_by_kernel([], 2)["kernels"] == []


def test_step_bench_gemm_by_place() -> None:
    """The GEMMs' shares of the step's end by the kind of kernel before each (one kernel name
    serves qkv, o, gate_up and down): after the norm, after attention, after a GEMM."""
    from benchmarks.step_bench import gemm_by_place

    timeline = [  # one layer: norm, qkv, rotary, attention, o, norm, gate_up, down
        [7, "_rmsnorm_kernel", 0.0, 2.0], [7, "_tma_gemm_kernel", 1.0, 10.0],
        [7, "_rope_store_kv_kernel", 11.0, 2.0], [7, "_decode_attention_kernel", 13.0, 12.0],
        [7, "_tma_gemm_kernel", 20.0, 9.0], [7, "_rmsnorm_kernel", 29.0, 2.0],
        [7, "_tma_gemm_kernel", 31.0, 50.0], [7, "_tma_gemm_kernel", 80.0, 30.0],
    ]
    got = {k["name"]: (k["us_per_step"], k["per_step"]) for k in gemm_by_place(timeline, 1)}
    # qkv moves the end 9 us past the norm's, gate_up 50; o 4 past attention's; down 29
    assert got == {"after norm": (59.0, 2.0), "after gemm": (29.0, 1.0),
                   "after attention": (4.0, 1.0)}
    assert gemm_by_place([], 1) == []


def test_step_bench_gpu_gaps() -> None:
    """--profile-loop: busy time is the union of every stream's kernels (overlaps count once),
    idle the rest of the span; gaps of at least the threshold are grouped by the kernels either
    side, largest first, per step."""
    from benchmarks.step_bench import gpu_gaps

    timeline = [  # [stream, name, start, duration]
        [7, "gemm", 0.0, 10.0],
        [9, "shrink", 2.0, 3.0],     # inside gemm: no gap
        [7, "norm", 12.0, 2.0],      # 2 us after gemm
        [7, "argmax", 14.5, 1.0],    # 0.5 us: under the threshold
        [7, "copy", 25.5, 1.0],      # 10 us after argmax
        [9, "gemm", 26.0, 4.0],      # overlaps copy, ends later
        [7, "norm", 32.0, 1.0],      # 2 us after that gemm
        [7, "argmax", 33.0, 1.0],
        [7, "copy", 44.0, 2.0],      # 10 us after argmax
        [7, "norm", 47.0, 1.0],      # 1 us after copy
        [7, "argmax", 48.0, 1.0],
        [7, "copy", 79.0, 1.0],      # 30 us after argmax
    ]
    out = gpu_gaps(timeline, steps=3, min_gap_us=1.0)
    assert out["span_us"] == pytest.approx(80.0 / 3)
    assert out["busy_us"] == pytest.approx((10 + 2 + 1 + 4.5 + 2 + 2 + 2 + 1) / 3)
    assert out["idle_us"] == pytest.approx((2 + 0.5 + 10 + 2 + 10 + 1 + 30) / 3)
    assert out["gaps"] == [
        {"after": "argmax", "before": "copy", "us_per_step": pytest.approx(50.0 / 3, abs=0.01),
         "count": 3, "median_us": 10.0, "max_us": 30.0},
        {"after": "gemm", "before": "norm", "us_per_step": pytest.approx(4.0 / 3, abs=0.01),
         "count": 2, "median_us": 2.0, "max_us": 2.0},
        {"after": "copy", "before": "norm", "us_per_step": pytest.approx(1.0 / 3, abs=0.01),
         "count": 1, "median_us": 1.0, "max_us": 1.0},
    ]
    assert gpu_gaps([], steps=3)["busy_us"] == 0.0


def test_graph_gap_reads_each_graphs_start() -> None:
    """graph_gap: the gap from each kernel ahead of a graph to the graph's first kernel, what
    runs between them (a copy on another stream) and the graph's later kernels aside; a kernel
    with no graph after it gives none; without a GPU the script says it needs one."""
    from benchmarks import graph_gap
    from benchmarks.graph_gap import NODE, PRED, graph_starts

    timeline = [  # [stream, name, start, duration]
        [7, PRED, 0.0, 2.0],
        [9, "Memcpy DtoH (Device -> Pinned)", 3.0, 1.0],
        [7, NODE, 14.0, 1.0],        # 12 us after the kernel ahead
        [7, NODE, 15.5, 1.0],        # the graph's second kernel
        [7, PRED, 20.0, 1.5],
        [7, NODE, 42.5, 1.0],        # 21 us
        [7, PRED, 50.0, 1.0],        # no graph after it
    ]
    assert graph_starts(timeline) == pytest.approx([12.0, 21.0])
    assert graph_starts([]) == []
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a GPU"), \
                mock.patch("sys.argv", ["graph_gap", "--quick"]):
            graph_gap.main()


def test_step_bench_profile_loop_runs_the_serving_loop(
        tiny: tuple[Path, dict[str, Path]]) -> None:
    """--profile-loop drives the serving loop: a token gap a case and the gap summary's fields
    (on the CPU the profiler sees no kernels, so the device figures are zero); so do the step
    targets' loop rows."""
    import asyncio

    from benchmarks.step_bench import loop_decode_ab, make_engine, profile_loop_cases

    model, _ = tiny
    engine = make_engine(model, device="cpu", dtype="float32", max_running_requests=4)
    rows = asyncio.run(profile_loop_cases(engine, [1, 2], 8, 3, [], host=True))
    assert [(r["batch"], r["adapters"]) for r in rows] == [(1, 0), (2, 0)]
    for r in rows:
        assert r["token_gap_ms"] > 0 and r["steps"] == 3
        assert r["busy_us"] == r["idle_us"] == 0.0 and r["gaps"] == []
        assert r["frontier"]["kernels"] == []  # what moves the step's end, kernel by kernel
        assert r["graph_launch"]["launches"] == 0  # --profile-host: no graphs on the CPU
    # the step targets' loop rows drive the same loop: overlap on and off, a token gap each
    engine = make_engine(model, device="cpu", dtype="float32", max_running_requests=4)
    rows = asyncio.run(loop_decode_ab(engine, [2], 8, 3, []))
    assert [(r["batch"], r["overlap"]) for r in rows] == [(2, True), (2, False)]
    assert all(r["median_ms"] > 0 for r in rows)
    for r in rows:  # the loop's host time a step by phase, over the measured tokens
        assert r["host_ms"]["steps"] >= 2 and r["host_ms"]["launch"] > 0


@pytest.mark.parametrize("variant", ["default", "k32", "fold", "fold+k32", "eager+fold+k32"])
def test_shrink_bench_variants_compute_the_shrink(variant: str) -> None:
    """shrink_bench's variants (the decode shrink's knobs set through the environment) give
    the shrink's t, through the Triton kernel under the interpreter at a small shape."""
    import os

    from benchmarks import shrink_bench as sb
    from ops.lora import lora_shrink_torch

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton shrink on CPU tensors under TRITON_INTERPRET=1")
    assert sb.variant_env("fold+k512") == {"LORASERVE_SHRINK_FOLD_DECODE": "1",
                                           "LORASERVE_SHRINK_DECODE_BLOCK_K": "512"}
    with pytest.raises(SystemExit, match="bogus"):
        sb.variant_env("fold+bogus")
    ly = sb.make_layers(6, 3, 96, 3, 4, 1, device="cpu", dtype=torch.float32)[0]
    with sb.environment(sb.variant_env(variant)):
        t = sb.shrink(ly)
    want = lora_shrink_torch(ly["x"], ly["A"], ly["info"], 3)
    torch.testing.assert_close(t[0].float(), want.float(), rtol=1e-3, atol=1e-3)
    assert sb.a_bytes(32, 3, 16, 4096) == 32 * 3 * 16 * 4096 * 2
    assert sb.groups("llama-3.1-8b") == {"qkv": (4096, 3), "o": (4096, 1),
                                         "gate_up": (4096, 2), "down": (14336, 1)}


def test_shrink_bench_stacked_gemm_gives_each_rows_t() -> None:
    """shrink_bench's "gemm" variant (one GEMM over the projection's weight with the adapter
    pool's A rows under it) yields each row's t from its own slot's columns, base rows zero:
    the shrink's t."""
    from benchmarks import shrink_bench as sb
    from ops.lora import lora_shrink_torch

    ly = sb.make_layers(6, 3, 96, 3, 4, 1, device="cpu", dtype=torch.float32)[0]
    ly["info"].seg_slots[0] = -1  # a base run: its rows get zeros
    ly["W"] = torch.randn(40, 96)
    ly["WA"] = torch.cat([ly["W"], ly["A"].reshape(-1, 96)])
    out = sb.stacked(ly)
    torch.testing.assert_close(out[:, :40], sb.projection(ly))
    t = sb.own_slot_columns(out[:, 40:], ly["info"], ly["A"].shape[1])
    want = lora_shrink_torch(ly["x"], ly["A"], ly["info"], 3)
    torch.testing.assert_close(t[0], want, rtol=1e-4, atol=1e-4)
    assert sb.variant_env("gemm+eager") == {"LORASERVE_SHRINK_EAGER": "1"}


def test_blaslt_problem_and_structs() -> None:
    """gemm_bench's cuBLASLt view of y = x W^T: D (out x batch, column-major) = W^T-op times
    x, leading dimensions from the row-major tensors; the heuristic result is the C struct's
    96 bytes; without CUDA the binding refuses with a message."""
    import ctypes

    from benchmarks import blaslt

    p = blaslt.problem(32, 4096, 14336)
    assert (p.transa, p.transb) == (blaslt.OP_T, blaslt.OP_N)
    assert (p.m, p.n, p.k) == (4096, 32, 14336)
    assert (p.lda, p.ldb, p.ldd) == (14336, 14336, 4096)
    assert ctypes.sizeof(blaslt.MatmulAlgo) == 64
    assert ctypes.sizeof(blaslt.HeuristicResult) == 96
    with pytest.raises(ValueError, match="positive"):
        blaslt.problem(0, 8, 8)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs CUDA"):
            blaslt.LtLinear(1, 8, 8)


def test_blaslt_best_plan_keeps_only_clear_wins() -> None:
    """A plan entry for each projection and batch whose fastest cuBLASLt algorithm beats
    F.linear by more than the margin, naming that algorithm; none elsewhere."""
    from benchmarks.blaslt import best_plan

    def row(proj, batch, layout, us):
        return {"proj": proj, "out": 8, "in": 4, "batch": batch, "layout": layout, "us": us}

    rows = [row("o", 1, "linear", 10.0), row("o", 1, "lt:0", 10.1), row("o", 1, "lt:3", 8.0),
            row("o", 32, "linear", 10.0), row("o", 32, "lt:0", 9.8),
            row("qkv", 1, "linear", 5.0), row("qkv", 1, "mm_t", 1.0)]
    plan = best_plan(rows)
    assert plan == [{"proj": "o", "out": 8, "in": 4, "batch": 1, "algo": 3, "us": 8.0,
                     "linear_us": 10.0}]
    assert best_plan(rows, min_gain=0.0)[1]["batch"] == 32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 32])
def test_blaslt_algorithms_match_linear(batch: int) -> None:
    """Every algorithm cuBLASLt's heuristic offers for a decode projection (bf16, o's shape)
    gives F.linear's result, eagerly and replayed in a CUDA graph."""
    from benchmarks.blaslt import LtLinear

    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    x = torch.randn(batch, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    want = torch.nn.functional.linear(x, w).float()
    lt = LtLinear(batch, 4096, 4096, torch.bfloat16, count=16)
    assert lt.algos, "the heuristic offered no algorithm"
    y = torch.empty(batch, 4096, device="cuda", dtype=torch.bfloat16)
    for i in range(len(lt.algos)):
        y.zero_()
        err = (lt.run(i, x, w, y).float() - want).norm() / want.norm()
        assert err < 1e-2, (i, lt.config(i), err.item())
        y.zero_()
        stream = torch.cuda.Stream()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            lt.run(i, x, w, y)  # warm, outside the capture
        torch.cuda.synchronize()
        y.zero_()
        with torch.cuda.graph(graph, stream=stream):
            lt.run(i, x, w, y)
        graph.replay()
        torch.cuda.synchronize()
        err = (y.float() - want).norm() / want.norm()
        assert err < 1e-2, (i, lt.config(i), err.item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_blaslt_plan_takes_the_algorithm_in_captures_only(monkeypatch) -> None:
    """With a plan installed, a bias-free nn.Linear of a planned shape runs the planned
    cuBLASLt algorithm while a graph is captured (same result as F.linear) and F.linear
    eagerly; uninstalling puts F.linear back."""
    from benchmarks import blaslt

    calls = []
    run = blaslt.LtLinear.run
    monkeypatch.setattr(blaslt.LtLinear, "run",
                        lambda self, i, *a: calls.append(i) or run(self, i, *a))
    lin = torch.nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    want = torch.nn.functional.linear(x, lin.weight).float()
    original = torch.nn.Linear.forward
    uninstall = blaslt.install_plan([{"out": 4096, "in": 4096, "batch": 1, "algo": 0}])
    try:
        assert calls == [0]  # the planned kernel loads before any capture
        calls.clear()
        lin(x)
        assert calls == []
        stream, graph = torch.cuda.Stream(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            y = lin(x)
        graph.replay()
        torch.cuda.synchronize()
        assert calls == [0]
        assert ((y.float() - want).norm() / want.norm()).item() < 1e-2
    finally:
        uninstall()
    assert torch.nn.Linear.forward is original


def test_step_table_targets_and_ranges(tmp_path: Path, capsys) -> None:
    """step_table: the targets of a step_bench run (loop ÷ floor, adapter ratios by graph and
    loop, 32 adapters against base plus their bytes, prefill), '-' for cases a base-only run
    lacks, and each column's range."""
    from benchmarks import step_table

    full = {
        "hbm_bytes_per_s": 4e12,
        "decode": [{"batch": 1, "floor_ms": 3.5, "graph_forward_ms": 4.6},
                   {"batch": 32, "floor_ms": 4.0, "graph_forward_ms": 5.0}],
        "decode_lora": [{"batch": 1, "adapters": 1, "graph_forward_ms": 5.06},
                        {"batch": 32, "adapters": 8, "graph_forward_ms": 5.5},
                        {"batch": 32, "adapters": 32, "graph_forward_ms": 6.0,
                         "adapter_bytes": 2e9}],
        "decode_loop": [{"batch": 1, "adapters": 0, "overlap": True, "median_ms": 4.55},
                        {"batch": 1, "adapters": 0, "overlap": False, "median_ms": 9.0},
                        {"batch": 32, "adapters": 0, "overlap": True, "median_ms": 5.2},
                        {"batch": 1, "adapters": 1, "overlap": True, "median_ms": 5.005},
                        {"batch": 32, "adapters": 8, "overlap": True, "median_ms": 5.98}],
        "prefill_8x512": {"median_ms": 100.0}, "prefill_8x512_8_adapters": {"median_ms": 112.0},
    }
    row = step_table.target_row(full)
    want = {"loop_b1": 4.55, "floor_b1": 1.3, "loop_b32": 5.2, "floor_b32": 1.3,
            "graph_b1": 4.6, "graph_b32": 5.0, "one_graph": 1.1, "one_loop": 1.1,
            "eight_graph": 1.1, "eight_loop": 1.15, "many_bytes": 6.0 / 5.5, "prefill": 1.12}
    assert row == pytest.approx(want)
    base = {k: full[k] for k in ("hbm_bytes_per_s", "decode", "prefill_8x512")}
    base["decode_loop"] = full["decode_loop"][:3]
    base["decode"] = [dict(d, floor_ms=d["floor_ms"] * 1.1) for d in full["decode"]]
    slim = step_table.target_row(base)
    assert slim["one_graph"] is None and slim["many_bytes"] is None and slim["prefill"] is None
    assert slim["floor_b1"] == pytest.approx(4.55 / 3.85)
    (tmp_path / "a.json").write_text(json.dumps(full))
    (tmp_path / "b.json").write_text(json.dumps(base))
    step_table.main([f"default={tmp_path / 'a.json'}", str(tmp_path / "b.json")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| default | 4.550 | 1.300 |")
    assert lines[3].startswith("| b | 4.550 | 1.182 |") and " - |" in lines[3]
    assert lines[4].startswith("| range | 4.550 | 1.182-1.300 |")


def test_serve_bench_shared_prefixes() -> None:
    """--prefix-len puts one of --num-prefixes random prefixes before each prompt, after the
    prompts are drawn: the same seed gives the same prompts behind them."""
    argv = ["--num-prompts", "12", "--input-len", "5", "--output-len", "2", "--seed", "3",
            "--num-loras", "2"]
    plain = serve_bench.build_requests(serve_bench.parse_args(argv), 500)
    shared = serve_bench.build_requests(serve_bench.parse_args(
        argv + ["--prefix-len", "20", "--num-prefixes", "2"]), 500)
    assert [s.prompt[20:] for s in shared] == [p.prompt for p in plain]
    prefixes = {tuple(s.prompt[:20]) for s in shared}
    assert len(prefixes) == 2 and all(10 <= t < 500 for p in prefixes for t in p)
    text = serve_bench.build_requests(serve_bench.parse_args(
        argv + ["--prompt-format", "text", "--prefix-len", "6"]), None)
    heads = {" ".join(s.prompt.split()[:6]) for s in text}
    assert len(heads) == 1 and all(len(s.prompt.split()) == 11 for s in text)


def test_serve_bench_reports_prefix_cache_hits(tiny: tuple[Path, dict[str, Path]],
                                               tmp_path: Path) -> None:
    """Against a server with the prefix cache, a shared-prefix workload sent one request at a
    time reports the cached prompt tokens, on both backends (meta_info and usage)."""
    model, _ = tiny
    with running_server(tmp_path, model, model.parent / "loras",
                        enable_prefix_caching=True) as server:
        for backend in serve_bench.BACKENDS:
            out = tmp_path / f"{backend}.json"
            serve_bench.main(["--base-url", server.url, "--backend", backend, "--quick",
                              "--base-fraction", "1", "--prefix-len", "40",
                              "--max-concurrency", "1", "--out", str(out), "--disable-tqdm"])
            (run,) = json.loads(out.read_text())["runs"]
            assert run["failed"] == 0, run["errors"]
            # every request after the first takes the prefix's two full blocks of 16
            assert run["total_cached_tokens"] >= (QUICK_REQUESTS - 1) * 32, run
