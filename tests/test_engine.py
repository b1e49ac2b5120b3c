"""Engine core against HF transformers, and the executor's batching claims checked from its own
counters. CPU, float32: greedy tokens must be identical, logits within LOGIT_ATOL."""

from __future__ import annotations

import asyncio
import random
from collections import deque

import pytest
import torch

from runtime.request import FinishReason, RequestOutput, SamplingParams
from runtime.sampler import SamplerOutput
from tests.engine_utils import (
    collect,
    engine_logits,
    greedy,
    hf_greedy,
    hf_logits,
    hf_model,
    make_engine,
    run,
    run_batch,
)
from tests.models import ARCHS, make_model, prompts, read_vocab

LOGIT_ATOL = 2e-4  # fp32 on CPU: only summation order differs from HF
NEW_TOKENS = 64


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request, tmp_path_factory):
    extra = {"tie": True} if request.param == "qwen2" else {}
    if request.param == "llama":
        extra["rope_scaling"] = {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        }
    folder = make_model(tmp_path_factory.mktemp(request.param), request.param, **extra)
    return request.param, folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("llama"), "llama", layers=3)


def shuffle_blocks(engine, seed: int = 0) -> None:
    """Hand out KV blocks in a random order so every table is scattered."""
    free = list(engine.block_manager._free)
    random.Random(seed).shuffle(free)
    engine.block_manager._free = deque(free)


def test_greedy_tokens_match_hf(arch_model):
    arch, folder = arch_model
    vocab = read_vocab(folder)
    ps = prompts(3, vocab, seed=1)
    engine = make_engine(folder, page_size=4)
    shuffle_blocks(engine)
    ours = run(run_batch(engine, ps, greedy(NEW_TOKENS)))
    for p, out in zip(ps, ours):
        ref = hf_greedy(folder, p, NEW_TOKENS)
        assert out == ref, f"{arch}: tokens differ from HF"
        assert len(set(out)) >= 8, f"{arch}: degenerate output {out[:16]}"


def test_logits_match_hf(arch_model):
    arch, folder = arch_model
    vocab = read_vocab(folder)
    engine = make_engine(folder, page_size=4)
    shuffle_blocks(engine, seed=3)
    model = hf_model(folder)
    for p in prompts(2, vocab, seed=2, lo=20, hi=90):
        ours, ref = engine_logits(engine, p), hf_logits(model, p)
        assert ours.shape == ref.shape
        err = (ours - ref).abs().max().item()
        assert err < LOGIT_ATOL, f"{arch}: max logit error {err}"


def test_batch_invariance(llama):
    vocab = read_vocab(llama)
    ps = prompts(16, vocab, seed=5, lo=2, hi=60)
    alone = [run(run_batch(make_engine(llama), [p], greedy(24)))[0] for p in ps[:4]]
    engine = make_engine(llama, page_size=8)
    shuffle_blocks(engine)
    together = run(run_batch(engine, ps, greedy(24)))
    assert together[:4] == alone
    assert engine.scheduler.counters.max_batch_size >= 8, "steps never held several requests"


def test_chunked_prefill_matches_unchunked(llama):
    vocab = read_vocab(llama)
    ps = prompts(4, vocab, seed=7, lo=60, hi=120)
    whole = run(run_batch(make_engine(llama, chunked_prefill_size=512), ps, greedy(16)))
    engine = make_engine(llama, chunked_prefill_size=24)
    chunked = run(run_batch(engine, ps, greedy(16)))
    assert chunked == whole
    c = engine.scheduler.counters
    assert c.num_prefill_chunks > len(ps) * 2, "prompts were not prefilled in several chunks"


def test_preemption_keeps_outputs(llama):
    vocab = read_vocab(llama)
    ps = prompts(8, vocab, seed=9, lo=20, hi=40)
    ref = run(run_batch(make_engine(llama), ps, greedy(40)))
    # 8 requests of up to 80 tokens need ~40 blocks of 16; give 14 so they must preempt.
    engine = make_engine(llama, max_total_tokens=14 * 16 + 15)
    assert engine.block_manager.num_blocks == 14
    out = run(run_batch(engine, ps, greedy(40)))
    assert out == ref
    assert engine.scheduler.counters.num_preemptions > 0, "no preemption happened"
    assert engine.block_manager.num_free_blocks == 14 - engine.runner.reserved_blocks


def outputs_of(engine, items) -> list[list[RequestOutput]]:
    """Every output of each Submission in `items`, submitted together (so steps batch them)
    on `engine`, started and stopped around them."""

    async def go():
        await engine.start()
        try:
            reqs = await engine.submit_many(items)
            return [[o async for o in engine.stream(r)] for r in reqs]
        finally:
            await engine.stop()

    return run(go())


def test_preemption_keeps_prompt_ranks_and_ids_logprobs(llama):
    """Requests preempted (and recomputed) under chunked prefill keep one prompt rank and one
    token_ids_logprob row a position and one a token: the same as with room for everyone."""
    from runtime.engine import Submission

    vocab = read_vocab(llama)
    ps = prompts(8, vocab, seed=19, lo=20, hi=40)

    items = [Submission(p, greedy(40), return_logprob=True, prompt_logprob_ranks=i % 2 == 0,
                        prompt_top_logprobs_num=2, token_ids_logprob=[i, 3, i])
             for i, p in enumerate(ps)]

    def summary(outs):
        rows = []
        for i, seq in enumerate(outs):
            first = seq[0]
            rows.append((first.input_ranks, [o.new_token_ids for o in seq],
                         first.input_ids_logprobs, [o.new_ids_logprobs for o in seq]))
            assert (first.input_ranks is not None) == (i % 2 == 0)
            assert len(first.input_ids_logprobs) == len(ps[i])
            assert sum(len(o.new_ids_logprobs or ()) for o in seq) == 40
        return rows

    ref = summary(outputs_of(make_engine(llama, chunked_prefill_size=16), items))
    engine = make_engine(llama, chunked_prefill_size=16, max_total_tokens=14 * 16)
    got = summary(outputs_of(engine, items))
    assert engine.scheduler.counters.num_preemptions > 0, "no preemption happened"
    for (r_ranks, r_toks, r_in, r_out), (g_ranks, g_toks, g_in, g_out) in zip(ref, got):
        assert g_ranks == r_ranks and g_toks == r_toks
        flat = [(a, b) for x, y in zip(r_in, g_in, strict=True) for a, b in zip(x, y, strict=True)]
        flat += [(a, b) for x, y in zip(r_out, g_out, strict=True)
                 for u, v in zip(x, y, strict=True) for a, b in zip(u, v, strict=True)]
        assert max(abs(a - b) for a, b in flat) < 1e-4


def test_seeded_sampling_is_reproducible(llama):
    vocab = read_vocab(llama)
    p = prompts(1, vocab, seed=11)[0]
    sp = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=1234)
    a = run(run_batch(make_engine(llama), [p], sp))[0]
    others = prompts(5, vocab, seed=12)
    b = run(run_batch(make_engine(llama), [p] + others,
                      [sp] + [SamplingParams(max_new_tokens=24)] * 5))[0]
    c = run(run_batch(make_engine(llama), [p], SamplingParams(max_new_tokens=24, seed=99)))[0]
    assert a == b
    assert a != c


def test_abort_frees_everything(llama):
    vocab = read_vocab(llama)

    async def go():
        engine = make_engine(llama)
        await engine.start()
        try:
            reqs = [await engine.submit(p, greedy(200)) for p in prompts(6, vocab, seed=13)]
            outs = []
            async for o in engine.stream(reqs[0]):
                outs.append(o)
                if len(outs) == 3:
                    break  # leaving the stream aborts the request
            assert engine.abort(reqs[1].rid)
            assert engine.abort(reqs[5].rid)  # possibly still queued
            assert not engine.abort("nope")
            rest = [await collect(engine, r) for r in reqs[2:5]]
            assert all(len(r) == 200 for r in rest)
            assert reqs[1].finish_reason == FinishReason.ABORT
            assert engine.scheduler.num_running == 0 and engine.scheduler.num_waiting == 0
            assert engine.block_manager.num_used_blocks == engine.runner.reserved_blocks
            assert not engine.requests
        finally:
            await engine.stop()

    run(go())


def test_stop_conditions(llama):
    vocab = read_vocab(llama)
    p = prompts(1, vocab, seed=21)[0]
    free = run(run_batch(make_engine(llama), [p], greedy(20)))[0]
    stop_tok = free[5]
    first = free.index(stop_tok)

    async def go():
        engine = make_engine(llama)
        await engine.start()
        try:
            r = await engine.submit(p, SamplingParams(max_new_tokens=20, temperature=0,
                                                      stop_token_ids=[stop_tok]))
            out = [o async for o in engine.stream(r)][-1]
            assert out.output_token_ids == free[: first + 1]
            assert out.finish_reason == FinishReason.STOP and out.matched_stop == stop_tok
            r = await engine.submit(p, SamplingParams(max_new_tokens=7, temperature=0))
            out = [o async for o in engine.stream(r)][-1]
            assert out.finish_reason == FinishReason.LENGTH and len(out.output_token_ids) == 7
            text = engine.tokenizer.decode(free[:10])
            stop = text[-3:]
            r = await engine.submit(p, SamplingParams(max_new_tokens=20, temperature=0,
                                                      stop=[stop]))
            out = [o async for o in engine.stream(r)][-1]
            assert out.finish_reason == FinishReason.STOP and out.matched_stop == stop
            assert stop in engine.tokenizer.decode(out.output_token_ids)
            assert len(out.output_token_ids) <= 10
        finally:
            await engine.stop()

    run(go())


def test_bad_words_of_two_tokens_under_the_overlapped_loop(llama):
    """A bad word of two tokens: its second is banned right after its first, which the step
    choosing it must see (so it does not overlap the step that generated the first); a
    one-token word is never generated."""
    vocab = read_vocab(llama)
    p = prompts(1, vocab, seed=21)[0]
    free = run(run_batch(make_engine(llama), [p], greedy(12)))[0]
    pair = free[2:4]

    async def go():
        engine = make_engine(llama)
        assert engine.overlap_schedule
        await engine.start()
        try:
            r = await engine.submit(p, SamplingParams(max_new_tokens=12, temperature=0,
                                                      bad_words_ids=[pair]))
            out = [o async for o in engine.stream(r)][-1].output_token_ids
            assert out[:3] == free[:3] and out[3] != free[3]
            assert all(out[i:i + 2] != pair for i in range(len(out) - 1))
            r = await engine.submit(p, SamplingParams(max_new_tokens=12, temperature=0,
                                                      bad_words_ids=[[free[0]]]))
            out = [o async for o in engine.stream(r)][-1].output_token_ids
            assert free[0] not in out and out != free
        finally:
            await engine.stop()

    run(go())


@pytest.mark.parametrize(
    "field,value",
    [("temperature", -1.0), ("top_p", 1.5), ("top_k", 0), ("max_new_tokens", -3),
     ("min_p", 2.0), ("repetition_penalty", 0.0), ("frequency_penalty", 9.0)],
)
def test_invalid_sampling_rejected(llama, field, value):
    from runtime.errors import ValidationError

    engine = make_engine(llama)

    async def go():
        with pytest.raises(ValidationError, match=field):
            await engine.submit([5, 6, 7], SamplingParams(**{field: value}))

    run(go())


def test_context_and_prompt_checks(llama):
    from runtime.errors import ValidationError

    engine = make_engine(llama, context_length=64)

    async def go():
        with pytest.raises(ValidationError, match="prompt"):
            await engine.submit([], SamplingParams())
        with pytest.raises(ValidationError, match="context"):
            await engine.submit([5] * 64, SamplingParams())
        with pytest.raises(ValidationError, match="input_ids"):
            await engine.submit([5, 10**9], SamplingParams())

    run(go())
    assert engine.model_info.context_length == 64


def test_max_total_tokens_caps_the_kv_cache(llama):
    """SGLang's max_total_tokens bounds the KV cache (whole blocks, on any device): a prompt
    that fills it is refused naming the cache's size, and one that fits runs."""
    from runtime.errors import ValidationError

    engine = make_engine(llama, max_total_tokens=70)  # 4 blocks of 16

    async def go():
        assert engine.block_manager.num_blocks == 4
        with pytest.raises(ValidationError, match="within the KV cache of 64 tokens"):
            await engine.submit([5] * 64, SamplingParams())

    run(go())
    assert [len(o) for o in run(run_batch(engine, [[5] * 40], greedy(8)))] == [8]


def test_new_tokens_past_the_context_are_refused(llama):
    """prompt + max_new_tokens over the context is refused, naming max_new_tokens (it was cut
    at the context without a word); one that fits exactly runs to its end."""
    from runtime.errors import ValidationError

    engine = make_engine(llama, context_length=40)

    async def go():
        with pytest.raises(ValidationError, match=r"^max_new_tokens: 30 prompt tokens \+ "
                           r"max_new_tokens 11 = 41 tokens exceed the context length of 40"):
            await engine.submit([5] * 30, SamplingParams(max_new_tokens=11))
        assert not engine.requests

    run(go())
    assert [len(o) for o in run(run_batch(engine, [[5] * 30], greedy(10)))] == [10]


def test_default_max_new_tokens_stops_at_context_length(llama):
    """A max_new_tokens the client left to its default is lowered to the room the context
    leaves, with or without allow_auto_truncate."""
    engine = make_engine(llama, context_length=40)
    params = SamplingParams(max_new_tokens=100, temperature=0, ignore_eos=True,
                            is_max_new_tokens_default=True)
    out = run(run_batch(engine, [[5] * 30], params))
    assert len(out[0]) == 10
    assert params.max_new_tokens == 100  # the caller's object is left as it was


def test_allow_auto_truncate_fits_the_request(llama):
    """With allow_auto_truncate, max_new_tokens past the context is lowered to the room left
    (min_new_tokens with it), and a prompt past the context keeps its first context - 1
    tokens, with room for one new token: its token is the one that head alone gets."""
    engine = make_engine(llama, context_length=40, allow_auto_truncate=True)
    long_prompt = list(range(3, 53))

    async def go():
        await engine.start()
        try:
            fits = await engine.submit([5] * 30, greedy(100))
            cut = await engine.submit(long_prompt, greedy(4))
            assert (fits.params.max_new_tokens, fits.params.min_new_tokens) == (10, 10)
            assert cut.prompt_ids == long_prompt[:39] and cut.params.max_new_tokens == 1
            outs = [await collect(engine, r) for r in (fits, cut)]
            assert fits.finish_reason is FinishReason.LENGTH
            return outs
        finally:
            await engine.stop()

    fits, cut = run(go())
    assert len(fits) == 10 and len(cut) == 1
    engine = make_engine(llama, context_length=40)
    assert run(run_batch(engine, [long_prompt[:39]], greedy(1))) == [cut]


def test_projection_biases_rejected(tmp_path):
    from runtime.model.loader import ModelLoadError

    folder = make_model(tmp_path / "b", "llama", mlp_bias=True)
    with pytest.raises(ModelLoadError, match="mlp_bias"):
        make_engine(folder)


def test_latency_metrics_count_tokens(llama):
    from metrics.serving import ServingMetrics
    from runtime.config import ServerConfig
    from runtime.engine import Engine

    metrics = ServingMetrics()
    engine = Engine.from_config(ServerConfig(model_path=str(llama), device="cpu",
                                             dtype="float32"), metrics)
    run(run_batch(engine, [[5, 6, 7], [8, 9]], greedy(5)))
    text = metrics.render()[0].decode()

    def value(name: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith(name))
        return float(line.rsplit(" ", 1)[1])

    assert value("loraserve:time_to_first_token_seconds_count") == 2
    assert value("loraserve:inter_token_latency_seconds_count") == 2 * 4


def engine_with_lm_head_adapter(llama, tmp_path, chunk: int):
    """An engine with adapter "a" (rank 4 on q_proj and lm_head, whose LoRA changes the
    logprobs themselves) at prefill chunk `chunk`, and the adapter's folder."""
    from runtime.config import LoraPathSpec
    from tests.models import make_adapter

    adapter = make_adapter(llama, tmp_path / "a", rank=4, targets=["q_proj", "lm_head"])
    engine = make_engine(llama, chunked_prefill_size=chunk,
                         lora_paths=(LoraPathSpec("a", str(adapter)),))
    return engine, adapter


@pytest.mark.parametrize("chunk", [512, 7])
def test_prompt_logprobs_match_hf(llama, tmp_path, chunk):
    """return_logprob scores every prompt token (SGLang's input_token_logprobs), also across
    prefill chunks, for base rows and an adapter with an lm_head LoRA in one batch."""
    engine, adapter = engine_with_lm_head_adapter(llama, tmp_path, chunk)
    vocab = read_vocab(llama)
    ps = prompts(3, vocab, seed=31, lo=10, hi=30)
    names = [None, "a", None]

    async def go():
        await engine.start()
        try:
            reqs = [await engine.submit(p, greedy(3), n, return_logprob=True, top_logprobs_num=2)
                    for p, n in zip(ps, names)]
            return [[o async for o in engine.stream(r)] for r in reqs]
        finally:
            await engine.stop()

    outs = run(go())
    for p, name, seq in zip(ps, names, outs):
        first = seq[0]
        assert first.input_logprobs is not None and len(first.input_logprobs) == len(p)
        assert first.input_logprobs[0] is None
        assert all(o.input_logprobs is None for o in seq[1:])
        model = hf_model(llama, adapter if name else None)
        ref = torch.log_softmax(hf_logits(model, p), dim=-1)
        want = [ref[i, p[i + 1]].item() for i in range(len(p) - 1)]
        got = first.input_logprobs[1:]
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-3
        top_ids = [t for t, _ in first.input_top_logprobs[1]]
        assert top_ids == ref[0].topk(2).indices.tolist()


@pytest.mark.parametrize("chunk", [512, 7])
def test_prompt_logprob_ranks_and_own_top_count_match_hf(llama, tmp_path, chunk):
    """vLLM's prompt_logprobs: the prompt's own number of top candidates (3, where the output
    lists 1) and each scored prompt token's rank (how many tokens HF finds likelier, plus 1),
    across prefill chunks, for a base row and an adapter's in one batch beside a request that
    asks for no ranks (whose outputs carry none)."""
    from runtime.engine import Submission

    engine, adapter = engine_with_lm_head_adapter(llama, tmp_path, chunk)
    vocab = read_vocab(llama)
    ps = prompts(3, vocab, seed=41, lo=10, hi=30)
    names = [None, "a", None]
    ranks = [True, True, False]

    outs = outputs_of(engine, [
        Submission(p, greedy(3), n, return_logprob=True, top_logprobs_num=1,
                   prompt_top_logprobs_num=3 if r else None, prompt_logprob_ranks=r)
        for p, n, r in zip(ps, names, ranks)])
    for p, name, with_ranks, seq in zip(ps, names, ranks, outs):
        first = seq[0]
        assert all(len(t) == 1 for t in first.new_top_logprobs)  # the output's own count
        if not with_ranks:
            assert first.input_ranks is None
            assert all(len(t) == 1 for t in first.input_top_logprobs[1:])
            continue
        assert len(first.input_ranks) == len(p) and first.input_ranks[0] is None
        ref = torch.log_softmax(hf_logits(hf_model(llama, adapter if name else None), p), dim=-1)
        for i in range(1, len(p)):
            row = ref[i - 1]
            chosen = row[p[i]]
            # within rounding of HF's logprobs: ties inside 1e-4 may count either way
            lo = int((row > chosen + 1e-4).sum()) + 1
            hi = int((row > chosen - 1e-4).sum())
            assert lo <= first.input_ranks[i] <= max(lo, hi), (i, first.input_ranks[i], lo, hi)
            assert [t for t, _ in first.input_top_logprobs[i]] == row.topk(3).indices.tolist()
        assert any(r > 1 for r in first.input_ranks[1:])  # random weights: not all likeliest


@pytest.mark.parametrize("chunk", [512, 7])
def test_token_ids_logprob_match_hf(llama, tmp_path, chunk):
    """SGLang's token_ids_logprob: the given ids' log-probs (in their order, repeats kept) at
    every scored prompt position from logprob_start and at every output token, HF's within
    1e-3, for a base row and an adapter's in one batch beside a request that gives none."""
    from runtime.engine import Submission

    engine, adapter = engine_with_lm_head_adapter(llama, tmp_path, chunk)
    vocab = read_vocab(llama)
    ps = prompts(3, vocab, seed=43, lo=10, hi=30)
    names = [None, "a", None]
    asks = [[7, 3, vocab - 1, 7], [11], None]
    start = 4

    outs = outputs_of(engine, [
        Submission(p, greedy(4), n, return_logprob=True, logprob_start=start,
                   token_ids_logprob=ids)
        for p, n, ids in zip(ps, names, asks)])
    for p, name, ids, seq in zip(ps, names, asks, outs):
        if ids is None:
            assert all(o.input_ids_logprobs is None and o.new_ids_logprobs is None for o in seq)
            continue
        out_ids = [t for o in seq for t in o.new_token_ids]
        ref = torch.log_softmax(hf_logits(hf_model(llama, adapter if name else None),
                                          p + out_ids), dim=-1)
        got_in = seq[0].input_ids_logprobs
        assert len(got_in) == len(p) and got_in[:start] == [[]] * start
        for pos in range(start, len(p)):
            want = ref[pos - 1, ids].tolist()
            assert max(abs(a - b) for a, b in zip(got_in[pos], want, strict=True)) < 1e-3
        got_out = [x for o in seq for x in (o.new_ids_logprobs or [])]
        assert len(got_out) == len(out_ids) == 4
        for k, row in enumerate(got_out):
            want = ref[len(p) - 1 + k, ids].tolist()
            assert max(abs(a - b) for a, b in zip(row, want, strict=True)) < 1e-3


@pytest.mark.parametrize("chunk", [512, 7])
@pytest.mark.parametrize("start", [1, 2, 9, 10_000])
def test_prompt_logprobs_from_a_start_score_only_those_tokens(llama, monkeypatch, chunk, start):
    """`logprob_start` (SGLang's logprob_start_len + 1; past the prompt for OpenAI answers
    without echo) scores the prompt tokens from there on and gives the runner no logits row
    for the positions before it: the tokens before get None, the rest HF's logprobs."""
    from runtime.request import Request

    vocab = read_vocab(llama)
    p = prompts(1, vocab, seed=37, lo=20, hi=30)[0]
    engine = make_engine(llama, chunked_prefill_size=chunk)
    scored: set[int] = set()
    positions = Request.prompt_logprob_positions

    def spy(self, begin, n):
        rows = positions(self, begin, n)
        scored.update(rows)
        return rows

    monkeypatch.setattr(Request, "prompt_logprob_positions", spy)

    async def go():
        await engine.start()
        try:
            req = await engine.submit(p, greedy(2), return_logprob=True, top_logprobs_num=1,
                                      logprob_start=start)
            return [o async for o in engine.stream(req)]
        finally:
            await engine.stop()

    first = run(go())[0]
    skipped = min(start, len(p))
    assert scored == set(range(skipped - 1, len(p) - 1))
    assert len(first.input_logprobs) == len(first.input_top_logprobs) == len(p)
    assert first.input_logprobs[:skipped] == [None] * skipped
    assert first.input_top_logprobs[:skipped] == [[]] * skipped
    ref = torch.log_softmax(hf_logits(hf_model(llama), p), dim=-1)
    want = [ref[i - 1, p[i]].item() for i in range(skipped, len(p))]
    got = first.input_logprobs[skipped:]
    assert len(got) == len(want) and all(abs(a - b) < 1e-3 for a, b in zip(got, want))


async def all_outputs(engine, reqs) -> list[list[RequestOutput]]:
    """Every output each request streams, until it finishes."""

    async def outputs(req):
        return [o async for o in engine.stream(req)]

    return list(await asyncio.gather(*(outputs(r) for r in reqs)))


def assert_only_prefilled(outputs: list[RequestOutput]) -> None:
    """A max_new_tokens 0 request streams one output, its last, with no token."""
    assert len(outputs) == 1
    (out,) = outputs
    assert out.finished and out.finish_reason == FinishReason.LENGTH
    assert out.new_token_ids == [] and out.output_token_ids == [] and not out.new_logprobs


@pytest.mark.parametrize("chunk", [512, 7])
def test_zero_new_tokens_only_prefill(llama, chunk):
    """max_new_tokens 0 prefills the prompt and stops without a token (SGLang): the prompt
    logprobs still come, from every prefill chunk, and nothing stays behind."""
    vocab = read_vocab(llama)
    p = prompts(1, vocab, seed=41, lo=20, hi=30)[0]
    engine = make_engine(llama, chunked_prefill_size=chunk)

    async def go():
        await engine.start()
        try:
            plain = await engine.submit(p, SamplingParams(max_new_tokens=0))
            scored = await engine.submit(p, SamplingParams(max_new_tokens=0),
                                         return_logprob=True, top_logprobs_num=2)
            outs = await all_outputs(engine, [plain, scored])
            assert engine.block_manager.num_used_blocks == engine.runner.reserved_blocks
            assert not engine.requests and not engine.scheduler.has_work
            return outs
        finally:
            await engine.stop()

    plain, scored = run(go())
    assert_only_prefilled(plain)
    assert_only_prefilled(scored)
    assert plain[0].input_logprobs is None
    out = scored[0]
    assert out.input_logprobs is not None and len(out.input_logprobs) == len(p)
    assert out.input_logprobs[0] is None
    ref = torch.log_softmax(hf_logits(hf_model(llama), p), dim=-1)
    want = [ref[i, p[i + 1]].item() for i in range(len(p) - 1)]
    assert max(abs(a - b) for a, b in zip(out.input_logprobs[1:], want)) < 1e-3
    assert [t for t, _ in out.input_top_logprobs[1]] == ref[0].topk(2).indices.tolist()
    assert engine.stats().generated_tokens == 0


def test_zero_new_tokens_leave_the_batch_alone(llama):
    """Requests for no tokens, between greedy and seeded ones in the same steps (overlapped,
    prefill chunked), change none of their tokens."""
    vocab = read_vocab(llama)
    ps = prompts(5, vocab, seed=43, lo=10, hi=40)
    seeded = SamplingParams(max_new_tokens=12, temperature=0.8, seed=7)
    params = [greedy(12), SamplingParams(max_new_tokens=0), seeded,
              SamplingParams(max_new_tokens=0), greedy(12)]
    kept = [0, 2, 4]
    alone = run(run_batch(make_engine(llama, chunked_prefill_size=32),
                          [ps[i] for i in kept], [params[i] for i in kept]))
    engine = make_engine(llama, chunked_prefill_size=32)

    async def go():
        await engine.start()
        try:
            reqs = [await engine.submit(p, sp, return_logprob=sp.max_new_tokens == 0)
                    for p, sp in zip(ps, params)]
            return await all_outputs(engine, reqs)
        finally:
            await engine.stop()

    outs = run(go())
    assert [outs[i][-1].output_token_ids for i in kept] == alone
    for i in (1, 3):
        assert_only_prefilled(outs[i])
        assert len(outs[i][0].input_logprobs) == len(ps[i])
    assert engine.stats().generated_tokens == 3 * 12
    assert engine.block_manager.num_used_blocks == engine.runner.reserved_blocks
    assert engine.scheduler.counters.max_batch_size >= 3, "the requests never shared a step"


def test_zero_new_tokens_still_bound_min_new_tokens(llama):
    from runtime.errors import ValidationError

    engine = make_engine(llama)

    async def go():
        with pytest.raises(ValidationError, match="min_new_tokens"):
            await engine.submit([5, 6, 7], SamplingParams(max_new_tokens=0, min_new_tokens=1))

    run(go())


def test_temperatures_under_the_epsilon_are_greedy(llama):
    """1e-39 (0 in the sampler's float32) once drew pad tokens; every temperature under 1e-6
    now chooses like 0, and 0.7 with a seed still samples."""
    vocab = read_vocab(llama)
    p = prompts(1, vocab, seed=45)[0]
    temperatures = [0.0, 1e-39, 1e-7, 0.0, 0.7]
    params = [SamplingParams(max_new_tokens=16, min_new_tokens=16, temperature=t, seed=3)
              for t in temperatures]
    outs = run(run_batch(make_engine(llama), [p] * len(params), params))
    ref = run(run_batch(make_engine(llama), [p], greedy(16)))[0]
    assert outs[:4] == [ref] * 4
    assert outs[4] != ref


class ScriptedSampler:
    """Stands in for the engine's sampler: the k-th output token of request `rid` is
    scripts[rid][k], whatever the logits."""

    def __init__(self, scripts: dict[str, list[int]]) -> None:
        self.scripts = scripts

    def __call__(self, logits: torch.Tensor, requests) -> SamplerOutput:
        ids = [self.scripts[r.rid][r.num_output_tokens] for r in requests]
        return SamplerOutput(torch.tensor(ids, device=logits.device))


@pytest.mark.parametrize("stop", ["😀", "😀😀", "x 😀😀"])
def test_stop_strings_of_multibyte_characters(llama, stop):
    """The byte-level tokenizer spends 4 tokens on an emoji, more than a stop string has
    characters: the engine must still stop on the token that completes it."""
    engine = make_engine(llama)
    tok = engine.tokenizer
    assert len(tok.encode("😀", add_special_tokens=False)) == 4
    script = tok.encode("ab 😀 x 😀😀 fox", add_special_tokens=False)
    want = next(script[:k] for k in range(1, len(script) + 1) if stop in tok.decode(script[:k]))
    engine.runner.sampler = ScriptedSampler({"scripted": script})

    async def go():
        await engine.start()
        try:
            req = await engine.submit([5, 6, 7], SamplingParams(
                max_new_tokens=len(script), stop=[stop], ignore_eos=True), rid="scripted")
            return [o async for o in engine.stream(req)][-1]
        finally:
            await engine.stop()

    out = run(go())
    assert out.finish_reason == FinishReason.STOP and out.matched_stop == stop
    assert out.output_token_ids == want


def test_lora_stack_groups(monkeypatch):
    """Every layer group is stacked on CUDA, none elsewhere, a biased qkv never;
    LORASERVE_LORA_STACK=0 turns stacking off, =1 on for any device, anything else is refused."""
    from types import SimpleNamespace

    from runtime.engine import lora_stack_groups

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    llama, qwen2 = SimpleNamespace(qkv_bias=False), SimpleNamespace(qkv_bias=True)
    monkeypatch.delenv("LORASERVE_LORA_STACK", raising=False)
    assert lora_stack_groups(llama, cuda) == ("qkv", "o", "gate_up", "down")
    assert lora_stack_groups(qwen2, cuda) == ("o", "gate_up", "down")
    assert lora_stack_groups(llama, cpu) == ()
    assert lora_stack_groups(llama, cuda, ("q_proj", "v_proj", "down_proj")) == ("qkv", "down")
    monkeypatch.setenv("LORASERVE_LORA_STACK", "0")
    assert lora_stack_groups(llama, cuda) == ()
    monkeypatch.setenv("LORASERVE_LORA_STACK", "1")
    assert lora_stack_groups(llama, cpu) == ("qkv", "o", "gate_up", "down")
    monkeypatch.setenv("LORASERVE_LORA_STACK", "yes")
    with pytest.raises(ValueError, match="LORASERVE_LORA_STACK"):
        lora_stack_groups(llama, cpu)


def test_release_weights_drops_only_stacked_groups(monkeypatch):
    """Before the pool allocates its stacks, the base weights they will hold become meta
    tensors of their shapes and dtypes (and on CUDA the freed blocks go back to the device);
    the other groups keep theirs."""
    from runtime.engine import _release_weights

    released = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append(1))
    layers = [{g: torch.nn.Linear(4, 3, bias=False) for g in ("qkv", "o", "gate_up", "down")}
              for _ in range(2)]
    before = [{g: m.weight.detach().clone() for g, m in layer.items()} for layer in layers]
    assert _release_weights(layers, (), torch.device("cuda")) == []
    assert not released
    moved = _release_weights(layers, ("qkv", "down"), torch.device("cpu"))
    assert moved == [layers[0]["qkv"], layers[0]["down"], layers[1]["qkv"], layers[1]["down"]]
    assert not released  # only CUDA has a cache to give back
    for layer, old in zip(layers, before):
        for g, m in layer.items():
            if m in moved:
                assert m.weight.is_meta and m.weight.shape == (3, 4) and not m.weight.requires_grad
            else:
                assert torch.equal(m.weight, old[g])
    _release_weights(layers, ("o",), torch.device("cuda"))
    assert released == [1]


def test_stacked_engine_loads_the_checkpoint_into_its_stacks(llama, monkeypatch):
    """With stacks (LORASERVE_LORA_STACK=1) the engine builds its pool before the weights and
    loads the checkpoint straight into the stacks' top rows: every stacked projection's weight
    is a view of its stack and equals the checkpoint's, and the logits are those of the engine
    without stacks."""
    from runtime.adapters.pool import GROUPS

    def build(stack: str):
        monkeypatch.setenv("LORASERVE_LORA_STACK", stack)
        return make_engine(llama, enable_lora=True, max_lora_rank=8, max_loras_per_batch=2,
                           lora_target_modules=["all"])

    plain, stacked = build("0"), build("1")
    assert not plain.adapters.pool.stacked
    assert stacked.adapters.pool.stacked == tuple(GROUPS)
    for layer, (a, b) in enumerate(zip(plain.model.lora_linears(),
                                       stacked.model.lora_linears())):
        for g in GROUPS:
            assert b[g].weight.data_ptr() == stacked.adapters.pool.stacks[g][layer].data_ptr()
            assert torch.equal(b[g].weight, a[g].weight)
    tokens = prompts(1, read_vocab(llama), seed=2)[0]
    torch.testing.assert_close(engine_logits(stacked, tokens), engine_logits(plain, tokens),
                               rtol=1e-5, atol=1e-5)


def test_start_freezes_startup_objects_and_stop_thaws_them(llama, monkeypatch):
    """Serving allocates, and a full collection would walk every object the model and its
    libraries left alive (a pause in which no thread runs): the engine freezes them as it
    starts, collects first, and thaws them as it stops; LORASERVE_GC_FREEZE=0 leaves the
    collector alone."""
    import gc

    gc.unfreeze()
    seen = []
    engine = make_engine(llama)

    async def serve():
        await engine.start()
        seen.append((gc.get_freeze_count(), len(gc.get_objects())))
        req = await engine.submit([1, 2, 3], greedy(4))
        assert len(await collect(engine, req)) == 4
        await engine.stop()

    run(serve())
    frozen, left = seen[0]
    assert frozen > 10_000 and left < frozen  # the model and libraries, out of the walk
    assert gc.get_freeze_count() == 0

    monkeypatch.setenv("LORASERVE_GC_FREEZE", "0")
    seen.clear()
    engine = make_engine(llama)
    run(serve())
    assert seen[0][0] == 0
    monkeypatch.setenv("LORASERVE_GC_FREEZE", "yes")
    engine = make_engine(llama)
    with pytest.raises(ValueError, match="LORASERVE_GC_FREEZE"):
        run(engine.start())


def test_a_prompt_only_request_in_flight_is_not_preempted() -> None:
    """A max_new_tokens 0 request whose prefill is in flight frees its blocks when that step
    completes: a decode that needs a block waits for that, instead of preempting it (which
    would prefill its prompt again)."""
    from runtime.kv_cache import BlockManager
    from runtime.request import Request, SamplingParams
    from runtime.scheduler import Scheduler

    bm = BlockManager(num_blocks=3, block_size=4)
    s = Scheduler(bm, max_running_requests=8, chunked_prefill_size=64)
    decoding = Request(rid="d", prompt_ids=[5] * 4, params=SamplingParams(max_new_tokens=4))
    prompt_only = Request(rid="p", prompt_ids=[6] * 4, params=SamplingParams(max_new_tokens=0))
    s.add(decoding)
    s.add(prompt_only)
    first = s.schedule()
    assert first is not None and first.num_new_tokens == [4, 4]
    for req in (decoding, prompt_only):  # what Engine._advance does at launch
        req.num_computed_tokens += 4
    decoding.add_pending()
    assert prompt_only.awaits_finish and not decoding.awaits_finish
    other = Request(rid="o", prompt_ids=[7] * 4, params=SamplingParams())
    bm.allocate(other, 4)  # the last free block, held outside the queues
    # the decode row needs another block; the only running holder is the prompt-only request
    assert s.schedule() is None
    assert s.counters.num_preemptions == 0 and prompt_only in s.running
    s.remove(prompt_only)  # its step completed: it finished and freed its block
    second = s.schedule()
    assert second is not None and second.requests == [decoding]
