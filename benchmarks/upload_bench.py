"""Adapter upload bandwidth against the pinned host-to-device bandwidth of the same run.

An upload is what the engine does to bring an adapter from its pinned host buffer into a GPU
slot: every module's A and B copied on the copy stream (AdapterManager._upload). It is timed on
the copy stream with CUDA events, from before the first copy to after the last, so it includes
the gaps between the copies but not host-side bookkeeping.

    python -m benchmarks.upload_bench --shape llama-3.1-8b --ranks 16 64 --out upload.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.dummy_model import SHAPES, write_dummy_model
from benchmarks.random_adapters import ALL_LINEAR, clone_adapter, write_adapter
from benchmarks.step_bench import make_engine
from runtime.config import LoraPathSpec


def pinned_h2d_bandwidth(nbytes: int = 512 << 20, iters: int = 10) -> float:
    """Bytes/s of one large copy from pinned host memory to the device, on a side stream."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    times = []
    with torch.cuda.stream(stream):
        for i in range(iters + 2):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src, non_blocking=True)
            b.record()
            b.synchronize()
            if i >= 2:
                times.append(a.elapsed_time(b) / 1e3)
    return nbytes / statistics.median(times)


def time_uploads(engine, names: list[str]) -> list[dict]:
    """Upload each adapter into a slot (evicting the previous one) and time it."""
    m = engine.adapters
    rows = []
    for name in names:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(engine.streams.copy)
        assert m.slot_of(name) is None, f"{name} was already resident"
        m.admit(name, set(), overlap=True)  # takes a slot and enqueues the copies
        end.record(engine.streams.copy)
        end.synchronize()
        m.poll()
        slot = m.slot_of(name)
        nbytes = m._slots[slot].upload_bytes
        seconds = start.elapsed_time(end) / 1e3
        rows.append({"adapter": name, "bytes": nbytes, "seconds": seconds,
                     "bytes_per_s": nbytes / seconds})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--uploads", type=int, default=6, help="timed uploads per rank")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp())
    folder = write_dummy_model(a.shape, root / a.shape)
    h2d = pinned_h2d_bandwidth()
    result = {"shape": a.shape, "pinned_h2d_bytes_per_s": h2d, "ranks": [],
              "device": torch.cuda.get_device_name()}
    for rank in a.ranks:
        one = write_adapter(a.shape, root / f"r{rank}", rank, ALL_LINEAR, seed=rank)
        paths = [clone_adapter(one, root / "copies" / f"r{rank}-{i}")
                 for i in range(a.uploads + 2)]
        specs = tuple(LoraPathSpec(p.name, str(p)) for p in paths)
        t0 = time.perf_counter()
        engine = make_engine(folder, lora_paths=specs, max_loras_per_batch=2,
                             max_loaded_loras=len(specs), max_lora_rank=rank,
                             disable_cuda_graph=True)
        print(f"rank {rank}: engine built in {time.perf_counter() - t0:.1f} s", flush=True)

        async def load_all(engine=engine, specs=specs) -> None:
            for s in specs:
                await engine.adapters.load(s.lora_name, s.lora_path)

        asyncio.run(load_all())
        torch.cuda.synchronize()
        engine.adapters.poll()
        resident = {s.lora_name for s in specs if engine.adapters.slot_of(s.lora_name) is not None}
        names = [s.lora_name for s in specs if s.lora_name not in resident][: a.uploads]
        rows = time_uploads(engine, names)
        bw = statistics.median(r["bytes_per_s"] for r in rows)
        result["ranks"].append({"rank": rank, "uploads": rows, "median_bytes_per_s": bw,
                                "fraction_of_pinned_h2d": bw / h2d})
        del engine, load_all  # load_all's default argument holds the engine too
        gc.collect()
        torch.cuda.empty_cache()
    print(json.dumps(result, indent=2))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    print(f"pinned H2D {h2d / 1e9:.1f} GB/s")
    for r in result["ranks"]:
        mb = r["uploads"][0]["bytes"] / 1e6
        print(f"rank {r['rank']:3d} ({mb:.0f} MB an adapter): upload "
              f"{r['median_bytes_per_s'] / 1e9:.1f} GB/s = {100 * r['fraction_of_pinned_h2d']:.0f}%"
              " of pinned H2D (target >= 80%)")
    return result


if __name__ == "__main__":
    main()
