"""StagingRing: a step's integer inputs reach the device in one copy, as separate tensors of the
right dtype and shape, and a later step's writes never show through an earlier step's views."""

import numpy as np
import pytest
import torch

from runtime.staging import StagingRing

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_fields_arrive_with_their_dtype_and_shape(device: str) -> None:
    ring = StagingRing(torch.device(device), depth=2, capacity=64)
    table = np.arange(12, dtype=np.int32).reshape(3, 4)
    out = ring.stage([
        ([5, -1, 7], np.int64), (table, np.int32), ([], np.int64), ([2**40], np.int64),
        ([-3, 4, 9], np.int32),
    ])
    assert ring.copies == 1
    assert [t.dtype for t in out] == [torch.int64, torch.int32, torch.int64, torch.int64,
                                      torch.int32]
    assert [tuple(t.shape) for t in out] == [(3,), (3, 4), (0,), (1,), (3,)]
    assert out[0].tolist() == [5, -1, 7]
    assert out[1].tolist() == table.tolist()
    assert out[3].tolist() == [2**40]
    assert out[4].tolist() == [-3, 4, 9]
    assert all(t.device.type == device for t in out)
    assert all(t.data_ptr() % 16 == 0 for t in out)  # kernels' pointers stay 16-byte aligned


def test_torch_calls_do_not_grow_with_fields() -> None:
    """Views come from one split a dtype: a step with 13 fields makes as few torch calls as
    one with 3 (each call releases the GIL that the serving loop must then get back)."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    ring = StagingRing(torch.device("cpu"), depth=2, capacity=1 << 12)
    counts = []
    for n in (3, 13):
        fields = [([i, i + 1], np.int64 if i % 2 else np.int32) for i in range(n)]
        Count.calls = 0
        with Count():
            out = ring.stage(fields)
        counts.append(Count.calls)
        assert [t.tolist() for t in out] == [[i, i + 1] for i in range(n)]
    assert counts[1] == counts[0] <= 12, counts


@pytest.mark.parametrize("device", DEVICES)
def test_views_survive_later_steps_within_depth(device: str) -> None:
    """Step k's views hold their values while steps k+1 .. k+depth-1 are staged, including one
    that grows its slot's buffers."""
    depth = 3
    ring = StagingRing(torch.device(device), depth=depth, capacity=16)
    views = [ring.stage([([k] * 3, np.int64)])[0] for k in range(depth - 1)]
    big = ring.stage([(list(range(1000)), np.int32)])[0]  # grows the third slot
    views.append(big)
    assert [v.tolist() for v in views[:-1]] == [[k] * 3 for k in range(depth - 1)]
    assert big.tolist() == list(range(1000))
    again = ring.stage([([99, 98], np.int64)])[0]  # reuses the first slot
    assert again.tolist() == [99, 98]
    assert views[1].tolist() == [1, 1, 1]
    assert ring.copies == depth + 1


@pytest.mark.parametrize("device", DEVICES)
def test_slots_grown_in_inference_mode_stay_writable(device: str) -> None:
    """A slot that grows inside inference mode (the start-up warm-up's big steps) is still
    written by steps staged outside it, as the serving loop stages them."""
    ring = StagingRing(torch.device(device), depth=2, capacity=64)
    with torch.inference_mode():
        ring.stage([(np.arange(1000), np.int64)])
        ring.stage([(np.arange(1000), np.int64)])
    for _ in range(2):
        (ids,) = ring.stage([(np.arange(900), np.int64)])
        assert ids.tolist() == list(range(900)) and not ids.is_inference()


def test_views_do_not_alias_the_host_buffer() -> None:
    """On CPU the views are a copy: rewriting the host slot (a step depth later) must not change
    what an earlier step still reads before then."""
    ring = StagingRing(torch.device("cpu"), depth=2, capacity=64)
    first = ring.stage([([1, 2, 3], np.int64)])[0]
    ring._host[0].fill_(0)  # what a later step's numpy writes into slot 0 would do
    assert first.tolist() == [1, 2, 3]


def test_engine_sends_one_copy_a_step(tmp_path) -> None:
    """A served batch of base and adapter rows, one scoring its prompt: every step's inputs,
    the LoRA tables and the prompt-scoring rows included, reach the device in one copy."""
    import asyncio

    from runtime.config import LoraPathSpec
    from tests.engine_utils import collect, greedy, make_engine
    from tests.models import make_adapter, make_model

    model = make_model(tmp_path / "m", "llama")
    paths = [make_adapter(model, tmp_path / f"a{i}", seed=i) for i in range(2)]
    engine = make_engine(model, lora_paths=tuple(
        LoraPathSpec(f"a{i}", str(p)) for i, p in enumerate(paths)), max_loras_per_batch=2)

    async def go() -> None:
        await engine.start()
        try:
            reqs = [await engine.submit(list(range(5, 5 + n)), greedy(4), name,
                                        return_logprob=name == "a1")
                    for n, name in [(9, None), (12, "a0"), (7, "a1")]]
            await asyncio.gather(*(collect(engine, r) for r in reqs))
        finally:
            await engine.stop()

    asyncio.run(go())
    assert engine.timings.steps >= 4
    assert engine.runner.staging.copies == engine.timings.steps


@pytest.mark.parametrize("device", DEVICES)
def test_uncopied_fields_are_views_of_the_host_slot(device: str) -> None:
    """copy=False (zero-copy decode steps): no copy; the views are of the slot's host buffer
    (pinned on CUDA, for a kernel that reads mapped host memory), with the same dtypes, shapes
    and alignment; last_slot names the slot for record_use, and the ring moves on as before."""
    ring = StagingRing(torch.device(device), depth=2, capacity=64)
    table = np.arange(6, dtype=np.int32).reshape(2, 3)
    ids, tab = ring.stage([([5, -1], np.int64), (table, np.int32)], copy=False)
    assert ring.copies == 0 and ring.last_slot == 0
    assert ids.device.type == "cpu" and ids.tolist() == [5, -1] and tab.tolist() == table.tolist()
    assert ids.is_pinned() == (device == "cuda")
    assert ids.data_ptr() % 16 == 0 and tab.data_ptr() % 16 == 0
    ring.record_use(ring.last_slot)
    (dev,) = ring.stage([([1, 2], np.int64)])
    assert ring.copies == 1 and ring.last_slot == 1 and dev.device.type == device
    assert ids.tolist() == [5, -1]  # the other slot: the earlier step's rows are intact
