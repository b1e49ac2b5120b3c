"""The stream pipeline on the device: adapter uploads on the copy stream under overlap loading
on, off and the default policy, and the overlapped loop, give exactly the tokens of the
synchronous path (every adapter resident, one request at a time, each step completed before the
next). fp32 on CUDA, CUDA graphs on, 4 adapters of ranks 1..16 over 2 GPU slots so uploads and
evictions happen while batches run."""

from __future__ import annotations

import asyncio
import gc

import pytest
import torch

from tests.engine_utils import collect, greedy, make_engine, run
from tests.models import prompts, read_vocab
from tests.test_graphs_gpu import lora_config, setup  # noqa: F401  (setup is a fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")]

NAMES = [None, "a0", "a1", "a2", "a3", "a1", "a0", None, "a3", "a2"] * 2
NEW = 24


async def one_at_a_time(engine, ps, names):
    await engine.start()
    try:
        out = []
        for p, name in zip(ps, names):
            out.append(await collect(engine, await engine.submit(p, greedy(NEW), name)))
        return out
    finally:
        await engine.stop()


async def all_at_once(engine, ps, names):
    await engine.start()
    try:
        reqs = [await engine.submit(p, greedy(NEW), name) for p, name in zip(ps, names)]
        return list(await asyncio.gather(*(collect(engine, r) for r in reqs)))
    finally:
        await engine.stop()


def free_gpu() -> None:
    """Return a dropped engine's memory: the next engine sizes its KV cache from what is left."""
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize(("overlap_loading", "mode"),
                         [(True, "batch"), (False, "batch"), (None, "batch"),
                          (True, "loop"), (False, "loop"), (None, "loop")])
def test_overlap_loading_matches_synchronous_path(setup, overlap_loading, mode,  # noqa: F811
                                                  monkeypatch):
    """4 adapters through 2 slots, uploads overlapping compute, against one request at a time
    without overlap; uploads issued together at each poll or admission (the default) or
    one call a copy as each starts (LORASERVE_UPLOAD_BATCH=0) for the engine under test."""
    model, adapters = setup
    ps = prompts(len(NAMES), read_vocab(model), seed=5, lo=4, hi=60)
    common = lora_config(adapters, "csgmv", "float32")
    ref_engine = make_engine(model, **{**common, "disable_overlap_schedule": True})
    ref = run(one_at_a_time(ref_engine, ps, NAMES))
    del ref_engine
    free_gpu()
    monkeypatch.setenv("LORASERVE_UPLOAD_BATCH", "1" if mode == "batch" else "0")
    engine = make_engine(model, **{**common, "max_loras_per_batch": 2,
                                   "enable_lora_overlap_loading": overlap_loading})
    assert engine.adapters.upload_mode == mode
    assert engine.runner.graphs is not None
    out = run(all_at_once(engine, ps, NAMES))
    uploads = engine.adapters.counters.loads["gpu"]
    evictions = engine.adapters.counters.evictions["gpu"]
    overlapped = engine.num_overlapped_steps
    del engine
    free_gpu()
    assert out == ref
    assert uploads >= 4 and evictions >= 2, (uploads, evictions)  # 4 adapters through 2 slots
    assert overlapped > 0
