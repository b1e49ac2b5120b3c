"""CUDA-graph bookkeeping that runs on any device: the captured sizes, and the prefill graphs'
staging. A replay runs the model over the static buffers padded to a bucket; here that padded
forward runs eagerly (no capture on CPU) and must give the unpadded step's logits."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch

from runtime.config import LoraPathSpec
from runtime.graphs import MixedGraphs, graph_batch_sizes, graph_token_sizes
from runtime.request import Request
from tests.engine_utils import greedy, make_engine
from tests.models import make_adapter, make_model, prompts, read_vocab


def test_decode_blas_from_16_rows_by_default(monkeypatch):
    """cuBLASLt for decode graphs of at least LORASERVE_DECODE_CUBLASLT_MIN_BS rows (16 by
    default, 0: never), base-only and LoRA graphs alike unless LORASERVE_DECODE_CUBLASLT_LORA=0;
    a bad value is an error that names the setting."""
    from runtime.graphs import blas_library, decode_blas

    monkeypatch.delenv("LORASERVE_DECODE_CUBLASLT_MIN_BS", raising=False)
    monkeypatch.delenv("LORASERVE_DECODE_CUBLASLT_LORA", raising=False)
    assert decode_blas(16, False) == "cublaslt" and decode_blas(32, True) == "cublaslt"
    assert decode_blas(8, False) is None and decode_blas(15, True) is None
    monkeypatch.setenv("LORASERVE_DECODE_CUBLASLT_LORA", "0")  # base-only graphs
    assert decode_blas(32, False) == "cublaslt" and decode_blas(32, True) is None
    monkeypatch.setenv("LORASERVE_DECODE_CUBLASLT_LORA", "yes")
    with pytest.raises(ValueError, match="LORASERVE_DECODE_CUBLASLT_LORA"):
        decode_blas(32, True)
    monkeypatch.delenv("LORASERVE_DECODE_CUBLASLT_LORA")
    monkeypatch.setenv("LORASERVE_DECODE_CUBLASLT_MIN_BS", "4")
    assert decode_blas(4, True) == "cublaslt" and decode_blas(2, False) is None
    monkeypatch.setenv("LORASERVE_DECODE_CUBLASLT_MIN_BS", "0")
    assert decode_blas(64, False) is None and decode_blas(64, True) is None
    monkeypatch.setenv("LORASERVE_DECODE_CUBLASLT_MIN_BS", "big")
    with pytest.raises(ValueError, match="LORASERVE_DECODE_CUBLASLT_MIN_BS"):
        decode_blas(32, False)
    with blas_library(None):  # nothing to set
        pass


def test_graph_sizes_cover_every_count():
    for limit in (1, 7, 64, 200, 256):
        sizes = graph_batch_sizes(limit)
        assert sizes == sorted(sizes) and sizes[-1] == limit
    assert graph_token_sizes(0) == []
    for limit in (16, 100, 512, 1000):
        sizes = graph_token_sizes(limit)
        assert sizes == sorted(set(sizes)) and sizes[-1] == limit
        # a step pads to the next size: by at most 16 tokens or a quarter
        for a, b in itertools.pairwise(sizes):
            assert b - a <= max(16, a // 4)


@pytest.fixture(scope="module")
def lora_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    model = make_model(root / "m", "llama", hidden=64, heads=4, kv_heads=2, inter=128)
    adapters = [
        make_adapter(model, root / "a0", rank=4, targets=["q_proj", "v_proj", "down_proj"],
                     seed=1),
        make_adapter(model, root / "a1", rank=8, targets="all-linear", seed=2),
    ]
    specs = tuple(LoraPathSpec(f"a{i}", str(p)) for i, p in enumerate(adapters))
    engine = make_engine(model, lora_paths=specs, max_loras_per_batch=2, max_lora_rank=8,
                         lora_target_modules=("all",), max_lora_chunk_size=16)
    asyncio.run(engine.adapters.load_startup_adapters())  # steps are driven by hand below
    return engine, read_vocab(model)


def _mixed_plan(engine, vocab):
    """Two steps: the first prefills three requests; the second decodes them while it
    prefills three more (a plan with decode rows and prefill chunks, base and two adapters)."""
    sched = engine.scheduler
    ps = prompts(6, vocab, seed=7, lo=5, hi=30)
    names = [None, "a0", "a1", "a1", None, "a0"]
    reqs = [Request(rid=f"r{i}", prompt_ids=p, params=greedy(8), lora_name=n)
            for i, (p, n) in enumerate(zip(ps, names))]
    for r in reqs:
        r.outputs = asyncio.Queue()  # the engine emits each sampled token into it
    for r in reqs[:3]:
        sched.add(r)
    engine.adapters.poll()
    engine.run_step_blocking(sched.schedule())
    for r in reqs[3:]:
        sched.add(r)
    plan = sched.schedule()
    assert not plan.is_decode and 1 in plan.num_new_tokens
    return plan, reqs


def _graphs(engine, scratch: Request, max_tokens: int, max_seqs: int) -> MixedGraphs:
    """Prefill graphs of the engine's model, not captured (CPU): staging and bucket choice."""
    return MixedGraphs(
        engine.model, engine.kv_cache.k, engine.kv_cache.v, max_tokens=max_tokens,
        max_seqs=max_seqs, max_blocks=16, scratch_block=scratch.block_ids[0],
        block_size=engine.config.page_size, lora_backend="csgmv",
        lora_chunk_size=engine.config.max_lora_chunk_size,
    )


@pytest.fixture
def scratch(lora_engine):
    """The scratch block padded rows write into; the test's requests and it are freed after."""
    engine, _ = lora_engine
    req = Request(rid="scratch", prompt_ids=[0], params=greedy(1))
    engine.block_manager.allocate(req, 1)
    yield req
    for r in list(engine.scheduler.running) + list(engine.scheduler.waiting):
        engine.scheduler.remove(r)
    engine.block_manager.free(req)


def test_mixed_graph_staging_matches_unpadded_step(lora_engine, scratch):
    engine, vocab = lora_engine
    graphs = _graphs(engine, scratch, max_tokens=128, max_seqs=8)
    plan, _ = _mixed_plan(engine, vocab)
    fb = engine.runner.prepare(plan)
    assert fb.lora is not None and len(plan.slots) == 2
    bucket = graphs.bucket_for(fb)
    assert bucket is not None and bucket.tokens > fb.num_tokens and bucket.seqs > fb.batch_size
    with torch.inference_mode():
        eager = engine.model(fb, engine.kv_cache.k, engine.kv_cache.v)
        view = graphs.stage(fb, bucket)
        # the padded rows are there, and inert: no sequence owns them, no adapter reads them
        assert view.num_tokens == bucket.tokens and view.batch_size == bucket.seqs
        assert view.cu_q_lens[fb.batch_size:].eq(fb.num_tokens).all()
        assert view.slot_mapping[fb.num_tokens:].eq(graphs.scratch_slot).all()
        assert view.attn_tiles is not None and int(view.attn_tiles.ge(0).sum()) > 0
        hidden = engine.model.hidden(view, engine.kv_cache.k, engine.kv_cache.v)
        staged = engine.model.logits(hidden[: fb.batch_size], fb)
    torch.testing.assert_close(staged, eager, rtol=1e-4, atol=1e-4)


def test_mixed_graph_bucket_refusals(lora_engine, scratch):
    engine, vocab = lora_engine
    plan, _ = _mixed_plan(engine, vocab)
    fb = engine.runner.prepare(plan)
    too_few_tokens = _graphs(engine, scratch, max_tokens=16, max_seqs=2)
    assert fb.num_tokens > 16 and too_few_tokens.bucket_for(fb) is None  # eager
    too_few_seqs = _graphs(engine, scratch, max_tokens=256, max_seqs=2)
    assert too_few_seqs.bucket_for(fb) is None  # more sequences than any bucket holds
