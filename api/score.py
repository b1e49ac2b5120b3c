"""SGLang's /v1/score: for each item, the probability of each label token right after the
query and the item, read from one prefill each (SGLang's decoder-only scoring, as rerankers and
LLM judges use it). The adapter is chosen by `model` as on the OpenAI routes."""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web

from api.app import ENGINE, json_response, off_loop
from api.errors import ApiError, renamed
from api.generation import GenSpec, collect, submit_all, unless_disconnected
from api.openai import base_names, refuse_if_nothing_generated, resolve_adapter
from api.protocol import ScoreRequest, decode_body
from runtime.errors import ValidationError
from runtime.request import SamplingParams

routes = web.RouteTableDef()


@routes.post("/v1/score")
async def score(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = await decode_body(request, ScoreRequest)
    prompts = await off_loop(request, _prompts, body, engine.tokenizer,
                             engine.model_info.vocab_size)
    lora = resolve_adapter(request, body.model)
    specs = [GenSpec(p, SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True),
                     lora_name=lora, return_logprob=True, logprob_start=len(p),
                     token_ids_logprob=list(body.label_token_ids or []))
             for p in prompts]
    try:  # the engine checks the labels as token_ids_logprob (ids, range, count)
        gens = await submit_all(engine, specs)
    except ValidationError as e:
        raise renamed(e, {"token_ids_logprob": "label_token_ids"}) from None
    await unless_disconnected(request, collect(engine, gens))
    refuse_if_nothing_generated(request, gens)
    scores = []
    for g in gens:
        if not g.ids_logprobs:  # aborted before its prefill ended (another item was not)
            raise ApiError(500, f"item {g.index} was aborted: {g.error or 'aborted'}",
                           code="request_aborted")
        scores.append(_probabilities(g.ids_logprobs[0], body.apply_softmax))
    tokens = sum(len(p) for p in prompts)
    return json_response({
        "scores": scores, "model": body.model or base_names(request)[0], "object": "scoring",
        "usage": {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens},
    })


def _prompts(body: ScoreRequest, tokenizer: Any, vocab: int) -> list[list[int]]:
    """query + item for each item (item + query with item_first): texts joined and then
    tokenized, or token ids joined."""
    query, items = body.query, body.items
    if query is None or items is None:
        raise ApiError(400, "query and items: both required", param="query" if query is None
                       else "items")
    items = [items] if isinstance(items, str) else items
    if not items:
        raise ApiError(400, "items: an empty list", param="items")
    if isinstance(query, str):
        if not all(isinstance(i, str) for i in items):
            raise ApiError(400, "items: must be texts when the query is a text", param="items")
        texts = [i + query if body.item_first else query + i for i in items]  # type: ignore[operator]
        return [tokenizer.encode(t) for t in texts]
    if not all(isinstance(i, list) for i in items):
        raise ApiError(400, "items: must be lists of token ids when the query is token ids",
                       param="items")
    prompts = [i + query if body.item_first else query + i for i in items]  # type: ignore[operator]
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise ApiError(400, f"query and items: token ids must be integers in [0, {vocab})",
                       param="items")
    if any(not p for p in prompts):
        raise ApiError(400, "query and items: an empty prompt", param="items")
    return prompts


def _probabilities(logprobs: list[float], softmax: bool) -> list[float]:
    """exp of each label's log-prob under the whole vocabulary, or with `softmax` normalised
    over the labels alone."""
    if not softmax:
        return [math.exp(lp) for lp in logprobs]
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return [w / total for w in weights]
