"""Greedy sampling's row argmax alone: torch.argmax against the two-stage Triton argmax
(ops/triton_argmax.py) over [batch, vocab] fp32 logits, Llama-3.1-8B's vocabulary by default.

Per (batch, implementation), three figures, each the median of `--reps`:
- `graph_us`: device time a call, `--calls` calls captured in one CUDA graph and replayed (the
  Triton path's two launches and its scratch allocation included);
- `eager_us`: CUDA events around `--calls` eager calls back to back, a call: what a step pays
  when the device or the host's launches are the slower (the sampler runs eagerly);
- `host_us`: the host's time to enqueue one eager call, with no wait on the device.
The logits are one tensor, read again by every call: in serving they were just written by the
lm_head and its fp32 copy, so they are likely in L2 (50 MB on the H200) there too. Each Triton
row is checked against torch.argmax on random rows with ties and a NaN row first.

    python -m benchmarks.argmax_bench --out argmax.json
    python -m benchmarks.argmax_bench --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.timing import graph_us
from ops.triton_argmax import BLOCK, argmax_triton

LLAMA_VOCAB = 128256


def eager_us(fn, calls: int, reps: int) -> tuple[float, float]:
    """(device-side us a call from CUDA events around `calls` eager calls, host us to enqueue
    a call), medians over reps."""
    device, host = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host.append((time.perf_counter() - t0) / calls * 1e6)
        b.record()
        b.synchronize()
        device.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(device), statistics.median(host)


def check_rows(batch: int, vocab: int, block: int) -> bool:
    """Triton against torch on rows with ties, a NaN row, an -inf row (fp32 and bf16)."""
    x = torch.randn(max(batch, 4), vocab, device="cuda") * 3
    x[0, [5, vocab // 2, vocab - 1]] = 1e4
    x[1, [vocab // 3, 17]] = float("nan")
    x[2] = float("-inf")
    x[3] = 1.0
    return all(torch.equal(argmax_triton(t, block=block), t.argmax(dim=-1))
               for t in (x, x.bfloat16()))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--vocab", type=int, default=LLAMA_VOCAB)
    ap.add_argument("--block", type=int, nargs="+", default=[BLOCK],
                    help="stage-1 entries a program, one Triton row each (powers of two)")
    ap.add_argument("--calls", type=int, default=50, help="calls a graph or an eager run")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="batches 1 and 32, 10 calls, 10 reps")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("argmax_bench needs CUDA")
    if a.quick:
        a.batch, a.calls, a.reps = [1, 32], 10, 10
    torch.manual_seed(0)
    rows, mismatches = [], []
    for batch in a.batch:
        logits = torch.randn(batch, a.vocab, device="cuda")
        out = torch.empty(batch, dtype=torch.int64, device="cuda")
        impls = {"torch": lambda x=logits: x.argmax(dim=-1)}
        for block in a.block:
            if not check_rows(batch, a.vocab, block):
                mismatches.append({"batch": batch, "block": block})
            impls[f"triton-{block}"] = lambda x=logits, b=block: argmax_triton(x, block=b)
            impls[f"triton-{block}-out"] = (
                lambda x=logits, o=out, b=block: argmax_triton(x, o, block=b))
        for name, fn in impls.items():
            graph = graph_us(lambda _, fn=fn: fn(), range(a.calls), a.reps)
            eager, host = eager_us(fn, a.calls, a.reps)
            rows.append({"batch": batch, "vocab": a.vocab, "impl": name, "graph_us": graph,
                         "eager_us": eager, "host_us": host})
            print(f"b{batch:<4} {name:18} graph {graph:7.2f} us  eager {eager:7.2f} us  "
                  f"host {host:6.2f} us", flush=True)
    if mismatches:
        print(f"MISMATCHES against torch.argmax: {mismatches}")
    result = {"device": torch.cuda.get_device_name(), "vocab": a.vocab, "dtype": "float32",
              "calls": a.calls, "reps": a.reps, "mismatches": mismatches, "rows": rows}
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
