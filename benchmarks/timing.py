"""Timing of small GPU launches: many of them captured in one CUDA graph, replayed."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch


def graph_us(fn: Callable, items: Sequence, reps: int) -> float:
    """Median replay of one CUDA graph of fn(item) for every item, microseconds a launch
    (fn runs once for each item first, outside the capture: compiles and warms)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for item in items:
            fn(item)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for item in items:
            fn(item)
    times = []
    for i in range(reps + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        if i >= 3:
            times.append(a.elapsed_time(b))
    return 1e3 * statistics.median(times) / len(items)


def write_kernel_rows(path, shape: str, rank: int, layers: int, rows: list[dict]) -> None:
    """A kernel benchmark's rows as JSON, with the model shape, rank, layer count and device."""
    import json
    from pathlib import Path

    Path(path).write_text(json.dumps({"shape": shape, "rank": rank, "layers": layers,
                                      "device": torch.cuda.get_device_name(), "rows": rows},
                                     indent=2))
