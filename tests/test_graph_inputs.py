"""The decode graph's input kernel (ops/triton_graph_inputs.py) and the zero-copy decode steps
that use it (the default; LORASERVE_DECODE_ZERO_COPY=0 stages and copies): the static buffers
it writes are the ones the copies and padding fills write, and the serving loop's greedy tokens
do not change. On the CPU
the kernel runs under the Triton interpreter and a decode "graph" is the model run over the
static buffers; on CUDA the kernel reads the staged rows from pinned host memory."""

from __future__ import annotations

import itertools

import pytest
import torch

from runtime.graphs import DecodeGraphs, GraphBuffers
from runtime.model.batch import ForwardBatch
from tests.engine_utils import greedy, make_engine, run, run_batch
from tests.models import make_model, prompts, read_vocab

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MAX_BS, MAX_BLOCKS, SCRATCH_BLOCK, PAGE = 8, 6, 5, 4


def bare_graphs(max_blocks: int = MAX_BLOCKS) -> DecodeGraphs:
    """A DecodeGraphs' static buffers and padding values, without a model or captures."""
    g = object.__new__(DecodeGraphs)
    g.buf = GraphBuffers.allocate(MAX_BS, max_blocks, DEVICE)
    for name in ("input_ids", "positions", "slot_mapping", "kv_lens", "block_tables"):
        getattr(g.buf, name).fill_(77)  # stale values from an earlier step
    g.scratch_block, g.scratch_slot = SCRATCH_BLOCK, SCRATCH_BLOCK * PAGE
    return g


def staged_rows(batch: int, width: int, device: torch.device, pin: bool = False) -> dict:
    gen = torch.Generator().manual_seed(batch * 10 + width)
    rows = {
        "input_ids": torch.randint(0, 300, (batch,), generator=gen),
        "positions": torch.randint(0, 50, (batch,), generator=gen),
        "slot_mapping": torch.randint(0, 80, (batch,), generator=gen),
        "kv_lens": torch.randint(1, 50, (batch,), generator=gen).int(),
        "block_tables": torch.randint(0, 20, (batch, width), generator=gen).int(),
    }
    if pin:
        return {k: v.pin_memory() for k, v in rows.items()}
    return {k: v.to(device) for k, v in rows.items()}


def fb_of(rows: dict, **kw) -> ForwardBatch:
    n = rows["input_ids"].shape[0]
    return ForwardBatch(**rows, cu_q_lens=torch.arange(n + 1), logits_indices=torch.arange(n),
                        max_q_len=1, is_decode=True, **kw)


@pytest.mark.parametrize(("batch", "bucket", "width", "max_blocks"),
                         [(3, 4, 3, MAX_BLOCKS), (4, 4, 6, MAX_BLOCKS), (1, 8, 1, MAX_BLOCKS),
                          (8, 8, 2, MAX_BLOCKS), (3, 4, 300, 300)])
def test_input_kernel_writes_what_the_copies_and_fills_write(batch: int, bucket: int,
                                                             width: int, max_blocks: int) -> None:
    """Rows under the batch: the staged rows, a pending row's token from the step in flight;
    rows up to the bucket: the padding; rows past it: untouched. Against the copy path fed the
    same rows with the pending tokens already filled in. Tables wider than the kernel's tile
    (300 blocks) take its loop over the rest of the row."""
    rows = staged_rows(batch, width, DEVICE, pin=DEVICE.type == "cuda")
    prev = torch.arange(100, 100 + MAX_BS, device=DEVICE)  # the step in flight's tokens
    pending = torch.full((batch,), -1, dtype=torch.int64)
    pending[::2] = torch.arange(batch - 1, -1, -1)[::2]  # every other row, rows reversed
    filled = {k: v.to(DEVICE).clone() for k, v in rows.items()}
    rows["input_ids"][pending >= 0] = -1  # the placeholder the host stages
    filled["input_ids"][(pending >= 0).to(DEVICE)] = prev[pending[pending >= 0].to(DEVICE)]

    expected = bare_graphs(max_blocks)
    expected._write_inputs(fb_of(filled), bucket)
    got = bare_graphs(max_blocks)
    got._write_inputs(fb_of(rows, host_staged=True, pending_src=pending.pin_memory()
                            if DEVICE.type == "cuda" else pending, pending_tokens=prev), bucket)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    for name in ("input_ids", "positions", "slot_mapping", "kv_lens", "block_tables"):
        assert torch.equal(getattr(got.buf, name), getattr(expected.buf, name)), name
    assert (got.buf.input_ids[bucket:] == 77).all()  # another bucket's rows
    assert (got.buf.block_tables[batch:bucket] == SCRATCH_BLOCK).all()


def test_input_kernel_rejects_what_it_cannot_write() -> None:
    from ops.triton_graph_inputs import write_graph_inputs

    g = bare_graphs()
    dst = {k: getattr(g.buf, k) for k in ("input_ids", "positions", "slot_mapping", "kv_lens",
                                           "block_tables")}
    rows = staged_rows(4, 3, DEVICE)
    none = torch.full((4,), -1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="bucket"):
        write_graph_inputs(dst, rows, none, None, 2, 0, 0)
    with pytest.raises(ValueError, match="width"):
        write_graph_inputs(dst, staged_rows(4, MAX_BLOCKS + 1, DEVICE), none, None, 4, 0, 0)
    with pytest.raises(ValueError, match="kv_lens"):
        write_graph_inputs(dst, {**rows, "kv_lens": rows["kv_lens"].long()}, none, None, 4, 0, 0)


class ModelGraph:
    """Stands in for a captured decode graph on the CPU: a replay runs the model over the
    bucket's static rows into the logits buffer the real capture would return."""

    def __init__(self, graphs: DecodeGraphs, bs: int) -> None:
        self.graphs, self.bs = graphs, bs
        self.logits = torch.empty(0)

    def replay(self) -> None:
        g = self.graphs
        out = g.model(g.buf.view(self.bs, None), g.kv_k, g.kv_v)
        self.logits.resize_(out.shape).copy_(out)


def with_model_graphs(engine, max_bs: int) -> DecodeGraphs:
    """Decode "graphs" (ModelGraph) on a CPU engine's runner, as enable_cuda_graphs sets them
    up."""
    runner = engine.runner
    scratch = runner._ensure_scratch(engine.block_manager)
    graphs = DecodeGraphs(runner.model, runner.kv.k, runner.kv.v, max_bs, 32, scratch,
                          runner.block_size, runner.lora_backend)
    for bs in graphs.sizes:
        fake = ModelGraph(graphs, bs)
        graphs.graphs[(bs, False)] = (fake, fake.logits)
    runner.graphs = graphs
    return graphs


@pytest.mark.skipif(DEVICE.type == "cuda", reason="CPU stand-ins for the graphs")
def test_zero_copy_steps_keep_greedy_tokens(tmp_path, monkeypatch) -> None:
    """The overlapped serving loop with zero-copy decode steps (rows left in the staging ring's
    host buffer, pending tokens filled by the input kernel from the step in flight) gives the
    eager engine's greedy tokens, across batch sizes that pad to their bucket and that fill it
    (requests of different lengths finish at different steps)."""
    model = make_model(tmp_path / "m")
    ps = prompts(9, read_vocab(model), seed=5, lo=3, hi=20)
    params = [greedy(n) for n in (3, 9, 5, 12, 7, 12, 2, 10, 12)]
    eager = run(run_batch(make_engine(model, max_running_requests=9), ps, params))

    monkeypatch.setenv("LORASERVE_DECODE_ZERO_COPY", "1")
    engine = make_engine(model, max_running_requests=9)
    assert engine.runner.zero_copy
    graphs = with_model_graphs(engine, 16)
    staged = []
    host_staged = engine.runner._host_staged

    def counted(*args, **kw):
        fb = host_staged(*args, **kw)
        staged.append((fb.batch_size, fb.pending_tokens is not None))
        return fb

    monkeypatch.setattr(engine.runner, "_host_staged", counted)
    assert run(run_batch(engine, ps, params)) == eager
    assert graphs.num_replays == len(staged) > 5
    assert any(pending for _, pending in staged)  # the loop overlapped those steps
    assert {bs for bs, _ in staged} >= {9, 8}  # bucket 16 padded; smaller batches too


@pytest.mark.skipif(DEVICE.type == "cuda", reason="CPU stand-ins for the graphs")
def test_graph_copies_replay_in_turn(tmp_path, monkeypatch) -> None:
    """LORASERVE_DECODE_GRAPH_COPIES=2: a bucket's two captures replay in turn, never one twice
    in a row, and the loop's greedy tokens are the eager engine's; the setting is checked."""
    model = make_model(tmp_path / "m")
    ps = prompts(4, read_vocab(model), seed=2, lo=3, hi=12)
    params = [greedy(n) for n in (6, 9, 4, 9)]
    eager = run(run_batch(make_engine(model, max_running_requests=4), ps, params))
    monkeypatch.setenv("LORASERVE_DECODE_GRAPH_COPIES", "2")
    engine = make_engine(model, max_running_requests=4)
    graphs = with_model_graphs(engine, 4)
    assert graphs.copies == 2
    order = []
    for bs in graphs.sizes:
        for graph, name in ((graphs.graphs[(bs, False)][0], "a"), (ModelGraph(graphs, bs), "b")):
            replay = graph.replay
            graph.replay = lambda replay=replay, name=name, bs=bs: (order.append((bs, name)),
                                                                   replay())
            if name == "b":
                graphs.spares[(bs, False)] = [(graph, graph.logits)]
    assert run(run_batch(engine, ps, params)) == eager
    assert len(order) == graphs.num_replays > 5
    for bs in graphs.sizes:
        names = [n for b, n in order if b == bs]
        assert all(x != y for x, y in itertools.pairwise(names)), (bs, names)
    assert {n for _, n in order} == {"a", "b"}
    from runtime import tp

    with pytest.raises(ValueError, match="LORASERVE_DECODE_GRAPH_COPIES"):
        tp.TPModelRunner(None, None, 16, None, torch.device("cpu"), driver=None)
    monkeypatch.setenv("LORASERVE_DECODE_GRAPH_COPIES", "0")
    with pytest.raises(ValueError, match="LORASERVE_DECODE_GRAPH_COPIES"):
        with_model_graphs(make_engine(model, max_running_requests=4), 4)


def test_a_zero_copy_step_never_runs_eagerly(tmp_path) -> None:
    """A step whose rows are in host memory that the decode graphs cannot run is an error, not
    an eager forward over host tensors."""
    from runtime.scheduler import ScheduledBatch

    engine = make_engine(make_model(tmp_path / "m"), max_running_requests=4)
    graphs = with_model_graphs(engine, 8)
    graphs.max_bs = 1  # a batch of 2 no longer fits
    fb = fb_of(staged_rows(2, 3, torch.device("cpu")), host_staged=True,
               pending_src=torch.full((2,), -1))
    with pytest.raises(RuntimeError, match="zero-copy"):
        engine.runner.launch(ScheduledBatch([], []), fb)


def test_zero_copy_is_refused_with_tensor_parallelism(monkeypatch) -> None:
    """LORASERVE_DECODE_ZERO_COPY=1 with tp_size > 1 is an error naming the setting (rank 0
    broadcasts each step's plan from its device tensors); by default a tensor-parallel runner
    stages and copies (and reads its results back on the compute stream), while a single-GPU
    one takes zero-copy steps."""
    from runtime import tp
    from runtime.runner import ModelRunner

    monkeypatch.delenv("LORASERVE_DECODE_ZERO_COPY", raising=False)
    assert ModelRunner(None, None, 16, None, torch.device("cpu")).zero_copy
    tp_runner = tp.TPModelRunner(None, None, 16, None, torch.device("cpu"), driver=None)
    assert not tp_runner.zero_copy and not tp_runner.readback
    monkeypatch.setenv("LORASERVE_DECODE_ZERO_COPY", "1")
    with pytest.raises(ValueError, match="LORASERVE_DECODE_ZERO_COPY"):
        tp.TPModelRunner(None, None, 16, None, torch.device("cpu"), driver=None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
def test_zero_copy_steps_keep_greedy_tokens_on_cuda(tmp_path, monkeypatch) -> None:
    """On the device, with captured decode graphs: zero-copy decode steps (the input kernel
    reading pinned host rows, PDL-free, before the graph) give the eager engine's fp32 greedy
    tokens in the overlapped loop, over batches that pad to their bucket and that fill it."""
    model = make_model(tmp_path / "m")
    ps = prompts(9, read_vocab(model), seed=5, lo=3, hi=20)
    params = [greedy(n) for n in (3, 9, 5, 12, 7, 12, 2, 10, 12)]
    cfg = {"device": "cuda", "mem_fraction_static": 0.05, "max_running_requests": 9}
    eager = run(run_batch(make_engine(model, disable_cuda_graph=True, **cfg), ps, params))
    monkeypatch.setenv("LORASERVE_DECODE_ZERO_COPY", "1")
    engine = make_engine(model, cuda_graph_max_bs=16, **cfg)
    staged = []
    host_staged = engine.runner._host_staged
    monkeypatch.setattr(engine.runner, "_host_staged",
                        lambda *a, **k: staged.append(1) or host_staged(*a, **k))
    assert run(run_batch(engine, ps, params)) == eager
    assert engine.runner.graphs.num_replays >= len(staged) > 5
