"""Decode-step time at tensor-parallel size 1 against 2, on dummy weights, base and with many
distinct adapters resident.

One engine per tp size (tp 1 first, then tp 2 with rank 1 in a spawned process), adapters
written once and all made resident before any timing. A step is timed on the host clock around
schedule → prepare → forward (and, at tp 2, the plan's broadcast and the collectives) → sample
→ tokens on the host: the median over --steps decode steps after warm-up. Each engine runs its
decode steps through CUDA graphs (every rank's, collectives captured inside, at tp 2), then
tp 1 eagerly as well; `--tp2-eager` builds a second tp-2 engine without graphs (every rank
must take the same path, so one engine cannot switch).

    python -m benchmarks.tp_bench --out tp.json          # Llama-3.1-8B shapes, two GPUs
    python -m benchmarks.tp_bench --quick --out tp.json  # tiny model, CPU and gloo, < 1 min
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.dummy_model import SHAPES
from benchmarks.random_adapters import ALL_LINEAR, clone_adapter, write_adapter
from benchmarks.step_bench import decode_step_ms, make_engine
from runtime.adapters.manager import Residency
from runtime.engine import Engine
from runtime.tp import TP_GRAPHS_ENV

# A tiny Llama for --quick (heads and MLP divide by 2).
TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
}
GRAPHS_NOTE = ("decode steps replay CUDA graphs at both tp sizes (at tp 2 on every rank, "
               "their all-reduces captured inside); steps that prefill run eagerly at tp 2")
RESIDENT_TIMEOUT_S = 300.0


def write_model(shape: dict[str, Any], folder: Path) -> Path:
    """config.json of `shape` and the small test tokenizer, for load_format = "dummy"."""
    from tests.models import save_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(shape, indent=1))
    return folder


def write_adapters(shape: dict[str, Any], root: Path, count: int, rank: int) -> list[Path]:
    """`count` rank-`rank` bf16 PEFT adapters on all seven projections of every layer: one
    random adapter and hard-linked clones (the step time does not depend on the values)."""
    first = write_adapter(shape, root / "lora0", rank, ALL_LINEAR, seed=0)
    return [first] + [clone_adapter(first, root / f"lora{i}") for i in range(1, count)]


async def make_resident(engine: Engine, paths: list[Path]) -> float:
    """Load every adapter to host memory and upload it to a slot on every rank; seconds."""
    assert engine.adapters is not None
    t0 = time.perf_counter()
    for p in paths:
        await engine.adapters.load(p.name, str(p))
    for p in paths:
        engine.adapters.acquire(p.name)  # prefetch: starts the upload
    deadline = time.monotonic() + RESIDENT_TIMEOUT_S
    while True:
        engine.adapters.poll()
        states = [engine.adapters.state(p.name) for p in paths]
        if all(s is Residency.RESIDENT for s in states):
            break
        errors = [engine.adapters.load_error(p.name) for p in paths]
        if any(errors) or time.monotonic() > deadline:
            raise RuntimeError(f"adapters not resident: {states}, errors {errors}")
        await asyncio.sleep(0.01)
    for p in paths:
        engine.adapters.release(p.name)
    return time.perf_counter() - t0


def cases(a: argparse.Namespace, names: list[str]) -> list[tuple[int, list[str] | None]]:
    """(batch, adapters) of every timed case: base, then one adapter per row."""
    out: list[tuple[int, list[str] | None]] = [(b, None) for b in a.batch]
    out += [(b, names[: min(b, len(names))]) for b in a.batch if names]
    return out


async def bench_engine(engine: Engine, a: argparse.Namespace, tp: int, paths: list[Path],
                       eager_too: bool) -> list[dict[str, Any]]:
    """Every case on one engine: with its CUDA graphs first (if any), then, with `eager_too`
    (tp 1 only: the ranks of a tp-2 engine take one path), eagerly."""
    rows = []
    try:
        upload_s = await make_resident(engine, paths) if paths else 0.0
        names = [p.name for p in paths]
        modes = [True] if engine.runner.graphs is not None else []
        if eager_too or not modes:
            modes.append(False)
        for with_graphs in modes:
            if not with_graphs:
                engine.runner.graphs = None  # eager from here on
            for batch, loras in cases(a, names):
                r = decode_step_ms(engine, batch, a.prompt, a.steps, loras)
                rows.append({"tp": tp, "cuda_graphs": with_graphs, "batch": batch,
                             "adapters": r["adapters"], "median_ms": r["median_ms"],
                             "p10_ms": r["p10_ms"], "steps": a.steps,
                             "adapters_resident_s": upload_s})
    finally:
        await engine.stop()
    return rows


def build(a: argparse.Namespace, folder: Path, tp: int, paths: list[Path],
          graphs: bool = True) -> Engine:
    opts: dict[str, Any] = {
        "tp_size": tp, "disable_cuda_graph": a.quick or not graphs,
        "cuda_graph_max_bs": max(a.batch),
        "max_running_requests": max(a.batch),
    }
    # decode graphs at tp 2 are opt-in (runtime.tp.TP_GRAPHS_ENV); the workers follow rank 0
    os.environ[TP_GRAPHS_ENV] = "1" if graphs else "0"
    if a.quick:
        opts |= {"device": "cpu", "dtype": "float32", "kv_cache_cpu_bytes": 1 << 24}
    else:
        opts |= {"mem_fraction_static": a.mem_fraction_static}
    if paths:
        opts |= {"enable_lora": True, "max_lora_rank": a.rank, "lora_target_modules": ALL_LINEAR,
                     "max_loras_per_batch": len(paths), "max_loaded_loras": len(paths)}
    return make_engine(folder, **opts)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (batch, adapters): each tp size's step with and without graphs where measured, and
    tp 2's speed-up over tp 1 like for like (graphs where both have them, else eager)."""
    by = {(r["tp"], r["cuda_graphs"], r["batch"], r["adapters"]): r["median_ms"] for r in rows}
    out = []
    for key in dict.fromkeys((r["batch"], r["adapters"]) for r in rows):
        s = {"batch": key[0], "adapters": key[1]}
        for tp in (1, 2):
            for graphs, name in ((True, "graphs"), (False, "eager")):
                s[f"tp{tp}_{name}_ms"] = by.get((tp, graphs, *key))
        mode = "graphs" if s["tp1_graphs_ms"] and s["tp2_graphs_ms"] else "eager"
        tp1, tp2 = s[f"tp1_{mode}_ms"], s[f"tp2_{mode}_ms"]
        s["speedup_mode"] = mode
        s["speedup_tp2_vs_tp1"] = tp1 / tp2 if tp1 and tp2 else None
        out.append(s)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--adapters", type=int, default=32, help="distinct adapters (0: base only)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--mem-fraction-static", type=float, default=0.35)
    ap.add_argument("--tp2-eager", action="store_true",
                    help="also a tp-2 engine without CUDA graphs (a second build)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny model on CPU over gloo, few steps (a smoke run, < 1 min)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if a.quick:
        a.batch, a.steps, a.prompt, a.adapters = [1, 4], 4, 16, min(a.adapters, 4)
    elif torch.cuda.device_count() < max(a.tp):
        raise SystemExit(f"--tp {max(a.tp)} needs as many GPUs, "
                         f"{torch.cuda.device_count()} visible")
    shape = TINY if a.quick else SHAPES[a.shape]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_model(shape, Path(tmp) / "model")
        paths = write_adapters(shape, Path(tmp) / "adapters", a.adapters, a.rank)
        rows: list[dict[str, Any]] = []
        leftover: dict[int, int] = {}  # GPU bytes still allocated before each engine
        builds = [(tp, True) for tp in sorted(a.tp)]
        if a.tp2_eager and 2 in a.tp and not a.quick:
            builds.append((2, False))
        for tp, graphs in builds:
            if torch.cuda.is_available():
                leftover[f"tp{tp}{'' if graphs else ' eager'}"] = torch.cuda.memory_allocated()
            engine = build(a, folder, tp, paths, graphs)
            rows += asyncio.run(bench_engine(engine, a, tp, paths, eager_too=tp == 1))
            del engine
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    result = {
        "shape": "tiny" if a.quick else a.shape, "quick": a.quick,
        "device": "cpu (gloo)" if a.quick else torch.cuda.get_device_name(),
        "dtype": "float32" if a.quick else "bfloat16", "prompt": a.prompt,
        "adapter_rank": a.rank, "adapter_targets": list(ALL_LINEAR),
        "cuda_graphs_at_tp_gt_1": not a.quick, "cuda_graphs_note": GRAPHS_NOTE,
        "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
        "gpu_bytes_allocated_before_engine": leftover, "rows": rows, "summary": summarize(rows),
        "wall_s": time.perf_counter() - t_start,
    }
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    print_table(result)
    return result


def print_table(result: dict[str, Any]) -> None:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:8.2f}"

    print(f"decode step, {result['shape']} on {result['device']}, median ms "
          f"(wall {result['wall_s']:.0f} s)")
    print(f"{'batch':>5} {'adapters':>8} {'tp1 graphs':>10} {'tp2 graphs':>10} "
          f"{'tp1 eager':>10} {'tp2 eager':>10} {'tp1/tp2':>8}")
    for s in result["summary"]:
        ratio = s["speedup_tp2_vs_tp1"]
        print(f"{s['batch']:>5} {s['adapters']:>8} {ms(s['tp1_graphs_ms']):>10} "
              f"{ms(s['tp2_graphs_ms']):>10} {ms(s['tp1_eager_ms']):>10} "
              f"{ms(s['tp2_eager_ms']):>10} "
              f"{'-' if ratio is None else f'{ratio:.2f}x ' + s['speedup_mode']:>8}")


if __name__ == "__main__":
    main()
