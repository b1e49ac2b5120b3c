"""Start-up warm-up: steps of every shape class a served step can reach run before serving, on
throwaway requests that leave nothing behind; on CUDA, serving after it compiles nothing."""

import asyncio
import os

import pytest
import torch

from runtime.config import LoraPathSpec
from runtime.runner import warmup_shapes
from tests.engine_utils import collect, greedy, make_engine, run, run_batch
from tests.models import make_adapter, make_model, model_with_adapters, prompts, read_vocab


def test_warmup_shapes_cover_every_power_of_two() -> None:
    shapes = warmup_shapes(4096, 256, 1 << 17)
    tokens = sorted({t for t, _ in shapes})
    assert tokens == [1 << i for i in range(13)]
    assert (4096, 1) in shapes and (4096, 256) in shapes and (1, 1) in shapes
    assert all(1 <= s <= min(t, 256) for t, s in shapes)
    # a budget that is not a power of two is itself a shape
    assert {t for t, _ in warmup_shapes(3000, 8, 4096)} >= {2048, 3000}
    assert (3000, 8) in warmup_shapes(3000, 8, 4096)


def test_warmup_shapes_keep_sequences_within_the_context() -> None:
    """No sequence longer than the context (the rotary tables end there): a budget past it is
    split over more sequences, and a step that would need more than max_seqs is left out."""
    shapes = warmup_shapes(4096, 4, 512)
    assert (4096, 1) not in shapes and (1024, 2) in shapes and (2048, 4) in shapes
    assert all(-(-t // s) <= 512 and s <= 4 for t, s in shapes)
    assert max(t for t, _ in shapes) == 2048  # 4096 tokens would need 8 sequences of 512


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    return model_with_adapters(tmp_path_factory.mktemp("warm"))


def test_warm_up_leaves_no_trace(lora_setup) -> None:
    """Every shape runs when the KV cache has room, every block comes back, and a batch served
    afterwards gives the tokens a fresh engine gives."""
    model, specs = lora_setup
    opts = {"lora_paths": specs, "max_loras_per_batch": 2, "chunked_prefill_size": 256,
            "max_running_requests": 16}
    ps = prompts(5, read_vocab(model), seed=4, lo=5, hi=40)
    loras = [None, "a0", "a1", "a0", None]
    want = asyncio.run(run_batch(make_engine(model, **opts), ps, greedy(6), loras))

    engine = make_engine(model, **opts)
    free = engine.block_manager.num_free_blocks
    copies = engine.runner.staging.copies
    ran = engine.warm_up()
    shapes = warmup_shapes(256, 16, engine.model_info.context_length - 1)
    # each shape's step and the decode step after it, one staging copy each
    assert ran == 2 * len(shapes) == engine.runner.staging.copies - copies
    assert engine.block_manager.num_free_blocks == free
    assert asyncio.run(run_batch(engine, ps, greedy(6), loras)) == want


def test_warm_up_skips_shapes_that_do_not_fit(lora_setup) -> None:
    """A KV cache too small for the largest shapes skips them instead of failing start-up."""
    model, specs = lora_setup
    engine = make_engine(model, lora_paths=specs, max_loras_per_batch=2,
                         chunked_prefill_size=1024, kv_cache_cpu_bytes=1 << 17)
    capacity = engine.block_manager.num_free_blocks * engine.config.page_size
    assert capacity < 1024, "the test needs a cache smaller than the prefill budget"
    ran = engine.warm_up()
    shapes = warmup_shapes(1024, engine.config.max_running_requests,
                           engine.model_info.context_length - 1)
    assert 0 < ran < 2 * len(shapes)
    assert engine.block_manager.num_free_blocks * engine.config.page_size == capacity


ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "embed_tokens", "lm_head"]


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="reads kernel keys through the Triton interpreter, on CPU")
def test_serving_after_warm_up_meets_only_warmed_kernel_variants(tmp_path, monkeypatch) -> None:
    """Every Triton kernel launch of a served mixed workload (chunked prompts of uneven
    lengths; base rows and two adapters of ranks 8 and 16 on every projection, the embedding
    and the lm_head; prompt logprobs; decode batches of any size; sequences long enough to split
    decode attention) has a specialization key that a launch during the warm-up had: on CUDA,
    none of them would compile while serving. The keys are the CUDA backend's, computed from
    each launch's arguments (tests/kernel_keys.py). Each warm-up variant then compiles for
    sm_90 on this machine, spilling nothing."""
    import ops.dispatch
    import ops.lora
    from tests.kernel_keys import KeyLog, compile_for_sm90, describe

    monkeypatch.setattr(ops.dispatch, "TRITON_ON_CPU", True)
    # steps of up to 64 tokens (and decode and logits tables) expand over row blocks, longer
    # prefill steps over table entries: both
    monkeypatch.setattr(ops.lora, "ROWS_EXPAND_MAX_TOKENS", 64)
    model = make_model(tmp_path / "m", "llama")
    specs = tuple(
        LoraPathSpec(f"a{i}", str(make_adapter(model, tmp_path / f"a{i}", rank=r, seed=i,
                                               targets=ALL_TARGETS)))
        for i, r in enumerate((8, 16))
    )
    engine = make_engine(model, lora_paths=specs, max_loras_per_batch=2,
                         chunked_prefill_size=128, max_running_requests=16)
    with KeyLog() as warm:
        engine.warm_up()
    ps = prompts(10, read_vocab(model), seed=7, lo=1, hi=300)
    loras = [None, "a0", "a1", "a1", None, "a0", "a0", None, "a1", None]

    async def go() -> None:
        await engine.start()
        try:
            reqs = [await engine.submit(p, greedy(2 + i % 4), name, return_logprob=i % 3 == 0,
                                        top_logprobs_num=2 if i % 6 == 0 else 0)
                    for i, (p, name) in enumerate(zip(ps, loras))]
            await asyncio.gather(*(collect(engine, r) for r in reqs))
        finally:
            await engine.stop()

    with KeyLog() as served:
        run(go())
    counts = served.counts()
    assert all(counts.get(k) for k in ("_lora_expand_kernel", "_lora_expand_rows_kernel",
                                       "_lora_embed_shrink_kernel",
                                       "_decode_attention_kernel", "_argmax_partial_kernel",
                                       "_argmax_final_kernel")), counts
    missing = served.keys() - warm.keys()
    assert not missing, describe(missing, warm.keys())
    # every variant compiles for the H200 (the interpreter accepts code the CUDA front end
    # rejects) and spills no registers to local memory
    compiled = compile_for_sm90(warm.keys())
    assert len(compiled) == len(warm.keys())
    failed = [c for c in compiled if "error" in c or c["local"] > 0]
    assert not failed, failed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_serving_after_warm_up_compiles_nothing(lora_setup) -> None:
    """On CUDA the engine warms up at construction; a mixed batch served afterwards (prompts
    longer than the prefill graphs, prompt logprobs aside) meets no kernel it must compile."""
    from benchmarks.loop_profile import CompileLog

    model, specs = lora_setup
    engine = make_engine(model, device="cuda", dtype="bfloat16", mem_fraction_static=0.05,
                         lora_paths=specs, max_loras_per_batch=2, cuda_graph_max_tokens=64)
    vocab = read_vocab(model)
    ps = prompts(12, vocab, seed=5, lo=3, hi=300)
    loras = [None, "a0", "a1"] * 4

    async def go() -> None:
        await engine.start()
        try:
            reqs = [await engine.submit(p, greedy(8), name) for p, name in zip(ps, loras)]
            await asyncio.gather(*(collect(engine, r) for r in reqs))
        finally:
            await engine.stop()

    with CompileLog() as log:
        asyncio.run(go())
    assert not log.compiles, "\n".join(f"{name}: {key}" for name, key in log.compiles)
