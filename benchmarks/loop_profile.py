"""Where the serving loop's host time goes: one batch through the engine's async loop (as the
server runs it), the loop's phase timers a step, and a sampling profile of the runner thread
(the thread that enqueues each step's forward, sampler and copies) and of the event loop's
thread (schedule, prepare, postprocess), taken from their Python stacks every `--interval-ms`
while the measured batch runs.

    python -m benchmarks.loop_profile --out loop.json                   # 8B shapes, on the device
    python -m benchmarks.loop_profile --quick                           # tiny model on CPU

The batch runs twice: the first compiles and warms up, the second is measured and sampled.
A sample is a thread's innermost frame and its four innermost frames; an idle thread is not
counted, so the shares are of the time it was busy. `StackSampler` is also what
`many_adapters --profile` uses.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import faulthandler
import json
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

import torch

from benchmarks.random_adapters import ALL_LINEAR
from runtime.config import LoraPathSpec
from runtime.engine import Engine, LoopTimings
from runtime.request import SamplingParams

RUNNER_THREAD_PREFIX = "loraserve-runner"


def innermost(frame: Any, depth: int) -> list[tuple[str, str, int]]:
    """A stack's `depth` innermost frames, innermost first, as (function, file name, line).
    Read off the frame objects: traceback's extraction stats each file (linecache), and every
    stat gives the GIL away, which a sampler then waits a switch interval to get back."""
    out = []
    while frame is not None and len(out) < depth:
        code = frame.f_code
        out.append((code.co_name, Path(code.co_filename).name, frame.f_lineno))
        frame = frame.f_back
    return out


class StackSampler:
    """Samples the Python stacks of named threads from a daemon thread until stopped.

    threads: label -> thread-name prefix ("MainThread" for the event loop of an in-process
    engine). A thread that is idle (a pool thread waiting for work, an event loop in its
    selector) is not counted, so each label's shares are of the time that thread was busy.
    """

    IDLE_FRAMES = frozenset({"_worker", "select", "poll", "_run_once", "wait"})

    def __init__(self, threads: dict[str, str], interval_s: float) -> None:
        self.threads, self.interval = threads, interval_s
        self.leaves = {k: collections.Counter[str]() for k in threads}
        self.stacks = {k: collections.Counter[str]() for k in threads}
        self.samples = dict.fromkeys(threads, 0)
        self.ticks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="loop-profile")

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _label(self, name: str) -> str | None:
        return next((k for k, prefix in self.threads.items() if name.startswith(prefix)), None)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.ticks += 1
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                label = self._label(names.get(ident, ""))
                if label is None:
                    continue
                frames = innermost(frame, 4)
                if frames[0][0] in self.IDLE_FRAMES or any(
                    name == "_worker" for name, _, _ in frames[:3]
                ):
                    continue
                self.samples[label] += 1
                name, file, line = frames[0]
                self.leaves[label][f"{file}:{line} {name}"] += 1
                self.stacks[label][" < ".join(f"{n}:{ln}" for n, _, ln in frames)] += 1
            time.sleep(self.interval)

    def top(self, n: int) -> dict[str, Any]:
        """Per label: busy samples, their share of all sampling ticks, the hottest innermost
        frames and 4-frame stacks with their shares of the busy samples."""
        out: dict[str, Any] = {}
        for label in self.threads:
            busy = self.samples[label]
            share = 1.0 / max(busy, 1)
            out[label] = {
                "samples": busy,
                "busy_fraction": busy / max(self.ticks, 1),
                "leaves": [(k, v, round(v * share, 4))
                           for k, v in self.leaves[label].most_common(n)],
                "stacks": [(k, v, round(v * share, 4))
                           for k, v in self.stacks[label].most_common(n)],
            }
        return out

    def report(self, n: int = 12) -> str:
        lines = []
        for label, t in self.top(n).items():
            lines.append(f"{label} thread: busy in {100 * t['busy_fraction']:.0f} % of "
                         f"{self.ticks} samples; innermost frames:")
            lines += [f"  {100 * share:5.1f} %  {count:6d}  {name}"
                      for name, count, share in t["leaves"]]
        return "\n".join(lines)


class LongLaunches:
    """The runner thread's Python stacks inside every launch that takes `threshold_s` or more.

    Wraps `engine._launch_counted` on the instance while inside; a daemon thread samples the
    runner's innermost `depth` frames every `interval_s` while a launch runs, and a launch's
    samples are kept only if it ran long. A long launch's CPU time cannot tell Python work from
    a spin: CUDA's default schedule spins in a synchronising call. The stacks can: Python work,
    a torch call that waits (a synchronising op, a full launch queue, a driver lock), a Triton
    compile. A sampler needs the GIL, so a launch that holds it in C shows few samples and a
    long `max_gap_ms`. Pinned host allocations (the caching host allocator growing) are counted
    a launch too.
    """

    def __init__(self, engine: Engine, threshold_s: float, interval_s: float = 1e-3,
                 depth: int = 6) -> None:
        self.engine, self.threshold, self.interval, self.depth = (engine, threshold_s,
                                                                  interval_s, depth)
        self.long: list[dict[str, Any]] = []
        self.launches = 0
        self._stacks: collections.Counter[str] | None = None  # the running launch's samples
        self._gaps: list[float] = []
        self._ident = 0
        self._started = 0.0  # perf_counter at the running launch's start
        self._active = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="launch-sampler")

    def __enter__(self) -> Self:
        self._orig = self.engine._launch_counted
        self.engine._launch_counted = self._launch  # type: ignore[method-assign]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        del self.engine._launch_counted  # the class's method again
        self._stop.set()
        self._active.set()
        self._thread.join()

    @staticmethod
    def _pinned() -> dict[str, float]:
        if not torch.cuda.is_available():
            return {}
        st = torch.cuda.host_memory_stats()
        return {"allocs": st.get("num_host_alloc", 0),
                "alloc_ms": st.get("host_alloc_time.total", 0) / 1e3,
                "frees": st.get("num_host_free", 0)}

    def _launch(self, plan: Any, fb: Any) -> Any:
        self.launches += 1
        pinned = self._pinned()
        self._ident = threading.get_ident()
        t0, c0 = time.perf_counter(), time.thread_time()
        self._started = t0  # before the new counter, which tells the sampler a launch began
        gaps = self._gaps = []
        stacks = self._stacks = collections.Counter()
        self._active.set()
        try:
            return self._orig(plan, fb)
        finally:
            self._active.clear()
            dt, cpu = time.perf_counter() - t0, time.thread_time() - c0
            if dt >= self.threshold:
                after = self._pinned()
                n = sum(stacks.values())
                self.long.append({
                    "launch": self.launches, "ms": 1e3 * dt, "cpu_ms": 1e3 * cpu,
                    "rows": len(plan.requests), "tokens": plan.num_tokens, "samples": n,
                    "max_gap_ms": 1e3 * max(gaps, default=dt),
                    "pinned": {k: after[k] - pinned[k] for k in after},
                    "stacks": [(k, round(v / max(n, 1), 3)) for k, v in stacks.most_common(6)]})

    def _run(self) -> None:
        last, current = 0.0, None
        while not self._stop.is_set():
            if not self._active.wait(0.05):
                continue
            stacks, gaps = self._stacks, self._gaps
            if stacks is not current:  # a new launch: its first gap counts from its start
                last, current = self._started, stacks
            frame = sys._current_frames().get(self._ident)
            now = time.perf_counter()
            if frame is not None and stacks is not None and self._active.is_set():
                gaps.append(now - last)
                stacks[" < ".join(f"{name} ({file}:{line})"
                                  for name, file, line in innermost(frame, self.depth))] += 1
            last = now
            time.sleep(self.interval)

    def report(self, top: int = 3) -> str:
        head = f"{len(self.long)} of {self.launches} launches took {1e3 * self.threshold:.0f} ms"
        lines = [head + " or more"]
        for r in self.long:
            lines.append(f"  launch {r['launch']}: {r['ms']:.0f} ms ({r['cpu_ms']:.0f} CPU), "
                         f"{r['rows']} rows, {r['tokens']} tokens, {r['samples']} samples "
                         f"(longest gap {r['max_gap_ms']:.1f} ms), pinned {r['pinned']}")
            lines += [f"    {100 * share:5.1f} %  {k}" for k, share in r["stacks"][:top]]
        return "\n".join(lines)


# a thread blocked in one of these (innermost frame) is idle in a stall dump
IDLE = re.compile(r"(wait|_wait_for_tstate_lock|select|get|recv_bytes|_recv|accept|_worker) "
                  r"\((threading|selectors|queue|connection|socket|thread)\.py")


class LoopStallDumps:
    """Every thread's Python stack whenever the event loop stays away for `after_s` or more.

    A task re-arms faulthandler's watchdog every `every_s`; the watchdog is a C thread that
    needs no GIL, so it dumps the stacks mid-stall even while another thread holds the GIL (a
    sampler in Python would only run after it). `stalls` holds (seconds into the window, the
    loop's gap, {thread name: innermost frames}) for each stall, in order.
    """

    def __init__(self, after_s: float = 0.1, every_s: float = 0.01, frames: int = 6) -> None:
        self.after_s, self.every_s, self.frames = after_s, every_s, frames
        self.stalls: list[tuple[float, float, dict[str, list[str]]]] = []

    async def __aenter__(self) -> Self:
        self._file = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in __aexit__
        self._gaps: list[tuple[float, float]] = []
        self._names = {t.ident: t.name for t in threading.enumerate()}
        self._task = asyncio.create_task(self._rearm())
        return self

    async def _rearm(self) -> None:
        start = time.perf_counter()
        while True:
            faulthandler.dump_traceback_later(self.after_s, file=self._file)
            armed = time.perf_counter()
            await asyncio.sleep(self.every_s)
            if (gap := time.perf_counter() - armed) >= self.after_s:
                self._gaps.append((armed - start, gap))

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        faulthandler.cancel_dump_traceback_later()
        self._file.seek(0)
        dumps = [d for d in self._file.read().split("Timeout (") if d.strip()]
        self._file.close()
        names = self._names | {t.ident: t.name for t in threading.enumerate()}
        self.unmatched = len(dumps) != len(self._gaps)  # a gap at the threshold, in a race
        for (at, gap), dump in zip(self._gaps, dumps, strict=False):
            threads: dict[str, list[str]] = {}
            frames: list[str] = []
            for line in dump.splitlines():
                if m := re.search(r"[Tt]hread (0x[0-9a-f]+)", line):
                    frames = threads.setdefault(names.get(int(m.group(1), 16), m.group(1)), [])
                elif line.strip().startswith("File") and len(frames) < self.frames:
                    frames.append(re.sub(r'File "(?:[^"]*/)?([^"/]+)", line (\d+) in (\S+)',
                                         r"\3 (\1:\2)", line.strip()))
            self.stalls.append((at, gap, threads))

    def report(self, top: int = 3) -> str:
        """The `top` longest stalls, each thread's innermost frames."""
        lines = [f"{len(self.stalls)} loop stalls of {1e3 * self.after_s:.0f} ms or more"
                 + (" (a dump and a gap unmatched: pairs may be off)" if self.unmatched else "")]
        for at, gap, threads in sorted(self.stalls, key=lambda x: -x[1])[:top]:
            lines.append(f"  {1e3 * gap:.0f} ms at {at:.2f} s:")
            idle = [name for name, frames in threads.items() if frames and IDLE.match(frames[0])]
            for name, frames in threads.items():
                if name not in idle:
                    lines.append(f"    {name}: " + " <- ".join(frames))
            lines.append(f"    waiting on a lock, a queue or a socket: {', '.join(idle)}")
        return "\n".join(lines)


class CompileLog:
    """The Triton kernels compiled while active, through Triton's post-compile hook (chained
    to any hook already set): a measured run that compiles is not measuring serving, and the
    keys say which argument made a new variant. Nothing is recorded under the interpreter."""

    def __init__(self) -> None:
        self.compiles: list[tuple[str, str]] = []  # (kernel, its specialization as Triton shows it)
        self._prev = None

    def __enter__(self) -> Self:
        import triton

        self._knobs = triton.knobs.runtime
        self._prev = self._knobs.jit_post_compile_hook
        self._knobs.jit_post_compile_hook = self._hook
        return self

    def __exit__(self, *exc: object) -> None:
        self._knobs.jit_post_compile_hook = self._prev

    def _hook(self, **kw: Any) -> Any:
        fn, spec = kw.get("fn"), kw.get("compile", {})
        name = getattr(fn, "name", "?")
        self.compiles.append((name, f"{kw.get('repr', '')} constants={spec.get('constants')}"))
        return self._prev(**kw) if self._prev is not None else None

    def summary(self, n_keys: int = 3) -> dict[str, Any]:
        """Compiles per kernel, most first, with up to `n_keys` of each kernel's keys."""
        per = collections.Counter(name for name, _ in self.compiles)
        return {"total": len(self.compiles), "per_kernel": {
            name: {"count": count, "keys": [k for m, k in self.compiles if m == name][:n_keys]}
            for name, count in per.most_common()}}


THREADS = {"runner": RUNNER_THREAD_PREFIX, "loop": "MainThread", "adapter loads": "lora-load"}


def build(a: argparse.Namespace, root: Path) -> Engine:
    from benchmarks.step_bench import make_engine

    if a.quick:
        from tests.models import make_adapter, make_model

        model = make_model(root / "model", "llama", layers=2)
        paths = [make_adapter(model, root / f"a{i}", rank=a.rank, targets="all-linear", seed=i)
                 for i in range(a.num_adapters)]
        opts: dict[str, Any] = {"device": "cpu", "dtype": "float32",
                                "kv_cache_cpu_bytes": 1 << 26}
    else:
        from benchmarks.dummy_model import write_dummy_model
        from benchmarks.random_adapters import write_adapter

        model = write_dummy_model(a.shape, root / "model")
        paths = [write_adapter(a.shape, root / f"a{i}", a.rank, ALL_LINEAR, seed=i)
                 for i in range(a.num_adapters)]
        opts = {}
    if paths:
        opts |= {"lora_paths": tuple(LoraPathSpec(f"a{i}", str(p)) for i, p in enumerate(paths)),
                 "max_loras_per_batch": len(paths), "max_lora_rank": a.rank}
    return make_engine(model, **opts)


async def one_batch(engine: Engine, a: argparse.Namespace, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model_info.vocab_size
    params = SamplingParams(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                            temperature=0.0)
    names = [f"a{i % a.num_adapters}" if a.num_adapters else None for i in range(a.batch)]
    t0 = time.perf_counter()
    reqs = [await engine.submit(torch.randint(3, vocab - 3, (a.prompt_len,), generator=g).tolist(),
                                params, name) for name in names]

    async def drain(req) -> None:
        async for _ in engine.stream(req):
            pass

    await asyncio.gather(*(drain(r) for r in reqs))
    return time.perf_counter() - t0


def run(a: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        engine = build(a, Path(tmp))

        async def go() -> dict[str, Any]:
            await engine.start()
            try:
                await one_batch(engine, a, seed=1)  # compiles, warms the pinned-memory cache
                engine.timings = LoopTimings()
                with StackSampler(THREADS, a.interval_ms / 1e3) as sampler, CompileLog() as cl:
                    seconds = await one_batch(engine, a, seed=2)
                print(sampler.report(a.top))
                compiles = cl.summary()
                print(f"Triton compiles during the measured batch: {compiles['total']}",
                      {k: v["count"] for k, v in compiles["per_kernel"].items()})
                return {"seconds": seconds, "loop_ms": engine.timings.per_step_ms(),
                        "profile": sampler.top(a.top), "compiles": compiles}
            finally:
                await engine.stop()

        result = asyncio.run(go())
    steps = result["loop_ms"]["steps"]
    result |= {"settings": {k: v for k, v in vars(a).items() if k != "out"},
               "ms_per_step": 1e3 * result["seconds"] / max(steps, 1),
               "output_tokens_per_s": a.batch * a.new_tokens / result["seconds"]}
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--num-adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--interval-ms", type=float, default=0.5)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="tiny model on CPU (smoke run)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if a.quick:
        a.batch, a.prompt_len, a.new_tokens, a.num_adapters, a.rank = 8, 16, 8, 2, 4
    result = run(a)
    print(f"{a.batch} x {a.prompt_len}/{a.new_tokens} tokens over {a.num_adapters} adapters: "
          f"{result['seconds']:.3f} s, {result['ms_per_step']:.2f} ms a step, "
          f"{result['output_tokens_per_s']:.1f} output tok/s")
    print("loop, ms a step:", ", ".join(f"{k} {v:.2f}" for k, v in result["loop_ms"].items()))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
