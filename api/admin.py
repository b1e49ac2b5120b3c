"""Adapter admin routes: /load_lora_adapter, /unload_lora_adapter (also under /v1/) and
/lora_adapters. Answers carry {"success", "error_message", "loaded_adapters"}."""

from __future__ import annotations

from aiohttp import web

from api.app import ENGINE, json_response
from api.errors import ApiError
from api.openai import base_names
from api.protocol import LoadAdapterRequest, UnloadAdapterRequest, decode_body

routes = web.RouteTableDef()


def _ok(request: web.Request) -> web.Response:
    return json_response({"success": True, "error_message": "",
                          "loaded_adapters": request.app[ENGINE].loaded_adapters()})


def _check_name(name: str) -> None:
    if not name or ":" in name:
        raise ApiError(400, f"lora_name: {name!r} must be non-empty without ':'",
                       param="lora_name")


@routes.post("/load_lora_adapter")
@routes.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: web.Request) -> web.Response:
    body = await decode_body(request, LoadAdapterRequest)
    _check_name(body.lora_name)
    if body.lora_name in base_names(request):  # `model` names the base model by it
        raise ApiError(400, f"lora_name: {body.lora_name!r} is the base model's name",
                       param="lora_name")
    if not body.lora_path:
        raise ApiError(400, "lora_path: must not be empty", param="lora_path")
    await request.app[ENGINE].load_adapter(body.lora_name, body.lora_path, pinned=body.pinned)
    return _ok(request)


@routes.post("/unload_lora_adapter")
@routes.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: web.Request) -> web.Response:
    body = await decode_body(request, UnloadAdapterRequest)
    _check_name(body.lora_name)
    await request.app[ENGINE].unload_adapter(body.lora_name)  # returns once drained
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
    } for a in request.app[ENGINE].list_adapters()]
    return json_response({"adapters": adapters})
