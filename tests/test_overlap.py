"""The overlapped loop: step N+1 is scheduled, prepared and launched before step N's tokens are
on the host, and the result is exactly what one-step-at-a-time gives. CPU, float32 (and on
CUDA, the results' copies on the readback stream when the kernel readback is off)."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest
import torch

from runtime.request import SamplingParams
from tests.engine_utils import collect, greedy, make_engine, run, run_batch
from tests.models import make_model, prompts, read_vocab


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("llama"), "llama", layers=3)


async def run_full(engine, ps, params) -> list[tuple[list[int], str | None]]:
    """Outputs and finish reasons of every request, all submitted at once."""
    await engine.start()
    try:
        reqs = [await engine.submit(p, sp) for p, sp in zip(ps, params)]
        outs = await asyncio.gather(*(collect(engine, r) for r in reqs))
        return [(o, r.finish_reason.value) for o, r in zip(outs, reqs)]
    finally:
        await engine.stop()


def mixed_params(stop_tok: int) -> list[SamplingParams]:
    return [
        greedy(30),
        SamplingParams(max_new_tokens=7, temperature=0.0),  # length: the in-flight step is its last
        SamplingParams(max_new_tokens=30, temperature=0.0, stop_token_ids=[stop_tok]),
        SamplingParams(max_new_tokens=25, temperature=0.9, top_p=0.9, seed=5),
        SamplingParams(max_new_tokens=12, temperature=0.7, top_k=20, seed=11, min_new_tokens=12),
        greedy(1),
        greedy(18),
        SamplingParams(max_new_tokens=30, temperature=0.0, stop_token_ids=[stop_tok],
                       min_new_tokens=3),
    ]


def test_overlap_matches_one_step_at_a_time(llama):
    vocab = read_vocab(llama)
    ps = prompts(8, vocab, seed=21, lo=5, hi=50)
    first = run(run_batch(make_engine(llama), [ps[2]], greedy(30)))[0]
    stop_tok = first[5]  # request 2 stops on its 6th token while its 7th is being sampled
    params = mixed_params(stop_tok)
    sync = make_engine(llama, disable_overlap_schedule=True, chunked_prefill_size=32)
    ref = run(run_full(sync, ps, params))
    engine = make_engine(llama, chunked_prefill_size=32)
    out = run(run_full(engine, ps, params))
    assert out == ref
    assert ref[2][1] == "stop" and len(ref[2][0]) <= 6, "the stop token did not stop request 2"
    assert [len(o) for o, _ in ref][1] == 7
    assert sync.num_overlapped_steps == 0
    assert engine.num_overlapped_steps >= 20, engine.num_overlapped_steps
    assert engine.scheduler.counters.num_prefill_chunks > len(ps), "prompts were not chunked"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_overlap_with_preemption(llama):
    vocab = read_vocab(llama)
    ps = prompts(8, vocab, seed=9, lo=20, hi=40)
    ref = run(run_batch(make_engine(llama, disable_overlap_schedule=True), ps, greedy(40)))
    per_block = 2 * 3 * 16 * 2 * 16 * 4  # layers * page * kv_heads * head_dim * fp32, K and V
    engine = make_engine(llama, kv_cache_cpu_bytes=14 * per_block)
    out = run(run_batch(engine, ps, greedy(40)))
    assert out == ref
    assert engine.scheduler.counters.num_preemptions > 0, "no preemption happened"
    assert engine.num_overlapped_steps > 0
    assert engine.block_manager.num_free_blocks == 14


def test_penalties_wait_for_the_tokens(llama):
    """Repetition penalties read the host's token lists: such steps are not overlapped."""
    vocab = read_vocab(llama)
    ps = prompts(2, vocab, seed=3)
    sp = SamplingParams(max_new_tokens=16, temperature=0.0, repetition_penalty=1.5,
                        frequency_penalty=0.5)
    ref = run(run_batch(make_engine(llama, disable_overlap_schedule=True), ps, sp))
    engine = make_engine(llama)
    assert run(run_batch(engine, ps, sp)) == ref
    assert engine.num_overlapped_steps == 0


class GatedEvent:
    """A step's event that stays incomplete until the test opens it."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.sync_threads: list[str] = []

    def query(self) -> bool:
        return self.open.is_set()

    def synchronize(self) -> None:
        self.sync_threads.append(threading.current_thread().name)
        self.open.wait(10)

    def record(self, stream=None) -> None:
        pass


def test_loop_never_waits_on_a_running_step(llama):
    """While a step's event is incomplete the loop keeps serving: other coroutines run and new
    requests are accepted; the wait happens on a waiter thread, never on the loop thread."""
    engine = make_engine(llama)
    gates: list[GatedEvent] = []
    launch = engine.runner.launch

    def gated_launch(plan, fb):
        step = launch(plan, fb)
        gate = GatedEvent()
        gates.append(gate)
        step.event = gate
        return step

    engine.runner.launch = gated_launch  # type: ignore[method-assign]
    vocab = read_vocab(llama)
    p1, p2 = prompts(2, vocab, seed=4)

    async def main() -> list[list[int]]:
        await engine.start()
        try:
            r1 = await engine.submit(p1, greedy(4))
            task = asyncio.create_task(collect(engine, r1))
            while not gates:
                await asyncio.sleep(0.001)
            ticks = 0
            for _ in range(50):  # 50 ms with the first step held on the "GPU"
                await asyncio.sleep(0.001)
                ticks += 1
            r2 = await engine.submit(p2, greedy(4))  # accepted while the step is held
            assert not task.done() and ticks == 50
            assert gates[0].sync_threads and all(
                name.startswith("loraserve-wait") for name in gates[0].sync_threads
            ), gates[0].sync_threads
            while True:  # open every gate as it appears until both finish
                for g in gates:
                    g.open.set()
                if task.done() and r2.is_finished:
                    break
                await asyncio.sleep(0.001)
            return [await task, await collect(engine, r2)]
        finally:
            for g in gates:
                g.open.set()
            await engine.stop()

    out = run(main())
    ref = run(run_batch(make_engine(llama, disable_overlap_schedule=True), [p1, p2], greedy(4)))
    assert out == ref


def test_start_sets_the_gil_switch_interval(llama):
    """Whatever drives the engine (the server, a benchmark, a test) gets the short GIL switch
    interval that keeps the loop responsive while the runner thread launches a step."""
    import sys

    from runtime.engine import GIL_SWITCH_INTERVAL_S

    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    try:
        engine = make_engine(llama)

        async def start_stop() -> float:
            await engine.start()
            try:
                return sys.getswitchinterval()
            finally:
                await engine.stop()

        assert run(start_stop()) == pytest.approx(GIL_SWITCH_INTERVAL_S)
    finally:
        sys.setswitchinterval(before)


async def run_scored(engine, ps, params) -> list[tuple[list[int], list[float], list]]:
    """Tokens, log-probs and top-3 candidates of every request, all submitted at once."""

    async def scored(req) -> tuple[list[int], list[float], list]:
        tokens, lps, tops = [], [], []
        async for o in engine.stream(req):
            tokens = o.output_token_ids
            lps += o.new_logprobs or []
            tops += o.new_top_logprobs or []
        return tokens, lps, tops

    await engine.start()
    try:
        reqs = [await engine.submit(p, sp, return_logprob=True, top_logprobs_num=3)
                for p, sp in zip(ps, params)]
        return list(await asyncio.gather(*(scored(r) for r in reqs)))
    finally:
        await engine.stop()


def scored_case(llama) -> tuple[list[list[int]], list[SamplingParams]]:
    """Six prompts, greedy but for one seeded top-k sample, one of a single token."""
    ps = prompts(6, read_vocab(llama), seed=13, lo=5, hi=40)
    params = [greedy(n) for n in (20, 7, 15, 1, 12, 20)]
    params[2] = SamplingParams(max_new_tokens=15, temperature=0.8, top_k=20, seed=3)
    return ps, params


def scored_with_copies_on_compute(llama, ps, params, cfg, monkeypatch) -> list:
    """run_scored on a CUDA engine copying its results on the compute stream (no kernel
    readback, no readback stream); its memory released before the caller's engine sizes its KV
    cache. The caller's settings of both switches are left as they were."""
    with monkeypatch.context() as m:
        m.setenv("LORASERVE_READBACK_KERNEL", "0")
        m.setenv("LORASERVE_READBACK_STREAM", "0")
        ref = run(run_scored(make_engine(llama, **cfg), ps, params))
    gc.collect()
    torch.cuda.empty_cache()
    return ref


def assert_same_scores(out: list, ref: list) -> None:
    """The same tokens and top candidates; log-probs within fp32 noise (identical unless the
    two runs batched differently)."""
    assert [o[0] for o in out] == [r[0] for r in ref]
    for (tokens, lp, top), (_, ref_lp, ref_top) in zip(out, ref):
        assert len(lp) == len(top) == len(tokens) > 0
        assert lp == pytest.approx(ref_lp, abs=1e-5)
        assert [[i for i, _ in t] for t in top] == [[i for i, _ in t] for t in ref_top]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
def test_results_come_back_on_the_readback_stream(llama, monkeypatch):
    """On CUDA with the kernel readback off (LORASERVE_READBACK_KERNEL=0) a step's results are
    copied to the host on the readback stream, after the compute stream has sampled them, and
    the overlapped loop's tokens, log-probs and top candidates are those of copies on the
    compute stream (LORASERVE_READBACK_STREAM=0)."""
    ps, params = scored_case(llama)
    cfg = {"device": "cuda", "mem_fraction_static": 0.05}
    ref = scored_with_copies_on_compute(llama, ps, params, cfg, monkeypatch)
    monkeypatch.setenv("LORASERVE_READBACK_KERNEL", "0")
    engine = make_engine(llama, **cfg)
    runner = engine.runner
    streams = []
    to_host = runner._to_host
    monkeypatch.setattr(runner, "_to_host",
                        lambda t: streams.append(torch.cuda.current_stream()) or to_host(t))
    assert_same_scores(run(run_scored(engine, ps, params)), ref)
    assert engine.num_overlapped_steps > 5
    assert streams and all(s == runner.streams.readback for s in streams)
    assert runner.streams.readback not in (runner.streams.compute, runner.streams.copy)
