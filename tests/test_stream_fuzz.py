"""Adversarial mixed traffic against the real engine behind the aiohttp app (a tiny random Llama
on CPU, three adapters over two GPU slots), then an audit of what it left behind and of what
/metrics says about it.

Clients mix streaming and non-streaming /generate, /v1/completions and /v1/chat/completions;
n > 1 (streamed too); batches of prompts in one /generate, and prompts in one completion, with
an adapter each; max_new_tokens 0, stop strings (trimmed or kept), ignore_eos, logprobs,
stream_interval, continuous usage; clients that vanish mid-stream, right after the headers, or
before the first byte (streams and whole answers); aborts by rid while the request is queued,
half way through its chunked prefill, while it decodes, and as its last tokens are sampled; a
second request reusing a running rid; load and unload (pinned or not) of adapters nobody
uses; and requests that must fail (unknown adapters, bad fields, a batch whose last item is
bad). Every plan is drawn from a seeded `random.Random`; one round also runs on a KV cache
small enough that requests are preempted.

After the traffic settles:
- every request that was neither aborted nor left by its client got a whole, well-formed
  answer: streams end with [DONE], every choice has one valid finish reason, lengths are as
  asked, the text is the ids decoded and cut at the first stop string, and greedy answers
  equal the same request run alone;
- the engine holds no request, no KV block, no adapter reference, no slot lock, and none of
  its per-request side tables holds an entry;
- the queue, running and KV gauges read 0, and the adapter tier gauges match the adapters;
- the counters add up to what the clients saw, per adapter and finish reason: requests,
  generated and prompt tokens, time-to-first-token, inter-token and end-to-end histogram
  counts; a request refused with a 4xx leaves no trace in them; an aborted one, or one whose
  client left, counts as aborted.

The regressions below the rounds pin each bug the rounds found.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from api import create_app
from api.app import ENGINE
from metrics import ServingMetrics
from runtime.config import LoraPathSpec, ServerConfig
from runtime.engine import Engine
from tests.models import make_adapter, make_model

SERVED = "tiny"
ADAPTERS = ("a1", "a2", "a3")
SPARES = ("s1", "s2")  # loaded and unloaded while traffic runs; no request names them
LABELS = ("base", *ADAPTERS)
CONTEXT = 1024
LONG = 700  # new tokens of a request that its client leaves or aborts: never done first
STOPS = ["e", " t", "an", "\n", "o"]
CONCURRENCY = 24
SETTLE_S = 20.0
PLAN_TIMEOUT_S = 60.0
ALONE_CHECKS = 30

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stream_fuzz")
    model = make_model(root / "model", max_position_embeddings=CONTEXT)
    loras = root / "loras"
    for seed, name in enumerate((*ADAPTERS, *SPARES), start=1):
        make_adapter(model, loras / name, seed=seed)
    return model, loras


def make_config(folders: tuple[Path, Path], **overrides: Any) -> ServerConfig:
    model, loras = folders
    values: dict[str, Any] = {
        "model_path": str(model), "device": "cpu", "dtype": "float32",
        "kv_cache_cpu_bytes": 1 << 23, "enable_lora": True, "max_lora_rank": 8,
        "lora_target_modules": ("q_proj", "v_proj"), "served_model_name": SERVED,
        "max_loras_per_batch": 2, "chunked_prefill_size": 32, "max_running_requests": 16,
        "lora_roots": (str(loras),),
        "lora_paths": tuple(LoraPathSpec(a, str(loras / a)) for a in ADAPTERS),
    }
    return ServerConfig(**(values | overrides))


@pytest.fixture
async def client(aiohttp_client, folders):
    config = make_config(folders)
    metrics = ServingMetrics()
    return await aiohttp_client(create_app(Engine.from_config(config, metrics), config, metrics))


# ---------------------------------------------------------------- the clients' ledger

@dataclass
class Tally:
    """What clients saw of one adapter's generations."""

    reasons: Counter[str] = field(default_factory=Counter)  # finish reason -> generations
    tokens: int = 0  # completion tokens
    prompt_tokens: int = 0
    with_tokens: int = 0  # generations that got at least one token (a first-token time)


@dataclass
class Ledger:
    tokenizer: Any  # the server's, to decode answers' ids
    by_label: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))
    # generations whose client left: they must end as aborts, tokens unknown to anyone
    vanished: Counter[str] = field(default_factory=Counter)
    # generations whose client left before the first byte: maybe never submitted
    maybe: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def saw(self, label: str, reason: str, tokens: int, prompt_tokens: int,
            has_tokens: bool) -> None:
        t = self.by_label[label]
        t.reasons[reason] += 1
        t.tokens += tokens
        t.prompt_tokens += prompt_tokens
        t.with_tokens += has_tokens

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.problems.append(what)


def label_of(lora: str | None) -> str:
    return lora or "base"


# ---------------------------------------------------------------- plans

@dataclass
class Plan:
    """One HTTP request and what its client does with it."""

    path: str
    body: dict[str, Any]
    labels: list[str]  # the adapter label of each generation, in index order
    max_new: list[int]  # each generation's max_new_tokens
    # complete; abort_early, abort_prefill, abort_decode, abort_dup; vanish_mid, vanish_early
    behaviour: str = "complete"
    expect_status: int = 200
    delay: float = 0.0
    chunks: int = 0
    decode_tokens: int = 0
    prompt_tokens: int | None = None  # of an aborted OpenAI request: no usage comes back
    result: Any = None  # a one-generation answer's output ids (native) or text (OpenAI)

    @property
    def is_greedy_single(self) -> bool:
        """One greedy generation: the same request alone must give the same answer."""
        s = self.body.get("sampling_params", self.body)
        return (self.behaviour == "complete" and len(self.labels) == 1
                and s.get("temperature") == 0 and self.result is not None)

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def stops(self) -> list[str]:
        s = self.body.get("sampling_params", self.body)
        stop = s.get("stop") if isinstance(s, dict) else None
        return [stop] if isinstance(stop, str) else list(stop or [])

    @property
    def trims(self) -> bool:
        """Whether the stop string or token that ended a generation is cut from its text."""
        s = self.body.get("sampling_params", self.body)
        return not (s.get("no_stop_trim") or s.get("include_stop_str_in_output"))

    @property
    def no_eos(self) -> bool:
        s = self.body.get("sampling_params", self.body)
        return bool(isinstance(s, dict) and s.get("ignore_eos")) and not self.stops


def prompt_ids(rng: random.Random, lo: int = 2, hi: int = 40) -> list[int]:
    return [rng.randint(3, 300) for _ in range(rng.randint(lo, hi))]


def sampling(rng: random.Random, max_new: int) -> dict[str, Any]:
    s: dict[str, Any] = {"max_new_tokens": max_new}
    style = rng.choice(["greedy", "greedy", "sampled", "stop", "eos"])
    if style in ("greedy", "stop"):
        s["temperature"] = 0
    if style == "sampled":
        s.update(temperature=0.8, top_p=0.9, seed=rng.randint(0, 1000))
    if style == "stop":
        s["stop"] = rng.sample(STOPS, rng.randint(1, 2))
        s["no_stop_trim"] = rng.random() < 0.25
    if style != "eos":
        s["ignore_eos"] = rng.random() < 0.7
    return s


def native_plan(rng: random.Random, stream: bool) -> Plan:
    num_inputs = rng.choice([1, 1, 1, 2, 3])
    n = rng.choice([1, 1, 2]) if num_inputs == 1 or rng.random() < 0.3 else 1
    loras = [rng.choice([None, *ADAPTERS]) for _ in range(num_inputs)]
    max_new = rng.choice([0, 1, 3, 8, 16, 24, 24, 120])
    params = sampling(rng, max_new)
    if n > 1:
        params["n"] = n
    body: dict[str, Any] = {"sampling_params": params, "stream": stream}
    if rng.random() < 0.2:
        body.update(return_logprob=True, top_logprobs_num=rng.choice([0, 2]),
                    logprob_start_len=rng.choice([-1, 0]))
    if stream and rng.random() < 0.3:
        params["stream_interval"] = rng.choice([2, 5])
    if num_inputs == 1:
        body["input_ids"] = prompt_ids(rng)
        body["lora_path"] = loras[0]
    else:
        body["input_ids"] = [prompt_ids(rng) for _ in loras]
        body["lora_path"] = loras
    if body.get("return_logprob") and max_new % 2 == 0:  # drawn from nothing: the seeds' plans
        body["token_ids_logprob"] = [5, 6, 5]  # stay as they were
    labels = [label_of(lo) for lo in loras for _ in range(n)]
    return Plan("/generate", body, labels, [max_new] * len(labels))


def openai_plan(rng: random.Random, path: str, stream: bool) -> Plan:
    n = rng.choice([1, 1, 2, 3])
    max_new = rng.choice([1, 4, 8, 16, 16, 100])
    body: dict[str, Any] = {"max_tokens": max_new, "n": n, "stream": stream, "temperature": 0}
    if stream:
        body["stream_options"] = {"include_usage": True,
                                  "continuous_usage_stats": rng.random() < 0.2}
        if rng.random() < 0.2:
            body["stream_interval"] = rng.choice([2, 5])
    if rng.random() < 0.5:
        body["stop"] = rng.sample(STOPS, 1)
        body["include_stop_str_in_output"] = rng.random() < 0.25
    else:
        body["ignore_eos"] = True
    lora = rng.choice([None, *ADAPTERS])
    if path == "/v1/completions" and rng.random() < 0.2:
        body["logprobs"] = rng.choice([0, 2])
        if not stream:  # drawn from nothing: the seeds' plans stay as they were
            body["prompt_logprobs"] = body["logprobs"]
    if path == "/v1/completions" and not stream and rng.random() < 0.4 and "stop" not in body:
        # several prompts, an adapter each (usage sums them: every choice runs to max_tokens)
        loras = [rng.choice([None, *ADAPTERS]) for _ in range(rng.randint(2, 3))]
        body.update(model=SERVED, lora_path=loras, prompt=[prompt_ids(rng) for _ in loras])
        labels = [label_of(lo) for lo in loras for _ in range(n)]
        return Plan(path, body, labels, [max_new] * len(labels))
    body["model"] = SERVED if lora is None else f"{SERVED}:{lora}"
    if path == "/v1/completions":
        body["prompt"] = prompt_ids(rng)
    else:
        body["messages"] = [{"role": "user", "content": "hello there " * rng.randint(1, 6)}]
    return Plan(path, body, [label_of(lora)] * n, [max_new] * n)


def abort_plan(rng: random.Random, rid: str, when: str) -> Plan:
    """A request to abort by rid: `when` "early" (as soon as it is queued), "prefill" (half
    way through a long prompt's 32-token prefill chunks) or "decode" (after a few tokens);
    "late": as its last tokens are sampled (the abort races its end); "dup": a second
    request with its rid is refused before it is aborted."""
    lora = rng.choice([None, *ADAPTERS])
    decode_tokens = rng.randint(1, 6)
    limit = decode_tokens + rng.randint(0, 2) if when == "late" else LONG
    prompt = prompt_ids(rng, 150, 300) if when in ("early", "prefill") else prompt_ids(rng)
    path = rng.choice(["/generate", "/generate", "/v1/completions", "/v1/chat/completions"])
    stream = rng.random() < 0.5
    if path == "/generate":
        body: dict[str, Any] = {"input_ids": prompt, "lora_path": lora, "rid": rid,
                                "stream": stream, "sampling_params": {
                                    "max_new_tokens": limit, "ignore_eos": True,
                                    "temperature": 0}}
    else:
        body = {"model": SERVED if lora is None else f"{SERVED}:{lora}", "rid": rid,
                "max_tokens": limit, "ignore_eos": True, "stream": stream, "temperature": 0}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if path == "/v1/completions":
            body["prompt"] = prompt
        else:
            body["messages"] = [{"role": "user", "content": "x " * (len(prompt) // 2)}]
    plan = Plan(path, body, [label_of(lora)], [limit])
    plan.behaviour = f"abort_{when}"
    plan.decode_tokens = decode_tokens
    return plan


def vanish_plan(rng: random.Random, rid: str, early: bool) -> Plan:
    path = rng.choice(["/generate", "/v1/completions", "/v1/chat/completions"])
    lora = rng.choice([None, *ADAPTERS])
    n = rng.choice([1, 1, 2])
    if path == "/generate":
        body: dict[str, Any] = {"input_ids": prompt_ids(rng), "lora_path": lora, "stream": True,
                                "sampling_params": {"max_new_tokens": LONG, "n": n,
                                                    "ignore_eos": True}}
    else:
        body = {"model": SERVED if lora is None else f"{SERVED}:{lora}", "max_tokens": LONG,
                "n": n, "ignore_eos": True, "stream": True}
        if path == "/v1/completions":
            body["prompt"] = prompt_ids(rng)
        else:
            body["messages"] = [{"role": "user", "content": "hi " * rng.randint(1, 8)}]
    body["rid"] = rid
    plan = Plan(path, body, [label_of(lora)] * n, [LONG] * n)
    plan.behaviour = "vanish_early" if early else "vanish_mid"
    plan.delay = rng.uniform(0.0, 0.03)
    if early and rng.random() < 0.4:  # a whole answer: every moment is before its first byte
        body["stream"] = False
        plan.delay = rng.uniform(0.0, 0.3)
    plan.chunks = rng.randint(1, 8)
    return plan


def failing_plan(rng: random.Random) -> Plan:
    """A request that must be refused with a 4xx, leaving nothing behind."""
    ok = {"max_new_tokens": 4}
    cases: list[tuple[str, dict[str, Any], int]] = [
        ("/generate", {"input_ids": [5, 6], "lora_path": "nope"}, 400),
        ("/generate", {"input_ids": [[5, 6], [7, 8]], "lora_path": ["a1", "nope"],
                       "sampling_params": ok}, 400),
        ("/generate", {"input_ids": [[5, 6], [7, 8]], "lora_path": [None, "a2"],
                       "sampling_params": [ok, {"max_new_tokens": -1}]}, 400),
        ("/generate", {"input_ids": [[5, 6], [7, 8], [9]], "lora_path": ["a2", None, "gone"],
                       "stream": True, "sampling_params": ok}, 400),
        ("/generate", {"input_ids": [5, 6], "sampling_params": {"temperature": -1}}, 400),
        ("/generate", {"input_ids": [5, 6], "sampling_params": {"n": 0}}, 400),
        ("/generate", {"input_ids": [5, 100000]}, 400),
        ("/generate", {"text": "x", "input_ids": [5]}, 400),
        ("/v1/completions", {"model": f"{SERVED}:nope", "prompt": "x"}, 404),
        ("/v1/completions", {"model": "nope", "prompt": "x", "stream": True}, 404),
        ("/v1/completions", {"model": SERVED, "prompt": [[5], [6]], "lora_path": ["a1", "nx"],
                             "max_tokens": 2}, 400),
        ("/v1/completions", {"model": SERVED, "prompt": "x", "top_p": 0}, 400),
        ("/v1/chat/completions", {"model": SERVED, "messages": [], "stream": True}, 400),
        ("/v1/chat/completions", {"model": "a1", "messages": [{"role": "user",
                                                               "content": "x"}], "n": 0}, 400),
        ("/v1/chat/completions", {"model": f"{SERVED}:zz", "messages": [
            {"role": "user", "content": "x"}], "stream": True}, 404),
    ]
    path, body, status = rng.choice(cases)
    return Plan(path, body, [], [], expect_status=status)


def draw_plans(rng: random.Random, count: int, *, vanish: bool, abort_prefix: str) -> list[Plan]:
    plans = []
    for i in range(count):
        roll = rng.random()
        if roll < 0.22:
            plans.append(native_plan(rng, stream=rng.random() < 0.5))
        elif roll < 0.44:
            plans.append(openai_plan(rng, "/v1/completions", stream=rng.random() < 0.5))
        elif roll < 0.64:
            plans.append(openai_plan(rng, "/v1/chat/completions", stream=rng.random() < 0.5))
        elif roll < 0.76:
            when = rng.choice(["early", "prefill", "decode", "decode", "late", "dup"])
            plans.append(abort_plan(rng, f"{abort_prefix}-{i}", when))
        elif roll < 0.88:
            plans.append(vanish_plan(rng, f"{abort_prefix}-{i}", early=rng.random() < 0.4)
                         if vanish else native_plan(rng, stream=rng.random() < 0.5))
        else:
            plans.append(failing_plan(rng))
    return plans


# ---------------------------------------------------------------- reading answers

def sse_events(raw: bytes) -> tuple[list[Any], bool]:
    """The JSON events of an SSE body and whether it ended with `data: [DONE]`."""
    text = raw.decode()
    parts = [p for p in text.split("\n\n") if p]
    events, done = [], False
    for k, part in enumerate(parts):
        assert part.startswith("data: "), part[:200]
        data = part[len("data: "):]
        if data == "[DONE]":
            done = k == len(parts) - 1
            continue
        events.append(json.loads(data))
    return events, done


def check_text(ledger: Ledger, plan: Plan, text: str, where: str) -> None:
    if not plan.trims:
        return
    for s in plan.stops:
        ledger.check(s not in text, f"{where}: stop string {s!r} left in the text {text!r}")


def expected_text(tokenizer: Any, plan: Plan, ids: list[int], matched: int | str | None) -> str:
    """What a whole answer's text must be: its ids decoded, without the stop token that ended
    it, cut before the first stop string."""
    if isinstance(matched, int) and not isinstance(matched, bool) and plan.trims:
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    cuts = [i for i in (text.find(s) for s in plan.stops) if i >= 0 and plan.trims]
    return text[:min(cuts)] if cuts else text


def check_native_gen(ledger: Ledger, plan: Plan, i: int, res: dict[str, Any],
                     where: str) -> tuple[str, int, int, bool]:
    meta = res["meta_info"]
    reason = meta["finish_reason"]
    n_out = meta["completion_tokens"]
    ledger.check(len(res["output_ids"]) == n_out, f"{where}: output_ids vs completion_tokens")
    if plan.body.get("return_logprob"):
        ledger.check(len(meta["output_token_logprobs"]) == n_out, f"{where}: logprobs")
    if reason is None:
        ledger.problems.append(f"{where}: no finish reason")
        return "none", n_out, meta["prompt_tokens"], n_out > 0
    kind = reason["type"]
    if plan.behaviour == "complete":
        ledger.check(kind in ("length", "stop"), f"{where}: finish {reason}")
        if kind == "length":
            ledger.check(n_out == plan.max_new[i], f"{where}: length at {n_out} tokens")
        else:
            ledger.check(0 < n_out <= plan.max_new[i] and not plan.no_eos,
                         f"{where}: stop {reason} after {n_out} tokens")
        check_text(ledger, plan, res["text"], where)
        want = expected_text(ledger.tokenizer, plan, res["output_ids"], reason.get("matched"))
        ledger.check(res["text"] == want, f"{where}: text {res['text']!r} for ids "
                     f"{res['output_ids']} ({reason}), which decode to {want!r}")
    return kind, n_out, meta["prompt_tokens"], n_out > 0


def read_native(ledger: Ledger, plan: Plan, status: int, raw: bytes) -> list[tuple]:
    """[(label, finish type, completion tokens, prompt tokens, got a token)] of each of a
    /generate answer's generations."""
    where = f"/generate {plan.behaviour} {json.dumps(plan.body)[:160]}"
    if not plan.stream:
        body = json.loads(raw)
        results = body if isinstance(body, list) else [body]
        ledger.check(len(results) == len(plan.labels), f"{where}: {len(results)} results")
        plan.result = results[0]["output_ids"]
        return [(plan.labels[i], *check_native_gen(ledger, plan, i, r, where))
                for i, r in enumerate(results)]
    events, done = sse_events(raw)
    ledger.check(done, f"{where}: no [DONE]")
    last: dict[int, dict[str, Any]] = {}
    for ev in events:
        ledger.check("error" not in ev, f"{where}: error event {ev}")
        if "error" in ev:
            continue
        i = ev.get("index", 0)
        if i in last:
            prev = last[i]
            ledger.check(prev["meta_info"]["finish_reason"] is None,
                         f"{where}: a chunk after the last of {i}")
            ledger.check(ev["text"].startswith(prev["text"]), f"{where}: text not growing")
        last[i] = ev
    ledger.check(sorted(last) == list(range(len(plan.labels))), f"{where}: indexes {sorted(last)}")
    plan.result = last[0]["output_ids"] if last else None
    return [(plan.labels[i], *check_native_gen(ledger, plan, i, last[i], where))
            for i in sorted(last)]


def read_openai(ledger: Ledger, plan: Plan, status: int, raw: bytes) -> list[tuple]:
    """As read_native, for an OpenAI answer, and then ("prompt", "", 0, its usage's prompt
    tokens, False). The usage sums the choices' tokens: where they have several adapters, or
    n > 1 without stop strings, every choice must run to max_tokens (checked)."""
    where = f"{plan.path} {plan.behaviour} {json.dumps(plan.body)[:160]}"
    n = len(plan.labels)
    chat = plan.path.endswith("chat/completions")
    if status != 200:  # every choice aborted before its first token: streamed or not
        body = json.loads(raw)
        ledger.check(plan.behaviour.startswith("abort") and status == 500
                     and body["error"]["code"] == "request_aborted", f"{where}: {body}")
        return [(plan.labels[0], "abort", 0, plan.prompt_tokens, False)]
    if not plan.stream:
        body = json.loads(raw)
        choices = sorted(body["choices"], key=lambda c: c["index"])
        ledger.check([c["index"] for c in choices] == list(range(n)), f"{where}: choices")
        reasons = [c["finish_reason"] for c in choices]
        texts = [c["message"]["content"] if chat else c["text"] for c in choices]
        usage = body["usage"]
    else:
        events, done = sse_events(raw)
        ledger.check(done, f"{where}: no [DONE]")
        reasons_by: dict[int, str] = {}
        text_by: dict[int, str] = defaultdict(str)
        usage = None
        errors = []
        for ev in events:
            if "error" in ev:
                errors.append(ev)
                continue
            if not ev["choices"]:
                usage = ev["usage"]
                continue
            for c in ev["choices"]:
                i = c["index"]
                ledger.check(i not in reasons_by, f"{where}: a chunk after {i} finished")
                text_by[i] += c["delta"].get("content", "") if chat else c["text"]
                if c["finish_reason"] is not None:
                    reasons_by[i] = c["finish_reason"]
        ledger.check(sorted(reasons_by) == list(range(n)), f"{where}: finished {reasons_by}")
        reasons = [reasons_by.get(i, "none") for i in range(n)]
        texts = [text_by[i] for i in range(n)]
        ledger.check((len(errors) == 1) == ("abort" in reasons) and len(errors) <= 1,
                     f"{where}: error events {errors} for reasons {reasons}")
        ledger.check(usage is not None, f"{where}: no usage chunk")
        usage = usage or {"completion_tokens": 0, "prompt_tokens": 0}
    plan.result = texts[0] if texts else None
    if plan.behaviour == "complete":
        for i, (reason, text) in enumerate(zip(reasons, texts)):
            ledger.check(reason in ("stop", "length"), f"{where}: finish {reason}")
            ledger.check(reason == "length" or not plan.no_eos, f"{where}: stop without a stop")
            check_text(ledger, plan, text, f"{where} [{i}]")
    total = usage["completion_tokens"]
    per_prompt = usage["prompt_tokens"]
    if len(set(plan.labels)) > 1 or (len(plan.labels) > 1 and "stop" not in plan.body):
        ledger.check(all(r == "length" for r in reasons) and total == sum(plan.max_new),
                     f"{where}: {reasons} with {total} tokens")
        return [(label, reasons[i], plan.max_new[i], None, True)
                for i, label in enumerate(plan.labels)] + [("prompt", "", 0, per_prompt, False)]
    # one adapter: the usage is its total (each choice's own count is not in the answer); a
    # choice that ended other than by an abort has a token at least (max_tokens >= 1)
    has = [r != "abort" or (n == 1 and total > 0) for r in reasons]
    return [(plan.labels[i], reasons[i], total if i == 0 else 0, None, has[i])
            for i in range(n)] + [("prompt", "", 0, per_prompt, False)]


# ---------------------------------------------------------------- running plans

def openai_prompt_tokens(engine: Engine, body: dict[str, Any]) -> int:
    """The prompt tokens of a one-prompt OpenAI request, as its route builds the prompt."""
    if "prompt" in body:
        return len(body["prompt"])
    tok = engine.tokenizer
    text = tok.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
    return len(tok.encode(text, add_special_tokens=False))


async def abort_point(engine: Engine, plan: Plan, answer: asyncio.Future) -> str | None:
    """Poll the engine until the request reaches the point where `plan` aborts it; where it
    was then, or None if its answer came first."""
    rid = plan.body["rid"]
    while not answer.done():
        req = engine.requests.get(rid)
        if req is not None:
            if plan.behaviour in ("abort_early", "abort_dup"):
                return "queued" if req.admitted_time is None else "before its first token"
            if plan.behaviour == "abort_prefill":
                if 0 < req.num_computed_tokens < req.num_prompt_tokens:
                    return "mid-prefill"
                if req.num_output_tokens:
                    return "decoding (prefill missed)"
            elif req.num_resolved_outputs >= plan.decode_tokens:
                return "decoding"
        await asyncio.sleep(0.001)
    return None


async def run_plan(client, plan: Plan, ledger: Ledger) -> None:
    engine: Engine = client.app[ENGINE]
    b = plan.behaviour
    if b == "vanish_early":
        post = asyncio.ensure_future(client.post(plan.path, json=plan.body))
        await asyncio.sleep(plan.delay)
        if not post.done():
            post.cancel()
            await asyncio.gather(post, return_exceptions=True)
            ledger.maybe.update(plan.labels)
            ledger.outcomes["vanished before the first byte"] += 1
            return
        resp = post.result()
        resp.close()
        ledger.vanished.update(plan.labels)
        ledger.outcomes["vanished after the headers"] += 1
        return
    if b == "vanish_mid":
        resp = await client.post(plan.path, json=plan.body)
        ledger.check(resp.status == 200, f"{plan.path}: {resp.status}")
        for _ in range(plan.chunks):
            line = await resp.content.readuntil(b"\n\n")
            ledger.check(line != b"data: [DONE]\n\n", f"{plan.path}: done before its client left")
        resp.close()
        ledger.vanished.update(plan.labels)
        ledger.outcomes["vanished mid-stream"] += 1
        return

    async def answer() -> tuple[int, bytes]:
        resp = await client.post(plan.path, json=plan.body)
        return resp.status, await resp.read()

    task = asyncio.ensure_future(answer())
    if b.startswith("abort"):
        rid = plan.body["rid"]
        if plan.path != "/generate":
            plan.prompt_tokens = openai_prompt_tokens(engine, plan.body)
        point = await abort_point(engine, plan, task)
        if point is None and b == "abort_late":
            ledger.outcomes["finished before its abort"] += 1
        elif point is None:
            status, raw = await task
            ledger.problems.append(f"{plan.path}: {rid} answered before {b}: {status} "
                                   f"{raw[:300]!r}")
            return
        elif b == "abort_dup":  # a second request may not take a running request's rid
            second = {k: v for k, v in plan.body.items() if k != "stream_options"}
            r = await client.post(plan.path, json={**second, "stream": False})
            ledger.check(r.status == 400 and "rid" in await r.text(),
                         f"{plan.path}: a second {rid}: {r.status} {await r.text()}")
        if point is not None:
            r = await client.post("/abort_request", json={"rid": rid})
            is_aborted = (await r.json())["success"]
            ledger.check(is_aborted or b == "abort_late", f"abort of {rid} found nothing")
            kind = "stream" if plan.stream else "whole"
            ledger.outcomes[f"aborted {point} ({kind})" if is_aborted
                            else "finished before its abort"] += 1
    status, raw = await task
    if plan.expect_status != 200:
        ledger.check(status == plan.expect_status,
                     f"{plan.path} {plan.body}: {status} {raw[:300]!r}")
        error = json.loads(raw).get("error")
        ledger.check(isinstance(error, dict) and bool(error.get("message")),
                     f"{plan.path}: error body {raw[:200]!r}")
        ledger.outcomes["refused"] += 1
        return
    if b == "complete":
        ledger.check(status == 200, f"{plan.path} {plan.body}: {status} {raw[:300]!r}")
        ledger.outcomes["completed"] += 1
    reader = read_native if plan.path == "/generate" else read_openai
    prompt_sum = None
    for label, reason, tokens, prompt, has_tokens in reader(ledger, plan, status, raw):
        if label == "prompt":
            prompt_sum = prompt
            continue
        if b.startswith("abort"):  # one aborted late may have finished first
            ledger.check(reason == "abort" or (b == "abort_late" and reason == "length"),
                         f"{plan.path}: aborted request finished {reason}")
        ledger.saw(label, reason, tokens, prompt or 0, has_tokens)
    if prompt_sum is not None:  # OpenAI usage counts each prompt once, whatever n
        n = plan.body.get("n") or 1
        if len(set(plan.labels)) == 1:
            ledger.by_label[plan.labels[0]].prompt_tokens += prompt_sum * n
        else:
            ledger.by_label["*"].prompt_tokens += prompt_sum * n


MAX_DRAINING_VERSIONS = 4


async def draining_versions(client) -> int:
    """Adapter versions that a load in place replaced and whose requests still drain."""
    r = await client.get("/lora_adapters")
    return sum(1 for a in (await r.json())["adapters"] if a.get("replaced"))


async def churn_spares(client, loras: Path, stop: asyncio.Event, ledger: Ledger) -> int:
    """Load and unload adapters that no request uses, and load one that requests use again
    in place from its own folder (the same weights: every answer keeps its tokens, while the
    requests holding the old version drain on it), until `stop`; returns the cycles."""
    cycles = 0
    while not stop.is_set():
        for name in SPARES:
            r = await client.post("/load_lora_adapter", json={
                "lora_name": name, "lora_path": str(loras / name), "pinned": cycles % 3 == 1})
            ledger.check(r.status == 200, f"load {name}: {r.status} {await r.text()}")
            await asyncio.sleep(0.01)
            r = await client.post("/unload_lora_adapter", json={"lora_name": name})
            ledger.check(r.status == 200, f"unload {name}: {r.status} {await r.text()}")
        # (each replaced version keeps a host copy while its requests drain: on a slow
        # machine a load in place every 4 cycles outran the draining, and the versions filled
        # the host tier's 16 rows so that the spares' loads were refused; a few at a time)
        if cycles % 4 == 3 and await draining_versions(client) < MAX_DRAINING_VERSIONS:
            used = ADAPTERS[cycles // 4 % len(ADAPTERS)]
            r = await client.post("/load_lora_adapter", json={
                "lora_name": used, "lora_path": str(loras / used), "load_inplace": True})
            ledger.check(r.status == 200, f"load {used} in place: {r.status} {await r.text()}")
        cycles += 1
    return cycles


async def run_traffic(client, plans: list[Plan], loras: Path, ledger: Ledger) -> int:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(plan: Plan) -> None:
        async with gate:
            try:
                await asyncio.wait_for(run_plan(client, plan, ledger), PLAN_TIMEOUT_S)
            except TimeoutError:
                ledger.problems.append(f"hung: {plan.path} {plan.behaviour} {plan.body}")

    stop = asyncio.Event()
    churn = asyncio.ensure_future(churn_spares(client, loras, stop, ledger))
    try:
        await asyncio.gather(*(one(p) for p in plans))
    finally:
        stop.set()
        cycles = await churn
    return cycles


async def check_alone(client, plans: list[Plan], ledger: Ledger) -> int:
    """Run greedy one-generation requests again, alone: the answers under traffic must be
    the same (rows of other requests and adapters never leak into a row). Returns how many."""
    checked = [p for p in plans if p.is_greedy_single][:ALONE_CHECKS]
    for plan in checked:
        body = {k: v for k, v in plan.body.items() if k not in ("stream", "stream_options")}
        r = await client.post(plan.path, json=body)
        data = await r.json()
        if plan.path == "/generate":
            alone = data["output_ids"]
        else:
            c = data["choices"][0]
            alone = c["message"]["content"] if "message" in c else c["text"]
        ledger.check(alone == plan.result, f"{plan.path} {json.dumps(plan.body)[:200]}: "
                     f"{plan.result!r} under traffic, {alone!r} alone")
    return len(checked)


# ---------------------------------------------------------------- the audit

async def scrape(client) -> Samples:
    r = await client.get("/metrics")
    assert r.status == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(await r.text()) for s in fam.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over the series whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


async def settle(engine: Engine) -> None:
    for _ in range(int(SETTLE_S / 0.02)):
        if not engine.requests and not engine.scheduler.has_work and not engine._unloads:
            return
        await asyncio.sleep(0.02)


def leftovers(engine: Engine) -> dict[str, Any]:
    """Everything a finished request could leave behind in the engine; all zero/empty."""
    stats = engine.stats()
    adapters = engine.adapters
    assert adapters is not None
    return {
        "requests": sorted(engine.requests),
        "running": stats.num_running, "waiting": stats.num_waiting,
        "kv_blocks_used": stats.kv_blocks_used,
        "residency_entries": len(engine._residency),
        "unloads": len(engine._unloads),
        "adapter_refs": {a.name: a.refs for a in engine.list_adapters() if a.refs},
        "slot_locks": [s.locks for s in adapters._slots if s.locks],
        "unloading": [a.name for a in engine.list_adapters() if a.unloading],
    }


CLEAN = {"requests": [], "running": 0, "waiting": 0, "kv_blocks_used": 0,
         "residency_entries": 0, "unloads": 0, "adapter_refs": {}, "slot_locks": [],
         "unloading": []}


def audit_gauges(engine: Engine, after: Samples) -> None:
    assert total(after, "loraserve:num_running_reqs") == 0
    assert total(after, "loraserve:num_queue_reqs") == 0
    assert total(after, "loraserve:kv_cache_usage") == 0
    tiers = Counter(a.tier for a in engine.list_adapters())
    for tier in ("gpu", "host", "disk"):
        assert total(after, "loraserve:lora_adapters", tier=tier) == tiers[tier], tier
    assert total(after, "loraserve:lora_pinned_adapters") == sum(
        a.pinned for a in engine.list_adapters())


def audit_consistency(engine: Engine, before: Samples, after: Samples) -> None:
    """Relations between the counters that hold whatever the clients saw."""
    def d(name: str, **labels: str) -> float:
        return delta(after, before, name, **labels)

    finished = d("loraserve:requests_total")
    assert d("loraserve:queued_requests_total") == finished  # every queued request ended once
    assert d("loraserve:adapter_requests_total") == finished
    assert d("loraserve:e2e_request_latency_seconds_count") == finished
    assert d("loraserve:generation_tokens_total") == d("loraserve:adapter_generation_tokens_total")
    admitted = d("loraserve:queue_time_seconds_count")
    assert d("loraserve:lora_requests_total") == admitted
    assert d("loraserve:lora_requests_total", residency="base") == d(
        "loraserve:queue_time_seconds_count", adapter="base")
    assert admitted <= finished
    assert d("loraserve:time_to_first_token_seconds_count") <= admitted
    assert total(after, "loraserve:generation_tokens_total") == engine.stats().generated_tokens
    for label in LABELS:
        assert d("loraserve:adapter_requests_total", adapter=label) == d(
            "loraserve:e2e_request_latency_seconds_count", adapter=label), label
        for reason in ("stop", "length", "abort"):
            assert d("loraserve:adapter_requests_total", adapter=label,
                     finish_reason=reason) <= d("loraserve:requests_total",
                                                finish_reason=reason), (label, reason)


def audit_exact(ledger: Ledger, before: Samples, after: Samples) -> None:
    """The counters against what the clients saw. Generations whose client vanished must be
    aborts (their tokens are nobody's to know); those whose client left before the first
    byte may never have been submitted."""
    def d(name: str, **labels: str) -> float:
        return delta(after, before, name, **labels)

    got: dict[str, dict[str, float]] = {}
    want: dict[str, dict[str, float]] = {}
    for label in LABELS:
        t = ledger.by_label[label]
        vanished, maybe = ledger.vanished[label], ledger.maybe[label]
        got[label] = {
            "stop": d("loraserve:adapter_requests_total", adapter=label, finish_reason="stop"),
            "length": d("loraserve:adapter_requests_total", adapter=label,
                        finish_reason="length"),
            "abort-seen": d("loraserve:adapter_requests_total", adapter=label,
                            finish_reason="abort") - vanished,
        }
        want[label] = {"stop": t.reasons["stop"], "length": t.reasons["length"],
                       "abort-seen": t.reasons["abort"]}
        if maybe:  # 0..maybe more aborts
            extra = got[label]["abort-seen"] - t.reasons["abort"]
            assert 0 <= extra <= maybe, (label, extra, maybe)
            got[label]["abort-seen"] -= extra
        if not vanished and not maybe:  # every generation's tokens are known
            got[label]["tokens"] = d("loraserve:adapter_generation_tokens_total", adapter=label)
            want[label]["tokens"] = t.tokens
            got[label]["ttft"] = d("loraserve:time_to_first_token_seconds_count", adapter=label)
            want[label]["ttft"] = t.with_tokens
            # a gap before every token but a generation's first
            got[label]["itl"] = d("loraserve:inter_token_latency_seconds_count", adapter=label)
            want[label]["itl"] = t.tokens - t.with_tokens
        else:
            assert d("loraserve:adapter_generation_tokens_total", adapter=label) >= t.tokens
    assert got == want, f"metrics {got}\nclients {want}"
    for reason in ("stop", "length"):
        assert d("loraserve:requests_total", finish_reason=reason) == sum(
            ledger.by_label[lab].reasons[reason] for lab in LABELS)
    if not ledger.vanished and not ledger.maybe:
        assert d("loraserve:generation_tokens_total") == sum(
            ledger.by_label[lab].tokens for lab in LABELS)
        assert d("loraserve:prompt_tokens_total") == sum(
            t.prompt_tokens for t in ledger.by_label.values())


# ---------------------------------------------------------------- the tests

async def fuzz_round(client, folders, seed: int, count: int, vanish: bool) -> Ledger:
    engine: Engine = client.app[ENGINE]
    rng = random.Random(seed)
    plans = draw_plans(rng, count, vanish=vanish, abort_prefix=f"r{seed}")
    ledger = Ledger(engine.tokenizer)
    before = await scrape(client)
    cycles = await asyncio.wait_for(run_traffic(client, plans, folders[1], ledger), 120)
    await settle(engine)
    assert not ledger.problems, "\n".join(ledger.problems[:20])
    assert leftovers(engine) == CLEAN
    after = await scrape(client)
    audit_gauges(engine, after)
    audit_consistency(engine, before, after)
    audit_exact(ledger, before, after)
    alone = await check_alone(client, plans, ledger)
    assert not ledger.problems, "\n".join(ledger.problems[:20])
    stats = engine.stats()
    print(f"\nstream fuzz seed {seed}: {len(plans)} plans, {dict(ledger.outcomes)}, "
          f"{cycles} spare load/unload cycles (and loads in place), {stats.num_steps} steps, "
          f"{stats.num_preemptions} preemptions, {alone} answers the same alone")
    return ledger


async def test_mixed_traffic_counts_exactly(client, folders) -> None:
    """No client vanishes: every generation's outcome is known, so the counters must equal
    the clients' tally exactly."""
    await fuzz_round(client, folders, seed=11, count=200, vanish=False)


async def test_chaos_with_vanishing_clients_leaves_nothing(aiohttp_client, folders) -> None:
    """Clients also vanish, and the KV cache holds 1024 tokens (64 blocks of 16) for up to
    16 running requests of up to 1000: requests are preempted and recomputed too."""
    config = make_config(folders, kv_cache_cpu_bytes=1 << 19)
    metrics = ServingMetrics()
    client = await aiohttp_client(create_app(Engine.from_config(config, metrics), config,
                                             metrics))
    await fuzz_round(client, folders, seed=23, count=260, vanish=True)


async def test_chaos_with_the_prefix_cache(aiohttp_client, folders, monkeypatch) -> None:
    """The chaos round with the prefix cache on and a 32-token prefix before every prompt
    (two full blocks each request can take from another's, across adapters' separate chains):
    preemption, vanishing clients and adapter loads around shared blocks, every greedy answer
    still the one it gives alone, and nothing left behind."""
    shared = [7 + (11 * i) % 290 for i in range(32)]
    plain = prompt_ids
    monkeypatch.setattr(sys.modules[__name__], "prompt_ids",
                        lambda rng, lo=2, hi=40: shared + plain(rng, lo, hi))
    config = make_config(folders, kv_cache_cpu_bytes=1 << 19, enable_prefix_caching=True)
    metrics = ServingMetrics()
    engine = Engine.from_config(config, metrics)
    client = await aiohttp_client(create_app(engine, config, metrics))
    await fuzz_round(client, folders, seed=23, count=200, vanish=True)
    assert engine.block_manager.num_hit_tokens > 0


# ---------------------------------------------------------------- regressions

STREAM_BODIES = {
    "/generate": {"input_ids": [5, 6, 7], "lora_path": "a1", "rid": "gone", "stream": True,
                  "sampling_params": {"max_new_tokens": LONG, "ignore_eos": True}},
    "/v1/completions": {"model": f"{SERVED}:a1", "prompt": [5, 6, 7], "rid": "gone",
                        "max_tokens": LONG, "ignore_eos": True, "stream": True},
    "/v1/chat/completions": {"model": f"{SERVED}:a1", "rid": "gone", "max_tokens": LONG,
                             "ignore_eos": True, "stream": True,
                             "messages": [{"role": "user", "content": "hi"}]},
}


@pytest.mark.parametrize("path", list(STREAM_BODIES))
async def test_client_gone_as_its_prompt_is_tokenized_aborts_its_request(client, path) -> None:
    """The client closes its connection while its prompt is in the tokenizer thread, and the
    thread's answer reaches the loop just before the connection's end does: the handler
    resumes on a closing transport, submits, and its stream's first write fails before any
    cancellation arrives. The request must still be aborted (it ran all its LONG tokens to
    nobody, and counted as served), and counted as an abort."""
    import socket
    import threading
    import time

    from api.app import TOKENIZER_THREAD

    engine: Engine = client.app[ENGINE]
    before = await scrape(client)
    gate = threading.Event()
    tokenizer = client.app[TOKENIZER_THREAD]
    blocker = tokenizer.submit(gate.wait, 30)  # the handler's tokenizing queues behind it
    body = json.dumps(STREAM_BODIES[path]).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock = socket.create_connection((client.server.host, client.server.port))
    sock.sendall(head + body)
    for _ in range(1000):  # until the handler's tokenizing waits in the thread's queue
        if tokenizer._work_queue.qsize():
            break
        await asyncio.sleep(0.005)
    assert tokenizer._work_queue.qsize() == 1
    # Without letting the loop run: the thread finishes the prompt (its answer is queued on
    # the loop) and then the connection ends (the loop sees it after that answer).
    gate.set()
    sock.close()
    time.sleep(0.3)  # noqa: ASYNC251 - the loop must not run meanwhile
    blocker.result(5)
    await asyncio.sleep(0.5)  # the handler has resumed and answered (it takes milliseconds)
    running = {rid: r.num_output_tokens for rid, r in engine.requests.items()}
    assert running == {}, f"running for nobody: {running}"
    await settle(engine)
    after = await scrape(client)
    aborted = delta(after, before, "loraserve:requests_total", finish_reason="abort")
    served = delta(after, before, "loraserve:requests_total") - aborted
    assert (aborted, served) in ((0, 0), (1, 0))
    assert leftovers(engine) == CLEAN


async def test_one_rid_twice_while_an_adapter_loads(client, folders) -> None:
    """Two requests with one rid for an adapter whose load is under way both wait for the
    load inside the engine's submit. The rid was checked before that wait, so both were
    queued: the engine's table kept the second under the rid, the first ran on out of reach
    (an abort by its rid stopped only one; the table lost the rid when either finished).
    Now the second is refused (400, naming the rid) and the abort stops the request."""
    import threading

    engine: Engine = client.app[ENGINE]
    adapters = engine.adapters
    assert adapters is not None
    gate = threading.Event()
    read_host = adapters._read_host

    def slow_read(path: str, *args):  # the loader thread holds the load until the gate opens
        gate.wait(30)
        return read_host(path, *args)

    adapters._read_host = slow_read
    load = asyncio.ensure_future(client.post("/load_lora_adapter", json={
        "lora_name": "s1", "lora_path": str(folders[1] / "s1")}))
    body = {"input_ids": [5, 6, 7], "lora_path": "s1", "rid": "twin", "stream": True,
            "sampling_params": {"max_new_tokens": LONG, "ignore_eos": True}}
    for _ in range(500):
        if "s1" in adapters._loading:
            break
        await asyncio.sleep(0.01)
    posts = [asyncio.ensure_future(client.post("/generate", json=body)) for _ in range(2)]
    await asyncio.sleep(0.5)  # both wait for the load inside submit
    gate.set()
    assert (await load).status == 200
    await asyncio.wait(posts, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.sleep(0.2)
    r = await client.post("/abort_request", json={"rid": "twin"})
    assert (await r.json())["success"]
    answers = [await p for p in posts]
    statuses = sorted(a.status for a in answers)
    for a in answers:
        await a.read()
    await asyncio.sleep(0.3)
    assert (statuses, sorted(engine.requests)) == ([200, 400], [])
    await settle(engine)
    assert leftovers(engine) == CLEAN


REFUSED_BATCHES = [
    ("/generate", {"input_ids": [[5, 6], [7, 8]], "lora_path": ["a1", "nope"],
                   "sampling_params": {"max_new_tokens": 4}}, 400),
    ("/generate", {"input_ids": [[5, 6], [7, 8], [9]], "lora_path": ["a2", None, "gone"],
                   "stream": True, "sampling_params": {"max_new_tokens": 4}}, 400),
    ("/generate", {"input_ids": [[5, 6], [7, 8]], "lora_path": [None, "a3"], "rid": ["x", "y"],
                   "sampling_params": [{"max_new_tokens": 4}, {"max_new_tokens": 2000}]}, 400),
    ("/v1/completions", {"model": SERVED, "prompt": [[5], [6]], "lora_path": ["a1", "nx"],
                         "max_tokens": 2}, 400),
    ("/v1/completions", {"model": SERVED, "prompt": [[5], [6], [7]], "n": 2, "max_tokens": 2,
                         "lora_path": [None, "a2", "zz"], "stream": True}, 400),
]


async def test_refused_batch_leaves_no_trace(client) -> None:
    """A request whose last item is refused (an unknown adapter, a length past the context)
    is answered 4xx and leaves nothing: before, the items ahead of it were queued and then
    aborted, so /metrics counted requests the client never had (queued, aborted, their
    latencies and prompt tokens), and their adapters were prefetched for nothing."""
    engine: Engine = client.app[ENGINE]
    before = await scrape(client)
    for path, body, status in REFUSED_BATCHES:
        r = await client.post(path, json=body)
        assert r.status == status, (path, body, await r.text())
    await settle(engine)
    after = await scrape(client)
    for name in ("loraserve:queued_requests_total", "loraserve:requests_total",
                 "loraserve:adapter_requests_total", "loraserve:prompt_tokens_total",
                 "loraserve:e2e_request_latency_seconds_count",
                 "loraserve:queue_time_seconds_count", "loraserve:lora_requests_total"):
        assert delta(after, before, name) == 0, name
    assert leftovers(engine) == CLEAN


async def test_adapter_requests_count_aborts_apart(client) -> None:
    """Per adapter, an aborted request is counted as aborted, not as a served one: the
    per-adapter request counter has the finish reason as the server-wide one has."""
    engine: Engine = client.app[ENGINE]
    before = await scrape(client)
    r = await client.post("/generate", json={"input_ids": [5, 6], "lora_path": "a2",
                                             "sampling_params": {"max_new_tokens": 3}})
    assert r.status == 200
    post = asyncio.ensure_future(client.post("/generate", json={
        "input_ids": [5, 6], "lora_path": "a2", "rid": "cut",
        "sampling_params": {"max_new_tokens": LONG, "ignore_eos": True}}))
    for _ in range(1000):
        req = engine.requests.get("cut")
        if req is not None and req.num_resolved_outputs >= 2:
            break
        await asyncio.sleep(0.005)
    r = await client.post("/abort_request", json={"rid": "cut"})
    assert (await r.json())["success"]
    body = await (await post).json()
    assert body["meta_info"]["finish_reason"]["type"] == "abort"
    await settle(engine)
    after = await scrape(client)
    by_reason = {reason: delta(after, before, "loraserve:adapter_requests_total", adapter="a2",
                               finish_reason=reason) for reason in ("stop", "length", "abort")}
    assert by_reason == {"stop": 0, "length": 1, "abort": 1}
    tokens = delta(after, before, "loraserve:adapter_generation_tokens_total", adapter="a2")
    assert tokens == 3 + body["meta_info"]["completion_tokens"]


def test_every_metric_is_documented() -> None:
    """README's metrics table names every metric /metrics exports with each of its labels,
    and says what `lora_requests` counts as its help text does (where the adapter was when
    the request arrived: the help said at admission, where it is always on the GPU)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n### Metrics\n", 1)[1].split("\n#", 1)[0]
    rows = {line.split("`")[1]: line for line in section.splitlines()
            if line.startswith("| `loraserve:")}
    m = ServingMetrics()
    exported = {metric._name: metric._labelnames for metric in vars(m).values()
                if hasattr(metric, "_labelnames")}
    assert set(rows) == set(exported)
    for name, labels in exported.items():
        assert all(f"`{label}`" in rows[name] for label in labels), (name, labels)
    assert "when they arrived" in m.lora_requests._documentation
    assert "when they arrived" in rows["loraserve:lora_requests"]
