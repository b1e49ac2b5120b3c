"""Adapter admin under traffic, against the real engine over HTTP (a tiny random Llama on CPU).

An unload stops new requests for its adapter at once and answers once the adapter's requests
have drained; those requests finish with every token asked for, and everyone else keeps being
served. An unload whose client leaves while it drains still ends, so the name can be loaded
again; a load of a name that is being unloaded says so.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from api import create_app
from api.app import ENGINE
from metrics import ServingMetrics
from runtime.config import LoraPathSpec, ServerConfig
from runtime.engine import Engine
from tests.models import make_adapter, make_model

# Tokens of a stream that must outlast everything a test does meanwhile (seconds on CPU); the
# test closes it, or it runs to the context's end.
LONG = 3000
WAIT_S = 10.0


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("admin_traffic")
    model = make_model(root / "model", max_position_embeddings=LONG + 64)
    return model, make_adapter(model, root / "a1", seed=1), make_adapter(model, root / "a2",
                                                                        seed=2)


@pytest.fixture
async def client(aiohttp_client, folders):
    model, a1, a2 = folders
    config = ServerConfig(
        model_path=str(model), device="cpu", dtype="float32", kv_cache_cpu_bytes=1 << 24,
        enable_lora=True, max_lora_rank=8, lora_target_modules=("q_proj", "v_proj"),
        served_model_name="tiny", max_loras_per_batch=2,
        lora_paths=(LoraPathSpec("a1", str(a1)), LoraPathSpec("a2", str(a2))),
    )
    metrics = ServingMetrics()
    return await aiohttp_client(create_app(Engine.from_config(config, metrics), config, metrics))


def greedy(n: int) -> dict[str, object]:
    return {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}


async def first_event(resp) -> dict:
    """Read a stream up to its first `data: {...}` event."""
    while True:
        line = await resp.content.readline()
        assert line, "the stream ended before its first event"
        if line.startswith(b"data: {"):
            return json.loads(line[len(b"data: "):])


async def last_event(resp) -> dict:
    """Read a stream to [DONE]; its last JSON event."""
    last = None
    async for line in resp.content:
        if line.startswith(b"data: {"):
            last = json.loads(line[len(b"data: "):])
    assert last is not None
    return last


async def until(predicate, what: str) -> None:
    for _ in range(int(WAIT_S / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting until {what}")


def is_closing(engine: Engine, name: str) -> bool:
    """Unloading: no longer usable, not yet gone."""
    return name not in engine.adapters and name in engine.loaded_adapters()


async def ids(client, lora: str | None) -> list[int]:
    r = await client.post("/generate", json={"text": "Paris is", "lora_path": lora,
                                             "sampling_params": greedy(8)})
    assert r.status == 200, await r.text()
    return (await r.json())["output_ids"]


async def test_unload_drains_in_flight_streams_while_others_are_served(client, folders) -> None:
    engine = client.app[ENGINE]
    alone = {"a1": await ids(client, "a1"), "a2": await ids(client, "a2")}
    tokens = 200
    native = await client.post("/generate", json={
        "text": "Paris is", "lora_path": "a1", "sampling_params": greedy(tokens),
        "stream": True})
    chat = await client.post("/v1/chat/completions", json={
        "model": "tiny:a1", "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": tokens, "ignore_eos": True, "temperature": 0, "stream": True})
    assert native.status == chat.status == 200
    await first_event(native)
    await first_event(chat)
    unload = asyncio.create_task(client.post("/unload_lora_adapter", json={"lora_name": "a1"}))
    await until(lambda: is_closing(engine, "a1"), "the unload started")

    # while it drains: a1 takes no new request, in either API's error shape ...
    r = await client.post("/generate", json={"text": "x", "lora_path": "a1"})
    assert r.status == 400
    assert "being unloaded" in (await r.json())["error"]["message"]
    r = await client.post("/v1/completions", json={"model": "a1", "prompt": "x"})
    assert r.status == 404
    assert (await r.json())["error"]["code"] == "model_not_found"
    # ... a load of its name says why it is refused ...
    r = await client.post("/load_lora_adapter", json={"lora_name": "a1",
                                                      "lora_path": str(folders[2])})
    body = await r.json()
    assert r.status == 400 and body["success"] is False
    assert "being unloaded" in body["error_message"], body
    # ... /v1/models lists it no more, and the admin listing says it is unloading ...
    models = {m["id"] for m in (await (await client.get("/v1/models")).json())["data"]}
    assert "a1" not in models and "a2" in models
    r = await client.get("/v1/models/a1")
    assert r.status == 404
    listed = {a["name"]: a for a in (await (await client.get("/lora_adapters")).json())["adapters"]}
    assert listed["a1"]["unloading"] is True and listed["a2"]["unloading"] is False
    # ... and the others are served as before
    assert await ids(client, "a2") == alone["a2"]
    await ids(client, None)
    assert not unload.done()

    # the streams finish with every token, then the unload answers
    end = await last_event(native)
    assert end["meta_info"]["finish_reason"]["type"] == "length"
    assert len(end["output_ids"]) == tokens
    await last_event(chat)
    r = await unload
    assert r.status == 200
    assert set((await r.json())["loaded_adapters"]) == {"a2"}

    # the name is free again: a1 now serves a2's weights
    r = await client.post("/load_lora_adapter", json={"lora_name": "a1",
                                                      "lora_path": str(folders[2])})
    assert r.status == 200, await r.text()
    assert await ids(client, "a1") == alone["a2"]


async def test_unload_ends_after_its_client_left(client, folders) -> None:
    """An unload whose client disconnects while the adapter's requests drain still ends. It
    was cancelled with its handler, half-way: the name then refused requests, unloads and
    loads for good ("is being unloaded", "is already loaded")."""
    engine = client.app[ENGINE]
    stream = await client.post("/generate", json={
        "text": "Paris is", "lora_path": "a1", "sampling_params": greedy(LONG),
        "stream": True})
    assert stream.status == 200
    await first_event(stream)
    unload = asyncio.create_task(client.post("/unload_lora_adapter", json={"lora_name": "a1"}))
    await until(lambda: is_closing(engine, "a1"), "the unload started")
    unload.cancel()  # the admin client gives up: its connection closes
    await asyncio.gather(unload, return_exceptions=True)
    await asyncio.sleep(0.3)  # the server cancels the unload's handler
    assert is_closing(engine, "a1")  # a1's stream still runs
    stream.close()  # and now ends: a1's last reference goes

    await until(lambda: "a1" not in engine.loaded_adapters(), "a1 was unloaded")
    r = await client.post("/load_lora_adapter", json={"lora_name": "a1",
                                                      "lora_path": str(folders[1])})
    assert r.status == 200, await r.text()
    r = await client.post("/generate", json={"text": "x", "lora_path": "a1",
                                             "sampling_params": greedy(2)})
    assert r.status == 200


async def test_concurrent_loads_of_one_name(client, folders) -> None:
    engine = client.app[ENGINE]
    body = {"lora_name": "a3", "lora_path": str(folders[2])}
    answers = await asyncio.gather(*(client.post("/load_lora_adapter", json=body)
                                     for _ in range(4)))
    bodies = [await r.json() for r in answers]
    assert sorted(r.status for r in answers) == [200, 400, 400, 400], bodies
    for r, b in zip(answers, bodies, strict=True):
        if r.status == 400:
            assert b["success"] is False and "already loaded" in b["error_message"]
    assert engine.loaded_adapters()["a3"] == str(folders[2])
    assert await ids(client, "a3") == await ids(client, "a2")
