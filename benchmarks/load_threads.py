"""CPU time a load costs each thread of the serving process, for on-demand names (CPU run).

Every Python thread busy beside the runner delays its launches: each torch call gives the GIL
up and must get it back. This registers N on-demand adapter names at once (clones of one
rank-4 q/v adapter of a tiny model with `--layers` layers: what the manager does per name in
Python scales with the layers, not the widths), with reads in reader processes and the startup
objects out of the garbage collector's reach as served (LORASERVE_GC_FREEZE), and
reports the CPU milliseconds a load each thread of this process spent (from
/proc/self/task/*/stat, ticks of 10 ms: use a few hundred names).

    python -m benchmarks.load_threads --names 300 --out load_threads.json
    python -m benchmarks.load_threads --quick
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.random_adapters import clone_adapter
from benchmarks.step_bench import make_engine
from runtime.engine import freeze_startup_objects


def cpu_ticks_by_thread() -> dict[str, int]:
    """User + system clock ticks of each thread of this process, by Python thread name (the
    OS name for threads Python did not start)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, int] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            comm = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        name = names.get(int(tid), f"native:{comm}")
        out[name] = out.get(name, 0) + int(fields[11]) + int(fields[12])
    return out


def measure(names: int, layers: int, root: Path) -> dict[str, Any]:
    from tests.models import make_adapter, make_model

    model = make_model(root / "model", "llama", layers=layers)
    folder = root / "adapters"
    first = make_adapter(model, folder / "lora0", rank=4, targets=["q_proj", "v_proj"], seed=1)
    for i in range(1, names + 1):
        clone_adapter(first, folder / f"lora{i}")
    engine = make_engine(
        model, device="cpu", dtype="float32", enable_lora=True, max_lora_rank=4,
        lora_target_modules=("q_proj", "v_proj"), lora_roots=(str(folder),),
        lora_resolve_on_demand=True, max_loras_per_batch=8, max_loaded_loras=names + 8,
        kv_cache_cpu_bytes=1 << 26, disable_cuda_graph=True, lora_loader="process")
    manager = engine.adapters
    assert manager is not None
    froze = freeze_startup_objects()  # as a started engine does (LORASERVE_GC_FREEZE)

    async def go() -> tuple[float, dict[str, int], dict[str, int]]:
        await manager.acquire_or_resolve("lora0")  # the reader processes are up
        before, t0 = cpu_ticks_by_thread(), time.perf_counter()
        await asyncio.gather(*(manager.acquire_or_resolve(f"lora{i}")
                               for i in range(1, names + 1)))
        return time.perf_counter() - t0, before, cpu_ticks_by_thread()

    try:
        wall, before, after = asyncio.run(go())
    finally:
        manager.close()
        if froze:
            gc.unfreeze()
    ms = 1e3 / os.sysconf("SC_CLK_TCK")
    per_load = {k: (v - before.get(k, 0)) * ms / names for k, v in after.items()
                if v > before.get(k, 0)}
    return {"names": names, "layers": layers, "wall_s": wall, "gc_frozen": froze,
            "host_copies": manager._host_usage()[0],
            "cpu_ms_a_load": dict(sorted(per_load.items(), key=lambda kv: -kv[1]))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--names", type=int, default=300)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="a few names, 2 layers")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    names, layers = (12, 2) if a.quick else (a.names, a.layers)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(names, layers, Path(tmp))
    print(f"{names} on-demand loads ({layers} layers) in {result['wall_s']:.2f} s; CPU ms a "
          "load by thread: " + ", ".join(f"{k} {v:.3f}"
                                         for k, v in result["cpu_ms_a_load"].items()))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
