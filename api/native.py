"""Native routes, shaped like SGLang's: /generate, /abort_request, /health, /health_generate,
/get_model_info, /tokenize, /detokenize, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, TypeVar

from aiohttp import web

from api import sse
from api.app import ENGINE, LIFECYCLE, METRICS, json_response, off_loop
from api.errors import ApiError, Style
from api.generation import Generation, GenSpec, collect, follow, submit_all, unless_disconnected
from api.protocol import (
    AbortRequest,
    DetokenizeRequest,
    GenerateRequest,
    NativeSampling,
    TokenizeRequest,
    decode_body,
)
from runtime.request import FinishReason, SamplingParams

log = logging.getLogger("loraserve.api")
routes = web.RouteTableDef()
V = TypeVar("V")

MAX_TOP_LOGPROBS = 20
HEALTH_GENERATE_TIMEOUT_S = 30.0


@routes.post("/generate")
async def generate(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    body = await decode_body(request, GenerateRequest)
    specs, is_batch = await off_loop(request, generate_specs, body, engine.tokenizer)
    gens = await submit_all(engine, specs)
    if body.stream:
        return await _stream(request, gens, is_batch, body.return_text_in_logprobs)
    await unless_disconnected(request, collect(engine, gens))
    results = [result(g, body.return_text_in_logprobs, engine.tokenizer) for g in gens]
    return json_response(results if is_batch else results[0])


async def _stream(request: web.Request, gens: list[Generation], is_batch: bool,
                  with_text: bool) -> web.StreamResponse:
    engine = request.app[ENGINE]
    resp = await sse.start(request)

    async def produce() -> None:
        async with contextlib.aclosing(follow(engine, gens)) as outputs:
            async for g, _ in outputs:
                chunk = result(g, with_text, engine.tokenizer)
                if is_batch:
                    chunk["index"] = g.index
                await sse.send(resp, chunk)

    return await sse.run(request, resp, produce(), Style.NATIVE)


def generate_specs(body: GenerateRequest, tokenizer: Any) -> tuple[list[GenSpec], bool]:
    """The requests a /generate body asks for, and whether the answer is a list."""
    prompts, is_batch = _prompts(body, tokenizer)
    n = len(prompts)
    sampling = _aligned(body.sampling_params, n, "sampling_params", NativeSampling())
    loras = _aligned(body.lora_path, n, "lora_path", None)
    rids = _aligned(body.rid, n, "rid", None, broadcast=False)
    logprob = _aligned(body.return_logprob, n, "return_logprob", False)
    top = _aligned(body.top_logprobs_num, n, "top_logprobs_num", 0)
    specs = []
    for i, prompt in enumerate(prompts):
        if not 0 <= top[i] <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs_num: must be between 0 and {MAX_TOP_LOGPROBS}",
                           param="top_logprobs_num")
        specs.append(GenSpec(
            prompt, _params(sampling[i]), lora_name=loras[i] or None, rid=rids[i],
            return_logprob=logprob[i], top_logprobs_num=top[i],
            trim_stop=not sampling[i].no_stop_trim,
        ))
    return specs, is_batch


def _params(s: NativeSampling) -> SamplingParams:
    try:
        return s.to_params()
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


def _aligned(value: V | list[V] | None, n: int, name: str, default: V,
             broadcast: bool = True) -> list[V]:
    """One value per input: a list must match the inputs; a single value is repeated."""
    if value is None:
        return [default] * n
    if isinstance(value, list):
        if len(value) != n:
            raise ApiError(400, f"{name}: {len(value)} items for {n} inputs", param=name)
        return [default if v is None else v for v in value]
    if not broadcast and n > 1:
        raise ApiError(400, f"{name}: a list of inputs needs a list of {name}s", param=name)
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


def result(g: Generation, with_text: bool, tokenizer: Any) -> dict[str, Any]:
    """One /generate result (also each streamed chunk: text and ids so far)."""
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
        meta["input_token_logprobs"] = [
            [lp, t, text(t)] for lp, t in zip(g.input_logprobs, prompt, strict=False)
        ]
        meta["output_token_logprobs"] = [
            [lp, t, text(t)] for lp, t in zip(g.logprobs, g.output_ids, strict=False)
        ]
        if g.request.top_logprobs_num > 0:
            meta["input_top_logprobs"] = [
                [[lp, t, text(t)] for t, lp in tops] or None for tops in g.input_top_logprobs
            ]
            meta["output_top_logprobs"] = [
                [[lp, t, text(t)] for t, lp in tops] for tops in g.top_logprobs
            ]
    return {"text": g.text.text, "output_ids": list(g.output_ids), "meta_info": meta}


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
    if text is None:
        raise ApiError(400, "give text (or prompt)", param="text")
    enc = engine.tokenizer

    def ids(t: str) -> list[int]:
        return enc.encode(t, add_special_tokens=body.add_special_tokens)

    tokens: Any = await off_loop(
        request, lambda: [ids(t) for t in text] if isinstance(text, list) else ids(text))
    count: Any = [len(t) for t in tokens] if isinstance(text, list) else len(tokens)
    return json_response({"tokens": tokens, "count": count,
                          "max_model_len": engine.model_info.context_length})


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
