"""`python -m runtime --config server.toml [--flag value ...]`: serve over HTTP until SIGTERM."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import sys

import uvloop
from aiohttp import web

from runtime.cli import parse_args
from runtime.config import ConfigError, ServerConfig

log = logging.getLogger("loraserve")

DRAIN_TIMEOUT_S = 30.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(config: ServerConfig) -> None:
    """Anyone who can reach a public port could load adapters from any local path."""
    if not is_loopback(config.host) and config.admin_api_key is None and not config.lora_roots:
        log.warning(
            "listening on %s without admin_api_key or lora_roots: anyone who reaches this "
            "port may be able to load adapters from arbitrary paths", config.host,
        )


async def serve(config: ServerConfig) -> None:
    """Load the model, serve until SIGTERM/SIGINT, then stop accepting, drain and return."""
    from api import create_app
    from metrics import ServingMetrics
    from runtime.engine import Engine

    metrics = ServingMetrics()
    loop = asyncio.get_running_loop()
    # Loading the weights takes a while; keep the loop free (signals) meanwhile.
    engine = await loop.run_in_executor(None, Engine.from_config, config, metrics)
    app = create_app(engine, config, metrics, drain_timeout=DRAIN_TIMEOUT_S)
    # handler_cancellation: a client that disconnects cancels its handler, aborting its request.
    runner = web.AppRunner(app, handler_cancellation=True, handle_signals=False,
                           shutdown_timeout=DRAIN_TIMEOUT_S + 5)
    await runner.setup()  # starts the engine (cleanup_ctx)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, config.host, config.port).start()
        host = f"[{config.host}]" if ":" in config.host else config.host
        log.info("loraserve ready at http://%s:%d", host, config.port)
        await stop.wait()
        log.info("shutting down: no new connections, draining for up to %.0fs", DRAIN_TIMEOUT_S)
    finally:
        await runner.cleanup()  # sites stop, on_shutdown drains the engine, connections close
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    warn_if_exposed(config)
    uvloop.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
