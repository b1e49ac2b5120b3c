"""The aiohttp front end: native (SGLang-shaped), OpenAI-compatible and adapter admin routes."""

from api.app import create_app

__all__ = ["create_app"]
