"""Results written into host memory by a kernel (ops/triton_host_write.py, the result ring in
runtime/staging.py; the default, LORASERVE_READBACK_KERNEL=0 copies): the kernel writes what a
copy writes for every result dtype; the ring's views hold a step's results until its depth of
later steps; the overlapped loop's tokens, log-probs and top candidates are those of copies.
On the CPU the kernel runs under the Triton interpreter; on CUDA it writes pinned host
memory."""

from __future__ import annotations

import pytest
import torch

from ops.triton_host_write import write_to_host
from runtime.staging import ALIGN, ResultRing
from tests.engine_utils import make_engine, run
from tests.models import make_model
from tests.test_overlap import (
    assert_same_scores,
    run_scored,
    scored_case,
    scored_with_copies_on_compute,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PIN = DEVICE.type == "cuda"


@pytest.mark.parametrize(("shape", "dtype"), [((32,), torch.int64), ((5,), torch.float32),
                                              ((7, 3), torch.int64), ((3,), torch.uint8),
                                              ((2, 1500), torch.float32), ((1,), torch.bool)])
def test_kernel_writes_what_a_copy_writes(shape, dtype) -> None:
    """Every result dtype, sizes under and over the kernel's block, and sizes that do not
    divide into 32-bit words; the host buffer's bytes past the result are left alone."""
    gen = torch.Generator().manual_seed(sum(shape))
    src = (torch.randint(0, 2**20, shape, generator=gen) if dtype != torch.float32
           else torch.randn(shape, generator=gen)).to(dtype)
    host = torch.full((src.numel() + 8,), 7, dtype=dtype, pin_memory=PIN)
    if dtype == torch.bool:
        host.fill_(False)
    write_to_host(src.to(DEVICE), host[: src.numel()].view(shape))
    if PIN:
        torch.cuda.synchronize()
    assert torch.equal(host[: src.numel()].view(shape), src)
    assert (host[src.numel():] == (False if dtype == torch.bool else 7)).all()


def test_kernel_refuses_what_it_cannot_write() -> None:
    src = torch.arange(6, device=DEVICE)
    with pytest.raises(ValueError, match="does not match"):
        write_to_host(src, torch.empty(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="does not match"):
        write_to_host(src, torch.empty(6, dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous"):
        write_to_host(src.view(2, 3).t(), torch.empty(3, 2, dtype=torch.int64))


def test_ring_views_hold_until_depth_later_takes() -> None:
    """Each take carves ALIGN-aligned views of one slot; a slot comes round again after
    `depth` takes, grown when a step's results outgrow it; the views of the other slots keep
    what was written into them."""
    ring = ResultRing(torch.device("cpu"), depth=3, capacity=64)
    like = [torch.zeros(5, dtype=torch.int64), torch.zeros(3, dtype=torch.float32),
            torch.zeros(2, 2, dtype=torch.int64)]
    taken = []
    for i in range(3):
        slot, views = ring.take(like)
        assert slot == i and [v.shape for v in views] == [t.shape for t in like]
        assert [v.dtype for v in views] == [t.dtype for t in like]
        assert all(v.data_ptr() % ALIGN == 0 for v in views)
        for v in views:
            v.fill_(i + 1)
        taken.append(views)
    for i, views in enumerate(taken):  # nothing overwrote another's values
        assert all((v == i + 1).all() for v in views)
    slot, big = ring.take([torch.zeros(100, dtype=torch.int64)])  # slot 0 again, grown
    assert slot == 0 and big[0].numel() == 100
    assert all((v == 2).all() for v in taken[1]) and all((v == 3).all() for v in taken[2])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("llama"), "llama", layers=3)


def test_loop_with_results_written_by_kernel(llama, monkeypatch) -> None:
    """The overlapped loop (CPU: results copied into the ring's slots) gives what one step at a
    time with copies gives: tokens, log-probs and top candidates; no step copies through
    _to_host. The kernel readback is the default."""
    ps, params = scored_case(llama)
    with monkeypatch.context() as m:
        m.setenv("LORASERVE_READBACK_KERNEL", "0")
        ref_engine = make_engine(llama, disable_overlap_schedule=True)
        assert ref_engine.runner.results is None
        ref = run(run_scored(ref_engine, ps, params))
    monkeypatch.delenv("LORASERVE_READBACK_KERNEL", raising=False)
    engine = make_engine(llama)
    monkeypatch.setattr(engine.runner, "_to_host", lambda t: pytest.fail("copied"))
    written = []
    write_back = engine.runner._write_back
    monkeypatch.setattr(engine.runner, "_write_back",
                        lambda dev, step: written.append(1) or write_back(dev, step))
    assert run(run_scored(engine, ps, params)) == ref
    assert engine.num_overlapped_steps > 5 and len(written) > 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
def test_results_written_by_kernel_on_cuda(llama, monkeypatch) -> None:
    """On the device, by default: the overlapped loop's tokens, log-probs and top candidates
    are those of copies on the compute stream, the kernel writing pinned host memory on the
    compute stream."""
    ps, params = scored_case(llama)
    cfg = {"device": "cuda", "mem_fraction_static": 0.05}
    ref = scored_with_copies_on_compute(llama, ps, params, cfg, monkeypatch)
    monkeypatch.delenv("LORASERVE_READBACK_KERNEL", raising=False)
    engine = make_engine(llama, **cfg)
    runner = engine.runner
    monkeypatch.setattr(runner, "_to_host", lambda t: pytest.fail("copied"))
    streams = []
    write_back = runner._write_back
    monkeypatch.setattr(runner, "_write_back", lambda dev, step: streams.append(
        torch.cuda.current_stream()) or write_back(dev, step))
    assert_same_scores(run(run_scored(engine, ps, params)), ref)
    assert engine.num_overlapped_steps > 5
    assert streams and all(s == runner.streams.compute for s in streams)
    assert all(h.is_pinned() for h in runner.results._host)


def test_kernel_readback_is_refused_with_tensor_parallelism(monkeypatch) -> None:
    """A single-GPU runner writes its results by kernel by default; a tensor-parallel one
    copies them, and refuses an explicit LORASERVE_READBACK_KERNEL=1 naming it."""
    from runtime import tp
    from runtime.runner import ModelRunner

    monkeypatch.delenv("LORASERVE_READBACK_KERNEL", raising=False)
    assert ModelRunner(None, None, 16, None, torch.device("cpu")).results is not None
    tp_runner = tp.TPModelRunner(None, None, 16, None, torch.device("cpu"), driver=None)
    assert tp_runner.results is None
    monkeypatch.setenv("LORASERVE_READBACK_KERNEL", "1")
    with pytest.raises(ValueError, match="LORASERVE_READBACK_KERNEL"):
        tp.TPModelRunner(None, None, 16, None, torch.device("cpu"), driver=None)
