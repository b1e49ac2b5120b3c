"""HTTP errors and their JSON shapes.

Three shapes, chosen by route:
- OpenAI routes (/v1/...): {"error": {"message", "type", "param", "code"}}
- native routes: {"error": {"message", "code": <status>}}
- adapter admin routes (load/unload): {"success": false, "error_message", "loaded_adapters"}
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Any

import msgspec

from runtime.errors import (
    AdapterError,
    AdapterReadError,
    EngineStoppedError,
    QueueFullError,
    UnknownAdapterError,
    ValidationError,
)
from runtime.request import SamplingParams

RETRY_AFTER_QUEUE_FULL_S = 1
RETRY_AFTER_STOPPED_S = 5


class Style(enum.Enum):
    NATIVE = "native"
    OPENAI = "openai"
    ADMIN = "admin"


_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """A response other than 2xx, rendered in the route's error shape by the middleware."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self, style: Style, loaded_adapters: dict[str, str] | None = None) -> dict[str, Any]:
        if style is Style.OPENAI:
            kind = _OPENAI_TYPES.get(self.status, "server_error" if self.status >= 500
                                     else "invalid_request_error")
            return {"error": {"message": self.message, "type": kind, "param": self.param,
                              "code": self.code}}
        if style is Style.ADMIN:
            return {"success": False, "error_message": self.message,
                    "loaded_adapters": loaded_adapters or {}}
        return {"error": {"message": self.message, "code": self.status}}


# SamplingParams' names of fields the OpenAI routes take under OpenAI's names (a chat request
# may name its limit max_completion_tokens instead: OpenAISampling.field_names)
OPENAI_FIELDS = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
_SAMPLING_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def renamed(exc: ValidationError, names: dict[str, str]) -> ApiError:
    """A 400 for `exc` that names fields as the request spelled them: `names` maps the
    engine's names to the request's, in `param`, in the message's leading field name, and, for
    SamplingParams' names, wherever the message says them ("min_new_tokens: must not exceed
    max_new_tokens"). The prompt's name stays a plain word inside the message ("600 prompt
    tokens leave no room"), however the request called its prompt."""
    field = exc.field_name
    name = names.get(field, field)
    message = str(exc)
    if field in names:  # others' messages may quote the request's own text
        for engine_name, request_name in names.items():
            if engine_name in _SAMPLING_FIELD_NAMES:
                message = re.sub(rf"\b{engine_name}\b", request_name, message)
        if message.startswith(f"{field}: "):
            message = f"{name}: {message[len(field) + 2:]}"
    return ApiError(400, message, param=name)


def from_exception(exc: BaseException, style: Style) -> ApiError | None:
    """The HTTP error for an engine or decoding exception; None for anything else (a bug)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, msgspec.ValidationError):
        return ApiError(400, f"invalid request: {exc}", param=_msgspec_path(str(exc)))
    if isinstance(exc, msgspec.DecodeError):
        return ApiError(400, f"invalid JSON: {exc}")
    if isinstance(exc, ValidationError):
        return renamed(exc, OPENAI_FIELDS if style is Style.OPENAI else {})
    if isinstance(exc, UnknownAdapterError):
        if style is Style.OPENAI:
            message = str(exc) if exc.name is None else (
                f"The model `{exc.name}` does not exist ({exc})")
            return ApiError(404, message, code="model_not_found", param="model")
        field = "lora_name" if style is Style.ADMIN else "lora_path"
        return ApiError(400, f"{field}: {exc}", param=field)
    if isinstance(exc, AdapterReadError):  # the machine's I/O, not the request: retry
        return ApiError(503, str(exc), code="adapter_read_failed",
                        headers={"Retry-After": str(RETRY_AFTER_QUEUE_FULL_S)})
    if isinstance(exc, AdapterError):
        return ApiError(400, str(exc))
    if isinstance(exc, QueueFullError):
        return ApiError(503, str(exc) or "queue full", code="queue_full",
                        headers={"Retry-After": str(RETRY_AFTER_QUEUE_FULL_S)})
    if isinstance(exc, EngineStoppedError):
        return ApiError(503, str(exc) or "server is shutting down", code="shutting_down",
                        headers={"Retry-After": str(RETRY_AFTER_STOPPED_S)})
    return None


def _msgspec_path(message: str) -> str | None:
    """'Expected `int`, got `str` - at `$.sampling_params.top_k`' -> 'sampling_params.top_k'."""
    marker = "- at `$"
    i = message.rfind(marker)
    if i < 0:
        return None
    return message[i + len(marker):].rstrip("`").lstrip(".") or None
