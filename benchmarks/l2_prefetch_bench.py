"""An L2 prefetch beside a latency-bound wait, then the GEMM that reads the prefetched weight.

Each of `--layers` layers has its own o_proj-sized weight (Llama-3.1-8B: 4096 x 4096 bf16, 32 MB,
so layers do not share L2). A layer is: a wait of `--wait-us` on the compute stream (standing for
rotary + attention, which read little), then x @ W^T at `--batch` rows. With a prefetch, the
first MB of W are requested into L2 (ops/l2_prefetch.py) on a second stream as the wait begins.
All layers are captured in one CUDA graph; the figure is a replay's median over `--reps`, divided
by the layers: microseconds a layer, against the same graph without the GEMMs (the wait alone).

    python -m benchmarks.l2_prefetch_bench --out l2.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.timing import graph_us
from ops.l2_prefetch import l2_prefetch


def layer_fn(x, wait_cycles: int, prefetch_mb: float, gemm: bool):
    """One layer over weight w: the prefetch forked beside the wait, then the GEMM."""
    side = torch.cuda.Stream()
    fork, join = torch.cuda.Event(), torch.cuda.Event()
    for e in (fork, join):
        e.record(side)

    def run(w):
        main = torch.cuda.current_stream()
        if prefetch_mb > 0:
            fork.record(main)
            side.wait_event(fork)
            with torch.cuda.stream(side):
                l2_prefetch(w, int(prefetch_mb * 2**20))
        torch.cuda._sleep(wait_cycles)
        if gemm:
            torch.matmul(x, w.t())
        if prefetch_mb > 0:
            join.record(side)
            main.wait_event(join)

    return run


def cycles_per_us() -> float:
    """The GPU's clock as torch.cuda._sleep counts it, from one timed sleep."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)
    a.record()
    torch.cuda._sleep(20_000_000)
    b.record()
    b.synchronize()
    return 20_000_000 / (a.elapsed_time(b) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--wait-us", type=float, nargs="+", default=[0.0, 4.0, 8.0])
    ap.add_argument("--prefetch-mb", type=float, nargs="+", default=[0, 8, 16, 32])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dev = torch.device("cuda")
    per_us = cycles_per_us()
    weights = [torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16) * 0.02
               for _ in range(args.layers)]
    rows = []
    for batch in args.batch:
        x = torch.randn(batch, 4096, device=dev, dtype=torch.bfloat16)
        for wait in args.wait_us:
            cycles = int(wait * per_us)
            wait_only = graph_us(layer_fn(x, cycles, 0, False), weights, args.reps)
            for mb in args.prefetch_mb:
                us = graph_us(layer_fn(x, cycles, mb, True), weights, args.reps)
                rows.append({"batch": batch, "wait_us": wait, "prefetch_mb": mb,
                             "us_per_layer": us, "wait_only_us": wait_only,
                             "gemm_us": us - wait_only})
                print(f"batch {batch:3d} wait {wait:4.1f} us prefetch {mb:5.1f} MB: "
                      f"{us:7.2f} us a layer ({us - wait_only:6.2f} over the wait alone)",
                      flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                        "cycles_per_us": per_us, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
