"""Adapter churn under load, and a bounded soak, against the real engine over HTTP.

Every response is checked against the tokens its (adapter, prompt) gives when run alone
beforehand: a response that is cut short or has other tokens counts as lost. Requests for an
adapter that is being unloaded may be refused at admission with a clear 4xx; nothing else may
fail, and nothing may hang (every request runs under asyncio.wait_for).

LORASERVE_SOAK_SECONDS sets the soak's length (default 300; the device can run it longer),
LORASERVE_TEST_DEVICE the engine's device (default cpu; `cuda` on the device machine, where the
engine then runs its Triton kernels, CUDA graphs and copy stream), and
LORASERVE_SOAK_PREFIX_CACHE=1 turns the prefix cache on, with a 40-token prefix every prompt
shares (the expectations are computed with the cache flushed before each).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from api import create_app
from api.app import ENGINE
from metrics import ServingMetrics
from runtime.config import LoraPathSpec, ServerConfig
from runtime.engine import Engine
from tests._fake_engine import build_tiny_adapter
from tests.models import make_model
from tests.test_api import sse_events
from tests.test_overload import rss_mb

SOAK_SECONDS = float(os.environ.get("LORASERVE_SOAK_SECONDS", "300"))
DEVICE = os.environ.get("LORASERVE_TEST_DEVICE", "cpu")
SOAK_MIN_REQUESTS_PER_300S = 2000
RSS_GROWTH_BOUND_MB = 64
REQUEST_TIMEOUT_S = 60.0
MAX_NEW = 8
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [40, 41, 42, 43], [100, 3, 200, 17, 9, 9],
           [250, 251]]
PREFIX_CACHE = os.environ.get("LORASERVE_SOAK_PREFIX_CACHE") == "1"
if PREFIX_CACHE:  # two full blocks of 16 and 8 tokens before each prompt's own
    PROMPTS = [[20 + (7 * i) % 200 for i in range(40)] + p for p in PROMPTS]
STABLE = ("a1", "a2")
CHURNED = ("c1", "c2")
ADAPTERS = (None, *STABLE, *CHURNED)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("soak")
    model = make_model(root / "model")
    out = {"model": model}
    for i, name in enumerate(STABLE + CHURNED):
        import torch
        torch.manual_seed(100 + i)  # each adapter its own weights, so outputs differ
        out[name] = build_tiny_adapter(model, root / name)
    return out


class PlainClient:
    """Posts through a plain session: the test client keeps every response until teardown,
    which over tens of thousands of requests looks like a server leak in RSS."""

    def __init__(self, client) -> None:
        self.app = client.app
        self._client = client
        self._session = aiohttp.ClientSession()

    def post(self, path: str, **kw):
        return self._session.post(self._client.make_url(path), **kw)

    async def close(self) -> None:
        await self._session.close()


@pytest.fixture
async def make_client(aiohttp_client, folders):
    sessions: list[PlainClient] = []

    async def make(**overrides):
        cfg = {"model_path": str(folders["model"]), "device": DEVICE, "dtype": "float32",
               "kv_cache_cpu_bytes": 1 << 23, "mem_fraction_static": 0.2, "max_lora_rank": 8,
               "served_model_name": "tiny", "enable_prefix_caching": PREFIX_CACHE,
               "lora_target_modules": ("q_proj", "v_proj"), "max_loras_per_batch": 3,
               "lora_paths": tuple(LoraPathSpec(n, str(folders[n])) for n in STABLE + CHURNED)}
        cfg.update(overrides)
        config = ServerConfig(**cfg)
        metrics = ServingMetrics()
        client = await aiohttp_client(create_app(Engine.from_config(config, metrics), config,
                                                 metrics))
        sessions.append(PlainClient(client))
        return sessions[-1]
    yield make
    for s in sessions:
        await s.close()


def payload(path: str, lora: str | None, prompt: list[int], stream: bool) -> dict:
    if path == "/generate":
        return {"input_ids": prompt, "lora_path": lora, "stream": stream,
                "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0,
                                    "ignore_eos": True}}
    return {"model": "tiny" if lora is None else f"tiny:{lora}", "prompt": prompt,
            "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True, "stream": stream}


def answer(path: str, stream: bool, text: str) -> object:
    """What must match the request run alone: output ids (native) or text (OpenAI)."""
    if not stream:
        body = json.loads(text)
        if path == "/generate":
            assert body["meta_info"]["finish_reason"]["type"] == "length"
            return body["output_ids"]
        assert body["choices"][0]["finish_reason"] == "length"
        return body["choices"][0]["text"]
    chunks = sse_events(text)
    if path == "/generate":
        assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
        return chunks[-1]["output_ids"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    return "".join(c["choices"][0]["text"] for c in chunks)


async def expectations(client) -> dict[tuple[str, str | None, int], object]:
    """Each (path, adapter, prompt) run alone, one at a time."""
    out = {}
    for path in ("/generate", "/v1/completions"):
        for lora in ADAPTERS:
            for i, prompt in enumerate(PROMPTS):
                if PREFIX_CACHE:  # each computed whole, not from another's cached blocks
                    assert (await client.post("/flush_cache")).status == 200
                r = await client.post(path, json=payload(path, lora, prompt, False))
                assert r.status == 200, await r.text()
                out[(path, lora, i)] = answer(path, False, await r.text())
    # every adapter answers some prompt differently, so a mix-up would show
    by_adapter = {json.dumps([out[("/generate", a, i)] for i in range(len(PROMPTS))])
                  for a in ADAPTERS}
    assert len(by_adapter) == len(ADAPTERS)
    return out


@dataclass
class Tally:
    """What happened to every request the load generator sent."""

    counts: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


async def one_request(client, expected, rng: random.Random, tally: Tally,
                      cancel_rate: float) -> None:
    path = rng.choice(["/generate", "/v1/completions"])
    lora = rng.choice(ADAPTERS)
    i = rng.randrange(len(PROMPTS))
    stream = rng.random() < 0.5
    body = payload(path, lora, PROMPTS[i], stream)
    if rng.random() < cancel_rate:  # the client walks away at a random point
        task = asyncio.ensure_future(client.post(path, json=body))
        await asyncio.sleep(rng.uniform(0, 0.02))
        if not task.done():
            task.cancel()
        else:
            (await task).close()
        await asyncio.gather(task, return_exceptions=True)
        tally.counts["cancelled"] += 1
        return
    try:
        r = await asyncio.wait_for(client.post(path, json=body), REQUEST_TIMEOUT_S)
        text = await asyncio.wait_for(r.text(), REQUEST_TIMEOUT_S)
    except TimeoutError:
        tally.counts["hung"] += 1
        tally.problems.append(f"hung: {path} {lora} {i} stream={stream}")
        return
    if r.status >= 500:
        tally.counts["5xx"] += 1
        tally.problems.append(f"{r.status}: {path} {lora} {text[:300]}")
    elif r.status != 200:
        # only a churned adapter may be refused, at admission, with a clear message
        message = json.loads(text)["error"]["message"]
        if lora in CHURNED and r.status in (400, 404) and lora in message:
            tally.counts["refused_while_unloaded"] += 1
        else:
            tally.counts["wrongly_refused"] += 1
            tally.problems.append(f"{r.status}: {path} {lora} {text[:300]}")
    else:
        try:
            got = answer(path, stream, text)
        except (AssertionError, KeyError, json.JSONDecodeError) as e:
            got = f"unreadable: {e!r} {text[-300:]}"
        if got == expected[(path, lora, i)]:
            tally.counts["completed_correct"] += 1
        else:
            tally.counts["lost_or_wrong"] += 1
            tally.problems.append(f"wrong: {path} {lora} {i} stream={stream}: {got}")


async def churn(client, folders, stop: asyncio.Event, rng: random.Random, pause: float,
                tally: Tally) -> None:
    """Unload and reload the churned adapters (sometimes pinned), and load a stable one again
    in place from its own folder (its answers keep their tokens while its requests drain on
    the old version), until told to stop."""
    while not stop.is_set():
        stable = rng.choice(STABLE)
        r = await asyncio.wait_for(client.post("/load_lora_adapter", json={
            "lora_name": stable, "lora_path": str(folders[stable]), "load_inplace": True}),
            REQUEST_TIMEOUT_S)
        assert r.status == 200, await r.text()
        tally.counts["loads_in_place"] += 1
        name = rng.choice(CHURNED)
        r = await asyncio.wait_for(client.post("/unload_lora_adapter", json={"lora_name": name}),
                                   REQUEST_TIMEOUT_S)
        assert r.status == 200, await r.text()
        await asyncio.sleep(rng.uniform(0, pause))
        r = await asyncio.wait_for(client.post("/load_lora_adapter", json={
            "lora_name": name, "lora_path": str(folders[name]), "pinned": rng.random() < 0.2}),
            REQUEST_TIMEOUT_S)
        assert r.status == 200, await r.text()
        tally.counts["churn_cycles"] += 1
        await asyncio.sleep(rng.uniform(0, pause))


async def workers(client, expected, seconds: float, num_workers: int, tally: Tally,
                  cancel_rate: float, on_tick=None) -> None:
    deadline = time.monotonic() + seconds

    async def worker(k: int) -> None:
        rng = random.Random(1000 + k)
        while time.monotonic() < deadline:
            await one_request(client, expected, rng, tally, cancel_rate)
            if on_tick is not None:
                on_tick()
    await asyncio.gather(*(worker(k) for k in range(num_workers)))


async def settle(engine) -> None:
    for _ in range(500):
        if not engine.requests and not engine.scheduler.has_work and not any(
                a.replaced for a in engine.list_adapters()):  # versions replaced drained
            return
        await asyncio.sleep(0.02)


def check_clean(engine) -> None:
    """Nothing leaked: no requests, no KV blocks, no references, slots consistent."""
    stats = engine.stats()
    assert not engine.requests
    assert (stats.num_running, stats.num_waiting, stats.kv_blocks_used) == (0, 0, 0)
    manager = engine.adapters
    owners = [s.owner for s in manager._slots]
    for i, owner in enumerate(owners):
        if owner is not None:
            assert owner.slot == i and manager._adapters.get(owner.key) is owner
    resident, free = sum(o is not None for o in owners), sum(o is None for o in owners)
    assert resident + free == len(manager._slots)
    assert all(s.locks == 0 for s in manager._slots)
    assert all(a.refs == 0 for a in manager.list())
    assert sorted(a.name for a in manager.list()) == sorted(STABLE + CHURNED)


async def test_churn_under_load(make_client, folders) -> None:
    client = await make_client()
    engine = client.app[ENGINE]
    expected = await expectations(client)
    tally = Tally()
    stop = asyncio.Event()
    churner = asyncio.create_task(churn(client, folders, stop, random.Random(7), 0.05, tally))
    await workers(client, expected, 20.0, 8, tally, cancel_rate=0.1)
    stop.set()
    await asyncio.wait_for(churner, REQUEST_TIMEOUT_S)
    await settle(engine)
    print(f"\nchurn: {tally.total} events {dict(tally.counts)}")
    assert not tally.problems, tally.problems[:10]
    assert tally.counts["churn_cycles"] >= 20 and tally.counts["completed_correct"] > 200
    check_clean(engine)


async def test_soak(make_client, folders) -> None:
    client = await make_client()
    engine = client.app[ENGINE]
    expected = await expectations(client)
    tally = Tally()
    stop = asyncio.Event()
    churner = asyncio.create_task(churn(client, folders, stop, random.Random(11), 1.0, tally))
    rss: dict[str, float] = {}
    warm_at = time.monotonic() + min(30.0, SOAK_SECONDS / 10)
    samples: list[tuple[int, float]] = []

    def on_tick() -> None:
        now = time.monotonic()
        if "warm" not in rss and now > warm_at:
            gc.collect()
            rss["warm"] = rss_mb()
        if not samples or now - t0 - samples[-1][0] >= SOAK_SECONDS / 10:
            samples.append((int(now - t0), rss_mb()))
    t0 = time.monotonic()
    await workers(client, expected, SOAK_SECONDS, 6, tally, cancel_rate=0.1, on_tick=on_tick)
    stop.set()
    await asyncio.wait_for(churner, REQUEST_TIMEOUT_S)
    await settle(engine)
    gc.collect()
    rss["end"] = rss_mb()
    elapsed = time.monotonic() - t0
    requests = tally.total - tally.counts["churn_cycles"] - tally.counts["loads_in_place"]
    print(f"\nsoak: {elapsed:.0f}s, {requests} requests {dict(tally.counts)}, "
          f"RSS {rss.get('warm', 0):.1f} -> {rss['end']:.1f} MiB; samples (s, MiB) {samples}")
    assert not tally.problems, tally.problems[:10]
    assert tally.counts["5xx"] == tally.counts["lost_or_wrong"] == tally.counts["hung"] == 0
    assert requests >= SOAK_MIN_REQUESTS_PER_300S * SOAK_SECONDS / 300
    assert rss["end"] - rss["warm"] < RSS_GROWTH_BOUND_MB
    if PREFIX_CACHE:
        bm = engine.block_manager
        print(f"prefix cache: {bm.num_hit_tokens} of {bm.num_looked_up_tokens} prompt tokens "
              f"taken from it, {bm.num_evicted_blocks} blocks evicted")
        assert bm.num_hit_tokens > 0
    check_clean(engine)
