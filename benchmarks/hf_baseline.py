"""HF transformers + PEFT as the multi-adapter baseline, and our engine on the same workload.

A batch of equal-length random prompts is generated greedily to a fixed length by
`model.generate(..., adapter_names=[...])` (rows mixed over adapters), by the base model alone
and with one adapter for every row. `--compare-engine` then runs the identical prompts and
adapters through our engine in-process (submit all, collect), so both sit side by side in one
run; with the same weights in fp32 the greedy outputs must match row for row.

    python -m benchmarks.hf_baseline --dummy-shape llama-3.1-8b --num-adapters 8 \
        --batch 32 --prompt-len 128 --new-tokens 64 --compare-engine --out hf.json
    python -m benchmarks.hf_baseline --quick --compare-engine     # CPU smoke, tiny model

Times are host wall clock around the whole generate (prefill included), median of --reps
after a warm-up. ms/step = time / new tokens; decode ms/step = (time - time of one new token)
/ (new tokens - 1), which leaves the prefill out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.dummy_model import SHAPES, write_dummy_model
from benchmarks.workloads import fill_defaults
from runtime.config import LoraPathSpec, ServerConfig
from runtime.engine import Engine
from runtime.request import SamplingParams

BASE = "__base__"  # PEFT's name for base-model rows in adapter_names
VARIANTS = ("base", "one", "mixed")
QUICK = {"batch": 4, "prompt_len": 16, "new_tokens": 8, "num_adapters": 2, "reps": 1}
DEFAULTS = {"batch": 32, "prompt_len": 128, "new_tokens": 64, "num_adapters": 8, "reps": 3}
DUMMY_INIT_STD = 0.02


@dataclass(frozen=True)
class Workload:
    """Equal-length prompts (so no padding) and each row's adapter (None = base model)."""

    prompts: list[list[int]]
    adapters: list[str | None]
    new_tokens: int

    @property
    def batch(self) -> int:
        return len(self.prompts)


@dataclass
class Timing:
    """Median seconds for `new_tokens` tokens and for one token, and the outputs."""

    seconds: float
    seconds_one_token: float
    new_tokens: int
    batch: int
    outputs: list[list[int]]

    def summary(self) -> dict[str, float]:
        decode = (self.seconds - self.seconds_one_token) / max(self.new_tokens - 1, 1)
        return {"seconds": self.seconds, "prefill_and_first_token_s": self.seconds_one_token,
                "output_tokens_per_s": self.batch * self.new_tokens / self.seconds,
                "ms_per_step": 1e3 * self.seconds / self.new_tokens,
                "decode_ms_per_step": 1e3 * decode}


def make_workloads(vocab_size: int, batch: int, prompt_len: int, new_tokens: int,
                   adapters: list[str], seed: int = 0) -> dict[str, Workload]:
    """The three variants on the same prompts: base, one adapter, rows mixed over `adapters`."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, vocab_size, (batch, prompt_len), generator=g).tolist()
    out = {"base": Workload(prompts, [None] * batch, new_tokens)}
    if adapters:
        out["one"] = Workload(prompts, [adapters[0]] * batch, new_tokens)
        out["mixed"] = Workload(prompts, [adapters[i % len(adapters)] for i in range(batch)],
                                new_tokens)
    return out


def timed(fn: Callable[[int], list[list[int]]], new_tokens: int, batch: int, reps: int,
          device: torch.device) -> Timing:
    """Warm up `fn(n)` (n = tokens to generate), then the median of `reps` timed runs of
    `new_tokens` and of one token."""
    def clock(n: int) -> tuple[float, list[list[int]]]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        outputs = fn(n)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, outputs

    clock(new_tokens)
    runs = [clock(new_tokens) for _ in range(reps)]
    ones = [clock(1)[0] for _ in range(reps)]
    return Timing(statistics.median(t for t, _ in runs), statistics.median(ones), new_tokens,
                  batch, runs[-1][1])


# ---------------------------------------------------------------- HF transformers + PEFT

def hf_dummy_model(folder: Path, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """The model of `folder`'s config.json with random weights drawn directly on `device`
    (HF's own initialisation skipped: it would draw every weight twice)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(folder)
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, DUMMY_INIT_STD, generator=g)
    return model.eval()


def hf_model(folder: Path, dtype: torch.dtype, device: torch.device, is_dummy: bool):
    if is_dummy:
        return hf_dummy_model(folder, dtype, device)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


def attach_adapters(model, adapter_paths: dict[str, Path]):
    """A PeftModel with every adapter loaded under its name."""
    from peft import PeftModel

    names = list(adapter_paths)
    peft_model = PeftModel.from_pretrained(model, adapter_paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(adapter_paths[name], adapter_name=name)
    return peft_model.eval()


def hf_generate(model, w: Workload, new_tokens: int, pad_token_id: int) -> list[list[int]]:
    """Greedy outputs of `new_tokens` for every row: the base model when no row has an
    adapter, the active adapter when all rows share one, else PEFT's mixed-batch path."""
    device = next(model.parameters()).device
    ids = torch.tensor(w.prompts, device=device)
    kwargs: dict[str, Any] = {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": pad_token_id,
    }
    names = set(w.adapters)
    with torch.inference_mode():
        if names == {None}:
            plain = getattr(model, "disable_adapter", contextlib.nullcontext)  # not a PeftModel
            with plain():
                out = model.generate(**kwargs)
        elif len(names) == 1:
            model.set_adapter(w.adapters[0])
            out = model.generate(**kwargs)
        else:
            out = model.generate(**kwargs, adapter_names=[a or BASE for a in w.adapters])
    return out[:, ids.shape[1]:].tolist()


# ---------------------------------------------------------------- our engine

def engine_config(model_folder: Path, adapter_paths: dict[str, Path], device: str, dtype: str,
                  is_dummy: bool, **overrides: Any) -> ServerConfig:
    """A config serving `model_folder` with every adapter resident at once."""
    values: dict[str, Any] = {
        "model_path": str(model_folder), "device": device, "dtype": dtype,
        "load_format": "dummy" if is_dummy else "auto", "mem_fraction_static": 0.6,
        "lora_paths": tuple(LoraPathSpec(n, str(p)) for n, p in adapter_paths.items()),
        "max_loras_per_batch": max(len(adapter_paths), 1), "log_level": "warning",
    }
    values.update(overrides)
    return ServerConfig(**values)


async def _engine_batch(engine: Engine, w: Workload, new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            temperature=0.0)
    reqs = [await engine.submit(p, params, a) for p, a in zip(w.prompts, w.adapters, strict=True)]

    async def collect(req) -> list[int]:
        out: list[int] = []
        async for o in engine.stream(req):
            out = o.output_token_ids
        return list(out)

    return list(await asyncio.gather(*(collect(r) for r in reqs)))


def run_engine(engine: Engine, workloads: dict[str, Workload], reps: int) -> dict[str, Timing]:
    """Each workload through `engine` in-process: all rows submitted at once, outputs
    collected; timed like the HF runs (warm-up, median of `reps`). One event loop for all,
    since the engine's queues and events belong to the loop that started it."""
    async def body() -> dict[str, Timing]:
        await engine.start()
        try:
            out = {}
            for name, w in workloads.items():
                out[name] = await _timed_async(engine, w, reps, engine.device)
            return out
        finally:
            await engine.stop()

    return asyncio.run(body())


async def _timed_async(engine: Engine, w: Workload, reps: int, device: torch.device) -> Timing:
    async def clock(n: int) -> tuple[float, list[list[int]]]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        outputs = await _engine_batch(engine, w, n)
        return time.perf_counter() - t0, outputs  # outputs on the host: the GPU is done

    await clock(w.new_tokens)
    runs = [await clock(w.new_tokens) for _ in range(reps)]
    ones = [(await clock(1))[0] for _ in range(reps)]
    return Timing(statistics.median(t for t, _ in runs), statistics.median(ones), w.new_tokens,
                  w.batch, runs[-1][1])


def build_engine(config: ServerConfig, weights: Iterable[tuple[str, torch.Tensor]] | None
                 ) -> Engine:
    """Engine.from_config; `weights` (HF names) then replace its dummy weights, so both
    sides of a comparison compute with the same numbers."""
    engine = Engine.from_config(config)
    if weights is not None:
        with torch.no_grad():
            engine.model.load_weights(weights)
    return engine


# ---------------------------------------------------------------- main

def quick_setup(root: Path) -> tuple[Path, dict[str, Path]]:
    """A tiny random Llama and two random adapters (for --quick without --model-path)."""
    from tests.models import make_adapter, make_model

    model = make_model(root / "model")
    adapters = {f"lora{i}": make_adapter(model, root / f"lora{i}", seed=i + 1)
                for i in range(QUICK["num_adapters"])}
    return model, adapters


def prepare(args: argparse.Namespace, root: Path) -> tuple[Path, dict[str, Path], bool]:
    """(model folder, {adapter name: folder}, whether the weights are dummy)."""
    if args.dummy_shape:
        from benchmarks.random_adapters import write_adapters

        folder = write_dummy_model(args.dummy_shape, root / args.dummy_shape)
        paths = write_adapters(args.dummy_shape, root / "adapters", args.num_adapters, args.rank)
        return folder, {p.name: p for p in paths}, True
    if args.model_path:
        adapters = {Path(p).name: Path(p) for p in args.adapters or []}
        return Path(args.model_path), adapters, False
    if args.quick:
        model, adapters = quick_setup(root)
        return model, adapters, False
    raise SystemExit("error: give --model-path, --dummy-shape or --quick")


def compare(hf: dict[str, Timing], ours: dict[str, Timing]) -> dict[str, Any]:
    out = {}
    for name, t in ours.items():
        ref = hf[name]
        rows = [i for i, (a, b) in enumerate(zip(ref.outputs, t.outputs, strict=True)) if a != b]
        out[name] = {"engine_over_hf_tokens_per_s": ref.seconds / t.seconds,
                     "outputs_equal": not rows, "mismatched_rows": rows}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    root = Path(tempfile.mkdtemp(prefix="hf_baseline_"))
    folder, adapter_paths, is_dummy = prepare(args, root)
    model = hf_model(folder, dtype, device, is_dummy)
    vocab = model.config.vocab_size
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    base_weights = list(model.state_dict().items()) if is_dummy and args.compare_engine else None
    names = list(adapter_paths)
    workloads = {k: w for k, w in make_workloads(vocab, args.batch, args.prompt_len,
                                                  args.new_tokens, names, args.seed).items()
                 if k in args.variants}
    result: dict[str, Any] = {
        "model": args.dummy_shape or str(folder), "device": str(device), "dtype": args.dtype,
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "adapters": len(names), "rank": args.rank if is_dummy else None,
        "order": "HF first" if args.hf_first else "engine first",
    }
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    hf: dict[str, Timing] = {}
    ours: dict[str, Timing] = {}

    def run_hf() -> None:
        # PEFT wraps the model's modules in place: attached only now, after our engine has
        # copied the base weights and (unless --hf-first) run. With PEFT attached in the
        # process, our engine's launches measured 50 ms a step against 2.6 ms (H200).
        peft_model = attach_adapters(model, adapter_paths) if names else model
        for name, w in workloads.items():
            hf[name] = timed(lambda n, w=w: hf_generate(peft_model, w, n, pad), w.new_tokens,
                             w.batch, args.reps, device)
            print(f"HF+PEFT {name:5s}: {_line(hf[name])}")

    def run_ours() -> None:
        config = engine_config(folder, adapter_paths, device.type, args.dtype, is_dummy,
                               disable_cuda_graph=args.disable_cuda_graph)
        engine = build_engine(config, base_weights)
        ours.update(run_engine(engine, workloads, args.reps))
        # where the engine loop's host time went, per step (ms): schedule, prepare, launch,
        # wait (blocked on the GPU), postprocess
        result["engine_loop_ms"] = engine.timings.per_step_ms()
        print("engine loop, ms a step:", _phases(result["engine_loop_ms"]))
        if device.type == "cuda":
            # Retries mean the caching allocator ran out and freed its cache (a device sync)
            # to allocate: one thing to rule in or out for the slow launches seen with PEFT
            # attached in the process (--hf-first).
            stats = torch.cuda.memory_stats(device)
            result["allocator"] = {k: stats.get(k, 0) for k in (
                "num_alloc_retries", "num_ooms", "num_device_alloc", "num_device_free")}
            print("CUDA allocator during our run:", result["allocator"])

    if args.compare_engine and not args.hf_first:
        run_ours()
    run_hf()
    if args.compare_engine and args.hf_first:
        run_ours()
    result["hf"] = {k: t.summary() for k, t in hf.items()}
    if args.compare_engine:
        for name, t in ours.items():
            print(f"engine  {name:5s}: {_line(t)}  ({hf[name].seconds / t.seconds:.1f}x HF)")
        result["engine"] = {k: t.summary() for k, t in ours.items()}
        result["comparison"] = compare(hf, ours)
        for name, c in result["comparison"].items():
            if not c["outputs_equal"]:
                print(f"  {name}: outputs differ from HF in rows {c['mismatched_rows'][:8]}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


def _phases(ms: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in ms.items() if k != "steps") + (
        f" over {ms['steps']} steps")


def _line(t: Timing) -> str:
    s = t.summary()
    return (f"{s['output_tokens_per_s']:9.1f} tok/s, {s['ms_per_step']:7.2f} ms/step, "
            f"decode {s['decode_ms_per_step']:7.2f} ms/step")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hf_baseline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model-path", help="an HF model folder (real weights)")
    src.add_argument("--dummy-shape", choices=sorted(SHAPES),
                     help="random bf16 weights of this shape, with random adapters")
    ap.add_argument("--adapters", nargs="+", help="with --model-path: PEFT adapter folders")
    ap.add_argument("--num-adapters", type=int, help="with --dummy-shape (default 8)")
    ap.add_argument("--rank", type=int, default=16, help="with --dummy-shape")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--new-tokens", type=int)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--compare-engine", action="store_true",
                    help="also run our engine on the identical workload")
    ap.add_argument("--disable-cuda-graph", action="store_true", help="for our engine")
    ap.add_argument("--hf-first", action="store_true",
                    help="run HF+PEFT before our engine (PEFT then stays attached in the "
                         "process while ours runs, which measured our steps 7x slower)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny model on CPU, for smoke runs")
    ap.add_argument("--out", type=Path, help="JSON results")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    fill_defaults(args, QUICK if args.quick else DEFAULTS)
    if args.device is None:
        args.device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


if __name__ == "__main__":
    main()
