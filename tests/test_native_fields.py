"""/generate against SGLang's GenerateReqInput and sampling_params, field by field: every
field SGLang defines is served, honoured, or refused by name, and none is silently ignored
(api/native.py, api/protocol.py). The real engine on the tiny random Llama of test_api."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.app import ENGINE
from api.native import UNSUPPORTED_FIELDS, UNSUPPORTED_SAMPLING
from api.textstream import TextStream
from tests.served import sse_events

SAMPLED = {"max_new_tokens": 8, "temperature": 1.0, "ignore_eos": True}
GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}


async def generate(client, body: dict) -> tuple[int, object]:
    r = await client.post("/generate", json=body)
    return r.status, await r.json()


def _non_default(default: object) -> object:
    if isinstance(default, bool):
        return not default
    return 5 if isinstance(default, int) else "x"


# ---------------------------------------------------------------- refused by name

@pytest.mark.parametrize("name, value", [
    *[(name, _non_default(default)) for name, default in UNSUPPORTED_FIELDS],
    ("image_data", ["https://example.com/cat.png"]),
    ("image_data", [None, {"url": "x"}]),
    ("return_hidden_states", [False, True]),
    ("custom_logit_processor", "{\"callable\": \"...\"}"),
    ("session_params", {"id": "s1"}),
])
async def test_unsupported_fields_are_refused_by_name(client, name: str, value: object) -> None:
    text = ["a", "b"] if isinstance(value, list) else "a"
    status, body = await generate(client, {"text": text, name: value, "sampling_params": GREEDY})
    assert status == 400, body
    assert body["error"]["message"] == f"{name} is not supported by loraserve"
    assert not client.app[ENGINE].requests


@pytest.mark.parametrize("name, value", [
    *[(name, "x") for name in UNSUPPORTED_SAMPLING],
    ("json_schema", "{\"type\": \"object\"}"),
    ("regex", "(yes|no)"),
    ("ebnf", "root ::= \"a\""),
    ("stop_regex", ["\\d+"]),
    ("custom_params", {"token_id": 5}),
])
async def test_unsupported_sampling_fields_are_refused_by_name(client, name: str,
                                                               value: object) -> None:
    sampling = [GREEDY, {**GREEDY, name: value}]  # the second input's, in a batch
    status, body = await generate(client, {"text": ["a", "b"], "sampling_params": sampling})
    assert status == 400, body
    assert body["error"]["message"] == f"sampling_params.{name} is not supported by loraserve"


async def test_sglang_defaults_of_unsupported_fields_are_accepted(client) -> None:
    """Clients (and SGLang's own) send the defaults: those, null, and empty or all-null lists
    change nothing, so they are served."""
    defaults = {name: default for name, default in UNSUPPORTED_FIELDS}
    sampling = {**GREEDY, **{name: None for name in UNSUPPORTED_SAMPLING}, "stop_regex": [],
                "custom_params": {}}
    status, body = await generate(client, {
        "text": ["a", "b"], **defaults, "image_data": [None, None], "modalities": [],
        "sampling_params": sampling, "cache_salt": ["t1", "t2"], "extra_key": "k",
        "no_logs": True, "routed_dp_rank": 0, "data_parallel_rank": None,
        "disagg_prefill_dp_rank": 3, "kv_router_hint": {"source_control_endpoint": "x"},
    })
    assert status == 200, body
    assert [b["meta_info"]["completion_tokens"] for b in body] == [8, 8]


@pytest.mark.parametrize("extra, param", [
    ({"routed_dp_rank": 1}, "routed_dp_rank"),
    ({"data_parallel_rank": 2}, "data_parallel_rank"),
    ({"cache_salt": ["only-one"]}, "cache_salt"),
    ({"extra_key": 5}, "extra_key"),
    ({"sampling_params": {"spaces_between_special_tokens": "yes"}},
     "sampling_params.spaces_between_special_tokens"),
    ({"sampling_params": {"seed": 1, "sampling_seed": 2}}, "sampling_params.sampling_seed"),
    ({"sampling_params": {"stream_interval": 0}}, "sampling_params.stream_interval"),
    ({"sampling_params": {"n": 0}}, "sampling_params.n"),
    ({"sampling_params": {"n": 129}}, "sampling_params.n"),
    ({"sampling_params": [{"n": 2}, {"n": 3}]}, "sampling_params.n"),
    ({"rid": ["r", "r"]}, "rid"),
    ({"return_logprob": True, "logprob_start_len": 2}, "logprob_start_len"),
    ({"return_logprob": True, "logprob_start_len": -2}, "logprob_start_len"),
])
async def test_bad_values_name_their_field(client, extra: dict, param: str) -> None:
    status, body = await generate(client, {"input_ids": [[5, 6], [7, 8]], **extra})
    assert status == 400, body
    assert param in body["error"]["message"]
    assert not client.app[ENGINE].requests


# ---------------------------------------------------------------- n, rid, stream_interval

async def test_n_samples_each_input(client) -> None:
    """n > 1 answers a list, input-major (each input's n samples together), as SGLang does;
    sample j draws with seed + j, so the samples differ and repeat."""
    status, body = await generate(client, {"input_ids": [5, 6, 7],
                                           "sampling_params": {**SAMPLED, "n": 3, "seed": 11}})
    assert status == 200 and isinstance(body, list) and len(body) == 3, body
    outs = [b["output_ids"] for b in body]
    assert len({tuple(o) for o in outs}) == 3
    _, again = await generate(client, {"input_ids": [5, 6, 7],
                                       "sampling_params": {**SAMPLED, "seed": 12}})
    assert again["output_ids"] == outs[1]

    status, body = await generate(client, {
        "input_ids": [[5, 6, 7], [8, 9]], "rid": ["p", "q"],
        "sampling_params": [{**GREEDY, "n": 2}, {**GREEDY, "max_new_tokens": 3, "n": 2}]})
    assert status == 200, body
    assert [b["meta_info"]["prompt_tokens"] for b in body] == [3, 3, 2, 2]
    assert [b["meta_info"]["completion_tokens"] for b in body] == [8, 8, 3, 3]
    assert [b["meta_info"]["id"] for b in body] == ["p_0", "p_1", "q_0", "q_1"]
    assert body[0]["output_ids"] == body[1]["output_ids"]  # greedy: the samples agree


async def test_n_streams_with_an_index(client) -> None:
    r = await client.post("/generate", json={"text": "a", "stream": True, "rid": "s",
                                             "sampling_params": {**GREEDY, "n": 2}})
    chunks = sse_events(await r.text())
    assert {c["index"] for c in chunks} == {0, 1}
    assert {c["meta_info"]["id"] for c in chunks} == {"s_0", "s_1"}


async def test_a_string_rid_prefixes_a_batch(client) -> None:
    """As SGLang does: one rid for a list of inputs names the k-th `<rid>_<k>`."""
    status, body = await generate(client, {"text": ["a", "b", "c"], "rid": "job",
                                           "sampling_params": GREEDY})
    assert status == 200, body
    assert [b["meta_info"]["id"] for b in body] == ["job_0", "job_1", "job_2"]


async def test_stream_interval(client) -> None:
    """A chunk for the first token, then every stream_interval tokens, and the last."""
    r = await client.post("/generate", json={
        "input_ids": [5, 6], "stream": True,
        "sampling_params": {**GREEDY, "stream_interval": 3}})
    chunks = sse_events(await r.text())
    assert [c["meta_info"]["completion_tokens"] for c in chunks] == [1, 4, 7, 8]
    plain = await (await client.post("/generate", json={"input_ids": [5, 6],
                                                        "sampling_params": GREEDY})).json()
    assert chunks[-1]["text"] == plain["text"]


# ---------------------------------------------------------------- sampling fields

async def test_sampling_seed_is_seed(client) -> None:
    outs = []
    for seed in ({"seed": 3}, {"sampling_seed": 3}, {"seed": 3, "sampling_seed": 3}):
        status, body = await generate(client, {"input_ids": [5, 6, 7],
                                               "sampling_params": {**SAMPLED, **seed}})
        assert status == 200, body
        outs.append(body["output_ids"])
    assert outs[0] == outs[1] == outs[2]


async def test_null_max_new_tokens_runs_to_the_context(make_client) -> None:
    """Left out, max_new_tokens is 128; null, as on SGLang, is no limit but the context."""
    client = await make_client(context_length=150)
    body = {"input_ids": [5] * 10, "sampling_params": {"ignore_eos": True}}
    _, default = await generate(client, body)
    assert default["meta_info"]["completion_tokens"] == 128
    body["sampling_params"]["max_new_tokens"] = None
    status, unlimited = await generate(client, body)
    assert status == 200, unlimited
    assert unlimited["meta_info"]["finish_reason"] == {"type": "length", "length": 140}


async def test_a_stop_token_is_trimmed_from_the_text(client) -> None:
    """As SGLang does: the stop token that ended a generation is not in its text (it stays in
    output_ids); no_stop_trim keeps it."""
    tok = client.app[ENGINE].tokenizer
    _, full = await generate(client, {"input_ids": [5, 6, 7], "sampling_params": {
        **GREEDY, "max_new_tokens": 16}})
    ids = full["output_ids"]
    k = next((i for i in range(1, len(ids))
              if tok.decode([ids[i]]).strip().isalnum() and ids[i] not in ids[:i]), None)
    if k is None:
        pytest.skip(f"no visible token to stop on in {ids}")
    stop = {"input_ids": [5, 6, 7], "sampling_params": {
        **GREEDY, "max_new_tokens": 16, "stop_token_ids": [ids[k]]}}
    _, trimmed = await generate(client, stop)
    assert trimmed["output_ids"] == ids[:k + 1]
    assert trimmed["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[k]}
    assert trimmed["text"] == tok.decode(ids[:k])
    stop["sampling_params"]["no_stop_trim"] = True
    _, kept = await generate(client, stop)
    assert kept["text"] == tok.decode(ids[:k + 1])


def test_eos_and_spaces_between_special_tokens_reach_the_text(tmp_path: Path) -> None:
    from tests._fake_engine import build_tiny_tokenizer

    tok = build_tiny_tokenizer(tmp_path)
    ids = tok.encode("ab") + [tok.eos_token_id]
    eos = tok.eos_token_id

    def text(stream: TextStream) -> str:
        return stream.push(ids[:-1]) + stream.push(ids[-1:], finished=True, matched_stop=eos)

    assert text(TextStream(tok, skip_special_tokens=False)) == "ab"
    assert text(TextStream(tok, skip_special_tokens=False, trim_stop=False)) == "ab<|im_end|>"

    calls: list[dict] = []

    class Spy:
        def decode(self, token_ids: list[int], **kwargs) -> str:
            calls.append(kwargs)
            return tok.decode(token_ids, **kwargs)

    text(TextStream(Spy(), spaces_between_special_tokens=False))  # type: ignore[arg-type]
    assert calls and all(c["spaces_between_special_tokens"] is False for c in calls)


# ---------------------------------------------------------------- logprob_start_len

async def test_logprob_start_len(client) -> None:
    """As SGLang writes them: input logprobs from logprob_start_len on (-1, the default: the
    last prompt token only), the first entry's logprob null; a list aligns with the inputs."""
    prompt = [5, 6, 7, 8, 9]
    base = {"input_ids": prompt, "return_logprob": True, "top_logprobs_num": 2,
            "sampling_params": {**GREEDY, "max_new_tokens": 2}}
    _, whole = await generate(client, {**base, "logprob_start_len": 0})
    _, default = await generate(client, base)
    _, tail = await generate(client, {**base, "logprob_start_len": 2})
    full = whole["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in full] == prompt and full[0][0] is None
    assert default["meta_info"]["input_token_logprobs"] == [[None, 9, None]]
    assert default["meta_info"]["input_top_logprobs"] == [None]
    # the tail's prompt rows are a smaller batch for the lm_head: equal within rounding
    got = tail["meta_info"]["input_token_logprobs"]
    assert got[0] == [None, 7, None] and len(got) == len(full) - 2
    assert all(t == w[1] and abs(lp - w[0]) < 1e-4 for (lp, t, _), w in zip(got[1:], full[3:]))
    tops = tail["meta_info"]["input_top_logprobs"]
    assert tops[0] is None and [[t for _, t, _ in row] for row in tops[1:]] == [
        [t for _, t, _ in row] for row in whole["meta_info"]["input_top_logprobs"][3:]]
    assert tail["output_ids"] == whole["output_ids"] == default["output_ids"]

    _, batch = await generate(client, {**base, "input_ids": [prompt, [5, 6]],
                                       "logprob_start_len": [3, 0]})
    assert [[t for _, t, _ in b["meta_info"]["input_token_logprobs"]] for b in batch] == [
        [8, 9], [5, 6]]
    # without return_logprob it is unused, as on SGLang
    status, _ = await generate(client, {"input_ids": [5, 6], "logprob_start_len": 9})
    assert status == 200
