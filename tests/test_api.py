"""The HTTP front end against the real engine on a tiny random Llama (CPU).

Shapes are compared with golden files (keys and types, not generated text). A few paths the
real engine cannot produce on demand use tests/_fake_engine.py (named in each test).
Set LORASERVE_UPDATE_GOLDEN=1 to rewrite the golden files.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
from pathlib import Path

import pytest

from api import create_app
from api.app import ENGINE
from metrics import ServingMetrics
from runtime.engine import Engine
from tests._fake_engine import FakeEngine, describe
from tests.models import make_model
from tests.served import server_config, sse_events

GOLDEN = Path(__file__).parent / "golden"


def check_golden(name: str, body: object) -> None:
    """Compare the shape of `body` with tests/golden/<name>.json."""
    path = GOLDEN / f"{name}.json"
    shape = describe(body)
    if os.environ.get("LORASERVE_UPDATE_GOLDEN") or not path.exists():
        path.write_text(json.dumps(shape, indent=1, sort_keys=True) + "\n")
    assert shape == json.loads(path.read_text()), f"shape of {name} changed"


GREEDY = {"max_new_tokens": 8, "temperature": 0}


# ---------------------------------------------------------------- native

async def test_health_and_model_info(client) -> None:
    r = await client.get("/health")
    assert r.status == 200 and await r.text() == "OK"
    r = await client.get("/health_generate")
    assert r.status == 200
    r = await client.get("/get_model_info")
    body = await r.json()
    assert body["is_generation"] is True and body["served_model_name"] == "tiny"
    check_golden("get_model_info", body)


async def test_generate_single(client) -> None:
    r = await client.post("/generate", json={"text": "Paris is", "sampling_params": GREEDY})
    assert r.status == 200
    body = await r.json()
    check_golden("generate", body)
    meta = body["meta_info"]
    assert meta["completion_tokens"] == len(body["output_ids"])
    assert meta["finish_reason"] in ({"type": "length", "length": 8},) or \
        meta["finish_reason"]["type"] == "stop"
    assert body["text"] == client.app[ENGINE].tokenizer.decode(body["output_ids"],
                                                                skip_special_tokens=True)


async def test_generate_batch_aligned_lists(client) -> None:
    r = await client.post("/generate", json={
        "text": ["List 3 countries.", "List 3 countries.", "x"],
        "sampling_params": [GREEDY, GREEDY, {"max_new_tokens": 2, "unknown_field": 1}],
        "lora_path": ["a1", None, "a1"],
        "rid": ["b0", "b1", "b2"],
    })
    assert r.status == 200, await r.text()
    body = await r.json()
    assert isinstance(body, list) and len(body) == 3
    assert [b["meta_info"]["id"] for b in body] == ["b0", "b1", "b2"]
    assert body[2]["meta_info"]["completion_tokens"] <= 2
    # same prompt and greedy: the adapter changes the output (random B, so almost surely)
    assert body[0]["output_ids"] != body[1]["output_ids"]


async def test_generate_input_ids_and_logprobs(client) -> None:
    r = await client.post("/generate", json={
        "input_ids": [[5, 6, 7], [8, 9]], "sampling_params": {"max_new_tokens": 3},
        "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2,
        "return_text_in_logprobs": True,
    })
    body = await r.json()
    assert r.status == 200, body
    check_golden("generate_logprobs", body[0])
    for item, prompt in zip(body, [[5, 6, 7], [8, 9]]):
        meta = item["meta_info"]
        assert [t for _, t, _ in meta["input_token_logprobs"]] == prompt
        assert meta["input_token_logprobs"][0][0] is None
        assert all(lp <= 0 for lp, _, _ in meta["input_token_logprobs"][1:])
        assert len(meta["input_top_logprobs"]) == len(prompt)
        assert all(len(t) == 2 for t in meta["input_top_logprobs"][1:])
    for b in body:
        out = b["meta_info"]["output_token_logprobs"]
        assert [t for _, t, _ in out] == b["output_ids"]
        assert all(len(top) == 2 for top in b["meta_info"]["output_top_logprobs"])
        assert b["meta_info"]["prompt_tokens"] in (2, 3)


async def test_generate_token_ids_logprob(client) -> None:
    """SGLang's token_ids_logprob: [logprob, id, text] for each given id, in its order, at each
    prompt position from logprob_start_len (its own entry null, as input_top_logprobs') and
    at each output token; a given id's entry is the log-prob the other lists give it there.
    A list of lists gives each input its own (an empty one: none)."""
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    first = await (await client.post("/generate", json={
        "input_ids": prompts, "sampling_params": {"max_new_tokens": 3, "temperature": 0},
        "return_logprob": True, "logprob_start_len": 0})).json()
    out = first[0]["output_ids"]
    body = {"input_ids": prompts, "sampling_params": {"max_new_tokens": 3, "temperature": 0},
            "return_logprob": True, "logprob_start_len": 0, "return_text_in_logprobs": True,
            "token_ids_logprob": [[7, out[1], 7, 8], []]}
    r = await client.post("/generate", json=body)
    answer = await r.json()
    assert r.status == 200, answer
    meta, plain = answer[0]["meta_info"], first[0]["meta_info"]
    assert answer[0]["output_ids"] == out
    assert "input_token_ids_logprobs" not in answer[1]["meta_info"]
    ids_in, ids_out = meta["input_token_ids_logprobs"], meta["output_token_ids_logprobs"]
    assert len(ids_in) == 4 and ids_in[0] is None
    assert [[t for _, t, _ in row] for row in ids_in[1:]] == [[7, out[1], 7, 8]] * 3
    assert ids_in[1][1][2] == (await (await client.post("/detokenize", json={
        "tokens": [out[1]]})).json())["text"]
    # prompt position 2 is token 7 and position 3 token 8: the entries the input lists hold
    assert ids_in[2][0][0] == ids_in[2][2][0] == pytest.approx(
        plain["input_token_logprobs"][2][0], abs=1e-6)
    assert ids_in[3][3][0] == pytest.approx(plain["input_token_logprobs"][3][0], abs=1e-6)
    assert len(ids_out) == 3 and all(len(row) == 4 for row in ids_out)
    assert ids_out[1][1][0] == pytest.approx(plain["output_token_logprobs"][1][0], abs=1e-6)
    # one list for every input; streamed chunks carry the ones so far
    r = await client.post("/generate", json=body | {"token_ids_logprob": [5], "stream": True,
                                                      "input_ids": prompts[0]})
    chunks = sse_events(await r.text())
    assert [len(c["meta_info"]["output_token_ids_logprobs"]) for c in chunks] == [1, 2, 3]
    assert all(row[0][1] == 5 for row in chunks[-1]["meta_info"]["output_token_ids_logprobs"])


@pytest.mark.parametrize("fields, message", [
    ({"token_ids_logprob": [5]}, "needs return_logprob"),
    ({"return_logprob": True, "token_ids_logprob": []}, "an empty list"),
    ({"return_logprob": True, "token_ids_logprob": [5, [6]]}, "mixes"),
    ({"return_logprob": True, "token_ids_logprob": [[5]]}, "1 lists for 2 inputs"),
    ({"return_logprob": True, "token_ids_logprob": [5, 10 ** 9]}, "token ids in [0,"),
    ({"return_logprob": True, "token_ids_logprob": [-1]}, "token ids in [0,"),
    ({"return_logprob": True, "token_ids_logprob": [5] * 129}, "at most 128"),
])
async def test_generate_token_ids_logprob_refused(client, fields: dict, message: str) -> None:
    r = await client.post("/generate", json={"input_ids": [[5, 6], [7, 8]], **fields})
    body = await r.json()
    assert r.status == 400 and message in body["error"]["message"], body
    assert "token_ids_logprob" in body["error"]["message"]


async def test_score_reads_the_labels_after_query_and_item(client) -> None:
    """SGLang's /v1/score: each item's label probabilities are exp of the log-probs /generate's
    token_ids_logprob gives after query + item (item + query with item_first), or with
    apply_softmax those normalised over the labels; `model` picks an adapter."""
    labels = [7, 30, 7]
    body = {"query": [5, 6, 7], "items": [[8, 9], [10]], "label_token_ids": labels}
    r = await client.post("/v1/score", json=body)
    answer = await r.json()
    assert r.status == 200, answer
    assert answer["object"] == "scoring" and len(answer["scores"]) == 2
    assert answer["usage"] == {"prompt_tokens": 9, "completion_tokens": 0, "total_tokens": 9}
    for item, scores in zip(body["items"], answer["scores"]):
        ref = await (await client.post("/generate", json={
            "input_ids": [5, 6, 7] + item, "return_logprob": True,
            "token_ids_logprob": labels,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0}})).json()
        want = [math.exp(lp) for lp, _, _ in ref["meta_info"]["output_token_ids_logprobs"][0]]
        assert scores == pytest.approx(want, rel=1e-5)
        assert scores[0] == scores[2] and sum(scores) < 1
    soft = (await (await client.post("/v1/score", json=body | {"apply_softmax": True})).json())
    for raw, norm in zip(answer["scores"], soft["scores"]):
        assert sum(norm) == pytest.approx(1.0)
        assert norm == pytest.approx([x / sum(raw) for x in raw], rel=1e-5)
    first = await (await client.post("/v1/score", json=body | {
        "item_first": True, "query": [8, 9], "items": [[5, 6, 7]]})).json()
    assert first["scores"][0] == pytest.approx(answer["scores"][0], rel=1e-5)  # its batch
    text = await (await client.post("/v1/score", json={
        "query": "The quick", "items": " brown", "label_token_ids": [5]})).json()
    whole = await (await client.post("/v1/score", json={
        "query": "The quick brown", "items": [""], "label_token_ids": [5]})).json()
    assert text["scores"] == whole["scores"] and len(text["scores"]) == 1
    lora = await (await client.post("/v1/score", json=body | {"model": "tiny:a1"})).json()
    assert lora["model"] == "tiny:a1" and lora["scores"] != answer["scores"]


@pytest.mark.parametrize("body, status, param", [
    ({"query": [5], "items": [[6]]}, 400, "label_token_ids"),
    ({"query": [5], "items": [[6]], "label_token_ids": []}, 400, "label_token_ids"),
    ({"query": [5], "items": [[6]], "label_token_ids": [10 ** 9]}, 400, "label_token_ids"),
    ({"query": [5], "items": [[6]], "label_token_ids": [1] * 129}, 400, "label_token_ids"),
    ({"items": [[6]], "label_token_ids": [1]}, 400, "query"),
    ({"query": [5], "items": [], "label_token_ids": [1]}, 400, "items"),
    ({"query": "a", "items": [[6]], "label_token_ids": [1]}, 400, "items"),
    ({"query": [5], "items": ["b"], "label_token_ids": [1]}, 400, "items"),
    ({"query": [5], "items": [[-1]], "label_token_ids": [1]}, 400, "items"),
    ({"query": [5], "items": [[6]], "label_token_ids": [1], "model": "tiny:nope"}, 404,
     "model"),
    ({"query": [5] * 100_000, "items": [[6]], "label_token_ids": [1]}, 400, None),
])
async def test_score_refuses_bad_bodies(client, body: dict, status: int, param) -> None:
    r = await client.post("/v1/score", json=body)
    answer = await r.json()
    assert r.status == status, answer
    assert answer["error"]["message"]
    if param:
        assert answer["error"]["param"] == param, answer
    assert not client.app[ENGINE].requests


async def test_generate_stream(client) -> None:
    r = await client.post("/generate", json={"text": "Hello", "sampling_params": GREEDY,
                                             "stream": True})
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    chunks = sse_events(await r.text())
    check_golden("generate_stream_chunk", chunks[0])
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))  # cumulative
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"] is not None
    plain = await (await client.post("/generate", json={"text": "Hello",
                                                        "sampling_params": GREEDY})).json()
    assert chunks[-1]["text"] == plain["text"] and chunks[-1]["output_ids"] == plain["output_ids"]


async def test_generate_stream_batch_has_index(client) -> None:
    r = await client.post("/generate", json={"text": ["a", "b"], "stream": True,
                                             "sampling_params": {"max_new_tokens": 3}})
    chunks = sse_events(await r.text())
    assert {c["index"] for c in chunks} == {0, 1}
    assert sum(c["meta_info"]["finish_reason"] is not None for c in chunks) == 2


async def test_stop_string_is_cut(client) -> None:
    long = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}
    full = (await (await client.post("/generate", json={"text": "The quick",
                                                        "sampling_params": long})).json())
    text = full["text"]
    stop = next((text[i:i + 2] for i in range(2, len(text) - 2)
                 if text[i:i + 2].isascii() and text[i:i + 2].strip()), None)
    if stop is None:
        pytest.skip(f"no ASCII stop candidate in {text!r}")
    r = await client.post("/generate", json={"text": "The quick",
                                             "sampling_params": {**long, "stop": stop}})
    body = await r.json()
    assert body["text"] == text[:text.index(stop)]
    assert body["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    kept = await (await client.post("/generate", json={
        "text": "The quick", "sampling_params": {**long, "stop": [stop], "no_stop_trim": True},
    })).json()
    assert stop in kept["text"]


async def test_tokenize_detokenize(client) -> None:
    r = await client.post("/tokenize", json={"text": "hello world"})
    body = await r.json()
    check_golden("tokenize", body)
    assert body["count"] == len(body["tokens"])
    r = await client.post("/detokenize", json={"tokens": body["tokens"]})
    assert (await r.json())["text"] == "hello world"
    r = await client.post("/tokenize", json={"prompt": ["a", "bb"]})
    assert len((await r.json())["tokens"]) == 2
    r = await client.post("/detokenize", json={"tokens": [10**9]})
    assert r.status == 400


async def test_tokenize_messages_as_vllm(client) -> None:
    """vLLM's chat form of /tokenize: messages rendered as /v1/chat/completions renders them
    (the same prompt token count), with or without the generation prompt; return_token_strs
    adds each token's string; text and messages together, or a request's own template on a
    server that does not trust them, are 400s."""
    messages = [{"role": "user", "content": "Paris is"}]
    r = await client.post("/tokenize", json={"messages": messages, "return_token_strs": True})
    body = await r.json()
    assert r.status == 200, body
    chat = await (await client.post("/v1/chat/completions", json={
        "messages": messages, "max_tokens": 1})).json()
    assert body["count"] == len(body["tokens"]) == chat["usage"]["prompt_tokens"]
    tok = client.app[ENGINE].tokenizer
    assert body["token_strs"] == tok.convert_ids_to_tokens(body["tokens"])
    bare = await (await client.post("/tokenize", json={
        "messages": messages, "add_generation_prompt": False})).json()
    assert bare["count"] < body["count"] and body["tokens"][:bare["count"]] == bare["tokens"]
    text = await (await client.post("/tokenize", json={"text": ["a", "bb"],
                                                       "return_token_strs": True})).json()
    assert text["token_strs"] == [tok.convert_ids_to_tokens(t) for t in text["tokens"]]
    for bad, param in (({"text": "a", "messages": messages}, "messages"),
                       ({"messages": messages, "chat_template": "{{ 1 }}"}, "chat_template"),
                       ({"messages": [{"content": "x"}]}, "messages.0.role")):
        r = await client.post("/tokenize", json=bad)
        message = (await r.json())["error"]["message"]
        assert r.status == 400 and message.startswith(param.replace(".0.", "[0].")), message


async def test_ids_of_a_padded_vocabulary(aiohttp_client, tiny, tmp_path) -> None:
    """A model whose vocabulary is padded past its tokenizer's (324 against 320) can emit the
    padding ids: /detokenize and a completion's prompt ids take them (they decode to nothing),
    as /generate's input_ids do; ids past the model's vocabulary stay a 400."""
    model = make_model(tmp_path / "padded", vocab_size=324)
    config = server_config((model, tiny[1]), lora_paths=(), enable_lora=False)
    metrics = ServingMetrics()
    client = await aiohttp_client(create_app(Engine.from_config(config, metrics), config, metrics))
    r = await client.post("/detokenize", json={"tokens": [321, 323]})
    assert r.status == 200 and (await r.json())["text"] == ""
    for route, body in (("/v1/completions", {"prompt": [5, 322], "max_tokens": 1}),
                        ("/generate", {"input_ids": [5, 322], "sampling_params": {
                            "max_new_tokens": 1}})):
        assert (await client.post(route, json=body)).status == 200, route
    r = await client.post("/detokenize", json={"tokens": [324]})
    assert r.status == 400
    r = await client.post("/v1/completions", json={"prompt": [324], "max_tokens": 1})
    assert r.status == 400 and (await r.json())["error"]["param"] == "prompt"


async def test_abort_request(client) -> None:
    body = {"text": "x", "rid": "long-1", "stream": True,
            "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
    resp = await client.post("/generate", json=body)
    first = await resp.content.readuntil(b"\n\n")  # the request is running
    assert first.startswith(b"data: ")
    r = await client.post("/abort_request", json={"rid": "long-1"})
    assert (await r.json()) == {"success": True}
    chunks = sse_events(first.decode() + (await resp.text()))
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    r = await client.post("/abort_request", json={"rid": "nope"})
    assert (await r.json()) == {"success": False}


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b'{"text": "x", "sampling_params": {"max_new_tokens": "8"}}',
     "sampling_params.max_new_tokens"),
    (b'{"text": 5}', "text"),
    (b'{"text": "x", "sampling_params": {"temperature": -1}}', "temperature"),
    (b'{"text": "x", "sampling_params": {"top_p": 0}}', "top_p"),
    (b'{"text": "x", "input_ids": [1]}', "text"),
    (b'{}', "text"),
    (b'{"input_ids": []}', "input_ids"),
    (b'{"input_ids": [1, [2]]}', "input_ids"),
    (b'{"text": ["a", "b"], "lora_path": ["a1"]}', "lora_path"),
    (b'{"text": ["a", "b"], "rid": ["same", "same"]}', "rid"),
    (b'{"text": "x", "lora_path": "no-such-adapter"}', "lora_path"),
    (b'{"text": "x", "top_logprobs_num": 99}', "top_logprobs_num"),
    (b'[1, 2]', None),
])
async def test_generate_client_errors(client, body: bytes, param: str | None) -> None:
    r = await client.post("/generate", data=body, headers={"Content-Type": "application/json"})
    assert r.status == 400
    err = (await r.json())["error"]
    assert err["code"] == 400 and err["message"]
    if param is not None:
        assert param in err["message"]
    check_golden("native_error", await r.json())


async def test_prompt_too_long_is_400(client) -> None:
    r = await client.post("/generate", json={"input_ids": [5] * 600})
    assert r.status == 400 and "prompt" in (await r.json())["error"]["message"]


async def test_body_too_large_413(make_client) -> None:
    client = await make_client(max_request_bytes=1024)
    r = await client.post("/generate", json={"text": "x" * 4096})
    assert r.status == 413
    assert (await r.json())["error"]["code"] == 413
    r = await client.post("/v1/completions", json={"prompt": "x" * 4096})
    assert r.status == 413 and (await r.json())["error"]["type"] == "invalid_request_error"


async def test_unknown_route_and_method(client) -> None:
    r = await client.get("/nope")
    assert r.status == 404 and (await r.json())["error"]["code"] == 404
    r = await client.get("/generate")
    assert r.status == 405 and "Allow" in r.headers


async def test_stopped_engine_503(client) -> None:
    await client.app[ENGINE].stop()
    r = await client.post("/generate", json={"text": "x"})
    assert r.status == 503 and r.headers["Retry-After"].isdigit()
    r = await client.post("/v1/completions", json={"prompt": "x"})
    assert r.status == 503 and (await r.json())["error"]["type"] == "service_unavailable"


async def test_queue_full_503(make_client) -> None:
    # Fake engine: the real one admits too quickly to hold its queue full on demand.
    client = await make_client(engine_cls=FakeEngine, max_queued_requests=1)
    client.app[ENGINE].hold.clear()
    first = asyncio.create_task(client.post("/generate", json={"text": "x"}))
    await asyncio.sleep(0.05)
    r = await client.post("/generate", json={"text": "y"})
    assert r.status == 503 and r.headers["Retry-After"] == "1"
    assert (await r.json())["error"]["message"]
    client.app[ENGINE].hold.set()
    assert (await first).status == 200


async def test_request_larger_than_the_queue_is_400(make_client) -> None:
    """A request of more generations than the server ever queues fails at once with a 400
    (a 503 would have the client retry forever); the server then serves as before."""
    client = await make_client(max_queued_requests=3)
    for route, body in (("/generate", {"text": ["a", "b", "c", "d"]}),
                        ("/v1/completions", {"prompt": ["a", "b"], "n": 2, "max_tokens": 1}),
                        ("/v1/chat/completions", {"n": 4, "max_tokens": 1,
                                                  "messages": [{"role": "user", "content": "a"}]})):
        r = await client.post(route, json=body)
        assert r.status == 400, (route, await r.text())
        assert "max_queued_requests" in await r.text()
    r = await client.post("/v1/completions", json={"prompt": ["a"], "n": 3, "max_tokens": 1})
    assert r.status == 200 and len((await r.json())["choices"]) == 3


@pytest.mark.parametrize("stream", [False, True])
async def test_disconnect_aborts(make_client, stream: bool) -> None:
    # Fake engine: a request that waits forever, so only the disconnect can end it.
    client = await make_client(engine_cls=FakeEngine)
    engine = client.app[ENGINE]
    engine.hold.clear()
    task = asyncio.create_task(client.post("/generate", json={"text": "x", "stream": stream}))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if engine.live:
            break
    assert len(engine.live) == 1
    if stream:  # the response (headers) arrived: close its connection
        (await task).close()
    else:
        task.cancel()
    for _ in range(200):
        await asyncio.sleep(0.01)
        if not engine.live:
            break
    assert not engine.live  # aborted


async def test_real_disconnect_aborts(client) -> None:
    engine = client.app[ENGINE]
    task = asyncio.create_task(client.post("/generate", json={
        "text": "x", "sampling_params": {"max_new_tokens": 450, "ignore_eos": True}}))
    for _ in range(200):
        await asyncio.sleep(0.01)
        if engine.requests:
            break
    req = next(iter(engine.requests.values()))
    task.cancel()
    for _ in range(300):
        await asyncio.sleep(0.01)
        if req.is_finished:
            break
    assert req.is_finished and req.num_output_tokens < 450


# ---------------------------------------------------------------- OpenAI

async def test_completions(client) -> None:
    r = await client.post("/v1/completions", json={"model": "tiny", "prompt": "Paris is",
                                                   "max_tokens": 5, "temperature": 0})
    body = await r.json()
    assert r.status == 200, body
    check_golden("completion", body)
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["usage"]["completion_tokens"] <= 5
    assert body["usage"]["total_tokens"] == (body["usage"]["prompt_tokens"]
                                             + body["usage"]["completion_tokens"])


async def test_completions_n_logprobs_and_token_prompts(client) -> None:
    r = await client.post("/v1/completions", json={
        "model": "tiny:a1", "prompt": [[5, 6, 7], [8, 9]], "n": 2, "max_tokens": 3,
        "logprobs": 2, "seed": 7, "echo": True,
    })
    body = await r.json()
    assert r.status == 200, body
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    check_golden("completion_logprobs", body["choices"][0])
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"])
    assert body["usage"]["prompt_tokens"] == 5  # each prompt once, whatever n


async def test_completions_stream_with_usage(client) -> None:
    r = await client.post("/v1/completions", json={
        "prompt": "Hi", "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": True}})
    events = sse_events(await r.text())
    check_golden("completion_chunk", events[0])
    assert all(e["object"] == "text_completion" for e in events)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] <= 4
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


async def test_chat(client) -> None:
    r = await client.post("/v1/chat/completions", json={
        "model": "a1", "messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": [{"type": "text",
                                                                  "text": "Hi"}]}],
        "max_completion_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2})
    body = await r.json()
    assert r.status == 200, body
    check_golden("chat_completion", body)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    assert all(len(c["top_logprobs"]) == 2 for c in content)


async def test_chat_stream(client) -> None:
    r = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True,
        "n": 2, "stream_options": {"include_usage": True}})
    events = sse_events(await r.text())
    check_golden("chat_chunk_first", events[0])
    assert events[0]["object"] == "chat.completion.chunk"
    firsts = [e for e in events if e["choices"] and "role" in e["choices"][0]["delta"]]
    assert sorted(e["choices"][0]["index"] for e in firsts) == [0, 1]
    finals = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert sorted(e["choices"][0]["index"] for e in finals) == [0, 1]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] > 0


async def test_chat_custom_template_and_errors(make_client) -> None:
    client = await make_client(trust_request_chat_template=True)
    r = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ suffix }}",
        "chat_template_kwargs": {"suffix": ":"}})
    assert r.status == 200
    r = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}],
        "chat_template": "{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}"})
    assert r.status == 400
    r = await client.post("/v1/chat/completions", json={"messages": []})
    assert r.status == 400
    err = (await r.json())["error"]
    assert set(err) == {"message", "type", "param", "code"}
    check_golden("openai_error", await r.json())
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user",
                                                                      "content": 5}]})
    assert r.status == 400
    r = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"})
    assert r.status == 400 and (await r.json())["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("model", ["nope", "tiny:nope", "other-base:a1"])
async def test_unknown_model_404(client, model: str) -> None:
    r = await client.post("/v1/completions", json={"model": model, "prompt": "x"})
    assert r.status == 404
    err = (await r.json())["error"]
    assert err["code"] == "model_not_found" and "does not exist" in err["message"]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
async def test_unknown_model_404_without_lora(make_client, route: str) -> None:
    # A server without LoRA has no adapters: an unknown `model` is OpenAI's 404, as with LoRA
    # on (it was a 400 naming `lora_path`, a field the request never sent).
    client = await make_client(enable_lora=False, lora_paths=())
    body = {"model": "gpt-4", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}
    r = await client.post(route, json=body)
    assert r.status == 404, await r.text()
    err = (await r.json())["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "`gpt-4` does not exist" in err["message"]
    r = await client.post(route, json={**body, "model": "tiny", "max_tokens": 1})
    assert r.status == 200
    r = await client.post("/generate", json={"text": "x", "lora_path": "a1"})
    assert r.status == 400
    assert (await r.json())["error"]["message"].startswith("lora_path:")


@pytest.mark.parametrize("body, param, message", [
    ({"max_completion_tokens": -1}, "max_completion_tokens", "max_completion_tokens: must be"),
    ({"max_completion_tokens": 1 << 30, "max_tokens": 5}, "max_completion_tokens",
     "max_completion_tokens: must be"),
    ({"max_tokens": -1}, "max_tokens", "max_tokens: must be"),
    ({"max_completion_tokens": 2, "min_tokens": 5}, "min_tokens",
     "min_tokens: must not exceed max_completion_tokens"),
    ({"max_tokens": 2, "min_tokens": 5}, "min_tokens", "min_tokens: must not exceed max_tokens"),
])
async def test_chat_errors_name_the_field_sent(client, body: dict, param: str,
                                               message: str) -> None:
    r = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], **body})
    assert r.status == 400
    err = (await r.json())["error"]
    assert err["param"] == param and err["message"].startswith(message), err
    assert "max_new_tokens" not in err["message"]


async def test_openai_lora_path_names_the_adapter(client) -> None:
    """SGLang's `lora_path` on the OpenAI routes: what `model` "<base>:<adapter>" gives, per
    prompt in a list, with `model`'s adapter winning; an unknown one is refused."""
    async def texts(route: str, **body) -> list[tuple[str, list[float]]]:
        """Each choice's text and token log-probs (the tiny adapter moves these, not always
        the argmax)."""
        if route == "chat":
            body |= {"messages": [{"role": "user", "content": "Say something"}], "logprobs": True}
        else:
            body = {"prompt": "Say something", "logprobs": 0} | body
        r = await client.post(f"/v1/{'chat/completions' if route == 'chat' else 'completions'}",
                              json={"max_tokens": 6, "temperature": 0, **body})
        assert r.status == 200, await r.text()
        choices = (await r.json())["choices"]
        if route == "chat":
            return [(c["message"]["content"], [t["logprob"] for t in c["logprobs"]["content"]])
                    for c in choices]
        return [(c["text"], c["logprobs"]["token_logprobs"]) for c in choices]

    def same(a: list[tuple[str, list[float]]], b: list[tuple[str, list[float]]]) -> bool:
        """Same texts, log-probs within 1e-4 (a batch sums in another order)."""
        return len(a) == len(b) and all(
            ta == tb and max(abs(x - y) for x, y in zip(la, lb)) < 1e-4
            for (ta, la), (tb, lb) in zip(a, b))

    for route in ("chat", "completions"):
        adapter = await texts(route, model="tiny:a1")
        base = await texts(route, model="tiny")
        assert not same(adapter, base)  # the adapter changes the output
        assert same(await texts(route, lora_path="a1"), adapter)
        assert same(await texts(route, model="tiny", lora_path="a1"), adapter)
        assert same(await texts(route, model="default", lora_path="a1"), adapter)  # SGLang's
        assert same(await texts(route, model="tiny:a1", lora_path="nope"), adapter)  # model wins
        assert same(await texts(route, lora_path=["a1"]), adapter)
    # completions (the loop's last route): a prompt list takes a list, one adapter each
    both = await texts("completions", prompt=["Say something"] * 3, lora_path=["a1", None, ""])
    assert same(both, adapter + base + base)
    r = await client.post("/v1/completions", json={"prompt": ["x", "y"], "lora_path": ["a1"]})
    assert r.status == 400 and (await r.json())["error"]["param"] == "lora_path"
    r = await client.post("/v1/completions", json={"prompt": "x", "lora_path": "nope"})
    assert r.status == 400 and (await r.json())["error"]["param"] == "lora_path"


async def test_request_chat_template_needs_trust(client) -> None:
    """A chat template is code the server runs: refused unless the server trusts them, and the
    server goes on serving."""
    r = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
        "chat_template": "{% for i in range(10**9) %}{% endfor %}"})
    assert r.status == 400 and (await r.json())["error"]["param"] == "chat_template"
    r = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert r.status == 200


async def test_long_prompts_are_tokenized_off_the_loop(client) -> None:
    """Tokenizing megabytes of text takes a while; it runs in the tokenizer thread, so the
    event loop (every stream, the engine) goes on meanwhile."""
    import time

    ticks: list[float] = []

    async def tick() -> None:
        while True:
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.005)

    ticker = asyncio.create_task(tick())
    try:
        await asyncio.sleep(0.02)
        t0 = time.perf_counter()
        r = await client.post("/generate", json={"text": "ab cd, ef! " * 200_000})
        took = time.perf_counter() - t0
        assert r.status == 400 and "context" in (await r.json())["error"]["message"]
    finally:
        ticker.cancel()
    gaps = [b - a for a, b in itertools.pairwise(ticks) if b > t0]
    assert took > 0.2, f"the prompt tokenized in {took:.3f} s: too short to tell"
    assert max(gaps) < took / 2, (max(gaps), took)


@pytest.mark.parametrize("route, body, param", [
    ("completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("chat", {"logit_bias": {"100000": 1}}, "logit_bias"),
    ("completions", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat", {"functions": [{"name": "f"}]}, "functions"),
    ("completions", {"suffix": " end"}, "suffix"),
    ("completions", {"best_of": 3, "n": 2}, "best_of"),
    ("chat", {"max_tokens": 2**40}, "max_tokens"),
    ("completions", {"min_tokens": -1}, "min_tokens"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),
    ("chat", {"regex": "[ab]+"}, "regex"),
    ("completions", {"json_schema": "{}"}, "json_schema"),
    ("completions", {"ebnf": "root ::= 'a'"}, "ebnf"),
    ("chat", {"structural_tag": "{}"}, "structural_tag"),
    ("completions", {"stop_regex": ["a+"]}, "stop_regex"),
    ("chat", {"custom_logit_processor": "x"}, "custom_logit_processor"),
])
async def test_openai_fields_refused_by_their_name(client, route: str, body: dict,
                                                   param: str) -> None:
    """A field that would change the answer and that loraserve does not implement is a 400
    naming it, as is a bad value, under the name the request used (not served as if absent)."""
    if route == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]} | body
    else:
        path, body = "/v1/completions", {"prompt": "x"} | body
    r = await client.post(path, json={"max_tokens": 2} | body)
    err = (await r.json())["error"]
    assert r.status == 400 and err["param"] == param and err["message"].startswith(param), err


async def test_logit_bias_on_both_apis(client) -> None:
    """logit_bias (token ids as strings): +100 on one id makes every greedy token that id."""
    r = await client.post("/v1/completions", json={
        "prompt": "x", "max_tokens": 4, "temperature": 0, "logit_bias": {"42": 100}})
    assert r.status == 200
    r = await client.post("/generate", json={"text": "x", "sampling_params": {
        "max_new_tokens": 4, "temperature": 0, "logit_bias": {"42": 100}}})
    assert (await r.json())["output_ids"] == [42] * 4
    r = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "temperature": 0,
        "logprobs": True, "logit_bias": {"42": 100}})
    ids = [t["token"] for t in (await r.json())["choices"][0]["logprobs"]["content"]]
    assert len(ids) == 3 and len(set(ids)) == 1


async def test_allowed_token_ids_on_the_openai_routes(client) -> None:
    """vLLM's allowed_token_ids: every token chosen, greedy and sampled, is one of them, on
    both routes; bad lists, and one that min_tokens would leave empty, are a 400 naming it."""
    from api.tokenbytes import TokenBytes

    engine = client.app[ENGINE]
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 6, "ignore_eos": True}
    r = await client.post("/v1/completions", json={
        "prompt": "x", "max_tokens": 4, "temperature": 0, "allowed_token_ids": [42]})
    assert (await r.json())["choices"][0]["text"] == engine.tokenizer.decode([42] * 4)
    token_bytes = TokenBytes(engine.tokenizer)
    allowed = [42, 43, 97, 120]
    plain = await (await client.post("/v1/chat/completions", json=chat | {
        "temperature": 0, "logprobs": True})).json()
    own = {tuple(token_bytes(t)) for t in allowed}
    assert {tuple(t["bytes"]) for t in plain["choices"][0]["logprobs"]["content"]} - own
    for temperature in (0, 1.5):
        body = await (await client.post("/v1/chat/completions", json=chat | {
            "temperature": temperature, "n": 3, "seed": 7, "logprobs": True,
            "allowed_token_ids": allowed})).json()
        for choice in body["choices"]:
            got = [tuple(t["bytes"]) for t in choice["logprobs"]["content"]]
            assert len(got) == 6 and set(got) <= own, (temperature, got)
    eos = sorted(engine.eos_token_ids)
    for bad in ([], [10**6], "42", [1.5]):
        r = await client.post("/v1/completions", json={
            "prompt": "x", "max_tokens": 2, "allowed_token_ids": bad})
        err = (await r.json())["error"]
        assert r.status == 400 and err["param"].startswith("allowed_token_ids"), (bad, err)
    r = await client.post("/v1/chat/completions", json=chat | {
        "allowed_token_ids": eos, "min_tokens": 2})
    err = (await r.json())["error"]
    assert r.status == 400 and err["param"] == "allowed_token_ids", err
    assert "minimum of new tokens" in err["message"], err


async def test_openai_accepts_neutral_values_and_wraps_seeds(client) -> None:
    for body in ({"response_format": {"type": "text"}, "tools": [], "logit_bias": {},
                  "tool_choice": "none", "stop_regex": []},
                 {"best_of": 2, "n": 2, "suffix": ""},
                 {"seed": 2**64 - 1, "n": 2, "temperature": 1.0}):
        r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2} | body)
        assert r.status == 200, (body, await r.text())


async def test_streamed_text_offsets_equal_the_whole_answers(client) -> None:
    """A streamed completion's logprobs give each token the text offset the non-streamed
    answer gives it, also where a chunk holds back bytes of an unfinished character."""
    body = {"prompt": "Say", "max_tokens": 24, "temperature": 0, "logprobs": 0, "echo": True}
    whole = (await (await client.post("/v1/completions", json=body)).json())["choices"][0]
    r = await client.post("/v1/completions", json=body | {"stream": True})
    streamed = [e["choices"][0]["logprobs"] for e in sse_events(await r.text())
                if e["choices"] and e["choices"][0]["logprobs"]]
    assert [o for lp in streamed for o in lp["text_offset"]] == whole["logprobs"]["text_offset"]
    assert [t for lp in streamed for t in lp["tokens"]] == whole["logprobs"]["tokens"]
    assert [x for lp in streamed for x in lp["token_logprobs"]] == \
        whole["logprobs"]["token_logprobs"]


async def test_echo_logprobs_score_the_prompt(client) -> None:
    """`echo` with `logprobs`: the prompt's tokens come first with their own log-probs (the
    first token has none), as OpenAI answers it, and the output's follow."""
    prompt = "The quick brown fox"
    ids = (await (await client.post("/tokenize", json={"text": prompt})).json())["tokens"]
    body = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": 2}
    plain = (await (await client.post("/v1/completions", json=body)).json())["choices"][0]
    echoed = (await (await client.post("/v1/completions", json=body | {"echo": True}))
              .json())["choices"][0]
    lp, k = echoed["logprobs"], len(ids)
    assert echoed["text"] == prompt + plain["text"]
    assert "".join(lp["tokens"][:k]) == prompt and lp["tokens"][k:] == plain["logprobs"]["tokens"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:k])
    assert all(len(t) >= 1 for t in lp["top_logprobs"][1:k])
    # every offset, the output's too, runs over the tokens' own texts
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
    # without echo no prompt row is scored: the output's come from a smaller lm_head batch,
    # equal within rounding
    assert all(abs(a - b) < 1e-4
               for a, b in zip(lp["token_logprobs"][k:], plain["logprobs"]["token_logprobs"],
                               strict=True))


async def test_prompt_logprobs_as_vllm_answers_them(client) -> None:
    """vLLM's prompt_logprobs: per choice on completions, at the answer's top level on chat;
    null for the first prompt token, then {token id: {logprob, rank, decoded_token}} for the
    prompt token (its logprob the echo's) and its k likeliest (ranks 1..k); an echo's own
    logprobs keep their own number of candidates."""
    prompt = "The quick brown fox"
    ids = (await (await client.post("/tokenize", json={"text": prompt})).json())["tokens"]
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "logprobs": 1, "echo": True,
            "prompt_logprobs": 3}
    r = await client.post("/v1/completions", json=body)
    assert r.status == 200, await r.text()
    choice = (await r.json())["choices"][0]
    lps, echo = choice["prompt_logprobs"], choice["logprobs"]
    assert len(lps) == len(ids) and lps[0] is None
    assert all(len(t) == 1 for t in echo["top_logprobs"][1:])  # logprobs: 1, not 3
    for i in range(1, len(ids)):
        entry = lps[i]
        own = entry[str(ids[i])]
        assert own["logprob"] == pytest.approx(echo["token_logprobs"][i], abs=1e-6)
        assert own["decoded_token"] == echo["tokens"][i]
        tops = [v for k, v in entry.items() if k != str(ids[i])]
        assert len(entry) in (3, 4) and all(isinstance(v["decoded_token"], str)
                                            for v in entry.values())
        ranked = sorted(entry.values(), key=lambda v: v["rank"])
        assert [v["logprob"] for v in ranked] == sorted((v["logprob"] for v in ranked),
                                                        reverse=True)
        likelier = sum(v["logprob"] > own["logprob"] for v in tops)
        assert own["rank"] == likelier + 1 if own["rank"] <= 3 else likelier == 3
    # without echo and logprobs: the same prompt_logprobs, and no logprobs
    plain = (await (await client.post("/v1/completions", json={
        "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 0})).json())["choices"][0]
    assert plain["logprobs"] is None and plain["prompt_logprobs"][0] is None
    assert [list(e) for e in plain["prompt_logprobs"][1:]] == [[str(t)] for t in ids[1:]]
    assert [e[str(t)]["rank"] for e, t in zip(plain["prompt_logprobs"][1:], ids[1:])] == \
        [lps[i][str(ids[i])]["rank"] for i in range(1, len(ids))]
    # chat: one list for the prompt, whatever n
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "n": 2,
            "prompt_logprobs": 1}
    r = await client.post("/v1/chat/completions", json=chat)
    answer = await r.json()
    assert r.status == 200, answer
    assert len(answer["prompt_logprobs"]) == answer["usage"]["prompt_tokens"]  # counted once
    assert answer["prompt_logprobs"][0] is None
    assert all(1 <= len(e) <= 2 for e in answer["prompt_logprobs"][1:])
    assert "prompt_logprobs" not in answer["choices"][0]


# ---------------------------------------------------------------- context length

CHAT_X = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("route, body, param", [
    ("/generate", {"input_ids": [5] * 60, "sampling_params": {"max_new_tokens": 5}},
     "max_new_tokens"),
    ("/v1/completions", {"prompt": [5] * 60, "max_tokens": 5}, "max_tokens"),
    ("/v1/completions", {"prompt": [5] * 60}, "max_tokens"),  # OpenAI's default of 16
    ("/v1/chat/completions", {"messages": CHAT_X, "max_tokens": 64}, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT_X, "max_tokens": 1,
                              "max_completion_tokens": 64}, "max_completion_tokens"),
])
async def test_new_tokens_past_the_context_are_400(make_client, route: str, body: dict,
                                                   param: str) -> None:
    """Prompt + requested new tokens over the context: a 400 naming the field the client
    sent (or, for the completions default, would have), not an answer cut short."""
    client = await make_client(context_length=64)
    r = await client.post(route, json=body)
    assert r.status == 400, await r.text()
    err = (await r.json())["error"]
    assert err["message"].startswith(f"{param}: ") and "context length of 64" in err["message"]
    assert "max_new_tokens" not in err["message"] or param == "max_new_tokens"
    if route != "/generate":
        assert err["param"] == param
    assert not client.app[ENGINE].requests


async def test_unset_limits_run_up_to_the_context(make_client) -> None:
    """A native request without max_new_tokens and a chat request without max_tokens still
    generate up to the context; a request that fits exactly runs."""
    client = await make_client(context_length=64)
    r = await client.post("/generate", json={"input_ids": [5] * 60, "sampling_params": {
        "ignore_eos": True}})
    meta = (await r.json())["meta_info"]
    assert r.status == 200 and meta["finish_reason"] == {"type": "length", "length": 4}
    r = await client.post("/v1/chat/completions", json={"messages": CHAT_X, "ignore_eos": True})
    use = (await r.json())["usage"]
    assert r.status == 200 and use["prompt_tokens"] + use["completion_tokens"] == 64
    r = await client.post("/v1/completions", json={"prompt": [5] * 60, "max_tokens": 4,
                                                   "ignore_eos": True})
    assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 4


async def test_allow_auto_truncate(make_client) -> None:
    """--allow-auto-truncate: requested new tokens past the context are lowered to the room
    left, and a prompt past the context keeps its first context - 1 tokens."""
    client = await make_client(context_length=64, allow_auto_truncate=True)
    r = await client.post("/v1/completions", json={"prompt": [5] * 60, "max_tokens": 50,
                                                   "ignore_eos": True})
    body = await r.json()
    assert r.status == 200 and body["usage"]["completion_tokens"] == 4
    assert body["choices"][0]["finish_reason"] == "length"
    r = await client.post("/generate", json={"input_ids": list(range(3, 103)), "sampling_params":
                                             {"max_new_tokens": 8, "ignore_eos": True}})
    meta = (await r.json())["meta_info"]
    assert r.status == 200 and (meta["prompt_tokens"], meta["completion_tokens"]) == (63, 1)


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": CHAT_X, "max_tokens": 1}),
])
async def test_stream_options_need_stream(client, route: str, body: dict) -> None:
    for stream in ({}, {"stream": False}):
        r = await client.post(route, json=body | stream | {
            "stream_options": {"include_usage": True}})
        assert r.status == 400
        err = (await r.json())["error"]
        assert err["param"] == "stream_options" and "stream" in err["message"]
    r = await client.post(route, json=body | {"stream_options": None})
    assert r.status == 200


# ---------------------------------------------------------------- aborts

def fail_launches(engine, after: int = 0) -> None:
    """Make every step launch after the first `after` raise, as an internal error would."""
    launch, calls = engine.runner.launch, itertools.count()

    def failing(*args, **kwargs):
        if next(calls) >= after:
            raise RuntimeError("boom")
        return launch(*args, **kwargs)

    engine.runner.launch = failing


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 4}),
    ("/v1/chat/completions", {"messages": CHAT_X, "max_tokens": 4}),
])
async def test_openai_abort_says_why(client, route: str, body: dict) -> None:
    """An aborted request on the OpenAI routes carries its reason: an error response when
    nothing was generated, streamed or not (a stream's status line waits for its first
    output: before, a stream aborted before it answered 200 and an error event, which clients
    do not retry as they do a status); streamed after some tokens, an error event before
    [DONE]."""
    engine = client.app[ENGINE]
    launch = engine.runner.launch
    for stream in (False, True):
        engine.runner.launch = launch
        fail_launches(engine)
        r = await client.post(route, json=body | {"stream": stream})
        assert r.status == 500, await r.text()
        assert r.content_type == "application/json"
        err = (await r.json())["error"]
        assert "boom" in err["message"] and err["type"] == "server_error"
        assert err["code"] == "request_aborted"
    engine.runner.launch = launch
    fail_launches(engine, after=3)  # prefill and two decode steps run
    r = await client.post(route, json=body | {"stream": True, "max_tokens": 16, "ignore_eos": True})
    assert r.status == 200
    events = sse_events(await r.text())
    assert "boom" in events[-1]["error"]["message"]
    texts = [e["choices"][0].get("text") or e["choices"][0].get("delta", {}).get("content")
             for e in events[:-1] if e["choices"]]
    assert any(texts), events  # tokens came before the abort
    finals = [e for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"]]
    assert [e["choices"][0]["finish_reason"] for e in finals] == ["abort"]


async def test_openai_abort_after_tokens_keeps_them(client) -> None:
    """Aborted after some tokens: the answer keeps them, and the choice says why."""
    fail_launches(client.app[ENGINE], after=3)
    r = await client.post("/v1/chat/completions", json={
        "messages": CHAT_X, "max_tokens": 20, "ignore_eos": True})
    body = await r.json()
    assert r.status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "abort" and body["usage"]["completion_tokens"] >= 1
    assert "boom" in choice["error"]["message"]


async def test_openai_client_sees_the_abort(client) -> None:
    openai = pytest.importorskip("openai")
    fail_launches(client.app[ENGINE])
    api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused",
                             max_retries=0)
    with pytest.raises(openai.InternalServerError, match="boom"):
        await api.chat.completions.create(model="tiny", max_tokens=3, messages=CHAT_X)
    with pytest.raises(openai.APIError, match="boom"):
        async for _ in await api.chat.completions.create(
                model="tiny", max_tokens=3, stream=True, messages=CHAT_X):
            pass
    await api.close()


async def test_models(client) -> None:
    r = await client.get("/v1/models")
    body = await r.json()
    check_golden("models", body)
    ids = {m["id"]: m for m in body["data"]}
    assert ids["tiny"]["parent"] is None and ids["a1"]["parent"] == "tiny"
    assert ids["a1"]["root"].endswith("adapter")
    assert (await client.get("/v1/models/a1")).status == 200
    assert (await client.get("/v1/models/zzz")).status == 404


async def test_openai_client(client) -> None:
    openai = pytest.importorskip("openai")
    api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused")
    out = await api.completions.create(model="tiny", prompt="Hi", max_tokens=3)
    assert out.choices[0].finish_reason in ("stop", "length")
    chat = await api.chat.completions.create(model="tiny:a1", max_tokens=3,
                                             messages=[{"role": "user", "content": "Hi"}])
    assert chat.usage.completion_tokens <= 3
    pieces = [c async for c in await api.chat.completions.create(
        model="tiny", max_tokens=3, stream=True, messages=[{"role": "user", "content": "Hi"}])]
    assert pieces[0].choices[0].delta.role == "assistant"
    with pytest.raises(openai.NotFoundError):
        await api.completions.create(model="missing", prompt="x")
    await api.close()


# ---------------------------------------------------------------- admin

async def test_load_unload_adapter(client, tiny) -> None:
    _, adapter = tiny
    r = await client.post("/load_lora_adapter", json={"lora_name": "a2", "lora_path":
                                                      str(adapter), "pinned": True})
    body = await r.json()
    assert r.status == 200, body
    check_golden("load_lora_adapter", body)
    assert body == {"success": True, "error_message": "",
                    "loaded_adapters": {"a1": str(adapter), "a2": str(adapter)}}
    r = await client.get("/lora_adapters")
    listing = await r.json()
    check_golden("lora_adapters", listing)
    assert {a["name"]: a["pinned"] for a in listing["adapters"]} == {"a1": False, "a2": True}
    r = await client.post("/generate", json={"text": "x", "lora_path": "a2",
                                             "sampling_params": {"max_new_tokens": 2}})
    assert r.status == 200
    r = await client.post("/v1/unload_lora_adapter", json={"lora_name": "a2"})
    assert r.status == 200 and "a2" not in (await r.json())["loaded_adapters"]


async def test_load_adapter_in_place(client, tiny, tmp_path) -> None:
    """vLLM's load_inplace on /load_lora_adapter: a loaded name is refused without it and
    replaced with it (the listing then holds the name once, from its new folder, and requests
    get the new weights); a bad folder in place leaves the old version serving."""
    import torch

    from tests._fake_engine import build_tiny_adapter

    model, adapter = tiny
    torch.manual_seed(77)
    other = build_tiny_adapter(model, tmp_path / "other")
    await client.post("/load_lora_adapter", json={"lora_name": "b", "lora_path": str(other)})
    ask = {"text": "x", "sampling_params": {"max_new_tokens": 6, "temperature": 0,
                                            "ignore_eos": True}}
    a1_ids = (await (await client.post("/generate", json=ask | {"lora_path": "a1"})).json())
    b_ids = (await (await client.post("/generate", json=ask | {"lora_path": "b"})).json())
    assert a1_ids["output_ids"] != b_ids["output_ids"]
    body = {"lora_name": "a1", "lora_path": str(other)}
    r = await client.post("/load_lora_adapter", json=body)
    assert r.status == 400 and "already loaded" in (await r.json())["error_message"]
    r = await client.post("/load_lora_adapter", json=body | {"lora_path": "/no/such/folder",
                                                             "load_inplace": True})
    assert r.status == 400 and (await r.json())["loaded_adapters"]["a1"] == str(adapter)
    r = await client.post("/v1/load_lora_adapter", json=body | {"load_inplace": True})
    out = await r.json()
    assert r.status == 200 and out["loaded_adapters"]["a1"] == str(other), out
    for _ in range(100):  # the replaced version, which no request held, is unloaded
        listing = (await (await client.get("/lora_adapters")).json())["adapters"]
        if len(listing) == 2:
            break
        await asyncio.sleep(0.01)
    assert sorted((a["name"], a["path"], a["replaced"]) for a in listing) == [
        ("a1", str(other), False), ("b", str(other), False)]
    # the per-tier gauges count it no more, with no traffic since to refresh them
    metrics = (await (await client.get("/metrics")).text()).splitlines()
    by_tier = [line for line in metrics if line.startswith("loraserve:lora_adapters{")]
    assert sum(float(line.split()[-1]) for line in by_tier) == 2, by_tier
    got = (await (await client.post("/generate", json=ask | {"lora_path": "a1"})).json())
    assert got["output_ids"] == b_ids["output_ids"]
    r = await client.post("/load_lora_adapter", json=body | {"load_inplace": "yes"})
    assert r.status == 400


@pytest.mark.parametrize("path, body", [
    ("/load_lora_adapter", {"lora_name": "bad", "lora_path": "/no/such/folder"}),
    ("/load_lora_adapter", {"lora_name": "a1", "lora_path": "/no/such/folder"}),
    ("/load_lora_adapter", {"lora_name": "x:y", "lora_path": "/tmp"}),
    ("/load_lora_adapter", {"lora_path": "/tmp"}),
    ("/load_lora_adapter", {"lora_name": "tiny", "lora_path": "ADAPTER"}),  # the base's name
    ("/unload_lora_adapter", {"lora_name": "never-loaded"}),
    ("/v1/unload_lora_adapter", {"lora_name": 3}),
])
async def test_admin_failures(client, tiny, path: str, body: dict) -> None:
    body = {k: str(tiny[1]) if v == "ADAPTER" else v for k, v in body.items()}
    r = await client.post(path, json=body)
    assert r.status == 400
    if body.get("lora_name") == "never-loaded":  # the field the request named it in
        assert (await r.json())["error_message"].startswith("lora_name:")
    out = await r.json()
    assert out["success"] is False and out["error_message"]
    assert "a1" in out["loaded_adapters"]
    check_golden("admin_error", out)


# ---------------------------------------------------------------- auth

async def test_api_key_only(make_client) -> None:
    client = await make_client(api_key="inf")
    good = {"Authorization": "Bearer inf"}
    assert (await client.get("/health")).status == 200
    assert (await client.get("/metrics")).status == 200
    r = await client.post("/generate", json={"text": "x"})
    assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    r = await client.post("/v1/completions", json={"prompt": "x"},
                          headers={"Authorization": "Bearer wrong"})
    assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
    r = await client.post("/generate", json={"text": "x", "sampling_params": {
        "max_new_tokens": 1}}, headers=good)
    assert r.status == 200
    assert (await client.get("/v1/models", headers=good)).status == 200
    # the inference key never opens admin routes; with no admin key they are closed
    r = await client.post("/load_lora_adapter", json={"lora_name": "z", "lora_path": "/x"},
                          headers=good)
    assert r.status == 403 and (await r.json())["success"] is False
    assert (await client.get("/lora_adapters", headers=good)).status == 403


async def test_admin_api_key(make_client, tiny) -> None:
    client = await make_client(api_key="inf", admin_api_key="adm")
    body = {"lora_name": "a3", "lora_path": str(tiny[1])}
    r = await client.post("/load_lora_adapter", json=body,
                          headers={"Authorization": "Bearer inf"})
    assert r.status == 401
    assert (await client.post("/load_lora_adapter", json=body)).status == 401
    r = await client.post("/load_lora_adapter", json=body,
                          headers={"Authorization": "Bearer adm"})
    assert r.status == 200
    assert (await client.get("/lora_adapters", headers={"Authorization": "Bearer adm"})).ok
    r = await client.post("/generate", json={"text": "x", "sampling_params": {
        "max_new_tokens": 1}}, headers={"Authorization": "Bearer adm"})
    assert r.status == 200  # the admin key opens inference routes too


async def test_no_keys_everything_open(client, tiny) -> None:
    r = await client.post("/load_lora_adapter", json={"lora_name": "a4",
                                                      "lora_path": str(tiny[1])})
    assert r.status == 200


# ---------------------------------------------------------------- metrics

async def test_metrics(client) -> None:
    await client.post("/generate", json={"text": ["x", "y"], "lora_path": ["a1", None],
                                         "sampling_params": {"max_new_tokens": 3}})
    r = await client.get("/metrics")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    text = await r.text()
    for name in ["loraserve:time_to_first_token_seconds_bucket",
                 "loraserve:e2e_request_latency_seconds_count",
                 "loraserve:num_running_reqs", "loraserve:num_queue_reqs",
                 "loraserve:kv_cache_usage", "loraserve:lora_requests_total",
                 "loraserve:lora_loads_total", "loraserve:lora_adapters",
                 "loraserve:prompt_tokens_total", "loraserve:generation_tokens_total"]:
        assert name in text, name
