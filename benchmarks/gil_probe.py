"""How long a small torch call waits for the GIL while adapters are read (runs on the CPU).

A probe thread stands in for the runner thread: it makes one small torch call at a time (each
gives the GIL up and must get it back, as a kernel launch does) and times it, alone, while
loader threads read rank-8 q/v adapters of Llama-3.1-8B shape into host rows in this process
(`lora_loader = "thread"`), and while reader processes do (`"process"`). The switch interval
is the engine's (0.5 ms). Then the time to issue an upload's copies one call a copy and in one
foreach call, beside 0, 1 and 2 threads running Python (`upload_calls`).

    python -m benchmarks.gil_probe --out gil_probe.json
    python -m benchmarks.gil_probe --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.random_adapters import write_adapter
from runtime.adapters.manager import LOADER_WORKERS
from runtime.adapters.peft_format import load_peft_adapter
from runtime.adapters.pool import LoraModelShape, LoraPool
from runtime.adapters.reader import ProcessReader
from runtime.engine import GIL_SWITCH_INTERVAL_S

SHAPE = LoraModelShape(num_layers=32, hidden_size=4096, intermediate_size=14336, q_size=4096,
                       kv_size=1024, vocab_size=128256)
TARGETS = ("q_proj", "v_proj")


def probe(seconds: float) -> dict[str, float]:
    """Times of one small torch call at a time (µs)."""
    x = torch.zeros(16)
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.add(x, 1, out=x)
        lat.append((time.perf_counter() - t) * 1e6)
        time.sleep(0)
    lat.sort()
    return {"calls": len(lat), "median_us": statistics.median(lat),
            "p99_us": lat[int(0.99 * (len(lat) - 1))], "mean_us": statistics.fmean(lat)}


def with_readers(read: Callable[[], object], seconds: float, workers: int) -> dict[str, Any]:
    """probe() while `workers` threads call read() back to back."""
    stop, count = threading.Event(), [0]

    def loop() -> None:
        while not stop.is_set():
            read()
            count[0] += 1

    threads = [threading.Thread(target=loop) for _ in range(workers)]
    for t in threads:
        t.start()
    time.sleep(0.2)  # all reading
    r = probe(seconds)
    stop.set()
    for t in threads:
        t.join()
    return {**r, "loads_per_s": count[0] / (seconds + 0.2)}


def upload_calls(seconds: float, busy_threads: int) -> dict[str, float]:
    """µs to issue one upload's four copies (small CPU tensors: the call, not the bytes, is
    timed, as on CUDA where the copies are asynchronous) one call a copy, as the manager does
    with LORASERVE_UPLOAD_BATCH=0, and in one foreach call (as batched), beside `busy_threads`
    threads running Python (the runner, the loaders)."""
    dst = [torch.empty(64) for _ in range(4)]
    src = [torch.ones(64) for _ in range(4)]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(100))

    def timed(issue: Callable[[], object]) -> float:
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            issue()
            calls += 1
        return (time.perf_counter() - t0) / calls * 1e6

    threads = [threading.Thread(target=spin) for _ in range(busy_threads)]
    for t in threads:
        t.start()
    try:
        return {"per_copy_us": timed(lambda: [d.copy_(x, non_blocking=True)
                                              for d, x in zip(dst, src, strict=True)]),
                "foreach_us": timed(lambda: torch._foreach_copy_(dst, src, non_blocking=True))}
    finally:
        stop.set()
        for t in threads:
            t.join()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--quick", action="store_true", help="short probes (smoke run)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    seconds = 0.5 if a.quick else a.seconds
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_adapter("llama-3.1-8b", Path(tmp) / "a", 8, TARGETS, seed=1)
        path = str(folder)
        pool = LoraPool(SHAPE, 1, 8, TARGETS, cpu, torch.bfloat16)
        t0 = time.perf_counter()
        for _ in range(5):
            pool.build_host(load_peft_adapter(path, SHAPE))
        result: dict[str, Any] = {"one_read_ms": (time.perf_counter() - t0) / 5 * 1e3,
                                  "alone": probe(seconds)}
        result["threads"] = with_readers(
            lambda: pool.build_host(load_peft_adapter(path, SHAPE)), seconds, LOADER_WORKERS
        )
        shared = LoraPool(SHAPE, 1, 8, TARGETS, cpu, torch.bfloat16)
        shared.share_host_rows()
        reader = ProcessReader(shared, SHAPE, workers=LOADER_WORKERS)
        try:
            reader.read(path)  # started
            result["processes"] = with_readers(lambda: reader.read(path), seconds,
                                               LOADER_WORKERS)
        finally:
            reader.close()
    result["upload_calls"] = {n: upload_calls(seconds, n) for n in (0, 1, 2)}
    print(f"one read in this process: {result['one_read_ms']:.1f} ms")
    for n, r in result["upload_calls"].items():
        print(f"an upload's 4 copies beside {n} busy Python threads: {r['per_copy_us']:.1f} µs "
              f"one call a copy, {r['foreach_us']:.1f} µs in one foreach call")
    for k in ("alone", "threads", "processes"):
        r = result[k]
        loads = f", {r['loads_per_s']:.0f} reads/s" if "loads_per_s" in r else ""
        print(f"{k:>10}{loads}: {r['calls']} calls, median {r['median_us']:.1f} µs, "
              f"p99 {r['p99_us']:.1f} µs, mean {r['mean_us']:.1f} µs")
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
