"""Checkpoint resolution, config checks, RoPE frequencies and sharded weight iteration."""

from __future__ import annotations

import time
from pathlib import Path
from types import MappingProxyType, SimpleNamespace

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from runtime.model.loader import (
    ModelLoadError,
    RopeParams,
    RopeType,
    check_supported,
    inv_freq,
    iter_safetensors,
    load_hf_config,
    load_tokenizer,
    resolve_dtype,
    resolve_model_path,
    rope_params,
)

TINY = MappingProxyType({
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
})
LLAMA3_ROPE = MappingProxyType({
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64, "rope_theta": 500000.0,
})


def save_tiny(config: PretrainedConfig, folder: Path, max_shard_size: str | None = None) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), safe_serialization=True, **kwargs)
    return folder


def reference_state(folder: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model.state_dict()


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(**TINY),
        LlamaConfig(**TINY, rope_parameters=dict(LLAMA3_ROPE)),
        MistralConfig(**TINY, sliding_window=None),
        MistralConfig(**TINY, sliding_window=4096),  # window longer than the context: no effect
        Qwen2Config(**TINY),
        Qwen3Config(**TINY, head_dim=32),
    ],
    ids=["llama", "llama3-rope", "mistral", "mistral-long-window", "qwen2", "qwen3"],
)
def test_supported_configs_load(tmp_path: Path, config: PretrainedConfig) -> None:
    folder = save_tiny(config, tmp_path)
    assert resolve_model_path(str(folder)) == folder
    loaded = load_hf_config(folder)
    assert loaded.architectures == config.architectures or loaded.model_type == config.model_type


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (MistralConfig(**TINY, sliding_window=32), "sliding-window attention (window 32)"),
        (Qwen2Config(**TINY, use_sliding_window=True, max_window_layers=1), "sliding-window"),
        (Qwen3Config(**TINY, use_sliding_window=True, sliding_window=16), "sliding-window"),
        (LlamaConfig(**TINY, rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "'dynamic'"),
        (LlamaConfig(**TINY, rope_parameters={"rope_type": "yarn", "factor": 2.0}), "'yarn'"),
    ],
    ids=["mistral-window", "qwen2-window", "qwen3-window", "rope-dynamic", "rope-yarn"],
)
def test_unsupported_configs_are_rejected(config: PretrainedConfig, needle: str) -> None:
    with pytest.raises(ModelLoadError, match="supported") as info:
        check_supported(config)
    assert needle in str(info.value)


def test_unknown_architecture_is_rejected(tmp_path: Path) -> None:
    from transformers import GPT2Config

    folder = save_tiny(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64), tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load_hf_config(folder)
    message = str(info.value)
    assert "GPT2LMHeadModel" in message and "LlamaForCausalLM" in message


def test_rope_params_reads_both_spellings() -> None:
    modern = LlamaConfig(**TINY, rope_parameters=dict(LLAMA3_ROPE))
    legacy = SimpleNamespace(  # how transformers 4.x configs store it
        rope_theta=500000.0, max_position_embeddings=256,
        rope_scaling={k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"},
    )
    expected = RopeParams(500000.0, RopeType.LLAMA3, 8.0, 1.0, 4.0, 64)
    assert rope_params(modern) == expected
    assert rope_params(legacy) == expected
    old_linear = SimpleNamespace(rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0})
    assert rope_params(old_linear) == RopeParams(1e4, RopeType.LINEAR, 2.0)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "default", "rope_theta": 1e6},
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        dict(LLAMA3_ROPE),
        {**LLAMA3_ROPE, "factor": 32.0, "high_freq_factor": 8.0, "rope_theta": 1e4},
    ],
    ids=["default", "default-1e6", "linear", "llama3", "llama3-other"],
)
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_inv_freq_matches_transformers(rope: dict, head_dim: int) -> None:
    config = LlamaConfig(**{**TINY, "max_position_embeddings": 4096}, head_dim=head_dim,
                         rope_parameters=dict(rope))
    expected = LlamaRotaryEmbedding(config).inv_freq
    got = inv_freq(rope_params(config), head_dim)
    assert got.dtype == torch.float32 and got.shape == (head_dim // 2,)
    assert torch.equal(got, expected)


def test_sharded_iteration_yields_every_tensor_once(tmp_path: Path) -> None:
    folder = save_tiny(LlamaConfig(**TINY, tie_word_embeddings=False), tmp_path, "40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 2
    expected = reference_state(folder)
    names = []
    for name, tensor in iter_safetensors(folder, torch.bfloat16, "cpu"):
        names.append(name)
        assert tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu"
        assert torch.equal(tensor, expected[name].to(torch.bfloat16)), name
    assert sorted(names) == sorted(expected)  # each exactly once


def test_single_file_keeps_stored_dtype(tmp_path: Path) -> None:
    folder = save_tiny(Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=True), tmp_path)
    expected = reference_state(folder)
    got = dict(iter_safetensors(folder, None, "cpu"))
    assert got.keys() == {k for k in expected if k != "lm_head.weight"}  # tied: stored once
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[name]), name


def test_folder_without_safetensors_is_rejected(tmp_path: Path) -> None:
    LlamaConfig(**TINY).save_pretrained(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors.*\.bin"):
        list(iter_safetensors(tmp_path, None, "cpu"))


def test_local_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"holds no config\.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))


def test_hub_id_offline_gives_clear_error_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        resolve_model_path("loraserve-test/does-not-exist")
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "'loraserve-test/does-not-exist'" in message and "local folder path" in message


def test_resolve_dtype() -> None:
    bf16 = LlamaConfig(**TINY, dtype="bfloat16")
    fp32 = LlamaConfig(**TINY, dtype="float32")
    assert resolve_dtype("auto", bf16, "cpu") == torch.float32
    assert resolve_dtype("auto", bf16, "cuda") == torch.bfloat16
    assert resolve_dtype("auto", LlamaConfig(**TINY, dtype="float16"), "cuda:0") == torch.float16
    assert resolve_dtype("auto", fp32, "cuda") == torch.bfloat16
    assert resolve_dtype("bfloat16", fp32, "cpu") == torch.bfloat16
    assert resolve_dtype("float16", bf16, "cuda") == torch.float16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("int8", bf16, "cpu")


def test_load_tokenizer_missing_gives_clear_error(tmp_path: Path) -> None:
    LlamaConfig(**TINY).save_pretrained(str(tmp_path))
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_tokenizer(tmp_path)
