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
import traceback
from pathlib import Path
from typing import Any, Self

import torch

from benchmarks.random_adapters import ALL_LINEAR
from runtime.config import LoraPathSpec
from runtime.engine import Engine, LoopTimings
from runtime.request import SamplingParams

RUNNER_THREAD_PREFIX = "loraserve-runner"


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
                frames = traceback.extract_stack(frame)
                if frames[-1].name in self.IDLE_FRAMES or any(
                    f.name == "_worker" for f in frames[-3:]
                ):
                    continue
                self.samples[label] += 1
                leaf = frames[-1]
                self.leaves[label][f"{Path(leaf.filename).name}:{leaf.lineno} {leaf.name}"] += 1
                self.stacks[label][
                    " < ".join(f"{f.name}:{f.lineno}" for f in reversed(frames[-4:]))] += 1
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
