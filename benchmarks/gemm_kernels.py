"""Which GEMM kernels F.linear runs across a prefill step's token counts, and which of them the
engine's start-up warm-up (steps of power-of-two token counts) never runs.

CUDA loads a kernel into the context the first time it launches (lazy module loading, torch's
default), and loading one waits for the work in flight on the device. A kernel that the warm-up
never ran is loaded by the first served step that picks it, mid-serving. For each projection of
a model shape, F.linear on a [tokens, in] bf16 input for tokens from 1 to `--max-tokens` every
`--step` (and at each power of two): the kernel names cuBLAS launched, by token range, and those
not launched at any power of two.

    python -m benchmarks.gemm_kernels --out gemm_kernels.json

`--first-use` asks instead whether a call's first time at a token count makes the host wait for
the device: for each projection, F.linear at `--probes` token counts never run before, each
behind `--busy-ms` of device work (torch.cuda._sleep) and again behind the same work. A first
call that takes the busy time on the host waited for the device (a kernel loaded, or any other
synchronisation); one that returns at once did not. Run it with CUDA_MODULE_LOADING=EAGER too.

    python -m benchmarks.gemm_kernels --first-use --out first_use.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.dummy_model import SHAPES
from benchmarks.gemm_bench import projections


def kernels_of(fn) -> list[str]:
    """The CUDA kernels `fn()` launches, in order."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]


def survey(out_in: tuple[int, int], counts: list[int], dtype: torch.dtype) -> dict[int, str]:
    """tokens -> the kernels (joined by ' + ') F.linear launched for that many input rows."""
    w = torch.randn(out_in, device="cuda", dtype=dtype) * 0.02
    x = torch.randn(max(counts), out_in[1], device="cuda", dtype=dtype)
    return {m: " + ".join(kernels_of(lambda m=m: F.linear(x[:m], w))) for m in counts}


def sleep_cycles(ms: float) -> int:
    """torch.cuda._sleep cycles that keep the device busy about `ms`."""
    n = 1_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(n)  # the sleep kernel's own first use
    torch.cuda.synchronize()
    start.record()
    torch.cuda._sleep(n)
    end.record()
    end.synchronize()
    return int(n * ms / start.elapsed_time(end))


def first_use(out_in: tuple[int, int], counts: list[int], busy_ms: float,
              dtype: torch.dtype) -> list[dict[str, float]]:
    """Per token count: the host ms of F.linear the first time at that count and the second,
    each issued behind about `busy_ms` of device work."""
    w = torch.randn(out_in, device="cuda", dtype=dtype) * 0.02
    x = torch.randn(max(counts), out_in[1], device="cuda", dtype=dtype)
    F.linear(x[:1], w)  # the handle and its workspace
    cycles = sleep_cycles(busy_ms)
    rows = []
    for m in counts:
        row: dict[str, float] = {"tokens": m}
        for label in ("first", "again"):
            torch.cuda._sleep(cycles)
            t0 = time.perf_counter()
            F.linear(x[:m], w)
            row[f"{label}_ms"] = 1e3 * (time.perf_counter() - t0)
            torch.cuda.synchronize()
        rows.append(row)
    return rows


def probe(a: argparse.Namespace) -> dict[str, Any]:
    """--first-use: each projection at a.probes token counts spread over 1..a.max_tokens, at
    odd counts (so at none a warm-up or survey would run)."""
    step = max(1, a.max_tokens // a.probes)
    counts = [min(a.max_tokens, i * step + 1 + (i % 3) * 2) | 1 for i in range(a.probes)]
    result: dict[str, Any] = {"shape": a.shape, "busy_ms": a.busy_ms, "counts": counts,
                              "module_loading": os.environ.get("CUDA_MODULE_LOADING", ""),
                              "device": torch.cuda.get_device_name(), "projections": {}}
    for name, out_in in projections(SHAPES[a.shape]).items():
        rows = first_use(out_in, counts, a.busy_ms, torch.bfloat16)
        waited = [r for r in rows if r["first_ms"] > a.busy_ms / 2]
        result["projections"][name] = {"rows": rows, "first_waited": len(waited),
                                       "again_waited": sum(r["again_ms"] > a.busy_ms / 2
                                                           for r in rows)}
        shown = ", ".join(f"{r['tokens']}: {r['first_ms']:.0f} ms" for r in waited[:8])
        median = sorted(r["first_ms"] for r in rows)[len(rows) // 2]
        print(f"{name} {out_in}: the first call waited at {len(waited)} of {len(rows)} counts "
              f"({shown}); the second at {result['projections'][name]['again_waited']}; "
              f"median first {median:.2f} ms", flush=True)
    return result


def ranges(by_count: dict[int, str]) -> list[tuple[int, int, str]]:
    """(first, last token count, kernels) of each run of counts with the same kernels."""
    out: list[tuple[int, int, str]] = []
    for m in sorted(by_count):
        if out and out[-1][2] == by_count[m]:
            out[-1] = (out[-1][0], m, by_count[m])
        else:
            out.append((m, m, by_count[m]))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--max-tokens", type=int, default=4096,
                    help="the prefill budget a step (chunked_prefill_size)")
    ap.add_argument("--step", type=int, default=8)
    ap.add_argument("--first-use", action="store_true",
                    help="whether a call's first time at a token count waits for the device")
    ap.add_argument("--probes", type=int, default=48, help="--first-use: token counts a shape")
    ap.add_argument("--busy-ms", type=float, default=50.0,
                    help="--first-use: device work queued before each call")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if a.first_use:
        result = probe(a)
        if a.out:
            a.out.write_text(json.dumps(result, indent=2))
        return result
    powers = [1 << i for i in range(a.max_tokens.bit_length()) if 1 << i <= a.max_tokens]
    counts = sorted(set(range(a.step, a.max_tokens + 1, a.step)) | set(powers) | {1})
    result: dict[str, Any] = {"shape": a.shape, "max_tokens": a.max_tokens, "step": a.step,
                              "device": torch.cuda.get_device_name(), "projections": {}}
    t0 = time.perf_counter()
    for name, out_in in projections(SHAPES[a.shape]).items():
        by_count = survey(out_in, counts, torch.bfloat16)
        warmed = {by_count[m] for m in powers}
        missed = {k for k in by_count.values() if k not in warmed}
        rs = ranges(by_count)
        result["projections"][name] = {
            "out_in": out_in, "distinct": len(set(by_count.values())),
            "not_at_powers_of_two": sorted(missed),
            "counts_not_covered": sum(1 for k in by_count.values() if k in missed),
            "ranges": rs}
        print(f"{name} {out_in}: {len(set(by_count.values()))} kernel choices over "
              f"{len(counts)} token counts, {len(missed)} never at a power of two (at "
              f"{result['projections'][name]['counts_not_covered']} counts)", flush=True)
        for first, last, k in rs[:40]:
            print(f"  {first:>5}-{last:<5} {'*' if k in missed else ' '} {k[:150]}")
        if len(rs) > 40:
            print(f"  ... {len(rs) - 40} more ranges")
    result["wall_s"] = time.perf_counter() - t0
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
