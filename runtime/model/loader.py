"""Find a checkpoint, check we can serve it, and stream its weights.

A model path is `bundled:<name>`, a local HF folder, or a hub id. Only safetensors weights are
read; only full-attention Llama, Mistral, Qwen2 and Qwen3 with default, linear or llama3 RoPE are
served.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
)
# Configs saved without `architectures` still name their family.
ARCHITECTURE_BY_MODEL_TYPE: Mapping[str, str] = MappingProxyType({
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
})
HUB_ALLOW_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "merges.txt", "*.jinja")
# Some repos also ship the same weights in another layout; never download those twice.
HUB_IGNORE_PATTERNS = ("consolidated*", "original/*")
DTYPE_BY_NAME: Mapping[str, torch.dtype] = MappingProxyType(
    {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
)


class ModelLoadError(RuntimeError):
    """The model cannot be found, read or served. The message says what to do instead."""


class RopeType(StrEnum):
    DEFAULT = "default"
    LINEAR = "linear"
    LLAMA3 = "llama3"


@dataclass(frozen=True)
class RopeParams:
    """Rotary embedding settings; the llama3 fields are only meaningful for LLAMA3."""

    theta: float
    scaling_type: RopeType = RopeType.DEFAULT
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


# ---- resolving a model path -------------------------------------------------------------------


def resolve_model_path(model_path: str) -> Path:
    """Turn `bundled:<name>`, a local folder or a hub id into a local HF folder."""
    from runtime.model import bundled  # bundled imports this module for ModelLoadError

    if bundled.is_bundled(model_path):
        return bundled.ensure_bundled(model_path)
    local = Path(model_path).expanduser()
    if local.exists() or _looks_like_path(model_path):
        return _check_folder(local)
    return _check_folder(_download(model_path))


def _looks_like_path(model_path: str) -> bool:
    # A hub id is `name` or `owner/name`; anything else was meant as a folder.
    return model_path.startswith((".", "/", "~")) or model_path.count("/") > 1


def _check_folder(folder: Path) -> Path:
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} holds no config.json; expected a Hugging Face model folder")
    return folder


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        path = snapshot_download(
            repo_id,
            allow_patterns=list(HUB_ALLOW_PATTERNS),
            ignore_patterns=list(HUB_IGNORE_PATTERNS),
        )
    except (OSError, ValueError, HfHubHTTPError) as e:
        raise ModelLoadError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "pass a local folder path holding config.json and *.safetensors instead"
        ) from e
    return Path(path)


# ---- config ------------------------------------------------------------------------------------


def load_hf_config(folder: Path) -> PretrainedConfig:
    """Read `folder/config.json` (never running remote code) and check we can serve it."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot read the model config in {folder}: {e}") from e
    check_supported(config)
    return config


def architecture(config: PretrainedConfig) -> str:
    names = getattr(config, "architectures", None) or []
    if not names and config.model_type in ARCHITECTURE_BY_MODEL_TYPE:
        return ARCHITECTURE_BY_MODEL_TYPE[config.model_type]
    return names[0] if len(names) == 1 else ", ".join(names) or config.model_type


def check_supported(config: PretrainedConfig) -> None:
    """Raise ModelLoadError unless the config is a full-attention model we implement."""
    arch = architecture(config)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture {arch}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    window = _sliding_window(config)
    if window is not None:
        raise ModelLoadError(
            f"{arch} config uses sliding-window attention (window {window}); "
            "only full attention is supported"
        )
    rope_params(config)


def _sliding_window(config: PretrainedConfig) -> int | str | None:
    """The window if any layer attends through one, else None."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", False):
        return window or "on"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return window or "on"
    # Mistral has no on/off switch: a window shorter than the context is in force.
    if config.model_type == "mistral" and window is not None:
        return window if window < config.max_position_embeddings else None
    return None


def rope_params(config: PretrainedConfig) -> RopeParams:
    """Rotary settings from either spelling: `rope_parameters`, or `rope_scaling` + `rope_theta`."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is None:
        raise ModelLoadError("config sets no rope_theta")
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", None)))
    name = params.get("rope_type", params.get("type")) or RopeType.DEFAULT
    try:
        kind = RopeType(name)
    except ValueError:
        supported = ", ".join(t.value for t in RopeType)
        raise ModelLoadError(
            f"unsupported RoPE scaling type {name!r}; supported: {supported}"
        ) from None
    if kind is RopeType.DEFAULT:
        return RopeParams(theta=theta)
    factor = _required(params, "factor", kind)
    if kind is RopeType.LINEAR:
        return RopeParams(theta=theta, scaling_type=kind, factor=factor)
    return RopeParams(
        theta=theta,
        scaling_type=kind,
        factor=factor,
        low_freq_factor=_required(params, "low_freq_factor", kind),
        high_freq_factor=_required(params, "high_freq_factor", kind),
        original_max_position=int(
            params.get("original_max_position_embeddings", config.max_position_embeddings)
        ),
    )


def _required(params: dict[str, Any], key: str, kind: RopeType) -> float:
    if params.get(key) is None:
        raise ModelLoadError(f"{kind.value} RoPE scaling needs {key!r} in the config")
    return float(params[key])


def inv_freq(params: RopeParams, head_dim: int) -> torch.Tensor:
    """Rotary inverse frequencies, float32 [head_dim // 2], on CPU.

    Pair i rotates by `position * inv_freq[i]`. Linear scaling slows every pair by `factor`;
    llama3 slows only long wavelengths, blending smoothly across the middle band.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    freq = 1.0 / (params.theta ** exponents)
    if params.scaling_type is RopeType.LINEAR:
        return freq / params.factor
    if params.scaling_type is RopeType.DEFAULT:
        return freq
    old_len = params.original_max_position
    wavelen = 2 * math.pi / freq
    is_long = wavelen > old_len / params.low_freq_factor
    is_short = wavelen < old_len / params.high_freq_factor
    scaled = torch.where(is_long, freq / params.factor, freq)
    # blend: 0 at the long end of the middle band (fully scaled), 1 at the short end (unscaled)
    blend = (old_len / wavelen - params.low_freq_factor) / (
        params.high_freq_factor - params.low_freq_factor
    )
    smoothed = (1 - blend) * scaled / params.factor + blend * scaled
    return torch.where(~is_long & ~is_short, smoothed, scaled)


# ---- weights, dtype, tokenizer ----------------------------------------------------------------


def safetensors_files(folder: Path) -> list[Path]:
    """The weight shards: those the index names when sharded, else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} names missing shards: {', '.join(missing)}")
        return files
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("consolidated"))
    if not files:
        raise ModelLoadError(
            f"no *.safetensors weights in {folder}; .bin checkpoints are not loaded, "
            "convert them to safetensors first"
        )
    return files


def iter_safetensors(
    folder: Path, dtype: torch.dtype | None, device: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every (name, tensor) in the folder's safetensors files exactly once.

    Floating-point tensors are cast to `dtype` (None keeps the stored dtype); integer tensors
    are left as stored. Tensors are placed on `device`.
    """
    files = safetensors_files(folder)
    num_tensors = sum(len(_keys(f)) for f in files)
    with tqdm(total=num_tensors, desc="Loading weights", unit="tensor", disable=None) as bar:
        for path in files:
            with safe_open(str(path), framework="pt", device=device) as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    tensor = f.get_tensor(name)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    bar.update()
                    yield name, tensor


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def resolve_dtype(name: str, config: PretrainedConfig, device: str) -> torch.dtype:
    """The compute dtype for `--dtype name` on `device`.

    auto: on CUDA the checkpoint's bf16/fp16, else bfloat16 (fp32 checkpoints serve in bf16);
    on CPU float32, since CPU half-precision matmuls are slow and inexact.
    """
    if name in DTYPE_BY_NAME:
        return DTYPE_BY_NAME[name]
    if name != "auto":
        raise ModelLoadError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPE_BY_NAME)}")
    if not device.startswith("cuda"):
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = DTYPE_BY_NAME.get(stored.removeprefix("torch."))
    return stored if stored in (torch.bfloat16, torch.float16) else torch.bfloat16


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The folder's tokenizer (never running remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer in {folder}: {e}") from e
