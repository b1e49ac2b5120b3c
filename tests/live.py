"""A real `python -m runtime` process on loopback, for tests that talk to it as clients do.

`start_server` writes a TOML config, starts the server on a free port and waits for /health;
`stop_server` sends SIGTERM and kills it if it lingers. `scrape` reads /metrics into a dict.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.serve_bench import stop_process

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
SERVED_NAME = "tiny-llama"

Sample = tuple[str, frozenset[tuple[str, str]]]


@dataclass
class LiveServer:
    """A running server: its base URL, process, log file and adapter folder (`lora_roots`)."""

    url: str
    port: int
    proc: subprocess.Popen
    log: Path
    lora_root: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")


def write_config(path: Path, **values: object) -> Path:
    """A server TOML file with `values` as its keys."""
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()))
    return path


def start_server(folder: Path, model: Path, lora_root: Path, **options: object) -> LiveServer:
    """Serve `model` on CPU in float32 with LoRA on, adapters under `lora_root`; wait for /health.

    `options` are more TOML keys, or replace the defaults (lora_paths, log_level, ...)."""
    port = free_port()
    values: dict[str, object] = {
        "model_path": str(model), "served_model_name": SERVED_NAME, "device": "cpu",
        "dtype": "float32", "host": "127.0.0.1", "port": port, "log_level": "warning",
        "kv_cache_cpu_bytes": "16MiB", "enable_lora": True, "max_lora_rank": 8,
        "lora_target_modules": ["q_proj", "v_proj"], "lora_roots": [str(lora_root)],
    }
    config = write_config(folder / "server.toml", **{**values, **options})
    log = folder / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime", "--config", str(config)], cwd=REPO, stdout=out,
            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = LiveServer(f"http://127.0.0.1:{port}", port, proc, log, lora_root)
    try:
        _wait_healthy(server)
    except BaseException:
        stop_server(server)
        raise
    return server


def _wait_healthy(server: LiveServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n"
                               + server.log_text())
        try:
            if requests.get(server.url + "/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become healthy:\n" + server.log_text())


def stop_server(server: LiveServer) -> None:
    """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT_S."""
    stop_process(server.proc, STOP_TIMEOUT_S)


@contextmanager
def running_server(folder: Path, model: Path, lora_root: Path,
                   **options: object) -> Iterator[LiveServer]:
    server = start_server(folder, model, lora_root, **options)
    try:
        yield server
    finally:
        stop_server(server)


def scrape(url: str) -> dict[Sample, float]:
    """Every sample of GET /metrics as {(name, labels): value}."""
    r = requests.get(url + "/metrics", timeout=10)
    r.raise_for_status()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def metric(samples: dict[Sample, float], name: str, **labels: str) -> float:
    """One sample's value (labels must match exactly); KeyError if absent."""
    return samples[(name, frozenset(labels.items()))]


def count(samples: dict[Sample, float], name: str, **labels: str) -> float:
    """A labelled counter's value: 0 while its label set has not been seen yet."""
    return samples.get((name, frozenset(labels.items())), 0.0)
