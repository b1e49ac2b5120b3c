"""The adapter pipeline seen from the engine, on CPU with a copy stream whose completion the
test controls (FakeStreams): admission waits for uploads when overlap loading is on, the step
after an upload completes admits, an aborted request's pending upload leaks nothing, and with
more busy adapters than slots every request is served within the fairness bound."""

from __future__ import annotations

import asyncio
import random

import pytest

import runtime.scheduler as scheduler_module
from runtime.config import LoraPathSpec
from runtime.scheduler import MAX_PASSED_OVER
from tests.engine_utils import collect, greedy, make_engine, run, run_batch
from tests.models import make_adapter, make_model, prompts, read_vocab
from tests.test_adapters import FakeStreams


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    model = make_model(root / "m", "llama")
    adapters = [make_adapter(model, root / f"a{i}", rank=4, seed=i) for i in range(6)]
    return model, adapters


def engine_for(model, adapters, **kw):
    specs = tuple(LoraPathSpec(f"a{i}", str(p)) for i, p in enumerate(adapters))
    engine = make_engine(model, lora_paths=specs, max_lora_rank=4, **kw)
    streams = FakeStreams()
    engine.adapters.streams = streams
    return engine, streams


def test_uploading_adapter_waits_then_joins(setup):
    model, adapters = setup
    p = prompts(2, read_vocab(model), seed=1)
    solo = run(run_batch(make_engine(model, lora_paths=(LoraPathSpec("a0", str(adapters[0])),),
                                     max_lora_rank=4), [p[0]], greedy(8), ["a0"]))[0]
    engine, streams = engine_for(model, adapters[:1], max_loras_per_batch=1,
                                 enable_lora_overlap_loading=True)

    async def go():
        await engine.start()
        try:
            streams.auto_done = False
            assert engine.adapters.slot_of("a0") is None  # startup loads stop in host memory
            lora_req = await engine.submit(p[0], greedy(8), "a0")
            base = await collect(engine, await engine.submit(p[1], greedy(8)))
            assert len(base) == 8  # the base request ran while a0 uploaded
            assert lora_req.admitted_time is None and lora_req.passed_over > 0
            steps_before = engine.scheduler.counters.num_steps
            streams.events[-1].is_done = True
            out = await collect(engine, lora_req)
            assert engine.scheduler.counters.num_steps - steps_before == 8  # admitted at once
            return out
        finally:
            await engine.stop()

    assert run(go()) == solo


def test_aborted_request_pending_upload_leaks_no_slot(setup):
    model, adapters = setup
    p = prompts(1, read_vocab(model), seed=2)[0]
    engine, streams = engine_for(model, adapters[:2], max_loras_per_batch=1,
                                 enable_lora_overlap_loading=True)

    async def go():
        await engine.start()
        try:
            streams.auto_done = False
            req = await engine.submit(p, greedy(4), "a1")  # a1 must replace a0: upload pends
            await asyncio.sleep(0.05)
            assert engine.abort(req.rid)
            streams.events[-1].is_done = True
            engine.adapters.poll()
            m = engine.adapters
            assert all(s.locks == 0 for s in m._slots)
            assert all(a.refs == 0 for a in m._adapters.values())
            streams.auto_done = True
            out = await collect(engine, await engine.submit(p, greedy(4), "a0"))
            assert len(out) == 4  # the slot the aborted upload took is usable again
        finally:
            await engine.stop()

    run(go())


def test_busy_adapters_over_few_slots_all_served_fairly(setup):
    model, adapters = setup
    vocab = read_vocab(model)
    ps = prompts(24, vocab, seed=3, lo=3, hi=12)
    names = [f"a{i % 6}" for i in range(24)]
    engine = make_engine(model, max_lora_rank=4, max_loras_per_batch=2,
                         lora_paths=tuple(LoraPathSpec(f"a{i}", str(p))
                                          for i, p in enumerate(adapters)))
    seen: list[int] = []
    real_schedule = engine.scheduler.schedule

    def schedule():
        plan = real_schedule()
        seen.extend(r.passed_over for r in engine.scheduler.waiting)
        return plan

    engine.scheduler.schedule = schedule
    outs = run(run_batch(engine, ps, greedy(6), names))
    assert all(len(o) == 6 for o in outs)
    assert max(seen) <= MAX_PASSED_OVER
    assert engine.scheduler.counters.max_adapters_in_step == 2


def test_loading_starts_at_submit_not_at_queue_front(setup, monkeypatch):
    """The disk read of a request's adapter begins while the request still waits behind others:
    before the request ahead of it leaves the queue and before any running request finishes."""
    import threading
    import time

    from runtime.adapters import manager as manager_module
    from runtime.adapters.manager import Residency

    model, adapters = setup
    p = prompts(4, read_vocab(model), seed=4)
    # Host tier of two: starting a0, a1, a2 drops a0's host copy, so a0 must come from disk.
    engine = make_engine(model, max_lora_rank=4, max_loras_per_batch=1, max_loaded_loras=2,
                         max_running_requests=2,
                         lora_paths=tuple(LoraPathSpec(f"a{i}", str(adapters[i]))
                                          for i in range(3)))
    read_started: list[float] = []
    release = threading.Event()
    real_read = manager_module.load_peft_adapter

    def slow_read(*args, **kwargs):  # the loader thread's disk read
        read_started.append(time.monotonic())
        release.wait(timeout=30)
        return real_read(*args, **kwargs)

    async def go():
        await engine.start()
        try:
            assert engine.adapters.state("a0") is Residency.REGISTERED
            monkeypatch.setattr(manager_module, "load_peft_adapter", slow_read)
            running = [await engine.submit(q, greedy(48)) for q in p[:2]]
            queued = await engine.submit(p[2], greedy(4))  # waits: max_running_requests is 2
            lora_req = await engine.submit(p[3], greedy(4), "a0")
            waiting = list(engine.scheduler.waiting)
            assert waiting.index(queued) < waiting.index(lora_req)
            for _ in range(500):
                if read_started:
                    break
                await asyncio.sleep(0.002)
            assert read_started, "the adapter's disk read did not start at submit"
            assert lora_req in engine.scheduler.waiting and lora_req.admitted_time is None
            release.set()
            outs = await asyncio.gather(*(collect(engine, r) for r in [*running, queued,
                                                                        lora_req]))
        finally:
            release.set()
            await engine.stop()
        assert [len(o) for o in outs] == [48, 48, 4, 4]
        t_read = read_started[0]
        assert t_read < queued.admitted_time  # the request ahead had not left the queue yet
        assert t_read < min(r.last_token_time for r in running)  # nothing ahead had finished
        assert t_read < lora_req.admitted_time
        assert len(read_started) == 1

    run(go())


def test_starved_requests_never_stop_the_server(setup, monkeypatch):
    """24 adapters over 2 GPU slots and 4 host copies, 160 requests queued at once: requests
    starve (the bound lowered to 4 rounds), and one's adapter waits for a host row that only
    adapters whose requests wait without a slot hold. Every request still finishes. (Holding
    every new slot for the starved request there left nothing running, read or admitted: the
    engine hung, as the 1000-adapter benchmark did on the H200.)"""
    monkeypatch.setattr(scheduler_module, "MAX_PASSED_OVER", 4)
    model, adapters = setup
    rng = random.Random(0)
    names = [f"a{rng.randrange(24)}" for _ in range(160)]
    ps = prompts(160, read_vocab(model), seed=3, lo=3, hi=8)
    engine = make_engine(model, max_lora_rank=4, max_loras_per_batch=2, max_loaded_loras=4,
                         max_running_requests=16,
                         lora_paths=tuple(LoraPathSpec(f"a{i}", str(adapters[0]))
                                          for i in range(24)))
    engine.adapters.streams = FakeStreams()

    async def go():
        await engine.start()
        try:
            reqs = [await engine.submit(p, greedy(12), n) for p, n in zip(ps, names)]
            outs = await asyncio.wait_for(
                asyncio.gather(*(collect(engine, r) for r in reqs)), 60)
            return outs, max(r.passed_over for r in reqs)
        finally:
            await engine.stop()

    outs, most_passed_over = run(go())
    assert all(len(o) == 12 for o in outs)
    assert most_passed_over == 4  # requests did starve
