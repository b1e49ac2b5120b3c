"""What the native and OpenAI routes share: submit several requests, follow their outputs
as one stream, turn tokens into text, and abort whatever is left when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from aiohttp import web

from api.errors import ApiError
from api.textstream import TextStream
from runtime.engine import Submission
from runtime.request import FinishReason, Request, RequestOutput

if TYPE_CHECKING:
    from runtime.engine import Engine

T = TypeVar("T")

DISCONNECT_POLL_S = 0.5
MAX_STREAM_INTERVAL = 1 << 20  # output tokens between streamed chunks, at most


def is_chunk_due(g: Generation, num_sent: int, interval: int | None) -> bool:
    """Whether a streamed generation sends what it holds (`stream_interval` on either API):
    its first tokens, then every `interval` tokens (None or 1: every step), and its end."""
    return (interval is None or interval <= 1 or g.finished or num_sent == 0
            or g.completion_tokens - num_sent >= interval)

# The engine requests submitted while one HTTP request is handled: api.app's middleware sets
# a list per HTTP request and aborts whatever it holds unfinished when the handler ends.
SUBMITTED: contextvars.ContextVar[list[Request] | None] = contextvars.ContextVar(
    "loraserve_submitted", default=None)


def isolation_key(cache_salt: str | None, extra_key: str | None) -> str | None:
    """The prefix cache's isolation key of a request: vLLM's cache_salt and SGLang's
    extra_key together (requests share cached blocks only with requests of the same both)."""
    if cache_salt is None and extra_key is None:
        return None
    return json.dumps([cache_salt, extra_key])


@dataclass
class GenSpec(Submission):
    """One request to submit (Engine.submit's arguments), and how its text is cut."""

    trim_stop: bool = True


@dataclass
class Generation:
    """A submitted request and everything its outputs so far add up to."""

    index: int
    request: Request
    text: TextStream
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    input_logprobs: list[float | None] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    input_ranks: list[int | None] = field(default_factory=list)  # with prompt_logprob_ranks
    # with token_ids_logprob: those ids' log-probs at each output token, each prompt position
    ids_logprobs: list[list[float]] = field(default_factory=list)
    input_ids_logprobs: list[list[float]] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefix_cache: bool = False  # the server's prefix cache is on: usage reports cached_tokens
    finished: bool = False
    finish_reason: FinishReason | None = None
    matched_stop: int | str | None = None
    error: str | None = None
    start_time: float = field(default_factory=time.perf_counter)
    end_time: float | None = None

    @property
    def rid(self) -> str:
        return self.request.rid

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def e2e_latency(self) -> float:
        return (self.end_time or time.perf_counter()) - self.start_time

    def apply(self, out: RequestOutput) -> str:
        """Fold one engine output in; return the text it adds (stop strings cut off)."""
        self.output_ids.extend(out.new_token_ids)
        if out.new_logprobs:
            self.logprobs.extend(out.new_logprobs)
        if out.new_top_logprobs:
            self.top_logprobs.extend(out.new_top_logprobs)
        if out.new_ids_logprobs:
            self.ids_logprobs.extend(out.new_ids_logprobs)
        if out.input_logprobs is not None:
            self.input_logprobs = out.input_logprobs
            self.input_top_logprobs = out.input_top_logprobs or []
            self.input_ranks = out.input_ranks or []
            self.input_ids_logprobs = out.input_ids_logprobs or []
        self.prompt_tokens = out.prompt_tokens
        self.cached_tokens = out.cached_tokens
        if out.finished:
            self.finished = True
            self.finish_reason = out.finish_reason
            self.matched_stop = out.matched_stop
            self.error = out.error
            self.end_time = time.perf_counter()
        return self.text.push(out.new_token_ids, out.finished, out.matched_stop)


async def submit_all(engine: Engine, specs: list[GenSpec]) -> list[Generation]:
    """Submit every spec, or none: a spec that fails leaves nothing of the others queued.
    Within an HTTP handler the requests are its own: any still unfinished when it ends is
    aborted (api.app.abandoned_middleware)."""
    limit = engine.config.max_queued_requests
    if len(specs) > limit:  # could never queue, however long the client retried
        raise ApiError(400, f"{len(specs)} generations in one request (its prompts times n); "
                            f"the server queues at most {limit} (max_queued_requests)")
    for spec in specs:  # validate all first so a bad last item queues nothing
        spec.params.validate(engine.model_info.vocab_size)
    reqs = await engine.submit_many(specs)
    owned = SUBMITTED.get()
    if owned is not None:
        owned.extend(reqs)
    return [Generation(i, req, _text_stream(engine, spec), prompt_tokens=len(req.prompt_ids),
                       prefix_cache=engine.config.enable_prefix_caching)
            for i, (spec, req) in enumerate(zip(specs, reqs, strict=True))]


def _text_stream(engine: Engine, spec: GenSpec) -> TextStream:
    p = spec.params
    return TextStream(engine.tokenizer, p.skip_special_tokens, p.stop, spec.trim_stop,
                      p.spaces_between_special_tokens)


async def follow(engine: Engine, gens: list[Generation]) -> AsyncIterator[tuple[Generation, str]]:
    """Yield (generation, text delta) for every engine output of every generation, as they
    come. Leaving early (a disconnect, an error) aborts the unfinished requests."""
    if len(gens) == 1:
        stream = engine.stream(gens[0].request)
        try:
            async for out in stream:
                yield gens[0], gens[0].apply(out)
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
            _abort_unfinished(engine, gens)
        return
    # Each pump forwards one request's outputs; None ends it, an exception is re-raised here.
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(g: Generation) -> None:
        try:
            async for out in engine.stream(g.request):
                queue.put_nowait((g.index, out))
            queue.put_nowait((g.index, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((g.index, e))

    tasks = [asyncio.create_task(pump(g)) for g in gens]
    try:
        remaining = len(gens)
        while remaining:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                remaining -= 1
                continue
            yield gens[index], gens[index].apply(item)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        _abort_unfinished(engine, gens)


def _abort_unfinished(engine: Engine, gens: list[Generation]) -> None:
    for g in gens:
        if not g.finished:
            engine.abort(g.rid)


async def collect(engine: Engine, gens: list[Generation]) -> list[Generation]:
    """Run every generation to the end (the non-streaming case)."""
    async with contextlib.aclosing(follow(engine, gens)) as outputs:
        async for _ in outputs:
            pass
    return gens


class ClientGone(Exception):
    """The client closed the connection before its response was ready."""


async def unless_disconnected(request: web.Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client's connection closes first.

    Servers started by `python -m runtime` (and aiohttp's test server) also cancel handlers on
    disconnect; this watch covers runners that don't."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        elif not task.cancelled():
            # The handler was cancelled as `work` failed (a write to the closed connection):
            # mark that failure seen, or asyncio logs "Task exception was never retrieved".
            task.exception()
