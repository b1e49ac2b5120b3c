"""/v1/completions and /v1/chat/completions against OpenAI's requests and the extensions of
vLLM's and SGLang's OpenAI servers, field by field: each is served, refused by the name the
client sent, or a hint the README lists; none is silently ignored (api/openai.py,
api/protocol.py). The real engine on the tiny random Llama of test_api, and the fake engine
where a test reads what the route submitted."""

from __future__ import annotations

from pathlib import Path

import pytest

from api import create_app
from api.app import ENGINE
from api.openai import (
    UNSUPPORTED_CHAT_FIELDS,
    UNSUPPORTED_COMPLETION_FIELDS,
    UNSUPPORTED_FIELDS,
)
from metrics import ServingMetrics
from runtime.config import ServerConfig
from tests._fake_engine import FakeEngine, build_tiny_tokenizer
from tests.served import sse_events

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Say something"}]
GREEDY = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}


@pytest.fixture
async def fake(aiohttp_client, tmp_path: Path):
    """The fake engine (a scripted answer; `submitted` keeps each request as the route made
    it) behind a tokenizer that adds a BOS token when asked for special tokens."""
    from tokenizers import processors

    tok = build_tiny_tokenizer(tmp_path)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.pad_token_id)])
    config = ServerConfig(model_path=str(tmp_path), served_model_name="fake")
    metrics = ServingMetrics()
    return await aiohttp_client(create_app(FakeEngine(config, tok), config, metrics))


def body_for(route: str, **fields) -> dict:
    base = {"messages": MESSAGES} if route == CHAT else {"prompt": "Say something"}
    return base | GREEDY | fields


async def post(client, route: str, **fields) -> tuple[int, dict]:
    r = await client.post(route, json=body_for(route, **fields))
    return r.status, await r.json()


def answers(route: str, body: dict) -> list[str]:
    if route == CHAT:
        return [c["message"]["content"] for c in body["choices"]]
    return [c["text"] for c in body["choices"]]


def _refused_value(neutral: tuple[object, ...]) -> object:
    """A value outside `neutral` (the values that ask for nothing)."""
    if any(isinstance(v, bool) for v in neutral):
        return not neutral[0]
    return 5 if any(isinstance(v, (int, float)) for v in neutral) else "x"


def _fields(route: str) -> tuple[tuple[str, tuple[object, ...], str], ...]:
    return UNSUPPORTED_FIELDS + (UNSUPPORTED_CHAT_FIELDS if route == CHAT
                                 else UNSUPPORTED_COMPLETION_FIELDS)


# ---------------------------------------------------------------- refused by name

@pytest.mark.parametrize("route, name, value", [
    *[(route, name, _refused_value(neutral))
      for route in (CHAT, COMPLETIONS) for name, neutral, _ in _fields(route)],
    (CHAT, "tools", [{"type": "function", "function": {"name": "f"}}]),
    (CHAT, "tool_choice", {"type": "function", "function": {"name": "f"}}),
    (CHAT, "function_call", {"name": "f"}),
    (CHAT, "modalities", ["text", "audio"]),
    (CHAT, "audio", {"voice": "alloy", "format": "wav"}),
    (CHAT, "web_search_options", {}),
    (CHAT, "verbosity", "low"),
    (CHAT, "include_reasoning", False),
    (CHAT, "input_ids", [5, 6, 7]),
    (CHAT, "guided_json", {"type": "object"}),
    (COMPLETIONS, "guided_choice", ["yes", "no"]),
    (CHAT, "structured_outputs", {"regex": "[ab]+"}),
    (COMPLETIONS, "service_tier", "priority"),
    (CHAT, "store", True),
    (COMPLETIONS, "priority", -1),
    (COMPLETIONS, "use_beam_search", True),
    (CHAT, "length_penalty", 0.5),
    (CHAT, "logprob_token_ids", [5, 6]),
    (CHAT, "thinking_token_budget", 100),
    (COMPLETIONS, "logits_processors", ["my.module.Processor"]),
    (CHAT, "custom_logit_processor", ["x", None]),
    (COMPLETIONS, "return_token_ids", True),
    (CHAT, "kv_transfer_params", {"do_remote_prefill": True}),
    (COMPLETIONS, "prompt_embeds", "AAAA"),
])
async def test_unsupported_fields_are_refused_by_name(fake, route: str, name: str,
                                                      value: object) -> None:
    status, body = await post(fake, route, **{name: value})
    assert status == 400, body
    err = body["error"]
    assert err["param"] == name and err["message"].startswith(f"{name}: "), err
    assert not fake.app[ENGINE].submitted


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
async def test_values_that_ask_for_nothing_are_served(client, route: str) -> None:
    """What clients send as defaults (vLLM's and SGLang's own, null, empty lists) changes
    nothing: the answer is the one without them."""
    neutral = {name: values[0] if values else None for name, values, _ in _fields(route)}
    status, plain = await post(client, route)
    assert status == 200, plain
    lists = {"tools": [], "modalities": ["text"]} if route == CHAT else {}
    status, body = await post(client, route, **neutral | lists | {
        "bad_words": [], "stop_regex": []}, response_format={"type": "text"}, best_of=1,
        routed_dp_rank=0, data_parallel_rank=None)
    assert status == 200, body
    assert answers(route, body) == answers(route, plain)


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
async def test_hints_are_accepted_and_change_nothing(client, route: str) -> None:
    hints = {"user": {"id": 7}, "cache_salt": "s" * 43, "extra_key": "k",
             "disagg_prefill_dp_rank": 1, "ngram_corpus_id": "c", "return_token_offsets": True,
             "return_mm_kwargs": False, "service_tier": "auto"}
    if route == CHAT:
        hints |= {"metadata": {"team": "a"}, "safety_identifier": "u1", "prompt_cache_key": "p",
                  "prompt_cache_retention": "24h", "parallel_tool_calls": False,
                  "prediction": {"type": "content", "content": "Hello"},
                  "separate_reasoning": False, "stream_reasoning": True}
    status, plain = await post(client, route)
    status, body = await post(client, route, **hints)
    assert status == 200, body
    assert answers(route, body) == answers(route, plain)
    r = await client.post(route, json=body_for(route, **hints, stream=True, stream_options={
        "include_usage": True, "include_obfuscation": True}))
    events = sse_events(await r.text())
    assert r.status == 200 and events[-1]["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("route, fields, param", [
    (CHAT, {"best_of": 2}, "best_of"),
    (CHAT, {"routed_dp_rank": 1}, "routed_dp_rank"),
    (COMPLETIONS, {"data_parallel_rank": 2}, "data_parallel_rank"),
    (COMPLETIONS, {"prompt": ["a", "b"], "cache_salt": ["only-one"]}, "cache_salt"),
    (CHAT, {"extra_key": ["a", "b"]}, "extra_key"),
    (COMPLETIONS, {"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    (CHAT, {"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    (COMPLETIONS, {"truncation_side": "left"}, "truncation_side"),
    (CHAT, {"truncate_prompt_tokens": 4, "truncation_side": "middle"}, "truncation_side"),
    (COMPLETIONS, {"stream": True, "stream_interval": 0}, "stream_interval"),
    (CHAT, {"stream": True, "stream_options": {"continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
    (COMPLETIONS, {"rid": "a", "request_id": "b"}, "request_id"),
    (CHAT, {"continue_final_message": True, "add_generation_prompt": True},
     "continue_final_message"),
    (CHAT, {"spaces_between_special_tokens": "yes"}, "spaces_between_special_tokens"),
    (COMPLETIONS, {"include_stop_str_in_output": 1}, "include_stop_str_in_output"),
    (CHAT, {"documents": [{"title": "t", "text": "x"}]}, "documents"),
    (CHAT, {"reasoning_effort": "low"}, "reasoning_effort"),
    (COMPLETIONS, {"prompt_logprobs": -1}, "prompt_logprobs"),  # the whole vocabulary
    (CHAT, {"prompt_logprobs": 21}, "prompt_logprobs"),
    (COMPLETIONS, {"prompt_logprobs": True}, "prompt_logprobs"),
    (CHAT, {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),  # as on vLLM
    (COMPLETIONS, {"prompt_logprobs": 0, "stream": True}, "prompt_logprobs"),
])
async def test_bad_values_of_served_fields_name_them(fake, route: str, fields: dict,
                                                     param: str) -> None:
    status, body = await post(fake, route, **fields)
    assert status == 400, body
    assert body["error"]["param"] == param, body
    assert not fake.app[ENGINE].submitted


# ---------------------------------------------------------------- served

async def test_sampling_extensions_reach_the_engine(fake) -> None:
    """spaces_between_special_tokens is served (it was dropped), and top_k 0 means the whole
    vocabulary, as on vLLM (it was a 400)."""
    engine = fake.app[ENGINE]
    for route in (CHAT, COMPLETIONS):
        status, body = await post(fake, route, top_k=0, spaces_between_special_tokens=False)
        assert status == 200, body
        params = engine.submitted[-1].params
        assert params.top_k == -1 and params.spaces_between_special_tokens is False


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
async def test_include_stop_str_in_output_keeps_the_stop(fake, route: str) -> None:
    """vLLM's include_stop_str_in_output, like SGLang's no_stop_trim, keeps the stop string."""
    fields = {"max_tokens": 30, "stop": ["wörld"]}
    _, cut = await post(fake, route, **fields)
    _, kept = await post(fake, route, **fields, include_stop_str_in_output=True)
    _, sglang = await post(fake, route, **fields, no_stop_trim=True)
    assert answers(route, cut) == ["Hello "]
    assert answers(route, kept) == answers(route, sglang) == ["Hello wörld"]


async def test_add_special_tokens(fake) -> None:
    """Completions add the tokenizer's special tokens unless told not to; chat (whose template
    writes its own) adds them only when asked."""
    engine = fake.app[ENGINE]
    bos = engine.tokenizer.pad_token_id

    async def first_token(route: str, **fields) -> int:
        status, body = await post(fake, route, **fields)
        assert status == 200, body
        return engine.submitted[-1].prompt_ids[0]

    assert await first_token(COMPLETIONS) == bos
    assert await first_token(COMPLETIONS, add_special_tokens=None) == bos
    assert await first_token(COMPLETIONS, add_special_tokens=False) != bos
    assert await first_token(CHAT) != bos
    assert await first_token(CHAT, add_special_tokens=True) == bos


async def test_request_id_names_the_request_and_the_answer(fake) -> None:
    engine = fake.app[ENGINE]
    status, body = await post(fake, COMPLETIONS, request_id="job-1")
    assert status == 200 and body["id"] == "cmpl-job-1"
    assert engine.submitted[-1].rid == "job-1"
    status, body = await post(fake, CHAT, request_id="job-2", n=2, rid="job-2")
    assert status == 200 and body["id"] == "chatcmpl-job-2"
    assert [r.rid for r in engine.submitted[-2:]] == ["job-2-0", "job-2-1"]
    r = await fake.post(CHAT, json=body_for(CHAT, request_id="job-3", stream=True))
    assert {e["id"] for e in sse_events(await r.text())} == {"chatcmpl-job-3"}


async def test_truncate_prompt_tokens(client) -> None:
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens (its first with
    truncation_side "right"); an echo repeats the prompt the model saw."""
    ids = [3, 4, 5, 6, 7, 8]

    async def text_of(tokens: list[int]) -> str:
        r = await client.post("/detokenize", json={"tokens": tokens})
        return (await r.json())["text"]

    for side, kept in ((None, ids[-3:]), ("left", ids[-3:]), ("right", ids[:3])):
        status, body = await post(client, COMPLETIONS, prompt=ids, echo=True,
                                  truncate_prompt_tokens=3, truncation_side=side)
        assert status == 200, body
        assert body["usage"]["prompt_tokens"] == 3
        assert body["choices"][0]["text"].startswith(await text_of(kept))
    _, whole = await post(client, COMPLETIONS, prompt=ids)
    _, same = await post(client, COMPLETIONS, prompt=ids, truncate_prompt_tokens=-1)
    assert same["usage"] == whole["usage"] and answers(COMPLETIONS, same) == answers(
        COMPLETIONS, whole)
    status, body = await post(client, CHAT, truncate_prompt_tokens=5)
    assert status == 200 and body["usage"]["prompt_tokens"] == 5


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
async def test_stream_interval_batches_tokens(fake, route: str) -> None:
    """A chunk for the first token, then every stream_interval tokens, and the last; the text
    adds up to the whole answer's."""
    logprobs = {"logprobs": True} if route == CHAT else {"logprobs": 0}
    fields = {"max_tokens": 10, **logprobs}
    _, whole = await post(fake, route, **fields)
    r = await fake.post(route, json=body_for(route, **fields, stream=True, stream_interval=4))
    choices = [e["choices"][0] for e in sse_events(await r.text()) if e["choices"]]
    if route == CHAT:
        sizes = [len(c["logprobs"]["content"]) for c in choices if c["logprobs"]]
        text = "".join(c["delta"].get("content") or "" for c in choices)
    else:
        sizes = [len(c["logprobs"]["tokens"]) for c in choices if c["logprobs"]]
        text = "".join(c["text"] for c in choices)
    assert sizes == [1, 4, 4, 1]
    assert text == answers(route, whole)[0]


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
async def test_continuous_usage_stats(fake, route: str) -> None:
    r = await fake.post(route, json=body_for(route, max_tokens=6, stream=True, stream_options={
        "include_usage": True, "continuous_usage_stats": True}))
    events = sse_events(await r.text())
    assert r.status == 200 and all(e["usage"] is not None for e in events)
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[-1] == 6
    assert all(e["usage"]["prompt_tokens"] == events[-1]["usage"]["prompt_tokens"]
               for e in events)


async def test_chat_echo(fake) -> None:
    """vLLM's chat echo: the answer starts with the last message's text when that message has
    the answer's role."""
    prefill = [{"role": "user", "content": "Hi"},
               {"role": "assistant", "content": [{"type": "text", "text": "The answer is"}]}]
    fields = {"messages": prefill, "continue_final_message": True}
    _, plain = await post(fake, CHAT, **fields)
    _, echoed = await post(fake, CHAT, **fields, echo=True)
    assert answers(CHAT, echoed) == ["The answer is" + answers(CHAT, plain)[0]]
    r = await fake.post(CHAT, json=body_for(CHAT, **fields, echo=True, stream=True))
    deltas = [e["choices"][0]["delta"] for e in sse_events(await r.text()) if e["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == answers(CHAT, echoed)[0]
    # after a user message the answer is the assistant's: nothing to echo
    _, body = await post(fake, CHAT, echo=True)
    _, without = await post(fake, CHAT)
    assert answers(CHAT, body) == answers(CHAT, without)


async def test_documents_and_reasoning_effort_reach_the_template(make_client) -> None:
    """Served to a chat template that reads them (as variables of those names); the default
    template reads neither, so there they are a 400 (test_bad_values_of_served_fields...)."""
    client = await make_client(trust_request_chat_template=True)
    template = ("{% for d in documents or [] %}[{{ d.text }}]{% endfor %}"
                "{% if reasoning_effort %}effort={{ reasoning_effort }};{% endif %}"
                "{% for m in messages %}{{ m.content }}{% endfor %}")

    async def prompt_tokens(**fields) -> int:
        status, body = await post(client, CHAT, chat_template=template, **fields)
        assert status == 200, body
        return body["usage"]["prompt_tokens"]

    async def count(text: str) -> int:
        r = await client.post("/tokenize", json={"text": text})
        return (await r.json())["count"]

    content = MESSAGES[0]["content"]
    assert await prompt_tokens() == await count(content)
    assert await prompt_tokens(documents=[{"title": "t", "text": "doc"}]) == \
        await count("[doc]" + content)
    assert await prompt_tokens(reasoning_effort="high") == await count("effort=high;" + content)


async def test_nulls_and_zero_top_logprobs_are_accepted(fake) -> None:
    """JSON null is "not given" for every field (booleans were a 400), and top_logprobs 0
    without logprobs asks for nothing (it was a 400)."""
    nulls = {"logprobs": None, "echo": None, "add_generation_prompt": None,
             "continue_final_message": None, "no_stop_trim": None, "include_stop_str_in_output":
             None, "add_special_tokens": None, "top_logprobs": None}
    status, body = await post(fake, CHAT, **nulls)
    assert status == 200 and body["choices"][0]["logprobs"] is None, body
    status, body = await post(fake, COMPLETIONS, echo=None, no_stop_trim=None)
    assert status == 200, body
    r = await fake.post(CHAT, json=body_for(CHAT, stream=True, stream_options={
        "include_usage": None}))
    assert r.status == 200 and all("usage" not in e for e in sse_events(await r.text()))
    status, body = await post(fake, CHAT, top_logprobs=0)
    assert status == 200 and body["choices"][0]["logprobs"] is None, body


async def test_continue_final_message_alone_continues(fake) -> None:
    """continue_final_message without add_generation_prompt (whose default it overrides) and
    with add_generation_prompt: false are served."""
    prefill = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]
    for extra in ({}, {"add_generation_prompt": False}):
        status, body = await post(fake, CHAT, messages=prefill, continue_final_message=True,
                                  **extra)
        assert status == 200, body


# ---------------------------------------------------------------- the prompt's name

@pytest.mark.parametrize("route, body, param", [
    (CHAT, {"messages": [{"role": "user", "content": "x" * 100}], "max_tokens": 1}, "messages"),
    (COMPLETIONS, {"prompt": "x" * 100, "max_tokens": 1}, "prompt"),
    (COMPLETIONS, {"prompt": [5] * 100, "max_tokens": 1}, "prompt"),
    ("/generate", {"text": "x" * 100, "sampling_params": {"max_new_tokens": 1}}, "text"),
    ("/generate", {"input_ids": [5] * 100, "sampling_params": {"max_new_tokens": 1}},
     "input_ids"),
    ("/generate", {"text": ["a", "x" * 100], "sampling_params": {"max_new_tokens": 1}}, "text"),
])
async def test_prompt_too_long_names_the_field_sent(make_client, route: str, body: dict,
                                                    param: str) -> None:
    """A prompt that leaves no room in the context is a 400 naming the field the prompt came
    in (the engine calls it `prompt`), on every route."""
    client = await make_client(context_length=64)
    r = await client.post(route, json=body)
    assert r.status == 400, await r.text()
    err = (await r.json())["error"]
    assert err["message"].startswith(f"{param}: "), err
    assert "context length of 64" in err["message"]
    if route != "/generate":
        assert err["param"] == param
    assert not client.app[ENGINE].requests


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
async def test_bad_words_reach_the_engine_as_token_sequences(fake, route: str) -> None:
    """vLLM's bad_words: each word as it opens a text and, where that is as many tokens, as it
    follows a space; every choice gets them; a blank or huge word, or a word that is not a
    string, is a 400 naming the field."""
    from api.openai import bad_words_ids

    engine = fake.app[ENGINE]
    tok = engine.tokenizer
    status, body = await post(fake, route, n=2, bad_words=["hello", " world"])
    assert status == 200, body
    want = bad_words_ids(["hello", " world"], tok)
    assert tok.encode("hello", add_special_tokens=False) in want
    assert tok.encode("world", add_special_tokens=False) in want
    assert [r.params.bad_words_ids for r in engine.submitted] == [want, want]
    for bad in ([""], ["   "], ["x" * 513], [5], "hello"):
        status, body = await post(fake, route, bad_words=bad)
        assert status == 400 and body["error"]["param"].startswith("bad_words"), (bad, body)
