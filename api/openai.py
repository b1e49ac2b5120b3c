"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

The adapter is chosen by `model`: the base model's name, "<base>:<adapter>" or a bare adapter
name. Unknown names are 404 `model_not_found`. As on SGLang's routes, a body may name it in
`lora_path` instead (a list: one per prompt of a completion, null the base model); then
`model` only counts in its "<base>:<adapter>" form, which wins.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Any

from aiohttp import web

from api import sse
from api.app import CONFIG, ENGINE, LIFECYCLE, TOKEN_BYTES, json_response, off_loop
from api.errors import ApiError, Style, renamed
from api.generation import Generation, GenSpec, collect, follow, submit_all, unless_disconnected
from api.protocol import ChatRequest, CompletionRequest, OpenAISampling, decode_body
from api.tokenbytes import TokenBytes
from runtime.errors import UnknownAdapterError, ValidationError
from runtime.request import FinishReason

log = logging.getLogger("loraserve.api")
routes = web.RouteTableDef()

MAX_N = 128
MAX_TOP_LOGPROBS = 20
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def base_names(request: web.Request) -> list[str]:
    config, info = request.app[CONFIG], request.app[ENGINE].model_info
    return list(dict.fromkeys([config.model_name, info.served_model_name, config.model_path]))


def resolve_adapter(request: web.Request, model: str | None) -> str | None:
    """The adapter `model` names, or None for the base model."""
    names = base_names(request)
    if not model or model in names:
        return None
    for base in names:
        if model.startswith(base + ":") and len(model) > len(base) + 1:
            return model[len(base) + 1:]
    if ":" in model:
        raise ApiError(404, f"The model `{model}` does not exist.", code="model_not_found",
                       param="model")
    return model  # a bare adapter name: the engine says whether it knows it


def from_lora_path(request: web.Request, body: OpenAISampling) -> bool:
    """Whether the body's adapters come from its `lora_path` (resolve_loras), not `model`."""
    model = body.model
    return body.lora_path is not None and not (
        model and ":" in model and model not in base_names(request))


def resolve_loras(request: web.Request, body: OpenAISampling, count: int) -> list[str | None]:
    """The adapter of each of `count` prompts: `model`'s (resolve_adapter), or where the body
    gives `lora_path` and `model` is not "<base>:<adapter>", lora_path's (SGLang's order)."""
    paths = body.lora_path
    if not from_lora_path(request, body):
        return [resolve_adapter(request, body.model)] * count
    if not isinstance(paths, list):
        paths = [paths] * count
    elif len(paths) != count:
        raise ApiError(400, f"lora_path: {len(paths)} items for {count} prompts",
                       param="lora_path")
    return [p or None for p in paths]


def refuse_unsupported(body: OpenAISampling) -> None:
    """A 400 naming the first OpenAI field set that loraserve does not implement (serving the
    request without it would answer another question than the one asked)."""
    fmt = body.response_format
    unsupported = [
        ("response_format", fmt is not None and fmt.get("type", "text") != "text",
         'only {"type": "text"} is supported (no constrained decoding)'),
        ("tools", bool(body.tools), "tool calling is not supported"),
        ("functions", bool(body.functions), "function calling is not supported"),
        ("tool_choice", body.tool_choice not in (None, "none", "auto"),
         "tool calling is not supported"),
        *((name, getattr(body, name) is not None, "constrained decoding is not supported")
          for name in ("regex", "json_schema", "ebnf", "structural_tag")),
        ("stop_regex", bool(body.stop_regex), "regex stop conditions are not supported"),
        ("custom_logit_processor", body.custom_logit_processor is not None,
         "custom logit processors are not supported"),
    ]
    if isinstance(body, CompletionRequest):
        n = 1 if body.n is None else body.n
        unsupported += [
            ("suffix", bool(body.suffix), "insertion (suffix) is not supported"),
            ("best_of", body.best_of is not None and body.best_of != n,
             "must equal n: choices are not ranked"),
        ]
    for field, is_set, why in unsupported:
        if is_set:
            raise ApiError(400, f"{field}: {why}", param=field)


def refuse_stream_options_without_stream(body: OpenAISampling) -> None:
    """A 400 for `stream_options` on a request that does not stream (OpenAI refuses it)."""
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options: only allowed when stream is true",
                       param="stream_options")


async def submit_openai(request: web.Request, body: OpenAISampling,
                        specs: list[GenSpec]) -> list[Generation]:
    """submit_all; an unknown adapter named in `lora_path` is a 400 naming that field, as on
    /generate (one named by `model` stays OpenAI's 404 model_not_found); a value out of range
    is a 400 naming the field as the body spelled it (max_completion_tokens or max_tokens)."""
    try:
        return await submit_all(request.app[ENGINE], specs)
    except ValidationError as e:
        raise renamed(e, body.field_names) from None
    except UnknownAdapterError as e:
        if from_lora_path(request, body):
            raise ApiError(400, f"lora_path: {e}", param="lora_path") from None
        raise


def _specs(body: OpenAISampling, prompts: list[list[int]], loras: list[str | None],
           max_tokens: list[int], logprobs: int | None, echo: bool = False) -> list[GenSpec]:
    """The generations to submit. The prompt's own logprobs are scored only for an echo (the
    rest of the time no answer carries them, and scoring costs a logits row a prompt token)."""
    refuse_unsupported(body)
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n: must be between 1 and {MAX_N}", param="n")
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        field = "top_logprobs" if isinstance(body, ChatRequest) else "logprobs"
        raise ApiError(400, f"{field}: must be between 0 and {MAX_TOP_LOGPROBS}", param=field)
    total = len(prompts) * n
    specs = []
    for p, prompt in enumerate(prompts):
        for j in range(n):
            i = p * n + j
            rid = None if body.rid is None else (body.rid if total == 1 else f"{body.rid}-{i}")
            specs.append(GenSpec(
                prompt, body.to_params(max_tokens[p], seed_offset=j), lora_name=loras[p],
                rid=rid,
                return_logprob=logprobs is not None, top_logprobs_num=logprobs or 0,
                trim_stop=not body.no_stop_trim, logprob_start=1 if echo else len(prompt),
            ))
    return specs


def finish_reason(g: Generation) -> str | None:
    if not g.finished:
        return None
    return {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}.get(g.finish_reason,
                                                                          "abort")


def abort_error(request: web.Request, g: Generation) -> ApiError:
    """Why `g` was aborted, as an OpenAI error: 503 while the server shuts down, else 500
    (a failed adapter load, an internal error, an abort by rid)."""
    status = 503 if request.app[LIFECYCLE].is_stopping else 500
    return ApiError(status, f"choice {g.index} was aborted: {g.error or 'aborted'}",
                    code="request_aborted")


def aborted(gens: list[Generation]) -> list[Generation]:
    return [g for g in gens if g.finished and g.finish_reason is FinishReason.ABORT]


def refuse_if_nothing_generated(request: web.Request, gens: list[Generation]) -> None:
    """A whole answer whose every choice was aborted before its first token is the error of
    the first; an abort after some tokens keeps the tokens (the choice says why: with_abort)."""
    failed = aborted(gens)
    if failed and len(failed) == len(gens) and not any(g.output_ids for g in gens):
        raise abort_error(request, failed[0])


def with_abort(request: web.Request, g: Generation, choice: dict[str, Any]) -> dict[str, Any]:
    """`choice`, with an `error` object saying why when its generation was aborted."""
    if g.finished and g.finish_reason is FinishReason.ABORT:
        choice["error"] = abort_error(request, g).body(Style.OPENAI)["error"]
    return choice


async def send_abort_error(request: web.Request, resp: web.StreamResponse,
                           gens: list[Generation]) -> None:
    """At the end of a stream (before [DONE]): an error event for the first aborted choice,
    which OpenAI clients raise."""
    failed = aborted(gens)
    if failed:
        await sse.send(resp, abort_error(request, failed[0]).body(Style.OPENAI))


def usage(gens: list[Generation], n: int) -> dict[str, int]:
    prompt = sum(g.prompt_tokens for g in gens[::n])  # each prompt counts once, whatever n
    completion = sum(g.completion_tokens for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _header(kind: str, rid: str, model: str) -> dict[str, Any]:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model}


# ---------------------------------------------------------------- completions

@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    body = await decode_body(request, CompletionRequest)
    refuse_stream_options_without_stream(body)
    prompts, texts = await off_loop(request, _completion_prompts, body.prompt, engine.tokenizer,
                                    engine.model_info.vocab_size)
    loras = resolve_loras(request, body, len(prompts))
    max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    specs = _specs(body, prompts, loras, [max_tokens] * len(prompts), body.logprobs,
                   echo=bool(body.echo))
    n = len(specs) // len(prompts)
    echo = [texts[i // n] if body.echo else "" for i in range(len(specs))]
    gens = await submit_openai(request, body, specs)
    header = _header("text_completion", f"cmpl-{uuid.uuid4().hex}", body.model or
                     base_names(request)[0])
    if body.stream:
        return await _stream_completions(request, gens, header, echo, body, n)
    await unless_disconnected(request, collect(engine, gens))
    refuse_if_nothing_generated(request, gens)
    tok = engine.tokenizer
    choices = [with_abort(request, g, {
        "index": g.index,
        "text": echo[g.index] + g.text.text,
        "logprobs": _logprobs_of(g, tok, echo[g.index], body),
        "finish_reason": finish_reason(g),
    }) for g in gens]
    return json_response({**header, "choices": choices, "usage": usage(gens, n)})


def _prompt_texts(g: Generation, tok: Any) -> list[str]:
    """Each prompt token's own text: what an echo with logprobs lists, and counts its offsets
    over (a BOS token decodes to text the prompt string does not hold)."""
    return [tok.decode([t]) for t in g.request.prompt_ids]


def _logprobs_of(g: Generation, tok: Any, echo: str,
                 body: CompletionRequest) -> dict[str, Any] | None:
    """A whole completion's logprobs (None unless asked for), the prompt's first with echo."""
    if body.logprobs is None:
        return None
    if not echo:
        return _completion_logprobs(g, tok, 0, 0)
    texts = _prompt_texts(g, tok)
    out = _completion_logprobs(g, tok, 0, sum(len(t) for t in texts))
    return _echo_logprobs(g, tok, texts, out)


def _completion_prompts(prompt: Any, tokenizer: Any,
                        vocab: int) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt: a string, a list of strings, a list of token ids or
    a list of such lists (never a mix). Ids run over the model's `vocab` (which may be padded
    past the tokenizer's), as on /generate."""
    items = prompt if isinstance(prompt, list) else [prompt]
    if items and all(isinstance(p, int) for p in items):
        items = [items]
    if not items:
        raise ApiError(400, "prompt: must not be empty", param="prompt")
    if all(isinstance(p, str) for p in items):
        return [tokenizer.encode(p) for p in items], list(items)
    if not all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in items):
        raise ApiError(400, "prompt: mixes strings, token ids and lists of token ids",
                       param="prompt")
    if any(not 0 <= t < vocab for p in items for t in p):
        raise ApiError(400, f"prompt: token ids must be integers in [0, {vocab})",
                       param="prompt")
    return items, [tokenizer.decode(p) for p in items]


def _top_by_text(tok: Any, tops: list[tuple[int, float]]) -> dict[str, float]:
    """{token text: logprob}, most likely first. Two ids can decode alike (partial UTF-8
    bytes both read as U+FFFD): keep the likelier one, not the last."""
    out: dict[str, float] = {}
    for t, lp in tops:
        out.setdefault(tok.decode([t]), lp)
    return out


def _echo_logprobs(g: Generation, tok: Any, tokens: list[str],
                   out: dict[str, Any]) -> dict[str, Any]:
    """`out` (the output tokens' logprobs, offsets from the end of `tokens`, the prompt
    tokens' texts) after the prompt tokens' own, as OpenAI answers `echo` with `logprobs`:
    the first prompt token has none; offsets count from 0 over the tokens' texts."""
    prompt = g.request.prompt_ids
    offsets, offset = [], 0
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    lps = (g.input_logprobs + [None] * len(prompt))[:len(prompt)]
    lps[0] = None
    top = None
    if out["top_logprobs"] is not None:
        tops = (g.input_top_logprobs + [[]] * len(prompt))[:len(prompt)]
        top = [None] + [_top_by_text(tok, t) for t in tops[1:]]
        top += out["top_logprobs"]
    return {"tokens": tokens + out["tokens"], "token_logprobs": lps + out["token_logprobs"],
            "top_logprobs": top, "text_offset": offsets + out["text_offset"]}


def _completion_logprobs(g: Generation, tok: Any, start: int, offset: int) -> dict[str, Any]:
    """OpenAI's completions logprobs for output tokens [start:]; offsets start at `offset`."""
    tokens = [tok.decode([t]) for t in g.output_ids[start:]]
    offsets = []
    for s in tokens:
        offsets.append(offset)
        offset += len(s)
    top = None
    if g.request.top_logprobs_num > 0:
        top = [_top_by_text(tok, tops) for tops in g.top_logprobs[start:]]
    return {"tokens": tokens, "token_logprobs": g.logprobs[start:], "top_logprobs": top,
            "text_offset": offsets}


async def _stream_completions(request: web.Request, gens: list[Generation],
                              header: dict[str, Any], echo: list[str], body: CompletionRequest,
                              n: int) -> web.StreamResponse:
    engine = request.app[ENGINE]
    extra = {"usage": None} if body.include_usage else {}
    sent_tokens = [0] * len(gens)
    # with logprobs, offsets run over the prompt tokens' own texts (_prompt_texts)
    prompt_texts = {g.index: _prompt_texts(g, engine.tokenizer) for g in gens
                    if echo[g.index] and body.logprobs is not None}
    text_offset = [sum(len(t) for t in prompt_texts[g.index]) if g.index in prompt_texts
                   else len(echo[g.index]) for g in gens]
    resp = await sse.start(request)

    # with logprobs the echo waits for the prompt's, which come with the first output
    to_echo = {g.index for g in gens if echo[g.index]}

    async def produce() -> None:
        for g in gens:
            if g.index in to_echo and body.logprobs is None:
                await sse.send(resp, {**header, "choices": [_choice(g.index, echo[g.index])],
                                      **extra})
                to_echo.discard(g.index)
        async with contextlib.aclosing(follow(engine, gens)) as outputs:
            async for g, delta in outputs:
                start, sent_tokens[g.index] = sent_tokens[g.index], len(g.output_ids)
                logprobs = None
                if body.logprobs is not None:
                    logprobs = _completion_logprobs(g, engine.tokenizer, start,
                                                    text_offset[g.index])
                    if g.index in to_echo:  # the echo chunk carries the prompt's logprobs
                        to_echo.discard(g.index)
                        empty = {"tokens": [], "token_logprobs": [], "text_offset": [],
                                 "top_logprobs": [] if logprobs["top_logprobs"] is not None
                                 else None}
                        await sse.send(resp, {**header, **extra, "choices": [_choice(
                            g.index, echo[g.index], None,
                            _echo_logprobs(g, engine.tokenizer, prompt_texts[g.index],
                                           empty))]})
                    # offsets run over each token's own text, as in the whole answer (the
                    # chunk's text may hold back bytes of an unfinished character)
                    text_offset[g.index] += sum(len(t) for t in logprobs["tokens"])
                if delta or g.finished or logprobs:
                    choice = _choice(g.index, delta, finish_reason(g), logprobs)
                    await sse.send(resp, {**header, "choices": [choice], **extra})
        if body.include_usage:
            await sse.send(resp, {**header, "choices": [], "usage": usage(gens, n)})
        await send_abort_error(request, resp, gens)

    return await sse.run(request, resp, produce(), Style.OPENAI)


def _choice(index: int, text: str, reason: str | None = None,
            logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}


# ---------------------------------------------------------------- chat

@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    body = await decode_body(request, ChatRequest)
    refuse_stream_options_without_stream(body)
    loras = resolve_loras(request, body, 1)
    if body.chat_template is not None and not request.app[CONFIG].trust_request_chat_template:
        # a template is code the server runs (a loop of a billion steps is a short one)
        raise ApiError(400, "chat_template: a request's own chat template is refused; the "
                            "server takes them with --trust-request-chat-template",
                       param="chat_template")
    prompt = await off_loop(request, chat_prompt, body, engine.tokenizer)
    limit = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    if limit is None:  # unset: up to the context length
        limit = max(engine.model_info.context_length - len(prompt), 1)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    specs = _specs(body, [prompt], loras, [limit], logprobs)
    gens = await submit_openai(request, body, specs)
    header = _header("chat.completion", f"chatcmpl-{uuid.uuid4().hex}",
                     body.model or base_names(request)[0])
    if body.stream:
        header["object"] = "chat.completion.chunk"
        return await _stream_chat(request, gens, header, body)
    await unless_disconnected(request, collect(engine, gens))
    refuse_if_nothing_generated(request, gens)
    choices = [with_abort(request, g, {
        "index": g.index,
        "message": {"role": "assistant", "content": g.text.text},
        "logprobs": _chat_logprobs(g, engine.tokenizer, request.app[TOKEN_BYTES], 0)
        if body.logprobs else None,
        "finish_reason": finish_reason(g),
    }) for g in gens]
    return json_response({**header, "choices": choices, "usage": usage(gens, len(gens))})


def chat_prompt(body: ChatRequest, tokenizer: Any) -> list[int]:
    """Render the messages with the chat template (the request's, or the tokenizer's)."""
    if not body.messages:
        raise ApiError(400, "messages: must not be empty", param="messages")
    messages = [_message(m, i) for i, m in enumerate(body.messages)]
    kwargs = dict(body.chat_template_kwargs or {})
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, chat_template=body.chat_template,
            add_generation_prompt=body.add_generation_prompt and not body.continue_final_message,
            continue_final_message=body.continue_final_message, **kwargs,
        )
    except Exception as e:  # noqa: BLE001 - a template error is the request's mistake
        raise ApiError(400, f"chat template failed: {type(e).__name__}: {e}",
                       param="messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


def _message(m: dict[str, Any], i: int) -> dict[str, Any]:
    if not isinstance(m.get("role"), str):
        raise ApiError(400, f"messages[{i}].role: must be a string", param=f"messages.{i}.role")
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text is supported
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages.{i}.content")
            texts.append(part["text"])
        return {**m, "content": "".join(texts)}
    if content is not None and not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content: must be a string or a list of parts",
                       param=f"messages.{i}.content")
    return m


def _chat_logprobs(g: Generation, tok: Any, token_bytes: TokenBytes,
                   start: int) -> dict[str, Any]:
    """OpenAI's chat logprobs for output tokens [start:]; `bytes` are each token's own raw
    bytes (part of a character for a token that splits one), not its text's."""
    def entry(t: int, lp: float) -> dict[str, Any]:
        return {"token": tok.decode([t]), "logprob": lp, "bytes": token_bytes(t)}

    content = []
    for k, (t, lp) in enumerate(zip(g.output_ids[start:], g.logprobs[start:], strict=False)):
        tops = g.top_logprobs[start + k] if start + k < len(g.top_logprobs) else []
        content.append({**entry(t, lp), "top_logprobs": [entry(tt, tlp) for tt, tlp in tops]})
    return {"content": content}


async def _stream_chat(request: web.Request, gens: list[Generation], header: dict[str, Any],
                       body: ChatRequest) -> web.StreamResponse:
    engine = request.app[ENGINE]
    extra = {"usage": None} if body.include_usage else {}
    sent_tokens = [0] * len(gens)
    resp = await sse.start(request)

    def chunk(index: int, delta: dict[str, Any], reason: str | None = None,
              logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {**header, "choices": [choice], **extra}

    async def produce() -> None:
        for g in gens:
            await sse.send(resp, chunk(g.index, {"role": "assistant", "content": ""}))
        async with contextlib.aclosing(follow(engine, gens)) as outputs:
            async for g, delta in outputs:
                start, sent_tokens[g.index] = sent_tokens[g.index], len(g.output_ids)
                logprobs = _chat_logprobs(g, engine.tokenizer, request.app[TOKEN_BYTES],
                                          start) if body.logprobs else None
                if delta or logprobs:
                    await sse.send(resp, chunk(g.index, {"content": delta}, None, logprobs))
                if g.finished:
                    await sse.send(resp, chunk(g.index, {}, finish_reason(g)))
        if body.include_usage:
            await sse.send(resp, {**header, "choices": [], "usage": usage(gens, len(gens))})
        await send_abort_error(request, resp, gens)

    return await sse.run(request, resp, produce(), Style.OPENAI)


# ---------------------------------------------------------------- models

def _model_cards(request: web.Request) -> list[dict[str, Any]]:
    engine, created = request.app[ENGINE], request.app[LIFECYCLE].started_at
    base = base_names(request)[0]
    info = engine.model_info
    cards = [{"id": base, "object": "model", "created": created, "owned_by": "loraserve",
              "root": info.model_path, "parent": None, "max_model_len": info.context_length}]
    for a in engine.list_adapters():
        if a.unloading:  # requests for it are refused (404) already
            continue
        cards.append({"id": a.name, "object": "model", "created": created,
                      "owned_by": "loraserve", "root": a.path, "parent": base,
                      "max_model_len": info.context_length})
    return cards


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    return json_response({"object": "list", "data": _model_cards(request)})


@routes.get("/v1/models/{model:.+}")
async def get_model(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    adapter = resolve_adapter(request, model)
    for card in _model_cards(request):
        if card["id"] == (adapter or base_names(request)[0]):
            return json_response(card)
    raise ApiError(404, f"The model `{model}` does not exist.", code="model_not_found",
                   param="model")
