"""Running the engine offline in tests, and the HF references it is compared against."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import torch

from runtime.config import ServerConfig
from runtime.engine import Engine
from runtime.model.batch import ForwardBatch
from runtime.request import Request, SamplingParams


def make_engine(folder: Path | str, **overrides) -> Engine:
    """An fp32 engine on LORASERVE_TEST_DEVICE (default cpu; `cuda` runs the CPU tests that
    build their engines here on the GPU, against the same HF references on the CPU)."""
    device = os.environ.get("LORASERVE_TEST_DEVICE", "cpu")
    cfg = {"model_path": str(folder), "device": device, "dtype": "float32"}
    if device == "cuda":  # a small KV cache, not mem_fraction_static's share of the GPU
        cfg["max_total_tokens"] = 1 << 16
    cfg.update(overrides)
    return Engine.from_config(ServerConfig(**cfg))


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, min_new_tokens=n, temperature=0.0, **kw)


async def collect(engine: Engine, req: Request) -> list[int]:
    out = []
    async for o in engine.stream(req):
        out = o.output_token_ids
    return out


async def run_batch(
    engine: Engine,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    loras: list[str | None] | None = None,
) -> list[list[int]]:
    """Submit everything at once (so steps batch them) and wait for all outputs."""
    if not isinstance(params, list):
        params = [params] * len(prompts)
    loras = loras or [None] * len(prompts)
    await engine.start()
    try:
        reqs = [await engine.submit(p, sp, lo) for p, sp, lo in zip(prompts, params, loras)]
        return list(await asyncio.gather(*(collect(engine, r) for r in reqs)))
    finally:
        await engine.stop()


def run(coro):
    return asyncio.run(coro)


def hf_greedy(folder: Path, prompt: list[int], n: int, adapter: Path | None = None) -> list[int]:
    """HF transformers (and PEFT) greedy generation of n tokens, EOS masked like min_new_tokens."""
    model = hf_model(folder, adapter)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt):].tolist()


def hf_model(folder: Path, adapter: Path | None = None, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def hf_logits(model, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab] fp32 logits of every position."""
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def engine_logits(engine: Engine, tokens: list[int], lora_slot: int = -1) -> torch.Tensor:
    """Our model's logits at every position of `tokens`, through the paged KV cache."""
    req = Request(rid="probe", prompt_ids=list(tokens), params=SamplingParams())
    req.lora_slot = lora_slot
    bm = engine.block_manager
    bm.allocate(req, len(tokens))
    try:
        from runtime.scheduler import ScheduledBatch

        fb: ForwardBatch = engine.runner.prepare(ScheduledBatch([req], [len(tokens)]))
        fb.logits_indices = torch.arange(len(tokens), device=fb.input_ids.device)
        if fb.lora is not None:
            from ops.lora import build_lora_batch_info

            pool = engine.model.lora_pool
            fb.lora_logits = build_lora_batch_info(
                [lora_slot] * len(tokens), pool.slot_ranks, engine.config.lora_backend,
                engine.config.max_lora_chunk_size, fb.input_ids.device,
            )
        with torch.inference_mode():
            return engine.model(fb, engine.kv_cache.k, engine.kv_cache.v).float().cpu()
    finally:
        bm.free(req)
