"""How long a CUDA graph takes to start after the kernel ahead of it on its stream.

In the serving loop's profile at batch 32 the decode graph's first kernel began 12 µs after the
input kernel ahead of it in every step, and 21-45 µs in about half the steps once the results'
copy ran on a second stream, while the host had launched the step 2.3-3.0 ms ahead
(benchmarks/RESULTS.md, fortieth session). This measures that start alone: a small Triton
kernel, then a graph of `--nodes` small kernels, repeated `--reps` times, all enqueued behind
a sleeping kernel so that the host is far ahead; the profiler's kernel timeline gives each
graph's start after the kernel ahead of it. Cases by what runs beside it:

- none: the kernel, then the graph;
- copy: a 256-byte device-to-host copy on the same stream between them (results read back on
  the compute stream);
- stream: that copy on a second stream after an event from the first (the readback stream);
- host_write: the kernel stores 256 bytes into pinned host memory instead (results written by a
  kernel, the default).

With --pdl on (or both) the graph's kernels after its first launch with programmatic dependent
launch, each waiting on the one before, as the decode graphs' layer kernels do (their first
kernel, the embedding's gather, launches without). Such graphs started sooner at the median but
100 µs or more late in a tenth of the rounds (forty-first session); --copies 2 captures the graph
twice and replays the copies in turn, as a serving loop could with two graph executables a
bucket, to see whether those late starts follow replaying one executable back to back.

    python -m benchmarks.graph_gap --nodes 1 64 300 --pdl both --out graph_gap.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import triton
import triton.language as tl

from benchmarks.step_bench import kernel_timeline
from ops.pdl import wait_then_release

CASES = ("none", "copy", "stream", "host_write")
PRED, NODE = "_gap_pred_kernel", "_gap_node_kernel"


@triton.jit
def _gap_pred_kernel(x, host, n, WRITE_HOST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    keep = offs < n
    v = tl.load(x + offs, mask=keep) + 1
    tl.store(x + offs, v, mask=keep)
    if WRITE_HOST:
        tl.store(host + offs, v, mask=keep)


@triton.jit
def _gap_node_kernel(y, n, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    keep = offs < n
    wait_then_release(USE_PDL)
    tl.store(y + offs, tl.load(y + offs, mask=keep) * 2 + 1, mask=keep)


def graph_starts(timeline: list[list]) -> list[float]:
    """From kernel_timeline rows ([stream, name, start us, duration us]), the gap from each
    PRED kernel's end to the start of the first NODE kernel after it (the graph's first), in µs.
    A PRED with no NODE after it gives none."""
    rows = sorted(timeline, key=lambda r: r[2])
    gaps, pred_end = [], None
    for _, name, start, dur in rows:
        if name.startswith(PRED):
            pred_end = start + dur
        elif name.startswith(NODE) and pred_end is not None:
            gaps.append(start - pred_end)
            pred_end = None
    return gaps


def measure(nodes: int, case: str, reps: int, pdl: bool = False, copies: int = 1) -> dict:
    """One case: `reps` rounds of the kernel, what the case puts beside it, and a graph of
    `nodes` kernels (after the first, with programmatic dependent launch if `pdl`; `copies`
    captures of it replayed in turn), profiled."""
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device("cuda")
    main, side = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
    x = torch.zeros(64, dtype=torch.float32, device=dev)
    y = torch.zeros(64, dtype=torch.float32, device=dev)
    host = torch.zeros(64, dtype=torch.float32, pin_memory=True)
    write_host = case == "host_write"
    with torch.cuda.stream(main):
        _gap_pred_kernel[(1,)](x, host, 64, WRITE_HOST=write_host, BLOCK=64)
        _gap_node_kernel[(1,)](y, 64, BLOCK=64, USE_PDL=False)
        if pdl:
            _gap_node_kernel[(1,)](y, 64, BLOCK=64, USE_PDL=True, launch_pdl=True)
        graphs = []
        for _ in range(copies):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=main):
                for i in range(nodes):
                    on = pdl and i > 0
                    _gap_node_kernel[(1,)](y, 64, BLOCK=64, USE_PDL=on, launch_pdl=on)
            graphs.append(graph)
    torch.cuda.synchronize()
    events = [torch.cuda.Event() for _ in range(reps)]
    with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.cuda.stream(main):
        torch.cuda._sleep(int(2e8))  # about 0.1 s: every round is enqueued before it ends
        for i in range(reps):
            _gap_pred_kernel[(1,)](x, host, 64, WRITE_HOST=write_host, BLOCK=64)
            if case == "copy":
                host.copy_(x, non_blocking=True)
            elif case == "stream":
                events[i].record(main)
                side.wait_event(events[i])
                with torch.cuda.stream(side):
                    host.copy_(x, non_blocking=True)
            graphs[i % copies].replay()
        torch.cuda.synchronize()
    gaps = graph_starts(kernel_timeline(prof))
    if not gaps:
        raise RuntimeError(f"{nodes} nodes, {case}: no graph start in the profile")
    q = statistics.quantiles(gaps, n=10) if len(gaps) > 1 else [gaps[0]] * 9
    return {"nodes": nodes, "case": case, "pdl": pdl, "copies": copies, "rounds": len(gaps),
            "median_us": round(statistics.median(gaps), 2), "p10_us": round(q[0], 2),
            "p90_us": round(q[-1], 2), "mean_us": round(statistics.fmean(gaps), 2),
            "max_us": round(max(gaps), 2), "over_20us": sum(g > 20.0 for g in gaps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 64, 300])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--pdl", choices=("off", "on", "both"), default="off",
                    help="the graph's kernels after its first with programmatic dependent launch")
    ap.add_argument("--copies", type=int, nargs="+", default=[1],
                    help="captures of the graph replayed in turn (each count a case)")
    ap.add_argument("--quick", action="store_true", help="10 rounds, one size")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("graph_gap measures CUDA graphs: it needs a GPU")
    if a.quick:
        a.reps, a.nodes = 10, a.nodes[:1]
    if min(a.copies) < 1:
        raise SystemExit("--copies: at least one capture")
    pdls = {"off": [False], "on": [True], "both": [False, True]}[a.pdl]
    rows = [measure(n, c, a.reps, p, k) for n in a.nodes for c in a.cases for p in pdls
            for k in a.copies]
    print("graph start after the kernel ahead of it (us): median [p10, p90], mean, largest, "
          "rounds over 20 us")
    for r in rows:
        print(f"  {r['nodes']:4d} nodes, {r['case']:10s}{' pdl' if r['pdl'] else '    '}"
              f" x{r['copies']}: {r['median_us']:7.2f} "
              f"[{r['p10_us']:.2f}, {r['p90_us']:.2f}], {r['mean_us']:.2f}, {r['max_us']:.2f}, "
              f"{r['over_20us']} of {r['rounds']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
