"""Overload, against the real engine over HTTP: a full queue answers 503 + Retry-After at once
while admitted requests finish; KV exhaustion preempts and recovers (every request finishes with
its correct tokens); memory stays bounded across a burst."""

from __future__ import annotations

import asyncio
import gc
import time

from api.app import ENGINE

TIMEOUT_S = 120.0
RSS_GROWTH_BOUND_MB = 64  # after a warm-up burst; a leak of 1 KiB per request would show


def rss_mb() -> float:
    """Resident set size of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def body(i: int, n: int) -> dict:
    return {"input_ids": [5 + i % 40, 6, 7 + i % 13, 8], "lora_path": "a1" if i % 2 else None,
            "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}}


async def timed_post(client, payload: dict) -> tuple[int, dict, dict, float]:
    t0 = time.monotonic()
    r = await client.post("/generate", json=payload)
    out = await r.json()
    return r.status, out, dict(r.headers), time.monotonic() - t0


async def test_queue_full_503_at_once(make_client) -> None:
    client = await make_client(max_running_requests=2, max_queued_requests=4)
    n_req, n_tok = 40, 24
    expected = {}
    for i in range(n_req):  # each alone first
        status, out, _, _ = await timed_post(client, body(i, n_tok))
        assert status == 200, out
        expected[i] = out["output_ids"]
    results = await asyncio.wait_for(asyncio.gather(
        *(timed_post(client, body(i, n_tok)) for i in range(n_req))), TIMEOUT_S)
    ok = [i for i, r in enumerate(results) if r[0] == 200]
    full = [r for r in results if r[0] == 503]
    assert len(ok) + len(full) == n_req, [r[0] for r in results]
    assert full, "nothing was refused: the queue never filled"
    slowest_ok = max(results[i][3] for i in ok)
    for _, out, headers, seconds in full:
        assert headers["Retry-After"].isdigit() and out["error"]["message"]
        assert seconds < slowest_ok  # refused at once, not after waiting
    for i in ok:
        assert results[i][1]["output_ids"] == expected[i]
    print(f"\noverload: {n_req} concurrent, {len(ok)} admitted and correct, {len(full)} got 503 "
          f"(slowest 503 {max(r[3] for r in full):.3f}s, slowest 200 {slowest_ok:.3f}s)")


async def test_kv_exhaustion_preempts_and_recovers(make_client) -> None:
    # 16 tokens per block; 2 layers x 2 KV heads x 16 dims x fp32 x (K, V) = 8 KiB per block
    client = await make_client(kv_cache_cpu_bytes=12 * 8192, max_queued_requests=64)
    engine = client.app[ENGINE]
    assert engine.block_manager.num_blocks == 12
    n_req, n_tok = 12, 56  # 4 blocks each: 48 blocks wanted at once, 12 exist
    expected = []
    for i in range(n_req):
        expected.append((await timed_post(client, body(i, n_tok)))[1]["output_ids"])
    before = engine.stats().num_preemptions
    results = await asyncio.wait_for(asyncio.gather(
        *(timed_post(client, body(i, n_tok)) for i in range(n_req))), TIMEOUT_S)
    assert [r[0] for r in results] == [200] * n_req
    assert [r[1]["output_ids"] for r in results] == expected
    preempted = engine.stats().num_preemptions - before
    assert preempted > 0, "the KV cache never ran out"
    assert engine.block_manager.num_used_blocks == 0
    print(f"\nkv: {n_req} requests on 12 blocks, {preempted} preemptions, all correct")


async def test_memory_bounded_across_burst(make_client) -> None:
    client = await make_client(max_queued_requests=4096)
    engine = client.app[ENGINE]

    async def burst(n: int) -> list[int]:
        res = await asyncio.wait_for(asyncio.gather(*(client.post("/generate", json={
            **body(i, 4), "stream": bool(i % 3 == 0)}) for i in range(n))), TIMEOUT_S)
        for r in res:
            await r.read()
        return [r.status for r in res]

    await burst(300)  # warm-up: allocator pools, caches, lazily built objects
    gc.collect()
    before = rss_mb()
    statuses = []
    for _ in range(4):
        statuses += await burst(500)
    gc.collect()
    after = rss_mb()
    assert statuses == [200] * len(statuses)
    assert not engine.requests and engine.block_manager.num_used_blocks == 0
    print(f"\nmemory: {len(statuses)} requests, RSS {before:.1f} -> {after:.1f} MiB "
          f"(bound +{RSS_GROWTH_BOUND_MB} MiB)")
    assert after - before < RSS_GROWTH_BOUND_MB
