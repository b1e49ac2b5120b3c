"""Folders for `load_format = "dummy"`: a config.json of a named shape plus a small tokenizer.

The engine builds the model from the config with random weights directly on the device, so an
8B-shaped model costs no download and no disk.

    python -m benchmarks.dummy_model llama-3.1-8b /tmp/llama8b
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SHAPES: dict[str, dict] = {
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001,
    },
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
        "use_sliding_window": False, "torch_dtype": "bfloat16", "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
}


def write_dummy_model(shape: str, folder: Path) -> Path:
    """Write config.json for `shape` and a small test tokenizer into `folder`."""
    from tests.models import save_tokenizer

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(SHAPES[shape], indent=2))
    return folder


def weight_bytes(shape: str, bytes_per_param: int = 2) -> tuple[int, int]:
    """(bytes of every weight but the embedding table, bytes of the embedding table)."""
    c = SHAPES[shape]
    h, i, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    d = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    per_layer = h * (q + 2 * kv) + q * h + 2 * h * i + i * h + 2 * h
    embed = c["vocab_size"] * h
    lm_head = 0 if c["tie_word_embeddings"] else c["vocab_size"] * h
    return (n * per_layer + h + lm_head) * bytes_per_param, embed * bytes_per_param


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("folder", type=Path)
    a = ap.parse_args()
    print(write_dummy_model(a.shape, a.folder))
