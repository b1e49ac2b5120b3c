"""Streaming clients that vanish at random points leave nothing behind: no running or waiting
requests, no used KV blocks, no adapter references, and /metrics agrees (its gauges are
refreshed from the engine at scrape time, not only every STEP_LOG_INTERVAL_S)."""

from __future__ import annotations

import asyncio
import random

import pytest

from api import create_app
from api.app import ENGINE
from metrics import ServingMetrics
from runtime.config import LoraPathSpec, ServerConfig
from runtime.engine import Engine
from tests._fake_engine import build_tiny_adapter
from tests.models import make_model

NUM_CLIENTS = 240
CONCURRENCY = 48
SEED = 1234
TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("disconnects")
    model = make_model(root / "model")
    return model, build_tiny_adapter(model, root / "a1"), build_tiny_adapter(model, root / "a2")


@pytest.fixture
async def client(aiohttp_client, tiny):
    model, a1, a2 = tiny
    config = ServerConfig(
        model_path=str(model), device="cpu", dtype="float32", kv_cache_cpu_bytes=1 << 22,
        max_lora_rank=8, lora_target_modules=("q_proj", "v_proj"), served_model_name="tiny",
        max_loras_per_batch=2,
        lora_paths=(LoraPathSpec("a1", str(a1)), LoraPathSpec("a2", str(a2))),
    )
    metrics = ServingMetrics()
    return await aiohttp_client(create_app(Engine.from_config(config, metrics), config, metrics))


def request_for(rng: random.Random) -> tuple[str, dict]:
    lora = rng.choice([None, "a1", "a2"])
    n = rng.randint(8, 120)
    prompt = [rng.randint(3, 300) for _ in range(rng.randint(2, 40))]
    if rng.random() < 0.5:
        return "/generate", {"input_ids": prompt, "lora_path": lora, "stream": True,
                             "sampling_params": {"max_new_tokens": n, "ignore_eos": True}}
    kind = rng.choice(["/v1/completions", "/v1/chat/completions"])
    model = "tiny" if lora is None else f"tiny:{lora}"
    payload = {"model": model, "max_tokens": n, "stream": True, "ignore_eos": True,
               "n": rng.choice([1, 1, 2])}
    if kind == "/v1/completions":
        payload["prompt"] = prompt
    else:
        payload["messages"] = [{"role": "user", "content": "hello " * rng.randint(1, 10)}]
    return kind, payload


def gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_vanishing_stream_clients_leave_nothing(client) -> None:
    engine = client.app[ENGINE]
    rng = random.Random(SEED)
    plans = [(request_for(rng), rng.choice(["before_headers", "after_headers", "mid_stream",
                                            "mid_stream", "mid_stream"]),
              rng.randint(0, 12), rng.uniform(0.0, 0.05)) for _ in range(NUM_CLIENTS)]
    gate = asyncio.Semaphore(CONCURRENCY)
    outcome = {"cancelled_before_headers": 0, "closed_after_headers": 0, "closed_mid_stream": 0,
               "finished_first": 0}

    async def vanish(plan) -> None:
        (path, payload), when, chunks, delay = plan
        async with gate:
            post = asyncio.ensure_future(client.post(path, json=payload))
            if when == "before_headers":
                await asyncio.sleep(delay)
                if not post.done():
                    post.cancel()
                    await asyncio.gather(post, return_exceptions=True)
                    outcome["cancelled_before_headers"] += 1
                    return
            resp = await post
            assert resp.status == 200, await resp.text()
            if when == "mid_stream":
                for _ in range(chunks):
                    line = await resp.content.readuntil(b"\n\n")
                    if line == b"data: [DONE]\n\n":
                        outcome["finished_first"] += 1
                        break
                else:
                    outcome["closed_mid_stream"] += 1
            else:
                outcome["closed_after_headers"] += 1
            resp.close()  # drop the connection without reading the rest

    await asyncio.wait_for(asyncio.gather(*(vanish(p) for p in plans)), TIMEOUT_S)
    for _ in range(500):  # unread streams are noticed at the next write or disconnect poll
        if not engine.requests and not engine.scheduler.has_work:
            break
        await asyncio.sleep(0.02)
    stats = engine.stats()
    assert not engine.requests
    assert (stats.num_running, stats.num_waiting, stats.kv_blocks_used) == (0, 0, 0)
    assert all(a.refs == 0 for a in engine.list_adapters())
    assert all(s.locks == 0 for s in engine.adapters._slots)
    text = await (await client.get("/metrics")).text()
    assert gauge(text, "loraserve:num_running_reqs") == 0
    assert gauge(text, "loraserve:num_queue_reqs") == 0
    assert gauge(text, "loraserve:kv_cache_usage") == 0
    # the server still serves
    r = await client.post("/generate", json={"text": "x", "sampling_params": {
        "max_new_tokens": 2}})
    assert r.status == 200
    print(f"\ndisconnects: {NUM_CLIENTS} clients vanished {outcome}; left: 0 requests, "
          "0 KV blocks, 0 adapter refs")
