"""Native routes, shaped like SGLang's: /generate, /abort_request, /health, /health_generate,
/get_model_info, /tokenize, /detokenize, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from api import sse
from api.app import ENGINE, LIFECYCLE, METRICS, json_response, off_loop
from api.errors import ApiError, Style, renamed
from api.generation import (
    MAX_STREAM_INTERVAL,
    Generation,
    GenSpec,
    collect,
    follow,
    is_chunk_due,
    isolation_key,
    submit_all,
    unless_disconnected,
)
from api.openai import chat_prompt, check_request_template
from api.protocol import (
    AbortRequest,
    ChatRequest,
    DetokenizeRequest,
    GenerateRequest,
    NativeSampling,
    TokenizeRequest,
    decode_body,
)
from runtime.errors import ValidationError
from runtime.request import FinishReason, SamplingParams

log = logging.getLogger("loraserve.api")
routes = web.RouteTableDef()
V = TypeVar("V")

MAX_TOP_LOGPROBS = 20
MAX_N = 128  # samples per input (sampling_params.n), as the OpenAI routes' n
HEALTH_GENERATE_TIMEOUT_S = 30.0


@routes.post("/generate")
async def generate(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    body = await decode_body(request, GenerateRequest)
    items, is_batch = await off_loop(request, generate_items, body, engine.tokenizer)
    try:
        gens = await submit_all(engine, [it.spec for it in items])
    except ValidationError as e:  # the engine's "prompt" is the field the body gave it in
        raise renamed(e, {"prompt": "text" if body.text is not None else "input_ids"}) from None
    with_text = bool(body.return_text_in_logprobs)
    if body.stream:
        return await _stream(request, gens, items, is_batch, with_text)
    await unless_disconnected(request, collect(engine, gens))
    results = [result(g, with_text, engine.tokenizer, items[g.index].logprob_start_len)
               for g in gens]
    return json_response(results if is_batch else results[0])


async def _stream(request: web.Request, gens: list[Generation], items: list[NativeItem],
                  is_batch: bool, with_text: bool) -> web.StreamResponse:
    engine = request.app[ENGINE]
    # the headers go out at once, as SGLang's do: an abort before any token is a chunk in-band
    # (finish_reason abort), as the answer without streaming carries it too
    resp = sse.start(request)
    await resp.response()
    num_sent = [0] * len(gens)  # output tokens each generation's last chunk carried

    async def produce() -> None:
        async with contextlib.aclosing(follow(engine, gens)) as outputs:
            async for g, _ in outputs:
                item = items[g.index]
                if not is_chunk_due(g, num_sent[g.index], item.stream_interval):
                    continue
                num_sent[g.index] = g.completion_tokens
                chunk = result(g, with_text, engine.tokenizer, item.logprob_start_len)
                if is_batch:
                    chunk["index"] = g.index
                await sse.send(resp, chunk)

    return await sse.run(request, resp, produce(), Style.NATIVE)


@dataclass
class NativeItem:
    """One generation a /generate body asks for: what to submit, and how to answer."""

    spec: GenSpec
    logprob_start_len: int = -1  # first prompt position with logprobs; -1: the last one
    stream_interval: int = 1


# SGLang's /generate fields that loraserve does not implement, with SGLang's default: a body
# that sets one to anything else is refused by name rather than served as if it were unset.
UNSUPPORTED_FIELDS: tuple[tuple[str, object], ...] = (
    ("input_embeds", None), ("image_data", None), ("video_data", None), ("audio_data", None),
    ("mm_hashes", None), ("mm_content_hashes", None), ("use_audio_in_video", False),
    ("video_config", None), ("modalities", None),
    ("return_sampling_mask", False), ("return_flat_raw_top_logprobs", False),
    ("return_flat_raw_top_logprobs_b64", False), ("log_metrics", True),
    ("return_hidden_states", False), ("return_routed_experts", False),
    ("routed_experts_start_len", 0), ("return_indexer_topk", False), ("session_id", None),
    ("session_params", None), ("lora_id", None), ("custom_logit_processor", None),
    ("positional_embed_overrides", None), ("bootstrap_host", None), ("bootstrap_port", None),
    ("bootstrap_room", None), ("bootstrap_pair_key", None), ("decode_tp_size", None),
    ("routing_key", None), ("conversation_id", None), ("http_worker_ipc", None),
    ("background", False), ("require_reasoning", False), ("max_thinking_tokens", None),
    ("priority", None), ("custom_labels", None), ("return_bytes", False),
    ("return_entropy", False), ("return_prompt_token_ids", False),
    ("external_trace_header", None), ("received_time", None),
    ("need_wait_for_mm_inputs", None), ("num_items_assigned", None), ("encoder_urls", None),
    ("max_dynamic_patch", None), ("min_dynamic_patch", None),
    ("image_max_dynamic_patch", None), ("video_max_dynamic_patch", None),
    ("images_config", None), ("multi_item_delimiter_indices", None),
)
UNSUPPORTED_SAMPLING = ("stop_regex", "json_schema", "regex", "ebnf", "structural_tag",
                        "custom_params")


def _is_set(value: object, default: object) -> bool:
    """Whether a field holds something other than its default (null, the default itself, and
    lists or objects holding only those count as unset)."""
    if value is None or value == default:
        return False
    if isinstance(value, list):
        return any(_is_set(v, default) for v in value)
    if isinstance(value, dict):
        return any(_is_set(v, None) for v in value.values())
    return True


def refuse_unsupported(body: GenerateRequest, sampling: list[NativeSampling]) -> None:
    """A 400 naming the first SGLang field set that loraserve does not implement."""
    for name, default in UNSUPPORTED_FIELDS:
        if _is_set(getattr(body, name), default):
            raise ApiError(400, f"{name} is not supported by loraserve", param=name)
    for s in sampling:
        for name in UNSUPPORTED_SAMPLING:
            if _is_set(getattr(s, name), None):
                raise ApiError(400, f"sampling_params.{name} is not supported by loraserve",
                               param=f"sampling_params.{name}")
    for name in ("routed_dp_rank", "data_parallel_rank"):
        if getattr(body, name) not in (None, 0):
            raise ApiError(400, f"{name}: loraserve runs one data-parallel rank, 0",
                           param=name)


def generate_items(body: GenerateRequest, tokenizer: Any) -> tuple[list[NativeItem], bool]:
    """The generations a /generate body asks for (n per input, input-major), and whether the
    answer is a list (a list of inputs, or n > 1)."""
    prompts, is_batch = _prompts(body, tokenizer)
    num_inputs = len(prompts)
    sampling = _aligned(body.sampling_params, num_inputs, "sampling_params", NativeSampling())
    refuse_unsupported(body, sampling)
    n = _samples_per_input(sampling)
    loras = _aligned(body.lora_path, num_inputs, "lora_path", None)
    logprob = _aligned(body.return_logprob, num_inputs, "return_logprob", False)
    starts = _aligned(body.logprob_start_len, num_inputs, "logprob_start_len", -1)
    top = _aligned(body.top_logprobs_num, num_inputs, "top_logprobs_num", 0)
    ids_logprob = _ids_logprob(body.token_ids_logprob, num_inputs, logprob)
    salts = _aligned(body.cache_salt, num_inputs, "cache_salt", None)
    extras = _aligned(body.extra_key, num_inputs, "extra_key", None)
    is_batch = is_batch or n > 1
    rids = _rids(body.rid, num_inputs, n, is_batch)
    items = []
    for i, prompt in enumerate(prompts):
        s = sampling[i]
        _check_item(s, prompt, top[i], starts[i] if logprob[i] else -1)
        for j in range(n):
            spec = GenSpec(
                prompt, _params(s, j), lora_name=loras[i] or None, rid=rids[i * n + j],
                return_logprob=logprob[i], top_logprobs_num=top[i],
                token_ids_logprob=ids_logprob[i], trim_stop=not s.no_stop_trim,
                # result() lists logprobs from the token after the start (its own is null)
                logprob_start=_logprob_start(starts[i], len(prompt)) + 1,
                cache_salt=isolation_key(salts[i], extras[i]),
            )
            items.append(NativeItem(spec, starts[i], s.stream_interval or 1))
    return items, is_batch


def _ids_logprob(value: list[int | list[int]] | None, num_inputs: int,
                 logprob: list[bool]) -> list[list[int] | None]:
    """token_ids_logprob for each input: a list of ids is every input's, a list of lists is
    aligned with the inputs (an empty one: none for that input). It needs return_logprob,
    without which SGLang returns no logprobs at all; here that is a 400, not an ignored field."""
    if value is None:
        return [None] * num_inputs
    if all(isinstance(t, int) for t in value):
        per_input: list[list[int]] = [value] * num_inputs  # type: ignore[list-item]
    elif all(isinstance(t, list) for t in value):
        if len(value) != num_inputs:
            raise ApiError(400, f"token_ids_logprob: {len(value)} lists for {num_inputs} "
                           "inputs", param="token_ids_logprob")
        per_input = value  # type: ignore[assignment]
    else:
        raise ApiError(400, "token_ids_logprob: mixes token ids and lists of token ids",
                       param="token_ids_logprob")
    if not value:
        raise ApiError(400, "token_ids_logprob: an empty list", param="token_ids_logprob")
    if any(ids and not wants for ids, wants in zip(per_input, logprob, strict=True)):
        raise ApiError(400, "token_ids_logprob: needs return_logprob: true",
                       param="token_ids_logprob")
    return [list(ids) or None for ids in per_input]


def _samples_per_input(sampling: list[NativeSampling]) -> int:
    counts = {1 if s.n is None else s.n for s in sampling}
    if len(counts) > 1:
        raise ApiError(400, "sampling_params.n: must be the same for every input",
                       param="sampling_params.n")
    n = counts.pop()
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"sampling_params.n: must be between 1 and {MAX_N}",
                       param="sampling_params.n")
    return n


def _check_item(s: NativeSampling, prompt: list[int], top: int, logprob_start: int) -> None:
    """Per-input checks of fields the engine does not see (`logprob_start` is -1 when no
    logprobs are returned: it is then unused, as on SGLang)."""
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"top_logprobs_num: must be between 0 and {MAX_TOP_LOGPROBS}",
                       param="top_logprobs_num")
    if not -1 <= logprob_start < len(prompt):
        raise ApiError(400, f"logprob_start_len: must be -1 (the last prompt token) or a "
                       f"prompt position below the prompt's {len(prompt)} tokens, got "
                       f"{logprob_start}", param="logprob_start_len")
    if s.stream_interval is not None and not 1 <= s.stream_interval <= MAX_STREAM_INTERVAL:
        raise ApiError(400, "sampling_params.stream_interval: must be between 1 and "
                       f"{MAX_STREAM_INTERVAL}", param="sampling_params.stream_interval")
    if None not in (s.seed, s.sampling_seed) and s.seed != s.sampling_seed:
        raise ApiError(400, "sampling_params.sampling_seed: differs from seed (give one)",
                       param="sampling_params.sampling_seed")


def _rids(rid: str | list[str] | None, num_inputs: int, n: int,
          is_batch: bool) -> list[str | None]:
    """One rid per generation: a string for a list answer is a prefix (`<rid>_<k>` for the
    k-th generation, as SGLang does), a list names each input (`<rid>_<j>` for its sample j
    when n > 1); rids must not repeat within a request."""
    total = num_inputs * n
    if rid is None:
        return [None] * total
    if isinstance(rid, str):
        rids = [f"{rid}_{k}" for k in range(total)] if is_batch else [rid]
    else:
        if len(rid) != num_inputs:
            raise ApiError(400, f"rid: {len(rid)} items for {num_inputs} inputs", param="rid")
        rids = [r if n == 1 else f"{r}_{j}" for r in rid for j in range(n)]
    if len(set(rids)) != len(rids):
        raise ApiError(400, "rid: the same rid twice in one request", param="rid")
    return list(rids)


def _params(s: NativeSampling, seed_offset: int) -> SamplingParams:
    try:
        return s.to_params(seed_offset)
    except TypeError as e:  # unreachable with the Struct's types; kept as a client error
        raise ApiError(400, f"sampling_params: {e}", param="sampling_params") from None


def _prompts(body: GenerateRequest, tokenizer: Any) -> tuple[list[list[int]], bool]:
    if (body.text is None) == (body.input_ids is None):
        raise ApiError(400, "give exactly one of text or input_ids", param="text")
    if body.text is not None:
        texts = body.text if isinstance(body.text, list) else [body.text]
        if not texts:
            raise ApiError(400, "text: an empty list", param="text")
        return [tokenizer.encode(t) for t in texts], isinstance(body.text, list)
    ids = body.input_ids or []
    if ids and all(isinstance(t, int) for t in ids):
        return [ids], False  # type: ignore[list-item]
    if ids and all(isinstance(t, list) for t in ids):
        return ids, True  # type: ignore[return-value]
    raise ApiError(400, "input_ids: must be a non-empty list of token ids or a list of such "
                   "lists", param="input_ids")


def _aligned(value: V | list[V] | None, n: int, name: str, default: V) -> list[V]:
    """One value per input: a list must match the inputs; a single value is repeated."""
    if value is None:
        return [default] * n
    if isinstance(value, list):
        if len(value) != n:
            raise ApiError(400, f"{name}: {len(value)} items for {n} inputs", param=name)
        return [default if v is None else v for v in value]
    return [value] * n


def finish_reason(g: Generation) -> dict[str, Any] | None:
    """`meta_info.finish_reason` as SGLang writes it."""
    if not g.finished:
        return None
    if g.finish_reason is FinishReason.LENGTH:
        return {"type": "length", "length": g.completion_tokens}
    if g.finish_reason is FinishReason.STOP:
        return {"type": "stop", "matched": g.matched_stop}
    return {"type": "abort", "message": g.error or "aborted"}


def result(g: Generation, with_text: bool, tokenizer: Any,
           logprob_start_len: int = -1) -> dict[str, Any]:
    """One /generate result (also each streamed chunk: text and ids so far). Prompt logprobs
    start at `logprob_start_len` (-1: the last prompt token), whose own logprob is null, as
    SGLang writes them."""
    meta: dict[str, Any] = {
        "id": g.rid,
        "finish_reason": finish_reason(g),
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.completion_tokens,
        "cached_tokens": g.cached_tokens,
        "e2e_latency": g.e2e_latency,
    }
    if g.request.return_logprob:
        def text(t: int) -> str | None:
            return tokenizer.decode([t]) if with_text else None
        prompt = g.request.prompt_ids
        start = _logprob_start(logprob_start_len, len(prompt))
        input_lps = [None, *g.input_logprobs[start + 1:]] if g.input_logprobs else []
        meta["input_token_logprobs"] = [
            [lp, t, text(t)] for lp, t in zip(input_lps, prompt[start:], strict=False)
        ]
        meta["output_token_logprobs"] = [
            [lp, t, text(t)] for lp, t in zip(g.logprobs, g.output_ids, strict=False)
        ]
        ids = g.request.token_ids_logprob
        if ids:
            # the start position's own entry is null, as its logprob is
            input_ids = [None, *g.input_ids_logprobs[start + 1:]] if g.input_ids_logprobs else []
            meta["input_token_ids_logprobs"] = [
                None if lps is None else [[lp, t, text(t)] for t, lp in zip(ids, lps, strict=True)]
                for lps in input_ids
            ]
            meta["output_token_ids_logprobs"] = [
                [[lp, t, text(t)] for t, lp in zip(ids, lps, strict=True)]
                for lps in g.ids_logprobs
            ]
        if g.request.top_logprobs_num > 0:
            input_tops = [[], *g.input_top_logprobs[start + 1:]] if g.input_top_logprobs else []
            meta["input_top_logprobs"] = [
                [[lp, t, text(t)] for t, lp in tops] or None for tops in input_tops
            ]
            meta["output_top_logprobs"] = [
                [[lp, t, text(t)] for t, lp in tops] for tops in g.top_logprobs
            ]
    return {"text": g.text.text, "output_ids": list(g.output_ids), "meta_info": meta}


def _logprob_start(logprob_start_len: int, num_prompt_tokens: int) -> int:
    """The first prompt position with logprobs (a prompt cut to fit the context by
    allow_auto_truncate may end before the position asked for)."""
    last = max(num_prompt_tokens - 1, 0)
    return last if logprob_start_len < 0 else min(logprob_start_len, last)


@routes.post("/abort_request")
async def abort_request(request: web.Request) -> web.Response:
    body = await decode_body(request, AbortRequest)
    if body.abort_all:
        raise ApiError(400, "abort_all: not supported; abort by rid", param="abort_all")
    if not body.rid:
        raise ApiError(400, "rid: required", param="rid")
    return json_response({"success": request.app[ENGINE].abort(body.rid)})


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    if request.app[LIFECYCLE].is_stopping:
        return web.Response(status=503, text="shutting down")
    return web.Response(text="OK")


@routes.get("/health_generate")
async def health_generate(request: web.Request) -> web.Response:
    """Run one greedy token through the whole engine."""
    engine = request.app[ENGINE]
    tok = engine.tokenizer
    prompt = await off_loop(request, tok.encode, "ping") or [tok.bos_token_id or 0]
    spec = GenSpec(prompt, SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True),
                   rid=None)
    gens = await submit_all(engine, [spec])
    try:
        await asyncio.wait_for(collect(engine, gens), HEALTH_GENERATE_TIMEOUT_S)
    except TimeoutError:
        return web.Response(status=503, text="generation timed out")
    if gens[0].finish_reason is FinishReason.ABORT:
        return web.Response(status=503, text=f"generation aborted: {gens[0].error}")
    return web.Response(text="OK")


@routes.get("/get_model_info")
@routes.get("/model_info")
async def get_model_info(request: web.Request) -> web.Response:
    info = request.app[ENGINE].model_info
    return json_response({
        "model_path": info.model_path,
        "tokenizer_path": info.model_path,
        "is_generation": True,
        "served_model_name": info.served_model_name,
        "context_length": info.context_length,
        "vocab_size": info.vocab_size,
        "dtype": info.dtype,
        "device": info.device,
        "is_lora_enabled": info.is_lora_enabled,
        "max_lora_rank": info.max_lora_rank,
        "lora_target_modules": list(info.lora_target_modules or []),
        "preferred_sampling_params": None,
    })


@routes.post("/tokenize")
async def tokenize(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = await decode_body(request, TokenizeRequest)
    text = body.text if body.text is not None else body.prompt
    enc = engine.tokenizer
    tokens: Any
    if body.messages is not None:
        if text is not None:
            raise ApiError(400, "messages: give text (or prompt) or messages, not both",
                           param="messages")
        check_request_template(request, body.chat_template)
        chat = ChatRequest(
            messages=body.messages, add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            chat_template=body.chat_template, chat_template_kwargs=body.chat_template_kwargs,
            add_special_tokens=bool(body.add_special_tokens))
        if chat.continue_final_message and chat.add_generation_prompt:
            raise ApiError(400, "continue_final_message: not with add_generation_prompt: true",
                           param="continue_final_message")
        tokens = await off_loop(request, chat_prompt, chat, enc)
    elif text is None:
        raise ApiError(400, "give text (or prompt), or messages", param="text")
    else:
        special = body.add_special_tokens is not False

        def ids(t: str) -> list[int]:
            return enc.encode(t, add_special_tokens=special)

        tokens = await off_loop(
            request, lambda: [ids(t) for t in text] if isinstance(text, list) else ids(text))
    many = isinstance(text, list)
    answer: dict[str, Any] = {
        "tokens": tokens, "count": [len(t) for t in tokens] if many else len(tokens),
        "max_model_len": engine.model_info.context_length}
    if body.return_token_strs:
        answer["token_strs"] = ([enc.convert_ids_to_tokens(t) for t in tokens] if many
                                else enc.convert_ids_to_tokens(tokens))
    return json_response(answer)


@routes.post("/detokenize")
async def detokenize(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = await decode_body(request, DetokenizeRequest)
    # the model's vocabulary, which may be padded past the tokenizer's: the model can emit
    # those ids (they decode to nothing), so they come back here
    vocab = engine.model_info.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"tokens: ids out of range [0, {vocab}): {bad[:5]}", param="tokens")
    text = engine.tokenizer.decode(body.tokens, skip_special_tokens=body.skip_special_tokens)
    return json_response({"text": text})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    stats = request.app[ENGINE].stats()  # refresh the gauges at scrape time
    m.set_running_waiting(stats.num_running, stats.num_waiting)
    if stats.kv_blocks_total:
        m.set_kv_usage(stats.kv_blocks_used / stats.kv_blocks_total)
    body, content_type = m.render()
    return web.Response(body=body, headers={"Content-Type": content_type})
