"""Fuzzed request bodies against the real engine over real HTTP.

A hypothesis property throws at least 2000 generated bodies at every endpoint: valid ones
(which must answer 200 with the right shape), bodies made invalid by one known mutation (which
must answer 4xx with a JSON error that says what is wrong) and junk (raw bytes, invalid UTF-8,
lone surrogates, deep nesting, oversized bodies, random JSON in random fields), which must never
answer 5xx. Meanwhile a thread sends good greedy requests for the base model and an adapter and
checks each output against the same request run alone first.

The server runs in a thread with its own event loop (hypothesis drives synchronous tests).
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api import create_app
from metrics import ServingMetrics
from runtime.config import LoraPathSpec, ServerConfig
from runtime.engine import Engine
from tests._fake_engine import build_tiny_adapter
from tests.models import make_model

NUM_BODIES = 2000
MAX_REQUEST_BYTES = 64 << 10
CONTEXT = 256  # above the longest valid prompt: 3 chat messages of 2 x 20 chars, templated
ENDPOINTS = ("/generate", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
             "/abort_request", "/load_lora_adapter", "/unload_lora_adapter", "/v1/score")
ADMIN_ENDPOINTS = ("/load_lora_adapter", "/unload_lora_adapter")


# ---------------------------------------------------------------- a server in a thread

class LiveServer:
    """The app served on 127.0.0.1:<free port> by an event loop in a daemon thread."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        self.port = 0

    def start(self) -> None:
        self.thread.start()
        self.call(self._start())

    async def _start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        """Run `coro` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def post(conn: http.client.HTTPConnection, path: str, body: bytes,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json",
                                                   **(headers or {})})
    resp = conn.getresponse()
    return resp.status, resp.read()


@dataclass
class Served:
    server: LiveServer
    model: Path
    adapter: Path
    root: Path  # lora_roots: the only folder run-time loads may read
    vocab: int

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=60)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    base = tmp_path_factory.mktemp("fuzz")
    model = make_model(base / "model")
    root = base / "adapters"
    adapter = build_tiny_adapter(model, root / "a1")
    config = ServerConfig(
        model_path=str(model), device="cpu", dtype="float32", kv_cache_cpu_bytes=1 << 24,
        context_length=CONTEXT, served_model_name="tiny", max_lora_rank=8,
        lora_target_modules=("q_proj", "v_proj"), lora_paths=(LoraPathSpec("a1", str(adapter)),),
        lora_roots=(str(root),), max_request_bytes=MAX_REQUEST_BYTES,
    )
    metrics = ServingMetrics()
    server = LiveServer(create_app(Engine.from_config(config, metrics), config, metrics))
    server.start()
    vocab = server.call(_vocab(server.app))
    yield Served(server, model, adapter, root, vocab)
    server.stop()


async def _vocab(app: web.Application) -> int:
    from api.app import ENGINE
    return app[ENGINE].model_info.vocab_size


# ---------------------------------------------------------------- bodies

@dataclass
class Case:
    """One body for one endpoint and what it must get: "valid" (200), "invalid" (4xx) or
    "junk" (anything but 5xx)."""

    path: str
    body: bytes
    kind: str
    note: str


def enc(obj: Any) -> bytes:
    return json.dumps(obj).encode()


SAFE_TEXT = st.text(alphabet=st.characters(codec="ascii", categories=("L", "N", "P", "Zs")),
                    min_size=1, max_size=20)
ANY_TEXT = st.text(max_size=24)  # any code point but lone surrogates
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
                      st.floats(allow_nan=False, allow_infinity=False), ANY_TEXT)
JSON_ANY = st.recursive(JSON_LEAF, lambda c: st.lists(c, max_size=4)
                        | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=10)
NOT_INT = st.one_of(ANY_TEXT, st.floats(allow_nan=False, allow_infinity=False)
                    .filter(lambda x: not float(x).is_integer()), st.booleans(),
                    st.lists(st.integers(), min_size=1, max_size=3),
                    st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=2))
NOT_NUMBER = st.one_of(ANY_TEXT, st.booleans(), st.lists(st.floats(), min_size=1, max_size=2),
                       st.just({"x": 1}))
NOT_STR = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(),
                    st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=2))
NOT_BOOL = st.one_of(st.integers(), ANY_TEXT, st.lists(st.booleans(), min_size=1, max_size=2))
HUGE = st.sampled_from([2 ** 21, 2 ** 40, 2 ** 70, 10 ** 30])
NEG = st.sampled_from([-1, -2, -(2 ** 40), -(2 ** 70)])


def greedy_or_sampled() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional={
        "temperature": st.sampled_from([0.0, 0.7, 1.0, 1.5]),
        "top_p": st.sampled_from([0.1, 0.9, 1.0]),
        "top_k": st.sampled_from([-1, 1, 5, 50]),
        "min_p": st.sampled_from([0.0, 0.05]),
        "seed": st.integers(0, 2 ** 32),
        "stop": st.one_of(SAFE_TEXT, st.lists(SAFE_TEXT, max_size=3)),
        "frequency_penalty": st.sampled_from([0.0, 0.5, -0.5]),
        "presence_penalty": st.sampled_from([0.0, 1.0]),
        "repetition_penalty": st.sampled_from([1.0, 1.2]),
        "ignore_eos": st.booleans(),
    })


@st.composite
def native_sampling(draw: st.DrawFn) -> dict[str, Any]:
    s = draw(greedy_or_sampled())
    s["max_new_tokens"] = draw(st.integers(1, 4))
    if draw(st.booleans()):
        s["unknown_field"] = draw(JSON_ANY)  # unknown fields are ignored
    return s


def token_ids(vocab: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, vocab - 1), min_size=1, max_size=12)


@st.composite
def valid_body(draw: st.DrawFn, path: str, vocab: int, names: Callable[[], str]) -> Case:
    lora = st.sampled_from([None, "a1"])
    if path == "/generate":
        n = draw(st.integers(1, 3))
        is_batch = draw(st.booleans())
        if draw(st.booleans()):
            prompt: Any = draw(st.lists(SAFE_TEXT, min_size=n, max_size=n)) if is_batch \
                else draw(SAFE_TEXT)
            body: dict[str, Any] = {"text": prompt}
        else:
            body = {"input_ids": draw(st.lists(token_ids(vocab), min_size=n, max_size=n))
                    if is_batch else draw(token_ids(vocab))}
        k = n if is_batch else 1
        body["sampling_params"] = draw(st.lists(native_sampling(), min_size=k, max_size=k)) \
            if is_batch and draw(st.booleans()) else draw(native_sampling())
        body["lora_path"] = draw(st.lists(lora, min_size=k, max_size=k)) \
            if is_batch and draw(st.booleans()) else draw(lora)
        body["stream"] = draw(st.booleans())
        if draw(st.booleans()):
            body["return_logprob"] = True
            body["top_logprobs_num"] = draw(st.integers(0, 5))
    elif path in ("/v1/completions", "/v1/chat/completions"):
        body = draw(greedy_or_sampled())
        body["model"] = draw(st.sampled_from([None, "tiny", "tiny:a1", "a1"]))
        body["max_tokens"] = draw(st.integers(1, 4))
        body["n"] = draw(st.integers(1, 3))
        body["stream"] = draw(st.booleans())
        if body["stream"] and draw(st.booleans()):
            body["stream_options"] = {"include_usage": draw(st.booleans())}
        if draw(st.integers(0, 3)) == 0:
            body["allowed_token_ids"] = draw(st.lists(st.integers(0, vocab - 1), min_size=1,
                                                      max_size=5))
        if draw(st.integers(0, 3)) == 0:
            body["bad_words"] = draw(st.lists(st.sampled_from(["the", " a", "hello world", "é"]),
                                              min_size=1, max_size=2))
        if not body["stream"] and draw(st.integers(0, 3)) == 0:  # a 400 when streamed
            body["prompt_logprobs"] = draw(st.sampled_from([0, 2]))
        if path == "/v1/completions":
            body["prompt"] = draw(st.one_of(SAFE_TEXT, st.lists(SAFE_TEXT, min_size=1,
                                                                max_size=2), token_ids(vocab),
                                            st.lists(token_ids(vocab), min_size=1, max_size=2)))
            body["echo"] = draw(st.booleans())
            body["logprobs"] = draw(st.sampled_from([None, 0, 2]))
        else:
            role = st.sampled_from(["system", "user", "assistant"])
            content = st.one_of(SAFE_TEXT, st.lists(
                st.fixed_dictionaries({"type": st.just("text"), "text": SAFE_TEXT}),
                min_size=1, max_size=2))
            body["messages"] = draw(st.lists(st.fixed_dictionaries(
                {"role": role, "content": content}), min_size=1, max_size=3))
            if draw(st.booleans()):
                body["logprobs"] = True
                body["top_logprobs"] = draw(st.integers(0, 3))
    elif path == "/v1/score":
        if draw(st.booleans()):
            body = {"query": draw(SAFE_TEXT), "items": draw(st.one_of(
                SAFE_TEXT, st.lists(SAFE_TEXT, min_size=1, max_size=3)))}
        else:
            body = {"query": draw(token_ids(vocab)),
                    "items": draw(st.lists(token_ids(vocab), min_size=1, max_size=3))}
        body["label_token_ids"] = draw(st.lists(st.integers(0, vocab - 1), min_size=1,
                                                max_size=4))
        body["model"] = draw(st.sampled_from([None, "tiny", "tiny:a1", "a1"]))
        body["apply_softmax"] = draw(st.booleans())
        body["item_first"] = draw(st.booleans())
    elif path == "/tokenize":
        key = draw(st.sampled_from(["text", "prompt"]))
        body = {key: draw(st.one_of(ANY_TEXT, st.lists(ANY_TEXT, max_size=3)))}
        if draw(st.booleans()):
            body["add_special_tokens"] = draw(st.booleans())
    elif path == "/detokenize":
        body = {"tokens": draw(st.lists(st.integers(0, vocab - 1), max_size=20)),
                "skip_special_tokens": draw(st.booleans())}
    elif path == "/abort_request":
        body = {"rid": draw(SAFE_TEXT)}
    elif path == "/load_lora_adapter":
        name = names()
        spelling = draw(st.sampled_from(["relative", "absolute", "dotted"]))
        where = {"relative": "a1", "absolute": "{root}/a1", "dotted": "./a1/../a1"}[spelling]
        return Case(path, enc({"lora_name": name, "lora_path": where,
                               "pinned": draw(st.booleans()),
                               "load_inplace": draw(st.booleans())}), "valid", "load+unload")
    else:  # /unload_lora_adapter is valid only after a load: covered by load+unload
        return Case(path, enc({"lora_name": "a1-never-" + names()}), "invalid", "unknown name")
    if draw(st.booleans()):
        body[draw(st.sampled_from(["zz_unknown", "extra", "user"]))] = draw(JSON_ANY)
    return Case(path, enc(body), "valid", "valid")


# A known-bad value for a field: (endpoint, field path, strategy of values).
Mutation = tuple[str, tuple[str, ...], st.SearchStrategy[Any]]


def mutations(vocab: int) -> list[Mutation]:
    bad_ids = st.sampled_from([vocab, vocab + 1, -1, 2 ** 40, 2 ** 70])
    thousands = st.integers(65, 5000).map(lambda k: [f"s{i}" for i in range(k)])
    gen, cmp, chat = "/generate", "/v1/completions", "/v1/chat/completions"
    sp = ("sampling_params",)
    out: list[Mutation] = [
        (gen, sp + ("max_new_tokens",), st.one_of(NOT_INT, NEG, HUGE)),
        (gen, sp + ("min_new_tokens",), st.one_of(NOT_INT, NEG, st.just(5))),
        (gen, sp + ("temperature",), st.one_of(NOT_NUMBER, st.sampled_from([-1, 101, 1e308]))),
        (gen, sp + ("top_p",), st.one_of(NOT_NUMBER, st.sampled_from([0, -0.5, 1.5]))),
        (gen, sp + ("top_k",), st.one_of(NOT_INT, st.sampled_from([0, -2, 2 ** 40]))),
        (gen, sp + ("min_p",), st.sampled_from([-0.1, 1.5, "x"])),
        (gen, sp + ("frequency_penalty",), st.sampled_from([3, -3, 1e9, "x"])),
        (gen, sp + ("repetition_penalty",), st.sampled_from([0, -1, 1000])),
        (gen, sp + ("seed",), st.one_of(NOT_INT, st.just(2 ** 70))),
        (gen, sp + ("stop",), st.one_of(thousands, st.just([""]), st.just(["y" * 600]),
                                        st.lists(st.integers(), min_size=1, max_size=3))),
        (gen, sp + ("stop_token_ids",), st.one_of(bad_ids.map(lambda t: [t]), st.just(["x"]))),
        (gen, sp + ("ignore_eos",), NOT_BOOL),
        (gen, sp, st.one_of(ANY_TEXT, st.integers(), st.just([[1]]))),
        (gen, ("input_ids",), st.one_of(bad_ids.map(lambda t: [5, t]), st.just([]),
                                        st.just([1.5]), st.just(["a"]), st.just([[]]),
                                        st.just([5] * (CONTEXT + 1)))),
        (gen, ("text",), st.one_of(st.integers(), st.just([]), st.just({"a": 1}),
                                   st.just([1, 2]))),
        (gen, ("lora_path",), st.one_of(st.just("no-such-adapter"), st.just(["a1", "a1", "a1",
                                                                             "a1"]), NOT_STR)),
        (gen, ("stream",), NOT_BOOL),
        (gen, ("top_logprobs_num",), st.one_of(NEG, st.just(21), HUGE)),
        (gen, ("rid",), st.one_of(st.integers(), st.just({"a": 1}))),
        (cmp, ("max_tokens",), st.one_of(NOT_INT, NEG, HUGE)),
        (cmp, ("n",), st.one_of(NOT_INT, st.sampled_from([0, -1, 129, 2 ** 40]))),
        (cmp, ("logprobs",), st.one_of(NEG, st.just(21), HUGE)),
        (cmp, ("prompt",), st.one_of(st.just(""), st.just([]), bad_ids.map(lambda t: [5, t]),
                                     st.just([["a"]]), st.just(["a", [5]]), st.just({"a": 1}))),
        (cmp, ("model",), st.one_of(st.just("no-such-model"), st.just("tiny:nope"), NOT_STR)),
        (cmp, ("stop",), st.one_of(thousands, st.just([""]))),
        (cmp, ("temperature",), st.one_of(NOT_NUMBER, st.sampled_from([-1, 1e300]))),
        (cmp, ("stream_options",), st.one_of(ANY_TEXT, st.just({"include_usage": "yes"}))),
        (cmp, ("stop_token_ids",), bad_ids.map(lambda t: [t])),
        (chat, ("messages",), st.one_of(st.just([]), st.just([{"content": "x"}]),
                                        st.just([{"role": 1, "content": "x"}]),
                                        st.just([{"role": "user", "content": 5}]),
                                        st.just([{"role": "user", "content": [{"type":
                                                                               "image_url"}]}]),
                                        st.just(["x"]), ANY_TEXT)),
        (chat, ("max_tokens",), st.one_of(NOT_INT, NEG, HUGE)),
        (chat, ("max_completion_tokens",), st.one_of(NEG, HUGE)),
        (chat, ("top_logprobs",), st.sampled_from([-1, 21, 2 ** 40])),
        (chat, ("n",), st.sampled_from([0, 129])),
        (chat, ("model",), st.just("nope:nope")),
        (cmp, ("bad_words",), st.one_of(st.just([""]), st.just(["x" * 600]), st.just("the"),
                                        st.just([5]))),
        (chat, ("prompt_logprobs",), st.one_of(st.sampled_from([-1, 21, 2 ** 40]), NOT_INT)),
        (chat, ("allowed_token_ids",), st.one_of(st.just([]), bad_ids.map(lambda t: [5, t]),
                                                 st.just(["5"]), st.just(5))),
        ("/v1/score", ("label_token_ids",), st.one_of(st.just([]), bad_ids.map(lambda t: [t]),
                                                      NOT_STR.filter(lambda v: v is not None))),
        ("/v1/score", ("items",), st.one_of(st.just([]), st.just([[5], "x"]), st.just(5))),
        ("/v1/score", ("model",), st.just("tiny:nope")),
        ("/tokenize", ("text",), st.one_of(st.integers(), st.just([1]), st.just({"a": "b"}))),
        ("/tokenize", ("add_special_tokens",), NOT_BOOL),
        ("/detokenize", ("tokens",), st.one_of(bad_ids.map(lambda t: [1, t]), st.just(["a"]),
                                               st.just([1.5]), NOT_STR.filter(
                                                   lambda v: not isinstance(v, dict) or v))),
        ("/abort_request", ("rid",), st.one_of(st.just(""), st.integers(), st.just(["a"]))),
        ("/abort_request", ("abort_all",), st.just(True)),
        ("/load_lora_adapter", ("lora_path",), st.sampled_from([
            "../a1", "/etc", "/proc/self", "/proc/self/cwd", "org/some-adapter", "", "missing",
            "a1/../../model", "{root}/../model", "\x00a1"])),
        ("/load_lora_adapter", ("lora_name",), st.one_of(st.sampled_from(["", "a:b", "a1",
                                                                          "x" * 300, "a\nb"]),
                                                         NOT_STR)),
        ("/load_lora_adapter", ("pinned",), NOT_BOOL),
        ("/load_lora_adapter", ("load_inplace",), NOT_BOOL),
        ("/unload_lora_adapter", ("lora_name",), st.one_of(st.sampled_from(["", "a:b", "zz"]),
                                                           NOT_STR)),
    ]
    return out


REQUIRED = {
    "/generate": ("text", "input_ids"), "/v1/chat/completions": ("messages",),
    "/tokenize": ("text", "prompt"), "/detokenize": ("tokens",), "/abort_request": ("rid",),
    "/load_lora_adapter": ("lora_name", "lora_path"), "/unload_lora_adapter": ("lora_name",),
    "/v1/completions": ("prompt",), "/v1/score": ("query", "items", "label_token_ids"),
}


def _set(body: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    for k in keys[:-1]:
        if not isinstance(body.get(k), dict):
            body[k] = {}
        body = body[k]
    body[keys[-1]] = value


@st.composite
def invalid_body(draw: st.DrawFn, vocab: int, names: Callable[[], str]) -> Case:
    how = draw(st.sampled_from(["mutate", "mutate", "mutate", "missing", "not_object"]))
    if how == "not_object":
        path = draw(st.sampled_from(ENDPOINTS))
        value = draw(st.one_of(st.lists(JSON_LEAF, max_size=3), JSON_LEAF.filter(
            lambda v: v is not None)))
        return Case(path, enc(value), "invalid", "not an object")
    if how == "missing":
        path = draw(st.sampled_from(ENDPOINTS))
        base = _valid_dict(draw, path, vocab, names)
        for k in REQUIRED[path]:
            base.pop(k, None)
        if path == "/v1/completions":
            base.pop("prompt", None)  # the default "" is an empty prompt: 400
        return Case(path, enc(base), "invalid", f"missing {REQUIRED[path]}")
    path, keys, values = draw(st.sampled_from(mutations(vocab)))
    base = _valid_dict(draw, path, vocab, names)
    value = draw(values)
    if path == "/generate" and keys[0] == "sampling_params" and len(keys) > 1:
        base["sampling_params"] = {"max_new_tokens": 2}  # a single, mutable object
        if keys[-1] == "min_new_tokens" and value == 5:
            base["sampling_params"]["max_new_tokens"] = 4
    if keys == ("lora_path",) and path == "/generate" and isinstance(value, list):
        base.pop("text", None)
        base["input_ids"] = [[5, 6]]  # one input, four adapters: a length mismatch
    if path == "/generate" and keys == ("input_ids",):
        base.pop("text", None)
    if path == "/generate" and keys == ("text",):
        base.pop("input_ids", None)
    if path == "/tokenize" and keys == ("text",):
        base.pop("prompt", None)
    if path == "/load_lora_adapter" and keys == ("lora_name",) and value == "a1":
        base["load_inplace"] = False  # a1 is loaded: only a plain load of it is refused
    if isinstance(value, str):
        value = value.replace("{root}", str(_ROOT.get("root", "")))
    _set(base, keys, value)
    return Case(path, enc(base), "invalid", "/".join(keys))


_ROOT: dict[str, str] = {}  # set once by the test: the lora root (for path spellings)


def _valid_dict(draw: st.DrawFn, path: str, vocab: int, names: Callable[[], str]) -> dict:
    if path == "/unload_lora_adapter":
        return {"lora_name": "zz-" + names()}
    case = draw(valid_body(path, vocab, names))
    body = json.loads(case.body)
    if path == "/load_lora_adapter":
        body["lora_path"] = body["lora_path"].replace("{root}", _ROOT["root"])
    for k in ("sampling_params", "lora_path"):  # single values: the mutation targets them
        if isinstance(body.get(k), list):
            body[k] = body[k][0] if k != "lora_path" else None
    if path == "/generate" and isinstance(body.get("text"), list):
        body["text"] = body["text"][0]
    if isinstance(body.get("input_ids"), list) and body["input_ids"] and \
            isinstance(body["input_ids"][0], list):
        body["input_ids"] = body["input_ids"][0]
    if "stream" in body:
        body["stream"] = False
    return body


def deep(n: int, leaf: str = "1") -> str:
    return "[" * n + leaf + "]" * n


@st.composite
def junk_body(draw: st.DrawFn, vocab: int, names: Callable[[], str]) -> Case:
    path = draw(st.sampled_from(ENDPOINTS))
    how = draw(st.sampled_from(["bytes", "utf8", "surrogate", "deep", "deep_field", "big",
                                "random_field", "random_body", "nan", "truncated"]))
    if how == "bytes":
        raw = draw(st.binary(max_size=64))
    elif how == "utf8":  # invalid UTF-8 inside a string
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80",
                                    b"\x80abc"]))
        key = draw(st.sampled_from(["text", "prompt", "lora_name", "rid", "model"]))
        raw = b'{"' + key.encode() + b'": "a' + bad + b'"}'
    elif how == "surrogate":
        s = draw(st.sampled_from(["\\ud800", "\\udc80", "\\ud800\\u0041", "\\udfff\\ud800"]))
        key = draw(st.sampled_from(["text", "prompt", "lora_name", "rid", "messages"]))
        raw = ('{"' + key + '": "a' + s + '"}').encode()
    elif how == "deep":
        raw = deep(draw(st.sampled_from([100, 1000, 10000, 30000]))).encode()
    elif how == "deep_field":
        n = draw(st.sampled_from([50, 500, 5000, 30000]))
        key = draw(st.sampled_from(["text", "input_ids", "sampling_params", "extra", "tokens"]))
        if path == "/v1/chat/completions":
            raw = ('{"max_tokens": 2, "messages": [{"role": "user", "content": "x", "extra": '
                   + deep(n) + "}]}").encode()
        else:
            raw = ('{"' + key + '": ' + deep(n) + "}").encode()
    elif how == "big":
        raw = enc({"text": "x" * draw(st.integers(MAX_REQUEST_BYTES, 4 * MAX_REQUEST_BYTES))})
    elif how == "random_field":
        base = _valid_dict(draw, path, vocab, names)
        keys = list(base) + ["sampling_params"] if base else ["x"]
        base[draw(st.sampled_from(keys))] = draw(JSON_ANY)
        base.pop("stream", None)
        raw = enc(base)
    elif how == "random_body":
        raw = enc(draw(st.dictionaries(st.sampled_from(
            ["text", "input_ids", "prompt", "messages", "tokens", "rid", "lora_name", "lora_path",
             "sampling_params", "max_tokens", "n", "model"]), JSON_ANY, max_size=4)))
    elif how == "nan":
        raw = draw(st.sampled_from([b'{"text": "x", "sampling_params": {"temperature": NaN}}',
                                    b'{"prompt": "x", "temperature": Infinity}',
                                    b'{"tokens": [-Infinity]}']))
    else:
        full = _valid_dict(draw, path, vocab, names)
        text = enc(full)
        raw = text[:draw(st.integers(0, max(len(text) - 1, 0)))]
    return Case(path, raw, "junk", how)


# ---------------------------------------------------------------- checks

def check_error(case: Case, status: int, data: bytes) -> None:
    body = json.loads(data)
    if case.path in ADMIN_ENDPOINTS:
        assert body["success"] is False and isinstance(body["error_message"], str)
        assert body["error_message"] and "a1" in body["loaded_adapters"]
    else:
        err = body["error"]
        assert isinstance(err["message"], str) and err["message"], body
        if case.path.startswith("/v1/"):
            assert err["type"] != "server_error"
        else:
            assert err["code"] == status


def check_ok(case: Case, data: bytes) -> None:
    if data.startswith(b"data: "):
        assert data.endswith(b"data: [DONE]\n\n")
        for block in data.split(b"\n\n")[:-2]:
            chunk = json.loads(block.removeprefix(b"data: "))
            chunks = chunk if isinstance(chunk, list) else [chunk]
            assert not any("error" in c for c in chunks), chunk  # no in-band failure
        return
    body = json.loads(data)
    if case.path in ADMIN_ENDPOINTS:
        assert body["success"] is True
    elif case.path in ("/generate",):
        for r in body if isinstance(body, list) else [body]:
            assert r["meta_info"]["finish_reason"]["type"] in ("length", "stop")
            assert len(r["output_ids"]) <= (4 if case.kind == "valid" else CONTEXT)
    elif case.path == "/v1/score":
        assert all(0 <= p <= 1 for scores in body["scores"] for p in scores), body
    elif case.path.startswith("/v1/"):
        assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
        if b'"prompt_logprobs"' in case.body:
            scored = ([body] if case.path == "/v1/chat/completions" else body["choices"])
            for lps in (c["prompt_logprobs"] for c in scored):
                assert lps[0] is None and all(isinstance(e, dict) and e for e in lps[1:]), lps


# ---------------------------------------------------------------- good traffic alongside

GOOD = [
    ("/generate", {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 4,
                                                                  "temperature": 0}}),
    ("/generate", {"input_ids": [9, 10, 11], "lora_path": "a1",
                   "sampling_params": {"max_new_tokens": 4, "temperature": 0,
                                       "ignore_eos": True}}),
    ("/generate", {"text": "The quick brown", "lora_path": "a1", "stream": True,
                   "sampling_params": {"max_new_tokens": 4, "temperature": 0}}),
    ("/v1/completions", {"model": "tiny:a1", "prompt": [12, 13, 14], "max_tokens": 4,
                         "temperature": 0}),
    ("/v1/chat/completions", {"model": "tiny", "max_tokens": 4, "temperature": 0,
                              "messages": [{"role": "user", "content": "Paris is"}]}),
]


def good_output(path: str, data: bytes) -> Any:
    """What must not change: output ids (native) or text (OpenAI)."""
    if data.startswith(b"data: "):
        chunks = [json.loads(b.removeprefix(b"data: ")) for b in data.split(b"\n\n")[:-2]]
        return chunks[-1]["output_ids"]
    body = json.loads(data)
    if path == "/generate":
        return body["output_ids"]
    return [c.get("text", c.get("message", {}).get("content")) for c in body["choices"]]


@dataclass
class GoodTraffic:
    expected: list[Any]
    sent: int = 0
    wrong: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, served: Served) -> None:
        conn = served.connect()
        for i in itertools.count():
            if self.stop.is_set():
                break
            path, body = GOOD[i % len(GOOD)]
            status, data = post(conn, path, enc(body))
            self.sent += 1
            if status != 200 or good_output(path, data) != self.expected[i % len(GOOD)]:
                self.wrong.append(f"{path} {status} {data[:200]!r}")
        conn.close()


# ---------------------------------------------------------------- the property

def test_fuzzed_bodies_never_500(served: Served) -> None:
    _ROOT["root"] = str(served.root)
    conn = served.connect()
    expected = []
    for path, body in GOOD:  # each good request alone first
        status, data = post(conn, path, enc(body))
        assert status == 200, data
        expected.append(good_output(path, data))
    good = GoodTraffic(expected)
    thread = threading.Thread(target=good.run, args=(served,), daemon=True)
    thread.start()

    counter = itertools.count()

    def names() -> str:
        return "{name}"  # filled in when sent: drawing must not depend on outside state

    seen: Counter[tuple[str, str]] = Counter()
    notes: Counter[str] = Counter()
    failures: list[str] = []
    vocab = served.vocab

    cases = st.one_of(
        st.sampled_from(ENDPOINTS).flatmap(lambda p: valid_body(p, vocab, names)),
        invalid_body(vocab, names),
        junk_body(vocab, names),
    )

    @settings(max_examples=NUM_BODIES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(case=cases)
    def throw(case: Case) -> None:
        nonlocal conn
        name = f"fz{next(counter)}"
        body = case.body.replace(b"{root}", str(served.root).encode())
        body = body.replace(b"{name}", name.encode())
        try:
            status, data = post(conn, case.path, body)
        except (http.client.HTTPException, ConnectionError):
            conn.close()  # the server may close after a 413; a new connection, one retry
            conn = served.connect()
            status, data = post(conn, case.path, body)
        seen[(case.path, case.kind)] += 1
        notes[case.note] += 1
        assert status < 500, f"{status} for {case.path} {body[:300]!r}: {data[:300]!r}"
        if case.kind == "valid":
            assert status == 200, f"valid body refused: {case.path} {body[:300]!r}: {data!r}"
        elif case.kind == "invalid":
            assert 400 <= status < 500, f"invalid body accepted: {case.path} {body[:300]!r}"
        if status >= 400:
            check_error(case, status, data)
        else:
            check_ok(case, data)
        if case.path == "/load_lora_adapter" and status == 200:  # keep the server as it was
            loaded = json.loads(body)["lora_name"]
            status, data = post(conn, "/unload_lora_adapter", enc({"lora_name": loaded}))
            assert status == 200, data

    try:
        throw()
    finally:
        good.stop.set()
        thread.join(60)
        conn.close()
    total = sum(seen.values())
    by_kind: Counter[str] = Counter()
    for (_, kind), n in seen.items():
        by_kind[kind] += n
    print(f"\nfuzz: {total} bodies, by kind {dict(by_kind)}")
    print(f"fuzz: by endpoint and kind {dict(sorted(seen.items()))}")
    print(f"fuzz: by mutation {dict(sorted(notes.items()))}")
    print(f"fuzz: good requests alongside: {good.sent}, wrong: {len(good.wrong)}")
    assert not failures
    assert total >= NUM_BODIES
    assert all(seen[(p, "valid")] > 0 for p in ENDPOINTS if p != "/unload_lora_adapter")
    assert by_kind["invalid"] > 300 and by_kind["junk"] > 300
    assert good.sent > 0 and not good.wrong, good.wrong[:5]
    # nothing left behind: no requests, no KV blocks, no adapter references, the startup adapter
    stats = served.server.call(_leftovers(served.server.app))
    assert stats == (0, 0, 0, ["a1"]), stats


async def _leftovers(app: web.Application) -> tuple[int, int, int, list[str]]:
    from api.app import ENGINE
    engine = app[ENGINE]
    for _ in range(100):  # aborted streams finish on the next step
        if not engine.requests:
            break
        await asyncio.sleep(0.02)
    s = engine.stats()
    adapters = engine.list_adapters()
    return (s.num_running + s.num_waiting, s.kv_blocks_used, sum(a.refs for a in adapters),
            [a.name for a in adapters])
