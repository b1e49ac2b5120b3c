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


class Stream:
    """An SSE answer whose status line and headers go out with its first event: until then a
    failure can still be answered with its own HTTP status (`run`)."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.resp: web.StreamResponse | None = None

    @property
    def started(self) -> bool:
        return self.resp is not None

    async def response(self) -> web.StreamResponse:
        """The response, its status line and headers sent first if they were not yet."""
        if self.resp is None:
            resp = web.StreamResponse(headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # proxies must not buffer the stream
            })
            await resp.prepare(self.request)
            self.resp = resp
        return self.resp


def start(request: web.Request) -> Stream:
    """An SSE answer to `request`, nothing sent yet."""
    return Stream(request)


async def send(stream: Stream, data: object) -> None:
    resp = await stream.response()
    await resp.write(b"data: " + msgspec.json.encode(data) + b"\n\n")


async def finish(stream: Stream) -> web.StreamResponse:
    resp = await stream.response()
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def run(request: web.Request, stream: Stream, produce: Coroutine[Any, Any, None],
              style: Style) -> web.StreamResponse:
    """Run `produce` (which sends the chunks) until done or the client leaves; then [DONE].
    A failure before the first chunk is the answer's HTTP status (the error raised, as without
    streaming); after it, it is reported in-band."""
    try:
        await unless_disconnected(request, produce)
    except ConnectionError:
        raise ClientGone() from None  # a write found the connection closed
    except ApiError as e:
        if not stream.started:
            raise
        await send(stream, e.body(style))
    except Exception as e:
        log.exception("generation failed mid-stream")
        error = ApiError(500, f"{type(e).__name__}: {e}")
        if not stream.started:
            raise error from e
        await send(stream, error.body(style))
    return await finish(stream)
