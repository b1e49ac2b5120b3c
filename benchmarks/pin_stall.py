"""How long host-memory allocations in one thread stall another thread's CUDA calls.

The serving process pins its adapter host rows at start (runtime/adapters/manager.py) rather
than as the host tier grows, because pinning holds the CUDA driver's locks. This measures it:
a probe thread times a 7 MB pinned host-to-device copy and a bf16 GEMM launch, in a loop,
alone and while another thread allocates 256 MB chunks each way:
  pin            torch.empty(pin_memory=True) (cudaHostAlloc, what HostRows did while serving)
  pageable       torch.zeros (plain memory)
  hostregister   a memfd mapping registered with cudaHostRegister
  touch+register the same with its pages written first (what shared HostRows do)

    python -m benchmarks.pin_stall --out pin_stall.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from runtime.adapters.pool import shared_chunk

CHUNK = 256 << 20
MAX_CHUNKS = 24  # 6 GiB at most per mode


def probe(seconds: float, src: torch.Tensor, dst: torch.Tensor, a: torch.Tensor,
          w: torch.Tensor, stream: torch.cuda.Stream) -> dict[str, Any]:
    """Per-iteration host time of a non-blocking copy call and of a GEMM launch (ms)."""
    copy_ms, gemm_ms = [], []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        t1 = time.perf_counter()
        torch.nn.functional.linear(a, w)
        t2 = time.perf_counter()
        copy_ms.append((t1 - t0) * 1e3)
        gemm_ms.append((t2 - t1) * 1e3)
        torch.cuda.synchronize()
        time.sleep(0.0005)

    def stats(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs)
        return {"median": statistics.median(xs), "p99": xs[int(0.99 * (len(xs) - 1))],
                "max": xs[-1], "total": sum(xs)}

    return {"iterations": len(copy_ms), "copy_call_ms": stats(copy_ms),
            "gemm_call_ms": stats(gemm_ms)}


def allocate(mode: str) -> tuple[Any, ...]:
    if mode == "pin":
        return (torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True),)
    if mode == "pageable":
        return (torch.zeros(CHUNK, dtype=torch.uint8),)
    # the shared host rows' own allocation, with their pages touched first or not
    t, fd = shared_chunk(CHUNK, pin=True, touch=mode == "touch+register")
    os.close(fd)
    return (t,)


def allocator(mode: str, stop: threading.Event, kept: list, alloc_ms: list[float]) -> None:
    """Allocate 256 MB chunks until stopped (or MAX_CHUNKS), timing each."""
    while not stop.is_set() and len(kept) < MAX_CHUNKS:
        t0 = time.perf_counter()
        kept.append(allocate(mode))
        alloc_ms.append((time.perf_counter() - t0) * 1e3)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    dev = torch.device("cuda")
    src = torch.empty(7 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(7 << 20, dtype=torch.uint8, device=dev)
    x = torch.randn(256, 4096, device=dev, dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    for _ in range(20):
        dst.copy_(src, non_blocking=True)
        torch.nn.functional.linear(x, w)
    torch.cuda.synchronize()
    result: dict[str, Any] = {"quiet": probe(1.0, src, dst, x, w, stream)}
    for mode in ("pin", "pageable", "hostregister", "touch+register"):
        stop, kept, alloc_ms = threading.Event(), [], []
        thread = threading.Thread(target=allocator, args=(mode, stop, kept, alloc_ms))
        thread.start()
        r = probe(a.seconds, src, dst, x, w, stream)
        stop.set()
        thread.join()
        result[mode] = {**r, "chunks": len(alloc_ms),
                        "alloc_ms_median": statistics.median(alloc_ms)}
        if mode in ("hostregister", "touch+register"):
            for (t,) in kept:
                torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
        kept.clear()
    for mode, r in result.items():
        alloc = (f", {r['chunks']} chunks of 256 MB at {r['alloc_ms_median']:.1f} ms"
                 if "chunks" in r else "")
        c, g = r["copy_call_ms"], r["gemm_call_ms"]
        print(f"{mode:>12}{alloc}: {r['iterations']} iterations; copy call median "
              f"{c['median']:.3f} ms, p99 {c['p99']:.3f}, max {c['max']:.2f}; GEMM call median "
              f"{g['median']:.3f} ms, p99 {g['p99']:.3f}, max {g['max']:.2f}")
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
