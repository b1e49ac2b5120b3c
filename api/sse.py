"""Server-sent events: `data: {json}\\n\\n` chunks ending with `data: [DONE]\\n\\n`."""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import Any

import msgspec
from aiohttp import web

from api.errors import ApiError, Style
from api.generation import ClientGone, unless_disconnected

log = logging.getLogger("loraserve.api")


async def start(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # proxies must not buffer the stream
    })
    await resp.prepare(request)
    return resp


async def send(resp: web.StreamResponse, data: object) -> None:
    await resp.write(b"data: " + msgspec.json.encode(data) + b"\n\n")


async def finish(resp: web.StreamResponse) -> web.StreamResponse:
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def run(request: web.Request, resp: web.StreamResponse, produce: Coroutine[Any, Any, None],
              style: Style) -> web.StreamResponse:
    """Run `produce` (which sends the chunks) until done or the client leaves; a failure after
    the status line went out is reported in-band; then [DONE]."""
    try:
        await unless_disconnected(request, produce)
    except ConnectionError:
        raise ClientGone() from None  # a write found the connection closed
    except ApiError as e:
        await send(resp, e.body(style))
    except Exception as e:
        log.exception("generation failed mid-stream")
        await send(resp, ApiError(500, f"{type(e).__name__}: {e}").body(style))
    return await finish(resp)
