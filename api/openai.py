"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

The adapter is chosen by `model`: the base model's name, "<base>:<adapter>" or a bare adapter
name. Unknown names are 404 `model_not_found`. As on SGLang's routes, a body may name it in
`lora_path` instead (a list: one per prompt of a completion, null the base model); then
`model` only counts in its "<base>:<adapter>" form, which wins.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from typing import Any

from aiohttp import web

from api import sse
from api.app import CONFIG, ENGINE, LIFECYCLE, TOKEN_BYTES, json_response, off_loop
from api.errors import RETRY_AFTER_QUEUE_FULL_S, ApiError, Style, renamed
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


_CONSTRAINED = "constrained decoding is not supported"
_MULTIMODAL = "multimodal inputs are not supported"
_DISAGGREGATION = "prefill/decode disaggregation is not supported"
_EXTRA_OUTPUT = "this extra output is not supported"
_LOGIT_PROCESSORS = "custom logit processors are not supported"

# Fields of both routes (OpenAI's, and vLLM's and SGLang's extensions) that loraserve does not
# implement: each with the values that ask for nothing (null always does, and so does a list
# holding only such values) and why any other value is refused. Serving the request without
# the field would answer another question than the one asked.
UNSUPPORTED_FIELDS: tuple[tuple[str, tuple[object, ...], str], ...] = (
    ("service_tier", ("auto", "default"), "loraserve has one service tier, default"),
    ("store", (False,), "answers are not stored"),
    ("use_beam_search", (False,), "beam search is not supported"),
    ("length_penalty", (1.0,), "beam search is not supported"),
    ("logprob_token_ids", (), "logprobs of chosen token ids are not supported"),
    ("watermarking", (False,), "watermarking is not supported"),
    *((name, (), _CONSTRAINED) for name in (
        "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
        "guided_decoding_backend", "guided_whitespace_pattern", "regex", "json_schema", "ebnf",
        "structural_tag")),
    ("stop_regex", (), "regex stop conditions are not supported"),
    ("custom_logit_processor", (), _LOGIT_PROCESSORS),
    ("custom_params", ({},), _LOGIT_PROCESSORS),
    ("logits_processors", (), _LOGIT_PROCESSORS),
    ("vllm_xargs", ({},), "custom extensions are not supported"),
    ("repetition_detection", (), "repetition detection is not supported"),
    ("thinking_token_budget", (-1,), "thinking budgets are not supported"),
    ("priority", (0,), "priority scheduling is not supported"),
    ("session_id", (), "sessions are not supported"),
    ("session_params", (), "sessions are not supported"),
    ("return_tokens_as_token_ids", (False,), _EXTRA_OUTPUT),
    ("return_token_ids", (False,), _EXTRA_OUTPUT + " (/generate returns output_ids)"),
    ("return_prompt_text", (False,), _EXTRA_OUTPUT),
    ("return_hidden_states", (False,), _EXTRA_OUTPUT),
    ("return_routed_experts", (False,), _EXTRA_OUTPUT),
    ("routed_experts_start_len", (0,), _EXTRA_OUTPUT),
    ("routed_experts_prompt_start", (0,), _EXTRA_OUTPUT),
    ("return_cached_tokens_details", (False,), _EXTRA_OUTPUT),
    *((name, (), _DISAGGREGATION) for name in (
        "kv_transfer_params", "ec_transfer_params", "bootstrap_host", "bootstrap_port",
        "bootstrap_room")),
    ("mm_processor_kwargs", ({},), _MULTIMODAL),
    ("media_io_kwargs", ({},), _MULTIMODAL),
    ("images_config", (), _MULTIMODAL),
    ("custom_labels", ({},), "custom metric labels are not supported"),
)
UNSUPPORTED_CHAT_FIELDS: tuple[tuple[str, tuple[object, ...], str], ...] = (
    ("tools", (), "tool calling is not supported"),
    ("tool_choice", ("none", "auto"), "tool calling is not supported"),
    ("functions", (), "function calling is not supported"),
    ("function_call", ("none", "auto"), "function calling is not supported"),
    ("audio", (), "audio output is not supported"),
    ("modalities", ("text",), "only text output is supported"),
    ("verbosity", (), "verbosity control is not supported"),
    ("web_search_options", (), "web search is not supported"),
    ("include_reasoning", (True,), "no reasoning parser separates reasoning from answers"),
    ("reasoning", (), "not supported (reasoning_effort is, for templates that read it)"),
    ("task", (), "quick-instruction tasks are not supported"),
    ("input_ids", (), "chat renders its messages (/v1/completions takes token ids)"),
    ("return_prompt_token_ids", (False,), _EXTRA_OUTPUT),
    ("return_meta_info", (False,), _EXTRA_OUTPUT),
    ("max_dynamic_patch", (), _MULTIMODAL),
    ("min_dynamic_patch", (), _MULTIMODAL),
    ("use_audio_in_video", (False,), _MULTIMODAL),
)
UNSUPPORTED_COMPLETION_FIELDS: tuple[tuple[str, tuple[object, ...], str], ...] = (
    ("suffix", ("",), "insertion (suffix) is not supported"),
    ("prompt_embeds", (), "prompt embeddings are not supported"),
)


def _asks_for_something(value: object, neutral: tuple[object, ...]) -> bool:
    """Whether `value` asks for something: null, the `neutral` values and lists holding only
    those ask for nothing."""
    if value is None or value in neutral:
        return False
    if isinstance(value, list):
        return any(_asks_for_something(v, neutral) for v in value)
    return True


def refuse_unsupported(body: OpenAISampling) -> None:
    """A 400 naming the first field set that loraserve does not implement, or a served field
    whose value it cannot serve; checked before any work is done for the request."""
    table = UNSUPPORTED_FIELDS + (UNSUPPORTED_CHAT_FIELDS if isinstance(body, ChatRequest)
                                  else UNSUPPORTED_COMPLETION_FIELDS)
    for field, neutral, why in table:
        if _asks_for_something(getattr(body, field), neutral):
            raise ApiError(400, f"{field}: {why}", param=field)
    fmt = body.response_format
    if fmt is not None and fmt.get("type", "text") != "text":
        raise ApiError(400, 'response_format: only {"type": "text"} is supported (no '
                            "constrained decoding)", param="response_format")
    n = 1 if body.n is None else body.n
    if body.best_of is not None and body.best_of != n:
        raise ApiError(400, "best_of: must equal n: choices are not ranked", param="best_of")
    for field in ("routed_dp_rank", "data_parallel_rank"):
        if getattr(body, field) not in (None, 0):
            raise ApiError(400, f"{field}: loraserve runs one data-parallel rank, 0",
                           param=field)
    _check_served(body)


def _check_served(body: OpenAISampling) -> None:
    """400s for served fields whose values are out of range or contradict each other."""
    options = body.stream_options
    if options is not None and not body.stream:  # as on OpenAI's API
        raise ApiError(400, "stream_options: only allowed when stream is true",
                       param="stream_options")
    prompt_lps = body.prompt_logprobs
    if prompt_lps is not None and not 0 <= prompt_lps <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"prompt_logprobs: must be between 0 and {MAX_TOP_LOGPROBS}"
                            + (" (-1, the whole vocabulary, is not served)"
                               if prompt_lps == -1 else ""), param="prompt_logprobs")
    if prompt_lps is not None and body.stream:  # as on vLLM
        raise ApiError(400, "prompt_logprobs: not available when stream is true",
                       param="prompt_logprobs")
    if options is not None and options.continuous_usage_stats and not options.include_usage:
        raise ApiError(400, "stream_options.continuous_usage_stats: needs include_usage: true",
                       param="stream_options.continuous_usage_stats")
    k = body.truncate_prompt_tokens
    if k is not None and k != -1 and k < 1:
        raise ApiError(400, "truncate_prompt_tokens: must be -1 (the context length) or at "
                            "least 1", param="truncate_prompt_tokens")
    if body.truncation_side is not None:
        if body.truncation_side not in ("left", "right"):
            raise ApiError(400, 'truncation_side: must be "left" or "right"',
                           param="truncation_side")
        if k is None:
            raise ApiError(400, "truncation_side: only applies with truncate_prompt_tokens",
                           param="truncation_side")
    interval = body.stream_interval
    if interval is not None and not 1 <= interval <= MAX_STREAM_INTERVAL:
        raise ApiError(400, f"stream_interval: must be between 1 and {MAX_STREAM_INTERVAL}",
                       param="stream_interval")
    if None not in (body.rid, body.request_id) and body.rid != body.request_id:
        raise ApiError(400, "request_id: differs from rid (give one)", param="request_id")
    if isinstance(body, ChatRequest):
        if body.continue_final_message and body.add_generation_prompt:
            raise ApiError(400, "continue_final_message: cannot be combined with "
                                "add_generation_prompt: true", param="continue_final_message")
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")


def truncated(prompt: list[int], body: OpenAISampling, context_length: int) -> list[int]:
    """`prompt` cut to `truncate_prompt_tokens` (-1: the context length): its last tokens, or
    its first with truncation_side "right"."""
    k = body.truncate_prompt_tokens
    if k is None:
        return prompt
    k = context_length if k == -1 else k
    if len(prompt) <= k:
        return prompt
    return prompt[:k] if body.truncation_side == "right" else prompt[-k:]


def check_aligned_hints(body: OpenAISampling, count: int) -> None:
    """cache_salt and extra_key (accepted: README) given as lists hold one value a prompt."""
    for field in ("cache_salt", "extra_key"):
        value = getattr(body, field)
        if isinstance(value, list) and len(value) != count:
            raise ApiError(400, f"{field}: {len(value)} items for {count} prompts", param=field)


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


MAX_BAD_WORD_CHARS = 512


def bad_words_ids(words: list[str] | None, tokenizer: Any) -> list[list[int]]:
    """vLLM's bad_words as token sequences (tokenizer thread): each word as it would open the
    text, and as it would follow a space when that is another sequence of as many tokens (the
    same word as a tokenizer splits it mid-text: "Paris" and " Paris" are different tokens)."""
    out: list[list[int]] = []
    for word in words or ():
        if not word.strip() or len(word) > MAX_BAD_WORD_CHARS:
            raise ApiError(400, f"bad_words: each word must hold 1 to {MAX_BAD_WORD_CHARS} "
                                "characters, not only spaces", param="bad_words")
        first = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        for ids in (first, spaced):
            if ids and ids not in out and (ids is first or len(ids) == len(first)):
                out.append(ids)
    return out


async def _bad_words(request: web.Request, body: OpenAISampling) -> list[list[int]] | None:
    """The body's bad_words as bad_words_ids gives them, tokenized off the loop (None: none)."""
    if not body.bad_words:
        return None
    return await off_loop(request, bad_words_ids, body.bad_words, request.app[ENGINE].tokenizer)


def _specs(body: OpenAISampling, prompts: list[list[int]], loras: list[str | None],
           max_tokens: list[int], logprobs: int | None, echo: bool = False,
           bad_words: list[list[int]] | None = None) -> list[GenSpec]:
    """The generations to submit. The prompt's own logprobs are scored only for an echo with
    logprobs or for prompt_logprobs (the rest of the time no answer carries them, and scoring
    costs a logits row a prompt token); its top candidates, as many as the larger of the two
    asks for. `bad_words`: the body's, as bad_words_ids gives them."""
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n: must be between 1 and {MAX_N}", param="n")
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        field = "top_logprobs" if isinstance(body, ChatRequest) else "logprobs"
        raise ApiError(400, f"{field}: must be between 0 and {MAX_TOP_LOGPROBS}", param=field)
    total = len(prompts) * n
    scores_prompt = body.prompt_logprobs is not None or (echo and logprobs is not None)
    prompt_top = None  # top_logprobs_num's
    if body.prompt_logprobs is not None:
        prompt_top = max(body.prompt_logprobs, (logprobs or 0) if echo else 0)
    base_rid = body.rid if body.rid is not None else body.request_id
    specs = []
    for p, prompt in enumerate(prompts):
        for j in range(n):
            i = p * n + j
            rid = None if base_rid is None else (base_rid if total == 1 else f"{base_rid}-{i}")
            params = body.to_params(max_tokens[p], seed_offset=j)
            params.bad_words_ids = list(bad_words or [])
            specs.append(GenSpec(
                prompt, params, lora_name=loras[p],
                rid=rid,
                return_logprob=logprobs is not None or body.prompt_logprobs is not None,
                top_logprobs_num=logprobs or 0, trim_stop=body.trim_stop,
                logprob_start=1 if scores_prompt else len(prompt),
                prompt_top_logprobs_num=prompt_top,
                prompt_logprob_ranks=body.prompt_logprobs is not None,
                cache_salt=isolation_key(_per_prompt(body.cache_salt, p),
                                         _per_prompt(body.extra_key, p)),
            ))
    return specs


def _per_prompt(value: str | list[str] | None, p: int) -> str | None:
    """cache_salt or extra_key for prompt `p`: one for every prompt, or a list aligned with
    them (check_aligned_hints)."""
    return value[p] if isinstance(value, list) else value


def finish_reason(g: Generation) -> str | None:
    if not g.finished:
        return None
    return {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}.get(g.finish_reason,
                                                                          "abort")


def abort_error(request: web.Request, g: Generation) -> ApiError:
    """Why `g` was aborted, as an OpenAI error: 503 while the server shuts down or for a
    transient reason (an adapter's re-read hit the machine's read error: with Retry-After),
    else 500 (a failed adapter load, an internal error, an abort by rid)."""
    message = f"choice {g.index} was aborted: {g.error or 'aborted'}"
    if g.request.error_retryable:
        return ApiError(503, message, code="request_aborted",
                        headers={"Retry-After": str(RETRY_AFTER_QUEUE_FULL_S)})
    status = 503 if request.app[LIFECYCLE].is_stopping else 500
    return ApiError(status, message, code="request_aborted")


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


async def send_abort_error(request: web.Request, resp: sse.Stream,
                           gens: list[Generation]) -> None:
    """At the end of a stream (before [DONE]): an error event for the first aborted choice,
    which OpenAI clients raise."""
    failed = aborted(gens)
    if failed:
        await sse.send(resp, abort_error(request, failed[0]).body(Style.OPENAI))


def usage(gens: list[Generation], n: int) -> dict[str, Any]:
    """OpenAI's usage; with the prefix cache on, `prompt_tokens_details.cached_tokens` too (the
    prompt tokens taken from the cache, each prompt's first sample's, as its prompt counts)."""
    prompt = sum(g.prompt_tokens for g in gens[::n])  # each prompt counts once, whatever n
    completion = sum(g.completion_tokens for g in gens)
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion}
    if gens and gens[0].prefix_cache:
        out["prompt_tokens_details"] = {"cached_tokens": sum(g.cached_tokens for g in gens[::n])}
    return out


def _header(request: web.Request, kind: str, prefix: str,
            body: OpenAISampling) -> dict[str, Any]:
    """The fields every answer and chunk starts with; its id is "<prefix>-<request_id>" for a
    body that gives vLLM's request_id, else random."""
    rid = body.request_id if body.request_id is not None else uuid.uuid4().hex
    return {"id": f"{prefix}-{rid}", "object": kind, "created": int(time.time()),
            "model": body.model or base_names(request)[0]}


def _usage_extra(body: OpenAISampling, gens: list[Generation], n: int) -> dict[str, Any]:
    """The `usage` key of a streamed chunk: none without include_usage, the usage so far with
    continuous_usage_stats, else null (the last chunk carries it)."""
    if not body.include_usage:
        return {}
    return {"usage": usage(gens, n) if body.continuous_usage else None}


# ---------------------------------------------------------------- completions

@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    body = await decode_body(request, CompletionRequest)
    refuse_unsupported(body)
    info = engine.model_info
    prompts, texts = await off_loop(request, _completion_prompts, body, engine.tokenizer,
                                    info.vocab_size, info.context_length)
    loras = resolve_loras(request, body, len(prompts))
    check_aligned_hints(body, len(prompts))
    max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    bad = await _bad_words(request, body)
    specs = _specs(body, prompts, loras, [max_tokens] * len(prompts), body.logprobs,
                   echo=bool(body.echo), bad_words=bad)
    n = len(specs) // len(prompts)
    echo = [texts[i // n] if body.echo else "" for i in range(len(specs))]
    gens = await submit_openai(request, body, specs)
    header = _header(request, "text_completion", "cmpl", body)
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
        **_prompt_logprobs_key(g, tok, body),
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


def _prompt_logprobs_key(g: Generation, tok: Any, body: OpenAISampling) -> dict[str, Any]:
    """{"prompt_logprobs": ...} when the body asks for them, else nothing."""
    if body.prompt_logprobs is None:
        return {}
    return {"prompt_logprobs": prompt_logprobs(g, tok, body.prompt_logprobs)}


def prompt_logprobs(g: Generation, tok: Any, k: int) -> list[dict[str, Any] | None] | None:
    """vLLM's prompt_logprobs: for each prompt token after the first (whose entry is null),
    {token id: {"logprob", "rank", "decoded_token"}} for the token itself (its rank: how many
    tokens were likelier, plus 1) and then its `k` likeliest candidates (ranks 1..k), each id
    once. None when the request ended before its prompt was scored (an abort)."""
    prompt = g.request.prompt_ids
    if len(g.input_logprobs) < len(prompt) or len(g.input_ranks) < len(prompt):
        return None

    def entry(t: int, lp: float, rank: int) -> dict[str, Any]:
        # a -inf logprob is not JSON: vLLM writes -9999.0
        return {"logprob": max(lp, -9999.0), "rank": rank, "decoded_token": tok.decode([t])}

    out: list[dict[str, Any] | None] = [None]
    for p in range(1, len(prompt)):
        tokens = {str(prompt[p]): entry(prompt[p], g.input_logprobs[p], g.input_ranks[p])}
        for j, (t, lp) in enumerate(g.input_top_logprobs[p][:k]):
            tokens.setdefault(str(t), entry(t, lp, j + 1))
        out.append(tokens)
    return out


def _completion_prompts(body: CompletionRequest, tokenizer: Any, vocab: int,
                        context_length: int) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt: a string, a list of strings, a list of token ids or
    a list of such lists (never a mix), cut to truncate_prompt_tokens. Ids run over the
    model's `vocab` (which may be padded past the tokenizer's), as on /generate."""
    items = body.prompt if isinstance(body.prompt, list) else [body.prompt]
    if items and all(isinstance(p, int) for p in items):
        items = [items]
    if not items:
        raise ApiError(400, "prompt: must not be empty", param="prompt")
    if all(isinstance(p, str) for p in items):
        special = body.add_special_tokens is not False  # true unless the body says false
        ids = [tokenizer.encode(p, add_special_tokens=special) for p in items]
        texts = list(items)
    elif not all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in items):
        raise ApiError(400, "prompt: mixes strings, token ids and lists of token ids",
                       param="prompt")
    elif any(not 0 <= t < vocab for p in items for t in p):
        raise ApiError(400, f"prompt: token ids must be integers in [0, {vocab})",
                       param="prompt")
    else:
        ids, texts = items, [tokenizer.decode(p) for p in items]
    cut = [truncated(p, body, context_length) for p in ids]
    # an echo repeats the prompt the model saw
    texts = [text if len(c) == len(p) else tokenizer.decode(c)
             for text, c, p in zip(texts, cut, ids, strict=True)]
    return cut, texts


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
        k = g.request.top_logprobs_num  # prompt_logprobs may have asked for more
        top = [None] + [_top_by_text(tok, t[:k]) for t in tops[1:]]
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
    sent_tokens = [0] * len(gens)
    pending = [""] * len(gens)  # text not sent yet (stream_interval)
    # with logprobs, offsets run over the prompt tokens' own texts (_prompt_texts)
    prompt_texts = {g.index: _prompt_texts(g, engine.tokenizer) for g in gens
                    if echo[g.index] and body.logprobs is not None}
    text_offset = [sum(len(t) for t in prompt_texts[g.index]) if g.index in prompt_texts
                   else len(echo[g.index]) for g in gens]
    # the headers go out with the first chunk, once the first output came: a request aborted
    # before it is the error's status, as without streaming (refuse_if_nothing_generated)
    resp = sse.start(request)

    # with logprobs the echo waits for the prompt's, which come with the first output
    to_echo = {g.index for g in gens if echo[g.index]}

    async def send(choice: dict[str, Any]) -> None:
        await sse.send(resp, {**header, "choices": [choice], **_usage_extra(body, gens, n)})

    async def open_stream() -> None:  # at the first output: the echoes without logprobs
        refuse_if_nothing_generated(request, gens)
        for g in gens:
            if g.index in to_echo and body.logprobs is None:
                await send(_choice(g.index, echo[g.index]))
                to_echo.discard(g.index)

    async def produce() -> None:
        opened = False
        async with contextlib.aclosing(follow(engine, gens)) as outputs:
            async for g, delta in outputs:
                if not opened:
                    opened = True
                    await open_stream()
                pending[g.index] += delta
                if not is_chunk_due(g, sent_tokens[g.index], body.stream_interval):
                    continue
                start, sent_tokens[g.index] = sent_tokens[g.index], len(g.output_ids)
                text, pending[g.index] = pending[g.index], ""
                logprobs = None
                if body.logprobs is not None:
                    logprobs = _completion_logprobs(g, engine.tokenizer, start,
                                                    text_offset[g.index])
                    if g.index in to_echo:  # the echo chunk carries the prompt's logprobs
                        to_echo.discard(g.index)
                        empty = {"tokens": [], "token_logprobs": [], "text_offset": [],
                                 "top_logprobs": [] if logprobs["top_logprobs"] is not None
                                 else None}
                        await send(_choice(g.index, echo[g.index], None, _echo_logprobs(
                            g, engine.tokenizer, prompt_texts[g.index], empty)))
                    # offsets run over each token's own text, as in the whole answer (the
                    # chunk's text may hold back bytes of an unfinished character)
                    text_offset[g.index] += sum(len(t) for t in logprobs["tokens"])
                if text or g.finished or logprobs:
                    await send(_choice(g.index, text, finish_reason(g), logprobs))
        if not opened:
            await open_stream()
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
    refuse_unsupported(body)
    loras = resolve_loras(request, body, 1)
    check_aligned_hints(body, 1)
    check_request_template(request, body.chat_template)
    prompt = await off_loop(request, chat_prompt, body, engine.tokenizer)
    prompt = truncated(prompt, body, engine.model_info.context_length)
    limit = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    if limit is None:  # unset: up to the context length
        limit = max(engine.model_info.context_length - len(prompt), 1)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    bad = await _bad_words(request, body)
    specs = _specs(body, [prompt], loras, [limit], logprobs, bad_words=bad)
    gens = await submit_openai(request, body, specs)
    header = _header(request, "chat.completion", "chatcmpl", body)
    echo = _chat_echo(body)
    if body.stream:
        header["object"] = "chat.completion.chunk"
        return await _stream_chat(request, gens, header, body, echo)
    await unless_disconnected(request, collect(engine, gens))
    refuse_if_nothing_generated(request, gens)
    choices = [with_abort(request, g, {
        "index": g.index,
        "message": {"role": "assistant", "content": echo + g.text.text},
        "logprobs": _chat_logprobs(g, engine.tokenizer, request.app[TOKEN_BYTES], 0)
        if body.logprobs else None,
        "finish_reason": finish_reason(g),
    }) for g in gens]
    extra = {}
    if body.prompt_logprobs is not None:  # one prompt, whatever n: at the answer's top level
        extra["prompt_logprobs"] = next(
            (lps for g in gens if (lps := prompt_logprobs(g, engine.tokenizer,
                                                          body.prompt_logprobs)) is not None),
            None)
    return json_response({**header, "choices": choices, "usage": usage(gens, len(gens)),
                          **extra})


def check_request_template(request: web.Request, template: str | None) -> None:
    """A 400 for a request's own chat template unless the server trusts them: a template is
    code the server runs (a loop of a billion steps is a short one)."""
    if template is not None and not request.app[CONFIG].trust_request_chat_template:
        raise ApiError(400, "chat_template: a request's own chat template is refused; the "
                            "server takes them with --trust-request-chat-template",
                       param="chat_template")


def chat_prompt(body: ChatRequest, tokenizer: Any) -> list[int]:
    """Render the messages with the chat template (the request's, or the tokenizer's)."""
    if not body.messages:
        raise ApiError(400, "messages: must not be empty", param="messages")
    messages = [_message(m, i) for i, m in enumerate(body.messages)]
    kwargs = {**(body.chat_template_kwargs or {}), **_template_fields(body, tokenizer)}
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, chat_template=body.chat_template,
            add_generation_prompt=_adds_generation_prompt(body),
            continue_final_message=bool(body.continue_final_message), **kwargs,
        )
    except Exception as e:  # noqa: BLE001 - a template error is the request's mistake
        raise ApiError(400, f"chat template failed: {type(e).__name__}: {e}",
                       param="messages") from None
    return tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))


def _adds_generation_prompt(body: ChatRequest) -> bool:
    """add_generation_prompt: true unless the body says false or continues its last message."""
    return body.add_generation_prompt is not False and not body.continue_final_message


def _template_fields(body: ChatRequest, tokenizer: Any) -> dict[str, Any]:
    """`documents` and `reasoning_effort`, which the chat template receives as variables of
    those names. A template that never reads one would ignore it: setting it is then a 400
    naming it."""
    source = _template_source(body, tokenizer)
    fields = {}
    for field in ("documents", "reasoning_effort"):
        value = getattr(body, field)
        if value is None or value == []:
            continue
        if not re.search(rf"\b{field}\b", source):
            raise ApiError(400, f"{field}: the chat template does not read it", param=field)
        fields[field] = value
    return fields


def _template_source(body: ChatRequest, tokenizer: Any) -> str:
    """The text of the chat template that renders `body`: the request's (or, for a tokenizer
    with named templates, the one it names), else the tokenizer's default one."""
    stored = tokenizer.chat_template
    if isinstance(stored, dict):
        if body.chat_template in stored:
            return stored[body.chat_template]
        if body.chat_template is None:
            return stored.get("default", "")
    return body.chat_template or stored or ""


def _chat_echo(body: ChatRequest) -> str:
    """vLLM's chat `echo`: the answer starts with the last message's text when that message
    has the answer's role (the assistant's after a generation prompt; without one, the answer
    continues the last message, whatever its role)."""
    if not body.echo:
        return ""
    last = _message(body.messages[-1], len(body.messages) - 1)
    if _adds_generation_prompt(body) and last["role"] != "assistant":
        return ""
    return last.get("content") or ""


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
                       body: ChatRequest, echo: str) -> web.StreamResponse:
    engine = request.app[ENGINE]
    sent_tokens = [0] * len(gens)
    pending = [""] * len(gens)  # text not sent yet (stream_interval)
    # the headers go out with the first chunk, once the first output came: a request aborted
    # before it is the error's status, as without streaming (refuse_if_nothing_generated)
    resp = sse.start(request)

    def chunk(index: int, delta: dict[str, Any], reason: str | None = None,
              logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {**header, "choices": [choice], **_usage_extra(body, gens, len(gens))}

    async def open_stream() -> None:  # at the first output: each choice's role (and echo)
        refuse_if_nothing_generated(request, gens)
        for g in gens:
            await sse.send(resp, chunk(g.index, {"role": "assistant", "content": ""}))
            if echo:
                await sse.send(resp, chunk(g.index, {"content": echo}))

    async def produce() -> None:
        opened = False
        async with contextlib.aclosing(follow(engine, gens)) as outputs:
            async for g, delta in outputs:
                if not opened:
                    opened = True
                    await open_stream()
                pending[g.index] += delta
                if not is_chunk_due(g, sent_tokens[g.index], body.stream_interval):
                    continue
                start, sent_tokens[g.index] = sent_tokens[g.index], len(g.output_ids)
                text, pending[g.index] = pending[g.index], ""
                logprobs = _chat_logprobs(g, engine.tokenizer, request.app[TOKEN_BYTES],
                                          start) if body.logprobs else None
                if text or logprobs:
                    await sse.send(resp, chunk(g.index, {"content": text}, None, logprobs))
                if g.finished:
                    await sse.send(resp, chunk(g.index, {}, finish_reason(g)))
        if not opened:
            await open_stream()
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
