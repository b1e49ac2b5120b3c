"""SIGTERM on a real `python -m runtime` process drains: running streams finish, new requests
are refused (connection refused or 503), and the process exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests._fake_engine import build_tiny_adapter
from tests.models import make_model

REPO = Path(__file__).resolve().parent.parent
NUM_STREAMS = 12
MAX_NEW_TOKENS = 480
START_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path):
    model = make_model(tmp_path / "model")
    adapter = build_tiny_adapter(model, tmp_path / "a1")
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime", "--model-path", str(model), "--device", "cpu",
         "--dtype", "float32", "--port", str(port), "--kv-cache-cpu-bytes", str(1 << 24),
         "--lora-paths", f"a1={adapter}", "--max-lora-rank", "8",
         "--lora-target-modules", "q_proj", "v_proj", "--served-model-name", "tiny"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    yield proc, f"http://127.0.0.1:{port}", tmp_path / "server.log"
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    log.close()


async def wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                async with s.get(url + "/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError("server did not start:\n" + log.read_text())


async def run_stream(session: aiohttp.ClientSession, url: str, i: int,
                     started: asyncio.Event) -> dict:
    payload = {"input_ids": [5 + i, 6, 7], "lora_path": "a1" if i % 2 else None, "stream": True,
               "sampling_params": {"max_new_tokens": MAX_NEW_TOKENS, "ignore_eos": True,
                                   "temperature": 0}}
    async with session.post(url + "/generate", json=payload) as r:
        assert r.status == 200
        last = None
        async for line in r.content:
            if line.startswith(b"data: {"):
                last = json.loads(line.removeprefix(b"data: "))
                started.set()
        return last


async def test_sigterm_drains_and_exits_zero(server) -> None:
    proc, url, log = server
    await wait_ready(proc, url, log)
    started = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        streams = [asyncio.create_task(run_stream(session, url, i, started))
                   for i in range(NUM_STREAMS)]
        await asyncio.wait_for(started.wait(), 30)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        refused = None
        async with aiohttp.ClientSession() as fresh:  # a new connection, not a pooled one
            try:
                async with fresh.post(url + "/generate", json={"text": "x"}) as r:
                    refused = r.status
                    if r.status != 503:
                        refused = f"{r.status}: {await r.text()}"
            except aiohttp.ClientConnectionError:
                refused = "connection refused"
        running_at_refusal = sum(not t.done() for t in streams)
        results = await asyncio.wait_for(asyncio.gather(*streams), EXIT_TIMEOUT_S)
    code = await asyncio.to_thread(proc.wait, EXIT_TIMEOUT_S)
    text = log.read_text()
    assert refused in (503, "connection refused"), refused
    assert running_at_refusal > 0, "the streams finished before SIGTERM took effect"
    for r in results:
        assert r["meta_info"]["finish_reason"] == {"type": "length", "length": MAX_NEW_TOKENS}
        assert len(r["output_ids"]) == MAX_NEW_TOKENS
    assert code == 0, text
    assert "Traceback" not in text, text
    print(f"\nshutdown: {NUM_STREAMS} streams of {MAX_NEW_TOKENS} tokens, "
          f"{running_at_refusal} still running at SIGTERM + 0.3 s, all completed; new request: "
          f"{refused}; exit code {code}")
