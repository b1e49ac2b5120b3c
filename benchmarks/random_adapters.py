"""Write random PEFT-format LoRA adapters for a model shape (for benchmarks on dummy weights).

    python -m benchmarks.random_adapters llama-3.1-8b /tmp/adapters --count 8 --rank 16 \
        --targets q_proj k_proj v_proj o_proj gate_proj up_proj down_proj

Each adapter is a folder with adapter_config.json and adapter_model.safetensors in bf16, with
both A and B drawn non-zero so the adapter really changes the output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.dummy_model import SHAPES

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def _dims(shape: dict, module: str) -> tuple[int, int]:
    h, i = shape["hidden_size"], shape["intermediate_size"]
    d = h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}[module]


def write_adapter(
    shape_name: str | dict, folder: Path, rank: int, targets: tuple[str, ...], seed: int
) -> Path:
    """One adapter for a named shape of SHAPES, or for a config dict of the same keys."""
    shape = SHAPES[shape_name] if isinstance(shape_name, str) else shape_name
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape["num_hidden_layers"]):
        for m in targets:
            fan_in, fan_out = _dims(shape, m)
            part = "self_attn" if m in _ATTN else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{m}"
            a = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
            b = torch.randn(fan_out, rank, generator=g) * 0.01
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules":
              list(targets), "bias": "none", "lora_dropout": 0.0, "task_type": "CAUSAL_LM",
              "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "fan_in_fan_out": False, "init_lora_weights": True}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return folder


def clone_adapter(src: Path, dst: Path) -> Path:
    """`dst` holding `src`'s files, hard-linked where the filesystem allows: timing does not
    depend on the weights' values, and drawing many random 8B-shaped adapters takes minutes."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if (dst / f.name).exists():
            continue
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)
    return dst


def write_adapters(
    shape_name: str, root: Path, count: int, rank: int, targets: tuple[str, ...] = ALL_LINEAR
) -> list[Path]:
    return [write_adapter(shape_name, root / f"lora{i}", rank, targets, seed=i)
            for i in range(count)]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("root", type=Path)
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", nargs="+", default=list(ALL_LINEAR))
    a = ap.parse_args()
    for p in write_adapters(a.shape, a.root, a.count, a.rank, tuple(a.targets)):
        print(p)
