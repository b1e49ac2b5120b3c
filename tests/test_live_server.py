"""A real `python -m runtime` process on loopback, driven by the clients people use: the official
`openai` package and plain `requests` calls shaped exactly like the reference doc's examples.

One server per module (a tiny random Llama on CPU, float32, LoRA on, adapters under lora_roots).
Greedy outputs are compared between model spellings, adapters and endpoints; streams are cut
after two chunks and the server must be left with nothing running and no KV blocks held.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from api.openai import _top_by_text
from tests.live import (
    SERVED_NAME,
    LiveServer,
    Sample,
    count,
    metric,
    running_server,
    scrape,
)
from tests.models import make_adapter, make_model

PROMPT = "List 3 countries and their capitals."
DOC_SAMPLING = {"max_new_tokens": 32, "temperature": 0}
FULL = f"{SERVED_NAME}:lora0"
IDLE_TIMEOUT_S = 20.0
# Seconds of decoding on the tiny model: far longer than reading two chunks and closing.
LONG_TOKENS = 4000
# Relative to lora_roots, spelled like the hub ids of the reference doc.
FACT_LORA = "tiny-org/fact-lora"
SQL_LORA = "tiny-org/sql-lora"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("live")
    model = make_model(root / "model", max_position_embeddings=LONG_TOKENS + 96)
    loras = root / "loras"
    make_adapter(model, loras / "lora0", seed=1)
    make_adapter(model, loras / FACT_LORA, seed=2)
    make_adapter(model, loras / SQL_LORA, seed=3)
    startup = [{"lora_name": "lora0", "lora_path": str(loras / "lora0")}]
    with running_server(root, model, loras, lora_paths=startup, max_loras_per_batch=3) as server:
        yield server


@pytest.fixture(scope="module")
def api(live: LiveServer) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0,
                           timeout=60)
    yield client
    client.close()


def post(live: LiveServer, path: str, body: dict[str, Any], status: int = 200) -> Any:
    r = requests.post(live.url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    return r.json()


def generate_ids(live: LiveServer, lora: str | None) -> list[int]:
    """Greedy output of the doc's prompt and sampling params on one adapter (None: base)."""
    body = {"text": PROMPT, "sampling_params": DOC_SAMPLING, "lora_path": lora}
    return post(live, "/generate", body)["output_ids"]


# ---------------------------------------------------------------- the openai client

def check_completion_logprobs(out: openai.types.Completion, num_tokens: int) -> None:
    lp = out.choices[0].logprobs
    assert out.usage.completion_tokens == num_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == num_tokens
    assert lp.text_offset == sorted(lp.text_offset)
    for chosen, tops in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(tops) <= 2  # keyed by text: two ids may decode alike
        assert chosen <= 0.0
        assert chosen == pytest.approx(max(tops.values()), abs=1e-4)  # greedy took the top


def test_top_logprobs_keep_the_likelier_of_equal_texts() -> None:
    # Byte-level BPE: two ids holding partial UTF-8 both decode to U+FFFD. The dict keyed by
    # text must keep the likelier candidate (it once kept the last, breaking the greedy check).
    class Tok:
        def decode(self, ids: list[int]) -> str:
            return {7: "a"}.get(ids[0], "\ufffd")

    assert _top_by_text(Tok(), [(3, -0.5), (4, -0.9), (7, -1.2)]) == {"\ufffd": -0.5, "a": -1.2}


def test_completions_adapter_spellings(api: openai.OpenAI) -> None:
    def complete(model: str) -> openai.types.Completion:
        return api.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                      logprobs=2, extra_body={"ignore_eos": True})

    base, full, bare = complete(SERVED_NAME), complete(FULL), complete("lora0")
    for out in (base, full, bare):
        check_completion_logprobs(out, 12)
        assert out.choices[0].finish_reason == "length"
    assert full.model == FULL and bare.model == "lora0" and base.model == SERVED_NAME
    assert full.choices[0].logprobs.tokens == bare.choices[0].logprobs.tokens
    assert full.choices[0].text == bare.choices[0].text
    assert full.choices[0].logprobs.tokens != base.choices[0].logprobs.tokens


@pytest.mark.parametrize("model", [SERVED_NAME, FULL, "lora0"])
def test_completions_stream_matches(api: openai.OpenAI, model: str) -> None:
    kw: dict[str, Any] = {"model": model, "prompt": PROMPT, "max_tokens": 10, "temperature": 0,
                          "logprobs": 2, "extra_body": {"ignore_eos": True}}
    whole = api.completions.create(**kw)
    chunks = list(api.completions.create(**kw, stream=True,
                                         stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 10
    assert all(c.usage is None for c in body)
    assert "".join(c.choices[0].text for c in body) == whole.choices[0].text
    tokens = [t for c in body if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == whole.choices[0].logprobs.tokens
    assert [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason] == ["length"]


def chat_tokens(out: openai.types.chat.ChatCompletion) -> list[str]:
    return [c.token for c in out.choices[0].logprobs.content]


def test_chat_adapter_spellings_and_stream(api: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": PROMPT}]

    def chat(model: str, **kw: Any) -> Any:
        return api.chat.completions.create(model=model, messages=messages, max_tokens=10,
                                           temperature=0, logprobs=True, top_logprobs=2,
                                           extra_body={"ignore_eos": True}, **kw)

    outs = {m: chat(m) for m in (SERVED_NAME, FULL, "lora0")}
    for out in outs.values():
        content = out.choices[0].logprobs.content
        assert out.usage.completion_tokens == len(content) == 10
        assert out.choices[0].message.role == "assistant"
        for c in content:
            assert len(c.top_logprobs) == 2
            assert c.top_logprobs[0].token == c.token  # greedy took the top candidate
            assert c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-4)
            assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
    assert chat_tokens(outs[FULL]) == chat_tokens(outs["lora0"])
    assert outs[FULL].choices[0].message.content == outs["lora0"].choices[0].message.content
    assert chat_tokens(outs[FULL]) != chat_tokens(outs[SERVED_NAME])

    for model, whole in outs.items():
        *body, last = list(chat(model, stream=True, stream_options={"include_usage": True}))
        assert body[0].choices[0].delta.role == "assistant"
        assert last.choices == [] and last.usage.completion_tokens == 10
        text = "".join(c.choices[0].delta.content or "" for c in body)
        assert text == whole.choices[0].message.content
        tokens = [t.token for c in body if c.choices[0].logprobs
                  for t in c.choices[0].logprobs.content]
        assert tokens == chat_tokens(whole)


def test_n2_seeded_and_streamed(api: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": FULL, "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0,
                          "seed": 11, "n": 2, "extra_body": {"ignore_eos": True}}
    first, again = api.completions.create(**kw), api.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1]
    assert first.usage.completion_tokens == 12
    single = api.completions.create(model=FULL, prompt=PROMPT, max_tokens=1)
    assert first.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeds repeat

    chunks = list(api.chat.completions.create(
        model="lora0", messages=[{"role": "user", "content": PROMPT}], max_tokens=5, n=2,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    *body, last = chunks
    assert last.usage.completion_tokens == 10
    finished = sorted(c.choices[0].index for c in body if c.choices[0].finish_reason)
    assert finished == [0, 1]


def test_models_list(api: openai.OpenAI, live: LiveServer) -> None:
    cards = {m.id: m.model_dump() for m in api.models.list()}
    assert cards[SERVED_NAME]["parent"] is None
    assert cards["lora0"]["parent"] == SERVED_NAME
    assert cards["lora0"]["root"] == str(live.lora_root / "lora0")
    assert api.models.retrieve("lora0").id == "lora0"


@pytest.mark.parametrize("model", ["nope", f"{SERVED_NAME}:nope", "other-base:lora0"])
def test_unknown_model_not_found(api: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model=model, prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model=model, max_tokens=2,
                                    messages=[{"role": "user", "content": PROMPT}])


# ---------------------------------------------------------------- the doc's requests calls

def test_generate_single_and_batch(live: LiveServer) -> None:
    lora0, base = generate_ids(live, "lora0"), generate_ids(live, None)
    assert lora0 != base
    json_data = {
        "text": [
            "List 3 countries and their capitals.",
            "List 3 countries and their capitals.",
        ],
        "sampling_params": {"max_new_tokens": 32, "temperature": 0},
        # The first input uses lora0, and the second input uses the base model
        "lora_path": ["lora0", None],
    }
    response = requests.post(live.url + "/generate", json=json_data, timeout=60)
    assert response.status_code == 200, response.text
    out = response.json()
    assert isinstance(out, list) and len(out) == 2
    assert all(isinstance(o["text"], str) and o["meta_info"]["finish_reason"] for o in out)
    assert [o["output_ids"] for o in out] == [lora0, base]


def test_generate_list_sampling_params(live: LiveServer) -> None:
    lora0, base = generate_ids(live, "lora0"), generate_ids(live, None)
    limits = [24, 8, 16]
    json_data = {
        "text": [
            "List 3 countries and their capitals.",
            "List 3 countries and their capitals.",
            "List 3 countries and their capitals.",
        ],
        "sampling_params": [{"max_new_tokens": n, "temperature": 0} for n in limits],
        "lora_path": ["lora0", None, "lora0"],
    }
    out = post(live, "/generate", json_data)
    # Each input got its own limit, and its own adapter: a greedy prefix of the 32-token run.
    for o, limit, full in zip(out, limits, [lora0, base, lora0], strict=True):
        assert o["meta_info"]["completion_tokens"] == len(o["output_ids"]) <= limit
        assert o["output_ids"] == full[:len(o["output_ids"])]
        assert len(o["output_ids"]) == min(limit, len(full))


# ---------------------------------------------------------------- streams cut short

def wait_idle(live: LiveServer) -> dict[Sample, float]:
    """/metrics once nothing runs, waits or holds KV blocks; fails after IDLE_TIMEOUT_S."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        samples = scrape(live.url)
        idle = (metric(samples, "loraserve:num_running_reqs"),
                metric(samples, "loraserve:num_queue_reqs"),
                metric(samples, "loraserve:kv_cache_usage"))
        if idle == (0.0, 0.0, 0.0) or time.monotonic() > deadline:
            assert idle == (0.0, 0.0, 0.0), "running, queued, KV usage left behind"
            return samples
        time.sleep(0.1)


LONG = {"max_new_tokens": LONG_TOKENS, "ignore_eos": True, "temperature": 0}
CUT_STREAMS = {
    "generate": ("/generate", 1, {"text": PROMPT, "sampling_params": LONG, "lora_path": "lora0",
                                  "stream": True}),
    "generate-batch": ("/generate", 2, {"text": [PROMPT, PROMPT], "sampling_params": LONG,
                                        "lora_path": ["lora0", None], "stream": True}),
    "completions-n2": ("/v1/completions", 2, {"model": FULL, "prompt": PROMPT, "n": 2,
                                              "max_tokens": LONG_TOKENS, "ignore_eos": True,
                                              "stream": True}),
    "chat": ("/v1/chat/completions", 1, {"model": "lora0", "max_tokens": LONG_TOKENS,
                                         "ignore_eos": True, "stream": True,
                                         "messages": [{"role": "user", "content": PROMPT}]}),
}


@pytest.mark.parametrize("case", list(CUT_STREAMS))
def test_stream_disconnect_leaves_nothing(live: LiveServer, case: str) -> None:
    path, num_requests, body = CUT_STREAMS[case]
    aborted = count(wait_idle(live), "loraserve:requests_total", finish_reason="abort")
    r = requests.post(live.url + path, json=body, stream=True, timeout=60)
    assert r.status_code == 200
    lines = r.iter_lines()  # held: dropping it mid-stream would close the connection already
    chunks = 0
    while chunks < 2:
        chunks += next(lines).startswith(b"data: {")
    during = scrape(live.url)
    assert metric(during, "loraserve:num_running_reqs") == num_requests
    assert metric(during, "loraserve:kv_cache_usage") > 0
    r.close()
    after = wait_idle(live)
    assert count(after, "loraserve:requests_total", finish_reason="abort") == \
        aborted + num_requests
    listing = requests.get(live.url + "/lora_adapters", timeout=10).json()["adapters"]
    assert all(a["in_flight_requests"] == 0 for a in listing), listing


def test_openai_stream_close_leaves_nothing(live: LiveServer, api: openai.OpenAI) -> None:
    aborted = count(wait_idle(live), "loraserve:requests_total", finish_reason="abort")
    stream = api.completions.create(model="lora0", prompt=PROMPT, max_tokens=LONG_TOKENS,
                                    stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 1:
            break
    stream.close()
    after = wait_idle(live)
    assert count(after, "loraserve:requests_total", finish_reason="abort") == aborted + 1


# ---------------------------------------------------------------- dynamic adapters (the doc)

def check_admin(body: dict, loaded: set[str]) -> dict[str, str]:
    assert {"success", "error_message", "loaded_adapters"} <= set(body)
    assert body["success"] is True and body["error_message"] == ""
    assert set(body["loaded_adapters"]) == loaded
    return body["loaded_adapters"]


def check_refused(r: requests.Response) -> None:
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["success"] is False and body["error_message"]
    assert "lora0" in body["loaded_adapters"]


def batch(live: LiveServer, loras: list[str | None]) -> list[list[int]]:
    json_data = {"text": [PROMPT] * len(loras), "sampling_params": DOC_SAMPLING,
                 "lora_path": loras}
    return [o["output_ids"] for o in post(live, "/generate", json_data)]


def test_dynamic_loading(live: LiveServer) -> None:
    url = live.url
    old_lora0 = generate_ids(live, "lora0")
    response = requests.post(url + "/load_lora_adapter",
                             json={"lora_name": "lora1", "lora_path": FACT_LORA}, timeout=60)
    assert response.status_code == 200, response.text
    paths = check_admin(response.json(), {"lora0", "lora1"})
    assert paths["lora1"].endswith(FACT_LORA)
    out0, out1 = batch(live, ["lora0", "lora1"])
    assert out0 == old_lora0 and out1 != out0
    assert out1 == generate_ids(live, "lora1")

    # The new adapter's own output, under a third name, is what lora0 must give once reloaded.
    check_admin(post(live, "/load_lora_adapter", {"lora_name": "lora2", "lora_path": SQL_LORA}),
                {"lora0", "lora1", "lora2"})
    sql = generate_ids(live, "lora2")
    assert sql not in (old_lora0, out1)

    response = requests.post(url + "/unload_lora_adapter", json={"lora_name": "lora0"},
                             timeout=60)
    check_admin(response.json(), {"lora1", "lora2"})
    r = requests.post(url + "/generate", json={"text": PROMPT, "lora_path": "lora0"}, timeout=60)
    assert r.status_code == 400, r.text
    response = requests.post(url + "/load_lora_adapter",
                             json={"lora_name": "lora0", "lora_path": SQL_LORA}, timeout=60)
    paths = check_admin(response.json(), {"lora0", "lora1", "lora2"})
    assert paths["lora0"].endswith(SQL_LORA)
    assert batch(live, ["lora0", "lora1"]) == [sql, out1]

    # Reload lora1 pinned (the doc's GPU pinning example).
    check_admin(post(live, "/unload_lora_adapter", {"lora_name": "lora1"}), {"lora0", "lora2"})
    response = requests.post(url + "/load_lora_adapter", json={
        "lora_name": "lora1",
        "lora_path": FACT_LORA,
        "pinned": True,  # Pin the adapter to GPU
    }, timeout=60)
    check_admin(response.json(), {"lora0", "lora1", "lora2"})
    listing = requests.get(url + "/lora_adapters", timeout=10).json()["adapters"]
    assert {a["name"]: a["pinned"] for a in listing} == {"lora0": False, "lora1": True,
                                                        "lora2": False}
    assert batch(live, ["lora0", "lora1", "lora2"]) == [sql, out1, sql]
    listing = requests.get(url + "/lora_adapters", timeout=10).json()["adapters"]
    assert next(a for a in listing if a["name"] == "lora1")["tier"] == "gpu"

    # Refusals: 400 with success false, the error, and what is loaded.
    check_refused(requests.post(url + "/load_lora_adapter", json={
        "lora_name": "lora1", "lora_path": FACT_LORA}, timeout=60))
    check_refused(requests.post(url + "/unload_lora_adapter", json={
        "lora_name": "never-loaded"}, timeout=60))
    outside = str(Path(live.lora_root).parent / "model")
    check_refused(requests.post(url + "/load_lora_adapter", json={
        "lora_name": "outside", "lora_path": outside}, timeout=60))
    check_refused(requests.post(url + "/load_lora_adapter", json={
        "lora_name": "escape", "lora_path": "../model"}, timeout=60))

    # Leave the server as the fixture made it.
    for name in ("lora0", "lora1", "lora2"):
        post(live, "/unload_lora_adapter", {"lora_name": name})
    post(live, "/load_lora_adapter", {"lora_name": "lora0", "lora_path": "lora0"})
    assert generate_ids(live, "lora0") == old_lora0
