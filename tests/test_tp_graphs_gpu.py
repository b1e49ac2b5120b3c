"""The tensor-parallel engine's decode graphs on one GPU (device only): a TPEngine over an NCCL
group of one rank captures its decode forwards with the collectives inside (all-reduces of the
embedding, o_proj, down_proj and the row-parallel LoRA intermediates; the all-gather of the
logits) and replays them. fp32 greedy tokens of a base batch and of a mixed batch of three
adapters must equal the single-GPU engine's eager ones. tests/test_tp_gpu.py runs the same
over two ranks, where the ranks' captured collectives must also pair."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist

from runtime.config import LoraPathSpec, ServerConfig
from runtime.engine import Engine
from tests.engine_utils import collect, greedy, run
from tests.models import TP_TARGETS, prompts, read_vocab, tp_model_with_adapters

os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                   "NVSHMEM_DISABLE_NVLS": "1"})

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

NEW_TOKENS = 12
TARGETS = TP_TARGETS


@pytest.fixture(autouse=True)
def free_gpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("LORASERVE_TP_CUDA_GRAPHS", "1")  # opt-in (runtime.tp.TP_GRAPHS_ENV)
    yield
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tp_graphs")
    folder, adapters = tp_model_with_adapters(root, 128, 256, (8, 4, 2))
    # seven prompts: the decode buckets pad a row
    return {"folder": folder, "adapters": adapters,
            "prompts": prompts(7, read_vocab(folder), seed=5, lo=5, hi=60)}


def config(setup: dict[str, Any], **kw: Any) -> ServerConfig:
    cfg: dict[str, Any] = {
        "model_path": str(setup["folder"]), "device": "cuda", "dtype": "float32",
        "mem_fraction_static": 0.05, "page_size": 16, "max_lora_rank": 8,
        "lora_target_modules": TARGETS, "max_loras_per_batch": 3, "enable_lora": True,
        "lora_paths": tuple(LoraPathSpec(n, str(p)) for n, p in setup["adapters"].items()),
        "cuda_graph_max_bs": 8, "skip_server_warmup": True,
    }
    return ServerConfig(**(cfg | kw))


async def serve(engine: Engine, setup: dict[str, Any]) -> dict[str, list[list[int]]]:
    names = [None, *setup["adapters"]]
    mixed = [names[i % len(names)] for i in range(len(setup["prompts"]))]
    await engine.start()
    try:
        out = {}
        for label, loras in (("base", [None] * len(setup["prompts"])), ("mixed", mixed)):
            reqs = [await engine.submit(p, greedy(NEW_TOKENS), lo)
                    for p, lo in zip(setup["prompts"], loras)]
            out[label] = [await collect(engine, r) for r in reqs]
        return out
    finally:
        await engine.stop()


def tp_served(setup: dict[str, Any]) -> tuple[dict[str, list[list[int]]], int]:
    """(tokens, decode graph replays) of a TPEngine over a one-rank NCCL group."""
    from runtime.tp import TPEngine

    engine = TPEngine.launch(config(setup, tp_size=1))
    try:
        assert engine.runner.graphs is not None
        out = run(serve(engine, setup))
        return out, engine.runner.graphs.num_replays
    finally:
        del engine
        if dist.is_initialized():
            dist.destroy_process_group()


def test_one_rank_group_replays_graphs_with_collectives_inside(setup: dict[str, Any]) -> None:
    want = run(serve(Engine.from_config(config(setup, disable_cuda_graph=True)), setup))
    assert want["base"] != want["mixed"]  # the adapters change the output
    got, replays = tp_served(setup)
    assert replays >= NEW_TOKENS  # decode steps of both batches went through the graphs
    assert got == want
