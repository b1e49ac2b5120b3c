"""Host costs, measured on CPU tensors (host-side figures, not device ones):

- one LoRA application's kernel wrappers (apply_lora_triton), the two kernel launches stubbed
  out: the Python an eager step pays before Triton's own launch path, 128 times a step for an
  8B model with LoRA on every projection;
- the serving loop's per-step host work before a launch, `Scheduler.schedule` and
  `ModelRunner.prepare`, for a decode step of `--batches` requests over 8 adapters (a tiny
  model: these costs scale with requests and tokens, not with the model).

    python -m benchmarks.host_overhead --iters 2000 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from ops.lora import apply_lora_triton, build_lora_batch_info


class _NoLaunch:
    """Stands in for a jit kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **kwargs: None


def best_of(call: Callable[[], object], iters: int, rounds: int) -> float:
    """Seconds a call: the best of `rounds` rounds of `iters` calls (a shared machine's noise
    only adds time)."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iters):
            call()
        best = min(best, time.perf_counter() - t0)
    return best / iters


def wrapper_us(iters: int, rounds: int = 7, tokens: int = 4096, hidden: int = 4096) -> float:
    """Microseconds an application, the best of `rounds` rounds of `iters` (a shared machine's
    noise only adds time): a qkv group of an 8B layer, 8 adapters of rank 16, csgmv."""
    import ops.triton_lora_expand as expand
    import ops.triton_lora_shrink as shrink

    widths = (hidden, hidden // 4, hidden // 4)
    offsets = (0, widths[0], widths[0] + widths[1], sum(widths))
    slots = [i * 8 // tokens for i in range(tokens)]
    ranks = torch.full((32,), 16, dtype=torch.int32)
    info = build_lora_batch_info(slots, ranks, "csgmv", 32, "cpu")
    x = torch.zeros(tokens, hidden, dtype=torch.float16)
    A = torch.zeros(32, 48, hidden, dtype=torch.float16)
    B = torch.zeros(32, offsets[-1], 16, dtype=torch.float16)
    y = torch.zeros(tokens, offsets[-1], dtype=torch.float16)
    scalings = torch.ones(32, 3)
    with mock.patch.object(shrink, "_lora_shrink_kernel", _NoLaunch()), \
            mock.patch.object(expand, "_lora_expand_kernel", _NoLaunch()):
        for _ in range(50):
            apply_lora_triton(x, A, B, y, offsets, scalings, info)
        return 1e6 * best_of(lambda: apply_lora_triton(x, A, B, y, offsets, scalings, info),
                             iters, rounds)


def step_prep_ms(batch: int, iters: int, rounds: int = 7) -> dict[str, float]:
    """Milliseconds a call of schedule(), prepare() and the engine's postprocess (the sampled
    tokens into each request's stream) for a decode step of `batch` requests of 200-300 tokens
    over 8 adapters, best of `rounds` rounds of `iters` calls (postprocess: at most 20 calls a
    round)."""
    import asyncio
    import tempfile

    from runtime.config import LoraPathSpec
    from runtime.request import Request, SamplingParams
    from tests.engine_utils import make_engine
    from tests.models import make_adapter, make_model, prompts, read_vocab

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_model(root / "m", "llama", layers=1, hidden=64, heads=2, kv_heads=1,
                           inter=64)
        specs = tuple(LoraPathSpec(f"a{i}", str(make_adapter(model, root / f"a{i}", rank=4,
                                                              seed=i))) for i in range(8))
        engine = make_engine(model, max_running_requests=batch, chunked_prefill_size=1 << 16,
                             lora_paths=specs, max_loras_per_batch=8, kv_cache_cpu_bytes=1 << 28)
        asyncio.run(engine.adapters.load_startup_adapters())
        params = SamplingParams(max_new_tokens=1 << 20, temperature=0.0, ignore_eos=True)
        for i, p in enumerate(prompts(batch, read_vocab(model), seed=3, lo=200, hi=300)):
            req = Request(rid=f"r{i}", prompt_ids=p, params=params, lora_name=f"a{i % 8}")
            req.outputs = asyncio.Queue()
            engine.scheduler.add(req)
        engine.adapters.poll()
        engine.run_step_blocking(engine.scheduler.schedule())  # the prefill: now all decode
        plan = engine.scheduler.schedule()
        assert plan is not None and plan.is_decode and len(plan.requests) == batch
        figures = {
            "schedule_ms": 1e3 * best_of(engine.scheduler.schedule, iters, rounds),
            "prepare_ms": 1e3 * best_of(lambda: engine.runner.prepare(plan), iters, rounds),
        }
        # postprocess: each call needs a step of its own, so only the call itself is timed; a
        # few calls a round keep the requests within the tiny model's context
        best, calls = float("inf"), min(20, max(1, iters // 10))
        for _ in range(rounds):
            spent = 0.0
            for _ in range(calls):
                step_plan = engine.scheduler.schedule()
                step = engine.runner.launch(step_plan, engine.runner.prepare(step_plan))
                engine._advance(step)
                result = step.result()
                t0 = time.perf_counter()
                engine._postprocess(step, result)
                spent += time.perf_counter() - t0
            best = min(best, spent / calls)
        figures["postprocess_ms"] = 1e3 * best
        return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batches", type=int, nargs="*", default=[32, 256],
                    help="decode batches whose schedule() and prepare() are timed")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    result: dict[str, Any] = {"apply_lora_triton_wrapper_us": wrapper_us(a.iters, a.rounds),
                              "iters": a.iters, "rounds": a.rounds, "decode_step": {}}
    print(f"apply_lora_triton, kernels stubbed: {result['apply_lora_triton_wrapper_us']:.1f} us "
          f"an application (best of {a.rounds} rounds)")
    for batch in a.batches:
        ms = step_prep_ms(batch, max(1, a.iters // 20), a.rounds)
        result["decode_step"][batch] = ms
        print(f"decode step of {batch} requests over 8 adapters: schedule "
              f"{ms['schedule_ms']:.3f} ms, prepare {ms['prepare_ms']:.3f} ms, postprocess "
              f"{ms['postprocess_ms']:.3f} ms")
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
