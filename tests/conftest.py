"""Shared test setup: the GPU marker, the Triton interpreter on CPU, tiny model factories."""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton kernels run under the interpreter on CPU tensors; must be set before triton.jit.
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs CUDA (runs on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def release_device_memory(request: pytest.FixtureRequest):
    """After each GPU test, free what it left on the device. A failed test's engine stays
    referenced from the traceback pytest keeps for post-mortem debugging (sys.last_value and
    friends), and with it the KV cache the next test's engine sizes its own by
    (mem_fraction_static less what is allocated): one failure would fail the tests after it
    with "no room for a single KV block"."""
    yield
    on_cuda = os.environ.get("LORASERVE_TEST_DEVICE") == "cuda"  # CPU tests run on the GPU
    if not HAS_CUDA or (request.node.get_closest_marker("gpu") is None and not on_cuda):
        return
    import gc
    import sys

    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """A tiny random Llama and a LoRA adapter of it, (model folder, adapter folder), one pair
    a test module (a module may define its own `tiny`)."""
    from tests._fake_engine import build_tiny_adapter
    from tests.models import make_model

    root = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    model = make_model(root / "model")
    return model, build_tiny_adapter(model, root / "adapter")


@pytest.fixture
def make_client(aiohttp_client, tiny):
    """`await make_client(**overrides)`: a test client of the app over a real engine (or
    `engine_cls`) on `tiny`, with tests/served.py's settings and the overrides."""
    from api import create_app
    from metrics import ServingMetrics
    from runtime.engine import Engine
    from tests.served import server_config

    async def make(engine_cls=Engine, **overrides):
        config = server_config(tiny, **overrides)
        metrics = ServingMetrics()
        engine = engine_cls.from_config(config, metrics)
        return await aiohttp_client(create_app(engine, config, metrics))
    return make


@pytest.fixture
async def client(make_client):
    """A test client over the real engine with the default settings (make_client)."""
    return await make_client()


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Triton kernels where ops.dispatch would take torch's path on the CPU (the interpreter)."""
    import ops.dispatch

    monkeypatch.setattr(ops.dispatch, "TRITON_ON_CPU", True)
