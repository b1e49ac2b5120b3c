"""Eager prefill steps on a token grid (ModelRunner.enable_token_grid): padded steps give the
tokens and logits of unpadded ones, the grid's counts are what the runner pads to, and the
start-up GEMM warm-up runs every GEMM a served step then meets (cuBLAS makes the host wait for
the device the first time it runs a kernel). On CPU the grid is off unless
LORASERVE_EAGER_TOKEN_GRID sets one (on CUDA too, so far); these tests set it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from runtime.engine import TOKEN_GRID_ENV
from runtime.request import Request, SamplingParams
from runtime.scheduler import ScheduledBatch
from tests.engine_utils import collect, engine_logits, greedy, make_engine, run_batch
from tests.models import model_with_adapters, prompts, read_vocab


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return model_with_adapters(tmp_path_factory.mktemp("grid"))


OPTS = {"max_loras_per_batch": 2, "chunked_prefill_size": 100, "max_running_requests": 8}


def engine_with_grid(monkeypatch, setup, grid: int):
    model, specs = setup
    monkeypatch.setenv(TOKEN_GRID_ENV, str(grid))
    return make_engine(model, lora_paths=specs, **OPTS)


def test_grid_sizes_and_padded_counts(monkeypatch, setup) -> None:
    """Every multiple of the grid past the prefill graphs' tokens, then the budget; a count
    pads to the next of them, and one the graphs take (or past the budget) runs as it is."""
    runner = engine_with_grid(monkeypatch, setup, 16).runner
    assert runner.token_grid == 16 and runner.grid_max == 100 and runner.graph_tokens == 0
    assert runner.grid_sizes() == [16, 32, 48, 64, 80, 96, 100]
    runner.graph_tokens = 40  # as if prefill graphs took up to 40 tokens
    assert runner.grid_sizes() == [48, 64, 80, 96, 100]
    pads = {n: runner._padded_count(n) for n in (1, 40, 41, 48, 49, 96, 97, 100, 101)}
    assert pads == {1: 1, 40: 40, 41: 48, 48: 48, 49: 64, 96: 96, 97: 100, 100: 100, 101: 101}
    assert all(runner._padded_count(n) in runner.grid_sizes() for n in range(41, 101))


def test_no_grid_without_the_setting_on_cpu(setup) -> None:
    model, specs = setup
    runner = make_engine(model, lora_paths=specs, **OPTS).runner
    assert runner.token_grid == 0 and runner.grid_sizes() == []
    assert runner._padded_count(37) == 37


def test_padded_prefill_tokens_belong_to_no_sequence(monkeypatch, setup) -> None:
    """A 37-token prefill step runs as 48 tokens: the 11 padded ones write the scratch slot,
    sit past the last sequence and in a base LoRA run; a decode step is not padded."""
    engine = engine_with_grid(monkeypatch, setup, 16)
    runner, bm = engine.runner, engine.block_manager
    reqs = [Request(rid=f"r{i}", prompt_ids=list(range(1, n + 1)), params=SamplingParams())
            for i, n in enumerate((20, 17))]
    reqs[0].lora_slot, reqs[1].lora_slot = 0, 1
    for r in reqs:
        bm.allocate(r, r.num_tokens + 1)
    try:
        fb = runner.prepare(ScheduledBatch(reqs, [20, 17]))
        assert fb.num_tokens == 48 and fb.cu_q_lens.tolist() == [0, 20, 37]
        scratch = runner._scratch.block_ids[0] * engine.config.page_size
        assert fb.slot_mapping[37:].tolist() == [scratch] * 11
        assert fb.input_ids[37:].tolist() == [0] * 11 and fb.positions[37:].tolist() == [0] * 11
        assert fb.logits_indices.tolist() == [19, 36]
        seg = fb.lora.seg_indptr.tolist()
        assert seg[-1] == 48 and fb.lora.seg_slots.tolist()[-1] == -1
        for r in reqs:
            r.num_computed_tokens = r.num_tokens
            r.output_ids.append(5)
        fb = runner.prepare(ScheduledBatch(reqs, [1, 1]))
        assert fb.is_decode and fb.num_tokens == 2
    finally:
        for r in reqs:
            bm.free(r)


def test_padded_steps_serve_what_unpadded_steps_serve(monkeypatch, setup) -> None:
    """Greedy tokens of a batch over the base model and two adapters, identical with and
    without the grid, and each prompt's logits at every position within 1e-5 (fp32 on CPU: a
    padded GEMM may block its sums differently)."""
    model, _ = setup
    ps = prompts(6, read_vocab(model), seed=7, lo=5, hi=60)
    loras = [None, "a0", "a1", "a0", None, "a1"]
    out = {}
    logits = {}
    for grid in (0, 16):
        engine = engine_with_grid(monkeypatch, setup, grid)
        out[grid] = asyncio.run(run_batch(engine, ps, greedy(5), loras))
        logits[grid] = [engine_logits(engine, p, slot) for p, slot in zip(ps, [-1, 0, 1, 0, -1, 1])]
    assert out[16] == out[0]
    for a, b in zip(logits[0], logits[16]):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_padded_steps_score_prompts_as_unpadded_steps(monkeypatch, setup) -> None:
    """Prompt log-probs and top candidates, and each sampled token's log-prob, of requests
    asking for them (their steps take the logits of many rows), within 1e-5 with and without
    the grid; the same tokens."""
    model, _ = setup
    ps = prompts(4, read_vocab(model), seed=11, lo=20, hi=70)
    loras = [None, "a0", "a1", None]

    async def go(engine):
        await engine.start()
        try:
            reqs = [await engine.submit(p, greedy(3), name, return_logprob=True,
                                        top_logprobs_num=2) for p, name in zip(ps, loras)]
            outs = []
            for req in reqs:
                got = {"tokens": [], "logprobs": [], "input": None}
                async for o in engine.stream(req):
                    got["tokens"] += o.new_token_ids
                    got["logprobs"] += o.new_logprobs or []
                    if o.input_logprobs is not None:
                        got["input"] = (o.input_logprobs, o.input_top_logprobs)
                outs.append(got)
            return outs
        finally:
            await engine.stop()

    plain, padded = (asyncio.run(go(engine_with_grid(monkeypatch, setup, g))) for g in (0, 16))
    for a, b in zip(plain, padded):
        assert a["tokens"] == b["tokens"] and len(a["logprobs"]) == 3
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-5)
        (lp_a, top_a), (lp_b, top_b) = a["input"], b["input"]
        assert lp_a[0] is None and lp_b[0] is None and len(lp_a) == len(lp_b) > 19
        assert lp_a[1:] == pytest.approx(lp_b[1:], abs=1e-5)
        assert [[t for t, _ in row] for row in top_a] == [[t for t, _ in row] for row in top_b]


def test_grid_is_rejected_with_tensor_parallelism(monkeypatch, setup) -> None:
    """The ranks' runners pad no steps: the setting at tp_size > 1 is an error naming it,
    before any rank starts."""
    model, _ = setup
    monkeypatch.setenv(TOKEN_GRID_ENV, "64")
    with pytest.raises(ValueError, match=f"{TOKEN_GRID_ENV}: not supported at tp_size > 1"):
        make_engine(model, tp_size=2)


@contextlib.contextmanager
def linear_calls(monkeypatch) -> Iterator[set[tuple[tuple[int, ...], ...]]]:
    """(weight shape, input shape) of every F.linear call while inside, from any thread (the
    engine's forward runs on its runner thread)."""
    calls: set[tuple[tuple[int, ...], ...]] = set()
    linear = F.linear

    def record(x, weight, *args, **kw):
        calls.add((tuple(weight.shape), tuple(x.shape)))
        return linear(x, weight, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(F, "linear", record)
        yield calls


def test_warm_up_runs_every_gemm_a_served_batch_meets(monkeypatch, setup) -> None:
    """Every (weight, input) shape of F.linear in a served batch of prompts of many lengths
    (chunked by the budget, over the base model and both adapters) was called by the GEMM
    warm-up first."""
    model, _ = setup
    engine = engine_with_grid(monkeypatch, setup, 16)
    with linear_calls(monkeypatch) as warm:
        calls = engine.runner.warm_up_gemms(engine.runner.grid_sizes(), 8)
    counts = set(engine.runner.grid_sizes()) | set(range(1, 9))  # and decode steps' rows
    assert calls == len(warm) == 4 * len(counts) + 8  # 4 projections, then lm_head
    ps = prompts(12, read_vocab(model), seed=3, lo=3, hi=150)
    with linear_calls(monkeypatch) as served:
        asyncio.run(run_batch(engine, ps, greedy(4), [None, "a0", "a1"] * 4))
    token_counts = {x[0] for w, x in served if w[0] != engine.model_info.vocab_size}
    assert len(token_counts) > 3 and max(token_counts) > 16  # prefill steps of several sizes
    assert served <= warm, served - warm


def serve_on_cuda(model, specs, grid: int, groups: list[list[list[int]]], device: str = "cuda"):
    """(F.linear shapes at construction, F.linear shapes while serving, greedy tokens, the
    grid's sizes) of an engine on CUDA serving each group of prompts as one batch. The engine
    is gone on return: a failing assertion must not keep its KV cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKEN_GRID_ENV, str(grid))
        with linear_calls(mp) as warm:
            engine = make_engine(model, device=device, dtype="float32",
                                 mem_fraction_static=0.05, lora_paths=specs,
                                 max_loras_per_batch=2, cuda_graph_max_tokens=64,
                                 chunked_prefill_size=512, max_running_requests=16)
            if device == "cpu":  # CUDA warms up at construction
                engine.warm_up()
        sizes = engine.runner.grid_sizes()

        async def go(engine) -> list[list[int]]:
            await engine.start()
            try:
                out = []
                for group in groups:  # a batch at a time, each batch's steps its own
                    reqs = [await engine.submit(p, greedy(5), (None, "a0", "a1")[i % 3])
                            for i, p in enumerate(group)]
                    out += await asyncio.gather(*(collect(engine, r) for r in reqs))
                return out
            finally:
                await engine.stop()

        with linear_calls(mp) as served:
            tokens = asyncio.run(go(engine))
    del engine
    gc.collect()
    return warm, served, tokens, sizes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_serving_meets_only_gemms_the_warm_up_ran(setup) -> None:
    """On CUDA with a 64-token grid, every F.linear shape of served batches (prefill
    steps of many sizes past the prefill graphs', chunked by the budget; decode batches of
    every size) was called at construction (the warm-up, the graph captures), so no served step
    waits for the device on a cuBLAS kernel's first call; and the greedy tokens (fp32) are those
    of an engine without the grid."""
    model, specs = setup
    ps = prompts(12, read_vocab(model), seed=5, lo=70, hi=450)  # the context is 512
    groups = [ps[:1], ps[1:2], ps[2:4], ps[4:7], ps[7:]]  # steps of several sizes
    warm, served, got, sizes = serve_on_cuda(model, specs, 64, groups)
    assert sizes[0] == 128 and sizes[-1] == 512
    prefill_counts = {x[0] for _, x in served if x[0] > 64}
    assert len(prefill_counts) > 2 and prefill_counts <= set(sizes), prefill_counts
    assert served <= warm, served - warm
    assert serve_on_cuda(model, specs, 0, groups)[2] == got
