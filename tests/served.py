"""What the HTTP tests over the real engine share: the server settings on the tiny random
Llama and its adapter (the `tiny`, `make_client` and `client` fixtures in tests/conftest.py
serve them), and the parser of an SSE answer."""

from __future__ import annotations

import json
from pathlib import Path

from runtime.config import LoraPathSpec, ServerConfig


def server_config(tiny: tuple[Path, Path], **overrides) -> ServerConfig:
    """CPU, fp32, a 16 MiB KV cache, LoRA on q/v up to rank 8 with the adapter as `a1`,
    served as `tiny`; `overrides` replace any of them."""
    model, adapter = tiny
    cfg = {"model_path": str(model), "device": "cpu", "dtype": "float32",
           "kv_cache_cpu_bytes": 1 << 24, "enable_lora": True, "max_lora_rank": 8,
           "lora_target_modules": ("q_proj", "v_proj"), "served_model_name": "tiny",
           "lora_paths": (LoraPathSpec("a1", str(adapter)),)}
    cfg.update(overrides)
    return ServerConfig(**cfg)


def sse_events(text: str) -> list[object]:
    """Parse a `data: ...\\n\\n` stream; [DONE] must come last, exactly once."""
    assert text.endswith("data: [DONE]\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
    assert events.count("[DONE]") == 1
    return events[:-1]
