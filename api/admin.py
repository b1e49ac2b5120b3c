"""Adapter admin routes: /load_lora_adapter, /unload_lora_adapter (also under /v1/) and
/lora_adapters. Answers carry {"success", "error_message", "loaded_adapters"}. And the prefix
cache's: SGLang's /flush_cache and vLLM's /reset_prefix_cache."""

from __future__ import annotations

import asyncio

from aiohttp import web

from api.app import ENGINE, LIFECYCLE, json_response
from api.errors import ApiError
from api.openai import base_names
from api.protocol import LoadAdapterRequest, UnloadAdapterRequest, decode_body
from runtime.errors import EngineStoppedError

routes = web.RouteTableDef()


def _ok(request: web.Request) -> web.Response:
    return json_response({"success": True, "error_message": "",
                          "loaded_adapters": request.app[ENGINE].loaded_adapters()})


def _check_running(request: web.Request) -> None:
    """Adapters are neither loaded nor unloaded once shutdown has begun (a 503)."""
    if request.app[LIFECYCLE].is_stopping:
        raise EngineStoppedError("the server is shutting down")


def _check_name(name: str) -> None:
    if not name or ":" in name:
        raise ApiError(400, f"lora_name: {name!r} must be non-empty without ':'",
                       param="lora_name")


@routes.post("/load_lora_adapter")
@routes.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: web.Request) -> web.Response:
    body = await decode_body(request, LoadAdapterRequest)
    _check_running(request)
    _check_name(body.lora_name)
    if body.lora_name in base_names(request):  # `model` names the base model by it
        raise ApiError(400, f"lora_name: {body.lora_name!r} is the base model's name",
                       param="lora_name")
    if not body.lora_path:
        raise ApiError(400, "lora_path: must not be empty", param="lora_path")
    await request.app[ENGINE].load_adapter(body.lora_name, body.lora_path, pinned=body.pinned,
                                           inplace=body.load_inplace)
    return _ok(request)


@routes.post("/unload_lora_adapter")
@routes.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: web.Request) -> web.Response:
    body = await decode_body(request, UnloadAdapterRequest)
    _check_running(request)
    _check_name(body.lora_name)
    try:
        await request.app[ENGINE].unload_adapter(body.lora_name)  # returns once drained
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the client left
        # the engine's shutdown stopped the drain: answer, not a dropped connection
        raise EngineStoppedError("the server shut down before the unload finished") from None
    return _ok(request)


@routes.get("/lora_adapters")
@routes.get("/v1/lora_adapters")
async def lora_adapters(request: web.Request) -> web.Response:
    adapters = [{
        "name": a.name,
        "path": a.path,
        "tier": a.tier,
        "pinned": a.pinned,
        "rank": a.rank,
        "target_modules": list(a.target_modules),
        "in_flight_requests": a.refs,
        "unloading": a.unloading,
        "replaced": a.replaced,
    } for a in request.app[ENGINE].list_adapters()]
    return json_response({"adapters": adapters})


@routes.post("/flush_cache")
@routes.get("/flush_cache")
@routes.post("/reset_prefix_cache")
async def flush_cache(request: web.Request) -> web.Response:
    """Empty the prefix cache (requests running keep the blocks they hold)."""
    n = request.app[ENGINE].flush_cache()
    return json_response({"success": True, "message": "Cache flushed.", "flushed_blocks": n})
