"""Decode-step and prefill-step time of the engine on dummy weights, next to the HBM floor.

One process measures the device's copy bandwidth, then the step times, so every ratio comes
from one run. A step is timed on the host clock around prepare → forward → sample → tokens on
the host, i.e. what the serving loop pays per step, not a kernel-only figure.

    python -m benchmarks.step_bench --shape llama-3.1-8b --batch 1 32 --out results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.dummy_model import SHAPES, weight_bytes, write_dummy_model
from runtime.config import ServerConfig
from runtime.engine import Engine
from runtime.request import Request, SamplingParams


def hbm_bandwidth(nbytes: int = 4 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (nbytes // 2) * 2 / statistics.median(times)


def make_engine(folder: Path, **overrides) -> Engine:
    cfg = dict(
        model_path=str(folder), load_format="dummy", device="cuda", dtype="bfloat16",
        mem_fraction_static=0.6, chunked_prefill_size=8192, max_running_requests=256,
    )
    cfg.update(overrides)
    return Engine.from_config(ServerConfig(**cfg))


def one_step(engine: Engine) -> float:
    """Schedule, run and apply one step; seconds on the host clock."""
    t0 = time.perf_counter()
    plan = engine.scheduler.schedule()
    fb = engine.runner.prepare(plan)
    result = engine.runner.execute(plan, fb)
    engine._postprocess(plan, result)
    return time.perf_counter() - t0


def add_requests(engine: Engine, batch: int, prompt_len: int, loras: list[str | None]) -> None:
    g = torch.Generator().manual_seed(0)
    vocab = engine.model_info.vocab_size
    for i in range(batch):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        req = Request(rid=f"b{i}", prompt_ids=prompt, lora_name=loras[i % len(loras)],
                      params=SamplingParams(max_new_tokens=1 << 20, temperature=0.0,
                                            ignore_eos=True))
        req.outputs = asyncio.Queue()
        engine.scheduler.add(req)


def decode_step_ms(engine: Engine, batch: int, prompt_len: int, steps: int,
                   loras: list[str | None] | None = None) -> dict:
    add_requests(engine, batch, prompt_len, loras or [None])
    while any(r.is_prefilling for r in engine.scheduler.running) or engine.scheduler.waiting:
        one_step(engine)
    for _ in range(5):
        one_step(engine)
    times = [one_step(engine) for _ in range(steps)]
    ctx = prompt_len + 5 + steps
    for r in list(engine.scheduler.running):
        engine.scheduler.remove(r)
    return {"batch": batch, "median_ms": 1e3 * statistics.median(times),
            "p10_ms": 1e3 * sorted(times)[len(times) // 10], "ctx_at_end": ctx}


def prefill_ms(engine: Engine, batch: int, prompt_len: int, reps: int = 5) -> dict:
    times = []
    for rep in range(reps + 2):
        add_requests(engine, batch, prompt_len, [None])
        torch.cuda.synchronize()
        t = one_step(engine)
        if rep >= 2:
            times.append(t)
        for r in list(engine.scheduler.running):
            engine.scheduler.remove(r)
    return {"batch": batch, "prompt": prompt_len, "median_ms": 1e3 * statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="few steps, for smoke runs")
    ap.add_argument("--disable-cuda-graph", action="store_true")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    steps = 10 if a.quick else a.steps
    bw = hbm_bandwidth()
    folder = write_dummy_model(a.shape, Path(tempfile.mkdtemp()) / a.shape)
    engine = make_engine(folder, disable_cuda_graph=a.disable_cuda_graph)
    w_bytes, _ = weight_bytes(a.shape)
    c = SHAPES[a.shape]
    kv_per_token = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * (
        c["hidden_size"] // c["num_attention_heads"]) * 2
    rows = []
    for b in a.batch:
        r = decode_step_ms(engine, b, a.prompt, steps)
        kv_bytes = b * (a.prompt + steps // 2) * kv_per_token
        r["floor_ms"] = 1e3 * (w_bytes + kv_bytes) / bw
        r["ratio_to_floor"] = r["median_ms"] / r["floor_ms"]
        rows.append(r)
    pre = prefill_ms(engine, 8, 512)
    result = {"shape": a.shape, "hbm_bytes_per_s": bw, "weight_bytes_no_embed": w_bytes,
              "decode": rows, "prefill_8x512": pre, "device": torch.cuda.get_device_name()}
    print(json.dumps(result, indent=2))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    print(f"HBM {bw / 1e12:.2f} TB/s; weights (no embedding) {w_bytes / 1e9:.2f} GB")
    for r in rows:
        print(f"decode batch {r['batch']:3d}: {r['median_ms']:.2f} ms/step, floor "
              f"{r['floor_ms']:.2f} ms, ratio {r['ratio_to_floor']:.2f}")
    print(f"prefill 8x512: {pre['median_ms']:.1f} ms")


if __name__ == "__main__":
    main()
