"""The prefix cache (`enable_prefix_caching`): requests whose prompts share full KV blocks with
an earlier request of the same adapter version and cache_salt start their prefill after those
blocks, and produce the tokens and log-probs they produce without the cache."""

from __future__ import annotations

import asyncio

import pytest
import torch

from runtime.config import LoraPathSpec
from runtime.engine import Submission
from runtime.kv_cache import BlockManager, root_digest
from runtime.request import Request, SamplingParams
from tests.engine_utils import collect, greedy, make_engine, run
from tests.models import make_adapter, make_model, read_vocab

PAGE = 16


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("llama"), "llama", layers=3)


@pytest.fixture(scope="module")
def adapters(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(llama, root / name, seed=seed, targets="all-linear")
            for name, seed in (("a", 1), ("b", 2))}


def shared_prompts(vocab: int, n: int, prefix_len: int = 50, seed: int = 0) -> list[list[int]]:
    """`n` prompts of one `prefix_len`-token prefix and a different tail each."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, vocab - 3, (prefix_len,), generator=g).tolist()
    return [prefix + torch.randint(3, vocab - 3, (5 + 6 * i,), generator=g).tolist()
            for i in range(n)]


async def submit_one(engine, item: Submission) -> tuple[list[int], int]:
    """Submit `item` and wait for it: (tokens, cached_tokens)."""
    (req,) = await engine.submit_many([item])
    cached, tokens = 0, []
    async for o in engine.stream(req):
        tokens, cached = o.output_token_ids, o.cached_tokens
    return tokens, cached


def session(engine, body):
    """Run `body(engine)` (a coroutine function) on the started engine."""

    async def go():
        await engine.start()
        try:
            return await body(engine)
        finally:
            await engine.stop()

    return run(go())


def one_by_one(engine, items: list[Submission]) -> list[tuple[list[int], int]]:
    """Each item submitted after the one before it finished: (tokens, cached_tokens)."""

    async def body(e):
        return [await submit_one(e, item) for item in items]

    return session(engine, body)


def test_block_manager_shares_registered_blocks_and_evicts_the_idle_ones():
    bm = BlockManager(num_blocks=6, block_size=4, prefix_cache=True)
    root = root_digest(0, None)
    first = Request(rid="1", prompt_ids=list(range(10)), params=SamplingParams())
    assert bm.lookup(first, root, 9) == []
    bm.take_prefix(first, [])
    bm.allocate(first, 10)  # blocks 0, 1, 2
    first.num_computed_tokens = 10
    bm.register(first)  # the two full blocks
    assert bm.num_cached_blocks == 2 and first.num_registered_blocks == 2

    second = Request(rid="2", prompt_ids=list(range(9)) + [99], params=SamplingParams())
    hit = bm.lookup(second, root, 9)
    assert hit == first.block_ids[:2]
    assert bm.idle_among(hit) == 0  # the first request still holds them
    bm.take_prefix(second, hit)
    assert second.num_computed_tokens == 8 and bm.num_hit_tokens == 8
    bm.allocate(second, 10)
    assert bm.num_used_blocks == 4  # two shared, one each of their own

    other_root = root_digest(7, None)  # another adapter version: nothing shared
    assert bm.lookup(Request(rid="3", prompt_ids=list(range(10)), params=SamplingParams()),
                     other_root, 9) == []
    bm.free(first)
    bm.free(second)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 2  # idle, still registered
    third = Request(rid="4", prompt_ids=list(range(10)), params=SamplingParams())
    assert bm.idle_among(bm.lookup(third, root, 9)) == 2
    # a new request needing every block evicts the idle registered ones, the tail first
    big = Request(rid="5", prompt_ids=[1] * 24, params=SamplingParams())
    bm.allocate(big, 20)
    assert bm.num_evicted_blocks == 1 and bm.num_cached_blocks == 1
    bm.allocate(big, 24)
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 0
    assert bm.lookup(third, root, 9) == []


def test_shared_prefixes_hit_and_keep_the_tokens(llama):
    vocab = read_vocab(llama)
    ps = shared_prompts(vocab, 4)
    # then the same prompt again takes every full block but leaves its last token, and a
    # prompt one token past three blocks, twice: the second prefills that one token alone
    one_past = ps[0][: 3 * PAGE + 1]
    items = [Submission(p, greedy(12)) for p in ps] + [Submission(ps[3], greedy(12))] + [
        Submission(one_past, greedy(12))] * 2
    ref = one_by_one(make_engine(llama), items)
    engine = make_engine(llama, enable_prefix_caching=True)
    got = one_by_one(engine, items)
    assert [t for t, _ in got] == [t for t, _ in ref]
    assert [c for _, c in ref] == [0] * 7
    # the first computes everything; the others take the prefix's three full blocks
    again = (len(ps[3]) - 1) // PAGE * PAGE
    assert again > 3 * PAGE
    assert [c for _, c in got] == [0] + [3 * PAGE] * 3 + [again] + [3 * PAGE] * 2
    assert engine.block_manager.num_hit_tokens == 15 * PAGE + again


def test_batched_requests_and_outputs_of_earlier_turns_are_reused(llama):
    """A second turn's prompt holds the first turn's prompt and answer: the blocks its answer
    filled while decoding are taken too. Requests in one batch share nothing they have not
    computed (each computes the prefix) and answer as without the cache."""
    vocab = read_vocab(llama)
    ps = shared_prompts(vocab, 3, prefix_len=20, seed=3)
    extra = [5, 6, 7]

    async def body(e):
        reqs = await e.submit_many([Submission(p, greedy(40)) for p in ps])
        first = list(await asyncio.gather(*(collect(e, r) for r in reqs)))
        return first, await submit_one(e, Submission(ps[0] + first[0] + extra, greedy(8)))

    want, (want2, _) = session(make_engine(llama), body)
    got, (got2, cached) = session(make_engine(llama, enable_prefix_caching=True), body)
    assert got == want and got2 == want2
    # the prompt's and most of the answer's blocks (the last answer token's K/V was never
    # computed: it was sampled, not fed back)
    assert cached == (len(ps[0]) + len(got[0]) - 1) // PAGE * PAGE


def test_adapters_and_salts_never_share_blocks(llama, adapters):
    vocab = read_vocab(llama)
    (p,) = shared_prompts(vocab, 1, prefix_len=40, seed=5)
    specs = tuple(LoraPathSpec(n, str(path)) for n, path in adapters.items())
    ref = make_engine(llama, lora_paths=specs, max_loras_per_batch=2)
    engine = make_engine(llama, lora_paths=specs, max_loras_per_batch=2,
                         enable_prefix_caching=True)
    items = [Submission(p, greedy(10)), Submission(p, greedy(10), lora_name="a"),
             Submission(p, greedy(10), lora_name="b"),
             Submission(p, greedy(10), lora_name="a", cache_salt="tenant-1"),
             Submission(p, greedy(10), lora_name="a", cache_salt="tenant-2"),
             Submission(p, greedy(10), lora_name="a", cache_salt="tenant-1"),
             Submission(p, greedy(10), lora_name="a")]
    want = one_by_one(ref, items)
    got = one_by_one(engine, items)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert len({tuple(t) for t, _ in want[:3]}) == 3  # the adapters change the answer
    full = (len(p) - 1) // PAGE * PAGE
    # only the second request of the same adapter and salt hits
    assert [c for _, c in got] == [0, 0, 0, 0, 0, full, full]


def test_a_reloaded_adapter_roots_a_new_chain(llama, adapters):
    """Unloading "a" and loading other weights under the name "a" must not serve the old
    weights' cached K/V (the name's key is the same; the version's id is not)."""
    vocab = read_vocab(llama)
    (p,) = shared_prompts(vocab, 1, prefix_len=40, seed=6)
    engine = make_engine(llama, lora_paths=(LoraPathSpec("a", str(adapters["a"])),),
                         enable_prefix_caching=True, max_loras_per_batch=2)
    ref = make_engine(llama, lora_paths=(LoraPathSpec("a", str(adapters["b"])),),
                      max_loras_per_batch=2)
    (want,) = one_by_one(ref, [Submission(p, greedy(10), lora_name="a")])

    async def body(e):
        out = [(await submit_one(e, Submission(p, greedy(10), lora_name="a")))[0]
               for _ in range(2)]
        await e.adapters.unload("a")
        await e.adapters.load("a", str(adapters["b"]))
        out.append(await submit_one(e, Submission(p, greedy(10), lora_name="a")))
        return out

    old1, old2, (new, cached) = session(engine, body)
    assert old1 == old2 != want[0]
    assert (new, cached) == (want[0], 0)


def test_prompt_logprobs_are_computed_not_taken_from_the_cache(llama):
    """A request that scores its prompt takes no cached block holding a position it scores;
    its log-probs and tokens equal those without the cache (from a start past the prefix, it
    takes the blocks before the start)."""
    vocab = read_vocab(llama)
    ps = shared_prompts(vocab, 3, prefix_len=48, seed=7)
    items = [Submission(ps[0], greedy(4)),
             Submission(ps[1], greedy(4), return_logprob=True, top_logprobs_num=2),
             Submission(ps[2], greedy(4), return_logprob=True, logprob_start=40)]

    def run_all(engine):
        async def body(e):
            outs = []
            for item in items:
                (req,) = await e.submit_many([item])
                outs.append([o async for o in e.stream(req)])
            return outs
        return session(engine, body)

    want = run_all(make_engine(llama))
    got = run_all(make_engine(llama, enable_prefix_caching=True))
    assert [o.cached_tokens for o in (got[0][0], got[1][0], got[2][0])] == [0, 0, 32]
    for w, g in zip(want, got):
        assert g[-1].output_token_ids == w[-1].output_token_ids
        if w[0].input_logprobs is not None:
            assert len(g[0].input_logprobs) == len(w[0].input_logprobs)
            for a, b in zip(g[0].input_logprobs, w[0].input_logprobs):
                assert (a is None) == (b is None)
                assert a is None or abs(a - b) < 1e-4
            assert g[0].input_top_logprobs[1:] and [
                [t for t, _ in x] for x in g[0].input_top_logprobs] == [
                [t for t, _ in x] for x in w[0].input_top_logprobs]


def test_preemption_with_the_cache_keeps_outputs(llama):
    vocab = read_vocab(llama)
    ps = shared_prompts(vocab, 8, prefix_len=20, seed=9)
    want = run(_batch(make_engine(llama), ps))
    engine = make_engine(llama, enable_prefix_caching=True, max_total_tokens=14 * PAGE)
    assert run(_batch(engine, ps)) == want
    assert engine.scheduler.counters.num_preemptions > 0, "no preemption happened"
    assert engine.block_manager.num_used_blocks == engine.runner.reserved_blocks


async def _batch(engine, ps):
    await engine.start()
    try:
        reqs = await engine.submit_many([Submission(p, greedy(40)) for p in ps])
        return list(await asyncio.gather(*(collect(engine, r) for r in reqs)))
    finally:
        await engine.stop()


def test_option_is_off_by_default_and_a_config_key(tmp_path):
    from runtime.cli import parse_args

    assert parse_args([]).enable_prefix_caching is False
    assert parse_args(["--enable-prefix-caching"]).enable_prefix_caching is True


async def test_http_reports_cached_tokens_and_honours_cache_salt(make_client):
    """/generate's meta_info.cached_tokens counts the prompt tokens taken from the cache; a
    request with another cache_salt (or extra_key) takes none, on /generate and on the OpenAI
    routes alike."""
    client = await make_client(enable_prefix_caching=True)
    prompt = list(range(3, 3 + 40))
    greedy_body = {"temperature": 0, "max_new_tokens": 4}

    async def cached(extra: dict) -> tuple[int, list[int]]:
        resp = await client.post("/generate", json={
            "input_ids": prompt, "sampling_params": greedy_body, **extra})
        body = await resp.json()
        assert resp.status == 200, body
        return body["meta_info"]["cached_tokens"], body["output_ids"]

    first = await cached({})
    assert first[0] == 0
    assert await cached({}) == (32, first[1])
    assert (await cached({"cache_salt": "t1"}))[0] == 0
    assert (await cached({"cache_salt": "t1"}))[0] == 32
    assert (await cached({"cache_salt": "t1", "extra_key": "k"}))[0] == 0
    resp = await client.post("/v1/completions", json={
        "model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0,
        "cache_salt": "t2"})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert (await cached({"cache_salt": "t2"}))[0] == 32  # the completion's salt, its blocks
    resp = await client.post("/v1/completions", json={
        "model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0})
    assert (await resp.json())["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    text = await (await client.get("/metrics")).text()
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line.startswith("loraserve:prefix_cache_")}
    # eight requests of 40 prompt tokens; four took 32 each
    assert samples['loraserve:prefix_cache_queries_total{adapter="base"}'] == 8 * 40
    assert samples['loraserve:prefix_cache_hits_total{adapter="base"}'] == 4 * 32
    # SGLang's /flush_cache (vLLM's /reset_prefix_cache the same): nothing is taken after it
    resp = await client.post("/flush_cache")
    body = await resp.json()
    assert resp.status == 200 and body["success"] and body["flushed_blocks"] >= 4, body
    assert (await cached({}))[0] == 0
    assert (await cached({}))[0] == 32
    assert (await client.post("/reset_prefix_cache")).status == 200
    assert (await cached({}))[0] == 0


async def test_flush_cache_is_an_admin_route(make_client):
    client = await make_client(enable_prefix_caching=True, api_key="k", admin_api_key="adm")
    for path in ("/flush_cache", "/reset_prefix_cache"):
        resp = await client.post(path, headers={"Authorization": "Bearer k"})
        assert resp.status == 401, path
        resp = await client.post(path, headers={"Authorization": "Bearer adm"})
        assert resp.status == 200, path
