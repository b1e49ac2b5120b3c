"""The aiohttp application: app factory, typed keys, error and auth middlewares, engine
lifecycle (started in cleanup_ctx, drained on shutdown)."""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from aiohttp import web

from api.errors import ApiError, Style, from_exception
from api.generation import SUBMITTED, ClientGone
from api.tokenbytes import TokenBytes
from runtime.config import ServerConfig
from runtime.request import Request

if TYPE_CHECKING:
    from metrics import ServingMetrics
    from runtime.engine import Engine

log = logging.getLogger("loraserve.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Lifecycle:
    """Where the server stands: `is_stopping` flips when shutdown starts (health says 503)."""

    drain_timeout: float
    started_at: int
    is_stopping: bool = False
    is_stopped: bool = False


ENGINE = web.AppKey["Engine"]("loraserve.engine")
CONFIG = web.AppKey(ServerConfig.__name__, ServerConfig)
METRICS = web.AppKey["ServingMetrics"]("loraserve.metrics")
LIFECYCLE = web.AppKey("loraserve.lifecycle", Lifecycle)
TOKENIZER_THREAD = web.AppKey("loraserve.tokenizer_thread", ThreadPoolExecutor)
TOKEN_BYTES = web.AppKey("loraserve.token_bytes", TokenBytes)
R = TypeVar("R")

ADMIN_PATHS = frozenset({
    "/load_lora_adapter", "/unload_lora_adapter",
    "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
})
ADMIN_READ_PATHS = frozenset({"/lora_adapters", "/v1/lora_adapters"})
CACHE_ADMIN_PATHS = frozenset({"/flush_cache", "/reset_prefix_cache"})  # the prefix cache
PUBLIC_PATHS = frozenset({"/health", "/metrics"})


def create_app(engine: Engine, config: ServerConfig, metrics: ServingMetrics, *,
               drain_timeout: float = 0.0) -> web.Application:
    """The HTTP front end for `engine`. The engine is started when the app starts and stopped
    (after draining for up to `drain_timeout` seconds) when it shuts down."""
    from api import admin, native, openai, score

    app = web.Application(
        client_max_size=config.max_request_bytes,
        middlewares=[error_middleware, auth_middleware, abandoned_middleware],
    )
    app[ENGINE] = engine
    app[CONFIG] = config
    app[METRICS] = metrics
    app[LIFECYCLE] = Lifecycle(drain_timeout=drain_timeout, started_at=int(time.time()))
    app[TOKENIZER_THREAD] = ThreadPoolExecutor(max_workers=1,
                                               thread_name_prefix="loraserve-tokenize")
    app[TOKEN_BYTES] = TokenBytes(engine.tokenizer)
    app.add_routes(native.routes)
    app.add_routes(openai.routes)
    app.add_routes(admin.routes)
    app.add_routes(score.routes)
    app.cleanup_ctx.append(_engine_lifecycle)
    app.on_shutdown.append(_drain)
    return app


async def _engine_lifecycle(app: web.Application) -> AsyncIterator[None]:
    await app[ENGINE].start()
    yield
    await _stop_engine(app, 0.0)
    app[TOKENIZER_THREAD].shutdown(wait=False, cancel_futures=True)


async def off_loop(request: web.Request, fn: Callable[..., R], *args: Any) -> R:
    """fn(*args) in the front end's tokenizer thread: tokenizing a prompt (megabytes of text
    take seconds) and rendering a chat template. A large one then delays other requests'
    tokenizing, never the event loop, which streams every answer and drives the engine. Every
    encode runs here, in one thread; the loop keeps the per-token decodes of the streams (a
    token or a few each), which only read the tokenizer."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(request.app[TOKENIZER_THREAD],
                                      functools.partial(fn, *args))


async def _drain(app: web.Application) -> None:
    # on_shutdown runs after the listening sockets closed and before open connections are
    # waited for: running requests finish (up to the timeout) and their handlers respond.
    await _stop_engine(app, app[LIFECYCLE].drain_timeout)


async def _stop_engine(app: web.Application, drain_timeout: float) -> None:
    state = app[LIFECYCLE]
    state.is_stopping = True
    if not state.is_stopped:
        state.is_stopped = True
        await app[ENGINE].stop(drain_timeout=drain_timeout)


def error_style(path: str) -> Style:
    if path in ADMIN_PATHS:
        return Style.ADMIN
    return Style.OPENAI if path.startswith("/v1/") else Style.NATIVE


def json_response(data: object, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, headers=headers,
                        content_type="application/json")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as JSON in the route's shape; anything unexpected is a 500 + log."""
    style = error_style(request.path)
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        skip = {"Content-Type", "Content-Length"}
        headers = {k: v for k, v in e.headers.items() if k not in skip}
        err = ApiError(e.status, e.text or e.reason, headers=headers)
    except (ClientGone, ConnectionResetError):
        return web.Response(status=499)  # nobody reads it; the request was aborted
    except Exception as e:
        err = from_exception(e, style)
        if err is None:
            log.exception("unhandled error in %s %s", request.method, request.path)
            err = ApiError(500, f"internal error: {type(e).__name__}: {e}")
    loaded = request.app[ENGINE].loaded_adapters() if style is Style.ADMIN else None
    return json_response(err.body(style, loaded), status=err.status, headers=err.headers)


@web.middleware
async def abandoned_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """No engine request outlives the handler that submitted it. Its answer is whole when the
    handler returns, so a request still unfinished then was left behind: its client went away
    in a way that reached the handler as an error instead of a cancellation (a stream's first
    write to a connection closing just as the prompt was tokenized), and nobody reads it. It
    is aborted, not run to its end for nobody and counted as served."""
    owned: list[Request] = []
    token = SUBMITTED.set(owned)
    try:
        return await handler(request)
    finally:
        SUBMITTED.reset(token)
        for req in owned:
            if not req.is_finished:
                request.app[ENGINE].abort(req.rid)


def bearer_token(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _matches(token: str | None, key: str | None) -> bool:
    return token is not None and key is not None and hmac.compare_digest(
        token.encode(), key.encode())


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer keys.

    - /health and /metrics are open.
    - Admin routes (load/unload, /lora_adapters, /flush_cache) need `admin_api_key` when it is
      set. When it is unset they are open only if `api_key` is unset too; with only `api_key`
      set they are refused (403): the inference key never opens admin routes, and without an
      admin key nobody may load adapters from paths on this machine.
    - Inference routes need `api_key` when it is set (the admin key opens them too).
    """
    config = request.app[CONFIG]
    path = request.path
    if path in PUBLIC_PATHS:
        return await handler(request)
    token = bearer_token(request)
    challenge = {"WWW-Authenticate": "Bearer"}
    if path in ADMIN_PATHS or path in ADMIN_READ_PATHS or path in CACHE_ADMIN_PATHS:
        if config.admin_api_key is not None:
            if not _matches(token, config.admin_api_key):
                raise ApiError(401, "missing or invalid admin API key", headers=challenge)
        elif config.api_key is not None:
            raise ApiError(403, "admin routes are disabled: the server has api_key but no "
                           "admin_api_key")
        return await handler(request)
    if config.api_key is not None and not (
        _matches(token, config.api_key) or _matches(token, config.admin_api_key)
    ):
        raise ApiError(401, "missing or invalid API key", code="invalid_api_key",
                       headers=challenge)
    return await handler(request)
