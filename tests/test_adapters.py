"""Adapter tiers: loading, GPU slot eviction, pins, locks, host tier, unload, paths.

Runs on CPU with fake events, so an upload can be held "in flight" and the copy stream's waits
on last-use events can be observed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.adapters.manager import AdapterManager, Residency, resolve_pool_spec
from runtime.adapters.paths import resolve_adapter_path, resolve_on_demand
from runtime.adapters.peft_format import AdapterError
from runtime.adapters.pool import LoraModelShape
from runtime.config import LoraPathSpec, ServerConfig
from runtime.streams import Event, IssuedEvent, Streams

CPU = torch.device("cpu")
SHAPE = LoraModelShape(
    num_layers=2, hidden_size=64, intermediate_size=128, q_size=64, kv_size=32, vocab_size=256
)
DIMS = {"q_proj": (64, 64), "v_proj": (64, 32), "gate_proj": (64, 128)}


class FakeEvent(Event):
    """An event whose completion the test controls; records the waits issued on it."""

    def __init__(self, is_done: bool) -> None:
        super().__init__(CPU)
        self.is_done = is_done
        self.num_waits = 0

    def query(self) -> bool:
        return self.is_done

    def wait(self, stream: Any = None) -> None:
        self.num_waits += 1


class FakeStreams(Streams):
    def __init__(self) -> None:
        super().__init__(CPU)
        self.auto_done = True
        self.events: list[FakeEvent] = []

    def event(self) -> FakeEvent:
        ev = FakeEvent(self.auto_done)
        self.events.append(ev)
        return ev


def write_adapter(
    folder: Path, seed: int, r: int = 2, modules: tuple[str, ...] = ("q_proj", "v_proj")
) -> dict[str, torch.Tensor]:
    """A hand-made PEFT folder; returns its tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": list(modules),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(SHAPE.num_layers):
        for m in modules:
            parent = "mlp" if m == "gate_proj" else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{m}"
            in_f, out_f = DIMS[m]
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, in_f, generator=g)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, r, generator=g)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return tensors


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for i, name in enumerate("abcde"):
        out[name] = tmp_path / "root" / name
        write_adapter(out[name], seed=i)
    out["big_rank"] = tmp_path / "root" / "big_rank"
    write_adapter(out["big_rank"], seed=9, r=8)
    out["gate"] = tmp_path / "root" / "gate"
    write_adapter(out["gate"], seed=10, modules=("q_proj", "gate_proj"))
    return out


def make_manager(
    streams: Streams | None = None, stacked: tuple[str, ...] = (), **kw: Any
) -> AdapterManager:
    base: dict[str, Any] = {
        "device": "cpu",
        "enable_lora": True,
        "max_lora_rank": 4,
        "lora_target_modules": ("q_proj", "v_proj"),
        "max_loras_per_batch": 2,
    }
    config = ServerConfig(**{**base, **kw})
    return AdapterManager(config, SHAPE, CPU, torch.float32, streams or FakeStreams(),
                          stacked=stacked)


def slot_q_a(manager: AdapterManager, slot: int, layer: int = 0) -> torch.Tensor:
    """Slot `slot`'s q_proj A rows [R, hidden]."""
    return manager.pool.layers[layer]["qkv"].A[slot, : manager.pool.max_rank]


def q_a(folder: Path) -> torch.Tensor:
    """Layer 0's q_proj A [r, hidden] as saved in `folder`."""
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    return tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]


async def resident(manager: AdapterManager, name: str, batch: set[int] | None = None) -> int:
    slot = manager.admit(name, batch or set(), overlap=False)
    assert slot is not None
    manager.poll()
    assert manager.state(name) is Residency.RESIDENT
    return slot


def assert_host_tally(m: AdapterManager) -> None:
    """The host tier's running tally matches its copies counted afresh."""
    held = [a.host for a in m._adapters.values() if a.host is not None]
    assert m._host_usage() == (len(held), sum(h.nbytes for h in held))


async def wait_state(manager: AdapterManager, name: str, state: Residency) -> None:
    for _ in range(500):
        if manager.state(name) is state:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} never reached {state}, is {manager.state(name)}")


# registration --------------------------------------------------------------------------------


async def test_load_upload_and_residency_states(folders: dict[str, Path]) -> None:
    streams = FakeStreams()
    streams.auto_done = False
    m = make_manager(streams)
    await m.load("a", str(folders["a"]))
    assert m.state("a") is Residency.IN_HOST
    assert [(i.name, i.tier, i.rank, i.target_modules) for i in m.list()] == [
        ("a", "host", 2, ("q_proj", "v_proj"))
    ]
    m.acquire("a")  # prefetch: a free slot can be had, so the upload starts now
    assert m.state("a") is Residency.UPLOADING
    slot = m.slot_of("a")
    assert slot is not None
    assert m.admit("a", set(), overlap=True) is None  # overlap on: wait for the upload
    assert m.admit("a", set(), overlap=False) == slot  # overlap off: queued upload is enough
    ready = m.ready_event(slot)  # issued by that admission, which waited for no poll
    assert isinstance(ready, IssuedEvent) and ready.issued and ready.event is streams.events[-1]
    m.poll()
    assert m.state("a") is Residency.UPLOADING
    streams.events[-1].is_done = True
    m.poll()
    assert m.state("a") is Residency.RESIDENT and m.ready_event(slot) is None
    assert m.admit("a", set(), overlap=True) == slot
    assert m.list()[0].tier == "gpu" and m.list()[0].refs == 1
    # a read and an upload build none of the host copy's per-group views
    assert "_views" not in m._adapters["a"].host.__dict__
    assert m.counters.loads == {"host": 1, "gpu": 1}
    # issuing the one upload's copies took host time, counted once
    assert 0 < m.counters.upload_enqueue_max_s == m.counters.upload_enqueue_s
    parts = m.counters.upload_enqueue_parts_s
    assert parts == m.counters.upload_enqueue_max_parts_s and parts["copies"] > 0
    assert sum(parts.values()) == pytest.approx(m.counters.upload_enqueue_s)
    assert m.counters.requests_by_residency == {"gpu": 0, "host": 1, "disk": 0}
    assert {t for t, _ in m.drain_latencies()} == {"host", "gpu"} and not m.drain_latencies()
    assert int(m.pool.slot_ranks[slot]) == 2
    m.release("a")


async def test_names_and_duplicates(folders: dict[str, Path]) -> None:
    m = make_manager()
    for bad in ("", "x:y"):
        with pytest.raises(AdapterError, match="lora_name"):
            await m.load(bad, str(folders["a"]))
    await m.load("a", str(folders["a"]))
    with pytest.raises(AdapterError, match="already loaded"):
        await m.load("a", str(folders["b"]))
    with pytest.raises(AdapterError, match="never been loaded"):
        m.acquire("zzz")
    with pytest.raises(AdapterError, match="never been loaded"):
        await m.unload("zzz")


async def test_incompatible_adapters(folders: dict[str, Path]) -> None:
    m = make_manager()
    with pytest.raises(AdapterError, match=r"incompatible.*rank 8.*raise --max-lora-rank"):
        await m.load("x", str(folders["big_rank"]))
    with pytest.raises(AdapterError, match=r"incompatible.*gate_proj.*add them to --lora-target"):
        await m.load("x", str(folders["gate"]))
    assert m.list() == []


async def test_adapter_larger_than_host_budget(folders: dict[str, Path]) -> None:
    m = make_manager(max_lora_host_bytes=1000)
    with pytest.raises(AdapterError, match="max_lora_host_bytes"):
        await m.load("a", str(folders["a"]))
    assert m.list() == []


# GPU slots -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "victim"), [("lru", "b"), ("fifo", "a")])
async def test_eviction_policy_order(folders: dict[str, Path], policy: str, victim: str) -> None:
    m = make_manager(lora_eviction_policy=policy)
    for n in "abc":
        await m.load(n, str(folders[n]))
    await resident(m, "a")
    await resident(m, "b")
    await resident(m, "a")  # a used again: most recent, but first in
    freed = m.slot_of(victim)
    assert await resident(m, "c") == freed
    assert m.state(victim) is Residency.IN_HOST
    assert m.counters.evictions["gpu"] == 1
    torch.testing.assert_close(slot_q_a(m, freed)[:2], q_a(folders["c"]))


async def test_locked_and_batch_slots_are_never_victims(folders: dict[str, Path]) -> None:
    m = make_manager()
    for n in "abc":
        await m.load(n, str(folders[n]))
    sa, sb = await resident(m, "a"), await resident(m, "b")
    m.lock([sa])  # a's batch is in flight; a is least recently used
    assert m.admit("c", {sb}, overlap=False) is None  # b is in the batch being built
    assert m.slot_of("a") == sa and m.slot_of("b") == sb
    assert m.admit("c", set(), overlap=False) == sb  # only b may go
    m.poll()
    m.lock([sb])  # both slots locked: nothing can be evicted
    assert m.admit("b", set(), overlap=False) is None
    assert m.state("b") is Residency.IN_HOST and m.slot_of("a") == sa


async def test_queued_requests_lock_nothing(folders: dict[str, Path]) -> None:
    m = make_manager()
    for n in "abc":
        await m.load(n, str(folders[n]))
    sa = await resident(m, "a")
    await resident(m, "b")
    m.acquire("a")  # queued requests: references, no locks
    m.acquire("b")
    m.acquire("c")  # prefetch never evicts an adapter someone references
    assert m.state("c") is Residency.IN_HOST
    # admission may: a is least recently used and only queued
    assert m.admit("c", set(), overlap=False) == sa
    assert m.state("a") is Residency.IN_HOST
    # and unreferenced slots go before referenced ones whatever the policy says
    m.release("b")
    assert m.admit("a", {sa}, overlap=False) == m.slot_of("a") is not None
    assert m.slot_of("b") is None


async def test_copy_waits_for_last_use_of_victim(folders: dict[str, Path]) -> None:
    streams = FakeStreams()
    m = make_manager(streams)
    for n in "abc":
        await m.load(n, str(folders[n]))
    sa = await resident(m, "a")
    await resident(m, "b")
    m.lock([sa])
    last_use = FakeEvent(is_done=False)
    m.record_use([sa], last_use)
    m.unlock([sa])
    await resident(m, "b")  # a is now the LRU victim
    assert m.admit("c", set(), overlap=False) == sa
    assert last_use.num_waits == 1  # the copy stream waited for the batch that read slot a


async def test_pins(folders: dict[str, Path]) -> None:
    m = make_manager(max_loras_per_batch=3)
    await m.load("a", str(folders["a"]), pinned=True)
    await m.load("b", str(folders["b"]), pinned=True)
    assert m.state("a") is Residency.UPLOADING  # pinned adapters upload at once
    with pytest.raises(AdapterError, match="starvation"):
        await m.load("c", str(folders["c"]), pinned=True)
    m.poll()
    pinned_slots = {m.slot_of("a"), m.slot_of("b")}
    for n in "cde":
        await m.load(n, str(folders[n]))
    for n in "cdecde":
        await resident(m, n)
    assert {m.slot_of("a"), m.slot_of("b")} == pinned_slots
    assert m.counters.evictions["gpu"] == 5
    assert [i.pinned for i in m.list()] == [True, True, False, False, False]


async def test_slot_queries_for_the_scheduler(folders: dict[str, Path]) -> None:
    """has_slot_for: a free slot, or one outside the batch to evict; drain_slot: of a batch's
    slots, the one whose rows end soonest, never a pinned adapter's."""
    m = make_manager(max_loras_per_batch=3)
    await m.load("a", str(folders["a"]), pinned=True)
    m.poll()
    assert m.has_slot_for(set())  # two slots free
    for n in "bc":
        await m.load(n, str(folders[n]))
        await resident(m, n)
    sa, sb, sc = (m.slot_of(n) for n in "abc")
    assert m.has_slot_for({sb})  # c's slot may be evicted
    assert not m.has_slot_for({sb, sc})  # a is pinned, b and c in the batch
    assert m.drain_slot({sa: 1, sb: 9, sc: 4}) == sc
    assert m.drain_slot({sa: 1, sb: 3}) == sb
    assert m.drain_slot({sa: 1}) is None


@pytest.mark.parametrize("name", ["LORASERVE_UPLOAD_THREAD", "LORASERVE_UPLOAD_FOREACH"])
def test_removed_upload_settings_are_errors(name: str, monkeypatch) -> None:
    """A removed upload setting, set, stops the adapter manager with a message naming it (it
    would otherwise do nothing, silently); set blank, it is unset."""
    monkeypatch.setenv(name, "1")
    with pytest.raises(ValueError, match=f"{name} was removed: .*; unset it"):
        make_manager()
    monkeypatch.setenv(name, " ")
    assert make_manager().upload_mode == "batch"


@pytest.mark.parametrize("mode", ["batch", "loop"])
async def test_upload_failure_leaves_no_half_written_slot(
    folders: dict[str, Path], mode: str, monkeypatch
) -> None:
    """A copy failing midway (batched, the default: between the two foreach halves; with
    LORASERVE_UPLOAD_BATCH=0 between two copy calls) leaves the slot unused, and the admission
    that issued it hears at once; the next upload writes it whole."""
    monkeypatch.setenv("LORASERVE_UPLOAD_BATCH", "1" if mode == "batch" else "0")
    m = make_manager()
    assert m.upload_mode == mode
    await m.load("a", str(folders["a"]))

    def fail(name: str, slot: int) -> None:
        raise RuntimeError("simulated copy failure")

    m.upload_fault = fail
    assert m.admit("a", set(), overlap=False) is None
    assert m.state("a") is Residency.IN_HOST and m.slot_of("a") is None
    assert "simulated copy failure" in (m.load_error("a") or "")
    assert m.counters.upload_failures == 1
    m.upload_fault = None
    slot = await resident(m, "a")
    assert m.load_error("a") is None
    a_rows = slot_q_a(m, slot)
    assert torch.count_nonzero(a_rows[2:]) == 0 and torch.count_nonzero(a_rows[:2]) > 0


async def test_batched_uploads_issue_together_at_the_next_poll(folders: dict[str, Path]) -> None:
    """By default uploads started between two polls wait unissued (their slots UPLOADING, their
    host rows out of reuse); the next poll issues them in one go, sharing one ready event, and
    they hold what they should."""
    m = make_manager()
    assert m.upload_mode == "batch"
    await m.load("a", str(folders["a"]))
    await m.load("b", str(folders["b"]))
    m.acquire("a")
    m.acquire("b")
    sa, sb = m.slot_of("a"), m.slot_of("b")
    assert sa is not None and sb is not None and sa != sb
    assert m.state("a") is m.state("b") is Residency.UPLOADING
    lease = m._adapters["a"].host.lease
    ra, rb = m._slots[sa].ready, m._slots[sb].ready
    assert not ra.issued and not ra.query() and not lease.done()
    assert len(m._pending_uploads) == 2 and m.counters.upload_enqueue_s == 0
    m.poll()
    assert m._pending_uploads == [] and ra.issued and rb.issued and ra.event is rb.event
    assert m.state("a") is m.state("b") is Residency.RESIDENT and lease.done()
    assert m.admit("a", set(), overlap=False) == sa
    assert torch.equal(slot_q_a(m, sa)[:2], q_a(folders["a"]))
    assert torch.equal(slot_q_a(m, sb)[:2], q_a(folders["b"]))
    assert m.counters.loads["gpu"] == 2 and m.counters.upload_enqueue_s > 0


@pytest.mark.parametrize("overlap", [False, None, True])
async def test_admission_issues_the_waiting_uploads(
    folders: dict[str, Path], overlap: bool | None
) -> None:
    """A request's admission does not wait for the next poll: it issues every upload waiting
    (its adapter's and the others', in one go) and then admits as for an upload in flight:
    with overlap off at once, adaptive while the upload should end within the wait, with
    overlap on only once it has completed."""
    streams = FakeStreams()
    streams.auto_done = False
    m = make_manager(streams)
    await m.load("a", str(folders["a"]))
    await m.load("b", str(folders["b"]))
    m.acquire("b")  # a prefetch, say: waits for the next poll
    sb = m.slot_of("b")
    assert sb is not None and len(m._pending_uploads) == 1
    m.upload_bytes_per_s = 1e18
    slot = m.admit("a", set(), overlap=overlap, max_wait_s=0.01)
    sa = m.slot_of("a")
    assert sa is not None and m._pending_uploads == []
    ra, rb = m._slots[sa].ready, m._slots[sb].ready
    assert ra.issued and rb.issued and ra.event is rb.event and len(streams.events) == 1
    assert slot == (None if overlap else sa)
    streams.events[-1].is_done = True
    assert m.admit("a", set(), overlap=True) == sa
    m.poll()
    assert m.state("a") is m.state("b") is Residency.RESIDENT
    assert torch.equal(slot_q_a(m, sa)[:2], q_a(folders["a"]))
    assert torch.equal(slot_q_a(m, sb)[:2], q_a(folders["b"]))


async def test_batched_upload_failure_frees_every_slot_of_the_batch(
    folders: dict[str, Path]
) -> None:
    """A batch that fails while the poll issues it fails each of its uploads as one issued on
    its own would: slots freed, adapters back IN_HOST with their error, counted; a later
    request retries."""
    m = make_manager()
    await m.load("a", str(folders["a"]))
    await m.load("b", str(folders["b"]))

    def fail(name: str, slot: int) -> None:
        raise RuntimeError("simulated copy failure")

    m.upload_fault = fail
    m.acquire("a")
    m.acquire("b")
    m.poll()
    for n in "ab":
        assert m.state(n) is Residency.IN_HOST and m.slot_of(n) is None
        assert "simulated copy failure" in (m.load_error(n) or "")
    assert m.counters.upload_failures == 2 and all(s.owner is None for s in m._slots)
    m.upload_fault = None
    slot = m.admit("a", set(), overlap=False)
    assert slot is not None and m.load_error("a") is None
    m.poll()
    assert m.state("a") is Residency.RESIDENT
    assert torch.equal(slot_q_a(m, slot)[:2], q_a(folders["a"]))


async def test_unload_issues_a_waiting_upload(folders: dict[str, Path]) -> None:
    """An adapter unloaded while its upload waits for the next poll: the unload issues it (so
    no later upload into the slot shares a batch with it), frees its slot and host copy, its
    host row is handed out again only after those copies have run, and the slot then serves
    the next adapter whole."""
    streams = FakeStreams()
    streams.auto_done = False
    m = make_manager(streams, max_loras_per_batch=1)
    await m.load("a", str(folders["a"]))
    m.acquire("a")
    lease = m._adapters["a"].host.lease
    assert len(m._pending_uploads) == 1 and not lease.done()
    m.release("a")
    await m.unload("a")
    assert "a" not in m and m._pending_uploads == [] and not lease.done()
    streams.events[-1].is_done = True
    assert lease.done()
    await m.load("b", str(folders["b"]))
    m.acquire("b")
    m.poll()
    streams.events[-1].is_done = True
    slot = await resident(m, "b")
    assert torch.equal(slot_q_a(m, slot)[:2], q_a(folders["b"]))
    assert m.counters.upload_failures == 0


@pytest.mark.parametrize("mode", ["batch", "loop"])
@pytest.mark.parametrize("stacked", [(), ("qkv",)], ids=["slab", "stacked"])
async def test_upload_is_one_row_and_clears_what_the_last_adapter_left(
    folders: dict[str, Path], tmp_path: Path, stacked: tuple[str, ...], mode: str,
    monkeypatch,
) -> None:
    """A slot is one row of the pool's slab: an upload is three copies (rank, weights,
    scalings), and it overwrites everything the previous occupant wrote, so slices the new
    adapter does not target read zero with scaling 0. A stacked group's A rows live in its
    stack below the base weight: one copy more, which writes them there, clears the rows the
    previous occupant left (v's) and leaves the base weight's rows as they were. The same
    with the copies in one foreach call (batched, the default) and one call a copy
    (LORASERVE_UPLOAD_BATCH=0)."""
    monkeypatch.setenv("LORASERVE_UPLOAD_BATCH", "1" if mode == "batch" else "0")
    m = make_manager(max_loras_per_batch=1, stacked=stacked)
    assert m.pool.stacked == stacked
    group = m.pool.layers[0]["qkv"]
    N, R = group.slice_offsets[-1], m.pool.max_rank
    stack = m.pool.stacks.get("qkv")
    if stack is not None:
        stack[:, :N] = 3.0  # stands for the base weight
    q, _k, v = (slice(group.slice_offsets[i], group.slice_offsets[i + 1]) for i in range(3))
    v_a = slice(2 * R, 3 * R)
    await m.load("a", str(folders["a"]))  # q_proj and v_proj
    m.acquire("a")
    slot = await resident(m, "a")
    assert torch.count_nonzero(group.B[slot, v]) > 0 and group.scalings[slot, 2] > 0
    assert torch.equal(slot_q_a(m, slot)[:2], q_a(folders["a"]))
    assert torch.count_nonzero(group.A[slot, v_a]) > 0
    m.release("a")
    write_adapter(tmp_path / "q_only", seed=7, modules=("q_proj",))
    await m.load("q_only", str(tmp_path / "q_only"))
    entry = m._adapters["q_only"]
    assert len(m.pool.slot_copies(slot, entry.host)) == 3 + len(stacked)
    m.acquire("q_only")
    assert await resident(m, "q_only") == slot  # a was evicted from the only slot
    assert torch.count_nonzero(group.B[slot, v]) == 0 and group.scalings[slot, 2] == 0
    assert torch.count_nonzero(group.B[slot, q]) > 0 and group.scalings[slot, 0] > 0
    assert torch.equal(slot_q_a(m, slot)[:2], q_a(tmp_path / "q_only"))
    assert torch.count_nonzero(group.A[slot, 2:]) == 0  # q beyond rank 2, and all of v
    assert torch.count_nonzero(m.pool.layers[1]["qkv"].A[slot, R:]) == 0
    assert stack is None or bool((stack[:, :N] == 3.0).all())
    assert m.pool.slot_nbytes == entry.host.nbytes
    m.release("q_only")


# host tier -----------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["count", "bytes"])
async def test_host_tier_eviction_and_transparent_reload(
    folders: dict[str, Path], limit: str
) -> None:
    probe = make_manager()
    await probe.load("a", str(folders["a"]))
    nbytes = probe.pool.host_nbytes(probe._adapters["a"].config.modules)
    kw = {"max_loaded_loras": 2} if limit == "count" else {"max_lora_host_bytes": 2 * nbytes + 8}
    m = make_manager(**kw)
    for n in "abc":
        await m.load(n, str(folders[n]))
    tiers = {i.name: i.tier for i in m.list()}
    assert tiers == {"a": "disk", "b": "host", "c": "host"}  # a was least recently used
    assert m.counters.evictions["host"] == 1
    m.acquire("a")  # reloads from its path, in a thread
    assert m.counters.requests_by_residency["disk"] == 1
    assert m.state("a") is Residency.LOADING
    assert m.admit("a", set(), overlap=False) is None
    await wait_state(m, "a", Residency.UPLOADING)  # prefetch went on to upload it
    slot = await resident(m, "a")
    assert m.counters.loads["host"] == 4
    assert {i.name: i.tier for i in m.list()}["b"] == "disk"
    want = torch.zeros(4, 64)
    want[:2] = q_a(folders["a"])
    torch.testing.assert_close(slot_q_a(m, slot), want)
    m.release("a")
    assert_host_tally(m)
    await m.unload("b")
    assert_host_tally(m)
    assert m._host_usage()[0] == 2


async def test_host_copies_that_queued_requests_need_are_kept(folders: dict[str, Path]) -> None:
    """With more adapters wanted than the host tier holds, a copy a queued request will upload
    from is never dropped for another adapter (that only means reading it again, over and
    over): the other waits on disk, in order, and loads once a copy becomes droppable."""
    m = make_manager(max_loaded_loras=2)
    for n in "cd":  # both GPU slots, held by a batch in flight
        await m.load(n, str(folders[n]))
        m.acquire(n)
    slots = [await resident(m, "c"), await resident(m, "d", {0, 1} - {m.slot_of("c")})]
    m.lock(slots)
    for n in "ab":  # their copies push out c's and d's (on the GPU already)
        await m.load(n, str(folders[n]))
        m.acquire(n)  # queued: no slot is free of the batch in flight
    tiers = {i.name: i.tier for i in m.list()}
    assert tiers == {"a": "host", "b": "host", "c": "gpu", "d": "gpu"}
    await m.load("e", str(folders["e"]))  # validated, registered on disk: no room to drop
    assert {i.name: i.tier for i in m.list()}["e"] == "disk"
    assert m.counters.evictions["host"] == 2 and m.counters.loads["host"] == 4
    m.acquire("e")
    for _ in range(5):
        await asyncio.sleep(0.01)
        m.poll()
    tiers = {i.name: i.tier for i in m.list()}
    assert (tiers["a"], tiers["b"], tiers["e"]) == ("host", "host", "disk")
    assert m.counters.loads["host"] == 4  # nothing was read again
    m.unlock(slots)
    await resident(m, "a")  # admission evicts an unlocked slot; a's copy is droppable now
    await wait_state(m, "e", Residency.IN_HOST)
    tiers = {i.name: i.tier for i in m.list()}
    assert (tiers["a"], tiers["b"], tiers["e"]) == ("gpu", "host", "host")
    assert m.counters.loads["host"] == 5  # e read once more, a and b never
    for n in "abcde":
        m.release(n)
    assert_host_tally(m)


async def test_failed_load_changes_nothing(folders: dict[str, Path], tmp_path: Path) -> None:
    m = make_manager(max_loaded_loras=2)
    await m.load("a", str(folders["a"]))
    await m.load("b", str(folders["b"]))
    bad = tmp_path / "bad"
    write_adapter(bad, seed=3)
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    before = m.list()
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        await m.load("c", str(bad))
    assert m.list() == before and m.counters.evictions["host"] == 0
    assert "c" not in m
    assert_host_tally(m)
    await m.load("c", str(folders["c"]))
    assert "c" in m


# unload --------------------------------------------------------------------------------------


async def test_unload_waits_for_references_then_frees(folders: dict[str, Path]) -> None:
    m = make_manager()
    await m.load("a", str(folders["a"]))
    m.acquire("a")
    slot = await resident(m, "a")
    unload = asyncio.create_task(m.unload("a"))
    await asyncio.sleep(0.01)
    assert not unload.done()
    with pytest.raises(AdapterError, match="is being unloaded"):  # not "never been loaded"
        m.acquire("a")  # no new references at once
    assert m.admit("a", set(), overlap=False) == slot  # the running request still is served
    m.lock([slot])
    m.release("a")
    await asyncio.sleep(0.01)
    assert not unload.done()  # a batch reading the slot is still in flight
    m.unlock([slot])
    await asyncio.wait_for(unload, 1)
    assert m.list() == [] and m._slots[slot].owner is None
    await m.load("a", str(folders["b"]))  # the name again, another path
    assert await resident(m, "a") is not None
    assert m.list()[0].path == os.path.realpath(folders["b"])


async def test_unload_pinned_frees_its_pin(folders: dict[str, Path]) -> None:
    m = make_manager()
    await m.load("a", str(folders["a"]), pinned=True)
    with pytest.raises(AdapterError, match="starvation"):
        await m.load("b", str(folders["b"]), pinned=True)
    await m.unload("a")
    await m.load("b", str(folders["b"]), pinned=True)


# load in place (load_inplace) ---------------------------------------------------------------


async def test_load_in_place_serves_new_requests_while_old_ones_drain(
        folders: dict[str, Path]) -> None:
    """A load in place of a name whose version a request holds: the name serves the new
    version at once (its own key, slot and weights), the old one keeps serving the request
    that holds it, listed as replaced, and is unloaded (slot and host copy freed) once that
    request releases it and its last batch is done. The admin listing's `loaded_adapters`
    names the name once, with the new path."""
    m = make_manager(max_loras_per_batch=3)
    await m.load("a", str(folders["a"]))
    m.acquire("a")
    old_key = m.key_of("a")
    old_slot = await resident(m, "a")
    await m.load("a", str(folders["b"]), inplace=True)
    new_key = m.key_of("a")
    assert new_key != old_key and ":" in new_key
    assert "a" in m and not m.is_unloading("a")
    listed = {i.path: (i.unloading, i.replaced, i.refs) for i in m.list()}
    assert listed == {os.path.realpath(folders["a"]): (True, True, 1),
                      os.path.realpath(folders["b"]): (False, False, 0)}
    assert m.admit(old_key, set(), overlap=False) == old_slot  # the old request still runs
    torch.testing.assert_close(slot_q_a(m, old_slot)[:2], q_a(folders["a"]))
    m.acquire("a")
    new_slot = await resident(m, new_key)
    assert new_slot != old_slot
    torch.testing.assert_close(slot_q_a(m, new_slot)[:2], q_a(folders["b"]))
    m.lock([old_slot])
    m.release(old_key)
    await asyncio.sleep(0.01)
    assert len(m.list()) == 2  # its last batch is still in flight
    m.unlock([old_slot])
    await asyncio.sleep(0.01)
    assert [(i.path, i.replaced) for i in m.list()] == [(os.path.realpath(folders["b"]), False)]
    assert m._slots[old_slot].owner is None
    assert_host_tally(m)
    # again: the second version drains its request; the third takes the name's own key,
    # free again; one more, with no request holding the version it replaces, is gone at once
    await m.load("a", str(folders["c"]), inplace=True)
    assert m.key_of("a") == "a"
    m.release(new_key)  # the request that held the second version
    await asyncio.sleep(0.01)
    assert [i.path for i in m.list()] == [os.path.realpath(folders["c"])]
    assert m._slots[new_slot].owner is None
    await m.load("a", str(folders["d"]), inplace=True)
    await asyncio.sleep(0.01)
    assert [(i.path, i.refs) for i in m.list()] == [(os.path.realpath(folders["d"]), 0)]
    await m.unload("a")
    assert m.list() == [] and "a" not in m
    assert_host_tally(m)


async def test_load_in_place_refusals_change_nothing(folders: dict[str, Path]) -> None:
    """Without load_inplace a loaded name is refused as before; a load in place whose adapter
    is bad (a rank over the pool's, a missing folder) leaves the old version serving; an
    unload while the name is replaced is refused, and so is a second load in place; a load
    in place of a name not loaded is a plain load."""
    m = make_manager()
    await m.load("a", str(folders["a"]))
    with pytest.raises(AdapterError, match="already loaded"):
        await m.load("a", str(folders["b"]))
    for bad in (folders["big_rank"], folders["a"].parent / "missing"):
        with pytest.raises(AdapterError):
            await m.load("a", str(bad), inplace=True)
    assert [(i.name, i.path, i.replaced) for i in m.list()] == [
        ("a", os.path.realpath(folders["a"]), False)]
    assert m.key_of("a") == "a"
    m.acquire("a")
    slow = asyncio.Event()
    read = m._read_host

    def held_read(*args: Any) -> Any:  # (a loader thread)
        while not slow.is_set():
            time.sleep(0.005)
        return read(*args)

    m._read_host = held_read  # type: ignore[method-assign]
    replacing = asyncio.create_task(m.load("a", str(folders["b"]), inplace=True))
    await asyncio.sleep(0.05)
    with pytest.raises(AdapterError, match="still loading"):
        await m.unload("a")
    with pytest.raises(AdapterError, match="still loading"):
        await m.load("a", str(folders["c"]), inplace=True)
    assert m.key_of("a") == "a"  # requests keep getting the old version meanwhile
    slow.set()
    await asyncio.wait_for(replacing, 5)
    assert m.key_of("a") != "a"
    m.release("a")
    await m.load("z", str(folders["d"]), inplace=True)
    assert m.key_of("z") == "z"


async def test_pinned_version_retries_a_failed_upload_by_its_key(
        folders: dict[str, Path]) -> None:
    """A pinned version loaded in place (its key "<name>:<n>", its predecessor still held)
    whose upload fails is retried by the next polls until it holds a slot, by its own key."""
    m = make_manager(max_loras_per_batch=3)
    await m.load("a", str(folders["a"]), pinned=True)
    m.acquire("a")
    m.upload_fault = lambda name, slot: (_ for _ in ()).throw(RuntimeError("copy failed"))
    await m.load("a", str(folders["b"]), pinned=True, inplace=True)
    key = m.key_of("a")
    m.poll()  # issues the pinned upload, which fails
    assert key != "a" and m.counters.upload_failures >= 1
    assert m.state(key) is not Residency.RESIDENT
    m.upload_fault = None
    for _ in range(3):  # no request asks for it: only the pin's retry uploads it
        m.poll()
    assert m.slot_of(key) is not None and m.state(key) is Residency.RESIDENT
    torch.testing.assert_close(slot_q_a(m, m.slot_of(key))[:2], q_a(folders["b"]))


async def test_load_in_place_moves_the_pin(folders: dict[str, Path]) -> None:
    """A pinned name loaded in place, pinned: the pin moves to the new version (the pool's
    one pin is not counted twice), and the old version, unpinned, drains."""
    m = make_manager()
    await m.load("a", str(folders["a"]), pinned=True)
    m.acquire("a")
    old_key = m.key_of("a")
    await m.load("a", str(folders["b"]), pinned=True, inplace=True)
    pins = {i.path: i.pinned for i in m.list()}
    assert pins == {os.path.realpath(folders["a"]): False, os.path.realpath(folders["b"]): True}
    with pytest.raises(AdapterError, match="starvation"):
        await m.load("c", str(folders["c"]), pinned=True)
    m.release(old_key)
    await asyncio.sleep(0.01)
    assert [(i.path, i.pinned) for i in m.list()] == [(os.path.realpath(folders["b"]), True)]


# startup, roots, on-demand -------------------------------------------------------------------


async def test_startup_adapters_and_inferred_pool(folders: dict[str, Path]) -> None:
    specs = (LoraPathSpec("a", str(folders["a"])), LoraPathSpec("g", str(folders["gate"]), True))
    config = ServerConfig(device="cpu", lora_paths=specs, max_loras_per_batch=2)
    assert resolve_pool_spec(config, SHAPE.num_layers) == (
        2,
        frozenset({"q_proj", "v_proj", "gate_proj"}),
    )
    m = AdapterManager(config, SHAPE, CPU, torch.float32, FakeStreams())
    assert set(m.pool.layers[0]) == {"qkv", "gate_up"} and m.pool.embed is None
    await m.load_startup_adapters()
    assert [(i.name, i.pinned) for i in m.list()] == [("a", False), ("g", True)]


async def test_roots_apply_to_runtime_loads(folders: dict[str, Path], tmp_path: Path) -> None:
    root = folders["a"].parent
    m = make_manager(lora_roots=(str(root),), lora_resolve_on_demand=True)
    outside = tmp_path / "outside"
    write_adapter(outside, seed=5)
    with pytest.raises(AdapterError, match="escapes lora_roots"):
        await m.load("x", str(outside))
    await m.load("x", "b")  # relative to the root
    assert m.list()[0].path == os.path.realpath(folders["b"])
    await m.acquire_or_resolve("c")  # on demand: <root>/c
    assert m.list()[-1].name == "c" and m.list()[-1].refs == 1
    with pytest.raises(AdapterError, match="never been loaded"):
        await m.acquire_or_resolve("nope")
    await asyncio.gather(m.acquire_or_resolve("d"), m.acquire_or_resolve("d"))
    assert [i.refs for i in m.list() if i.name == "d"] == [2]


async def test_on_demand_burst_reads_before_all_resolved(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of requests for new names: the first adapter's read starts before the last
    name is resolved (reads never queue behind every resolve and config read of the burst), and
    concurrent requests for one name resolve it once."""
    import runtime.adapters.manager as manager_module

    root = tmp_path / "burst"
    names = [f"n{i}" for i in range(8)]
    for name in names:
        shutil.copytree(folders["a"], root / name)
    m = make_manager(lora_roots=(str(root),), lora_resolve_on_demand=True,
                     max_loras_per_batch=8, max_loaded_loras=8)
    events: list[str] = []
    resolve, read_host = manager_module.resolve_on_demand, m._read_host

    def slow_resolve(name: str, roots: tuple[str, ...]) -> str | None:
        time.sleep(0.02)
        events.append(f"resolve {name}")
        return resolve(name, roots)

    def logged_read(path: str, *args: Any) -> Any:
        events.append(f"read {Path(path).name}")
        return read_host(path, *args)

    monkeypatch.setattr(manager_module, "resolve_on_demand", slow_resolve)
    monkeypatch.setattr(m, "_read_host", logged_read)
    await asyncio.gather(*(m.acquire_or_resolve(n) for n in names + names[:3]))
    resolves = [i for i, e in enumerate(events) if e.startswith("resolve")]
    assert len(resolves) == len(names)  # n0-n2's second requests shared the first's resolve
    assert events.index("read n0") < events.index("resolve n7"), events
    assert sorted(e for e in events if e.startswith("read")) == [f"read {n}" for n in names]
    assert {i.name: i.refs for i in m.list()} == {n: 1 + (n in names[:3]) for n in names}
    assert m._resolving == {}
    m.close()


async def test_loader_workers_setting(folders: dict[str, Path], monkeypatch) -> None:
    """LORASERVE_LOADER_WORKERS sets how many reads run at once (loader threads here); a value
    under 1 or not a number is an error naming it."""
    monkeypatch.setenv("LORASERVE_LOADER_WORKERS", "3")
    m = make_manager(max_loras_per_batch=4)
    assert m.loader_workers == 3 and m._executor._max_workers == 3
    await asyncio.gather(*(m.load(n, str(folders[n])) for n in ("a", "b", "c")))
    assert {i.name for i in m.list()} == {"a", "b", "c"}
    m.close()
    for bad, message in (("0", "LORASERVE_LOADER_WORKERS: 0 "), ("two", "not an integer")):
        monkeypatch.setenv("LORASERVE_LOADER_WORKERS", bad)
        with pytest.raises(ValueError, match=message):
            make_manager()


def test_paths_with_roots(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "ok" / "inner").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", root / "escape")
    os.symlink(root / "ok", root / "alias")
    roots = (str(root),)
    assert resolve_adapter_path("ok", roots, False) == str((root / "ok").resolve())
    assert resolve_adapter_path(str(root / "ok" / "inner"), roots, False).endswith("inner")
    assert resolve_adapter_path("alias", roots, False) == str((root / "ok").resolve())
    assert resolve_adapter_path("ok/../ok", roots, False).endswith("ok")
    refusals = {
        "../secret": "escapes",
        "ok/../../secret": "escapes",
        str(tmp_path / "secret"): "escapes",
        "escape": "escapes",
        "/proc/self": "system folder",
        "/proc": "system folder",
        "org/model": "hub ids are refused",
        "missing": "hub ids are refused",
        "": "non-empty",
        "ok\x00": "NUL character",
    }
    for path, message in refusals.items():
        with pytest.raises(AdapterError, match=message):
            resolve_adapter_path(path, roots, False)


def test_paths_without_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_adapter_path(str(tmp_path), (), False) == str(tmp_path.resolve())
    with pytest.raises(AdapterError, match="hub ids are refused"):
        resolve_adapter_path("org/model", (), False)
    with pytest.raises(AdapterError, match="not a local folder"):
        resolve_adapter_path("../../no/such/dir", (), True)

    def offline(repo_id: str, **kw: Any) -> str:
        raise OSError("network unreachable")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(AdapterError, match="cannot fetch hub adapter 'org/model'.*unreachable"):
        resolve_adapter_path("org/model", (), True)


def test_resolve_on_demand(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_adapter(root / "good", seed=1)
    write_adapter(tmp_path / "secret", seed=2)
    os.symlink(tmp_path / "secret", root / "escape")
    roots = (str(root),)
    assert resolve_on_demand("good", roots) == str((root / "good").resolve())
    for name in ("escape", "../secret", "good/..", "", ".", "..", "missing", ".hidden"):
        assert resolve_on_demand(name, roots) is None, name


# CUDA ----------------------------------------------------------------------------------------

LLAMA8B_4L = LoraModelShape(
    num_layers=4,
    hidden_size=4096,
    intermediate_size=14336,
    q_size=4096,
    kv_size=1024,
    vocab_size=128256,
)


def write_full_adapter(folder: Path, shape: LoraModelShape, r: int, seed: int) -> None:
    """A hand-made PEFT folder targeting every supported module."""
    from runtime.adapters.pool import LAYER_MODULES, module_dims

    folder.mkdir(parents=True)
    cfg = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,
        "bias": "none",
        "target_modules": [*LAYER_MODULES, "embed_tokens", "lm_head"],
    }
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {}
    for layer in range(shape.num_layers):
        for m in LAYER_MODULES:
            parent = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            in_f, out_f = module_dims(shape, m)
            p = f"base_model.model.model.layers.{layer}.{parent}.{m}"
            t[f"{p}.lora_A.weight"] = torch.randn(r, in_f, generator=g)
            t[f"{p}.lora_B.weight"] = torch.randn(out_f, r, generator=g)
    t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.randn(
        r, shape.vocab_size, generator=g
    )
    t["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.randn(
        shape.hidden_size, r, generator=g
    )
    t["base_model.model.lm_head.lora_A.weight"] = torch.randn(r, shape.hidden_size, generator=g)
    t["base_model.model.lm_head.lora_B.weight"] = torch.randn(shape.vocab_size, r, generator=g)
    save_file(t, str(folder / "adapter_model.safetensors"))


async def _cuda_uploads(tmp_path: Path, stacked: tuple[str, ...]) -> None:
    device = torch.device("cuda")
    shape, R = LLAMA8B_4L, 16
    for i, n in enumerate("abc"):
        write_full_adapter(tmp_path / n, shape, r=R if n != "b" else 8, seed=i)
    config = ServerConfig(
        device="cuda",
        enable_lora=True,
        max_lora_rank=R,
        lora_target_modules=("all",),
        max_loras_per_batch=2,
    )
    streams = Streams(device)
    m = AdapterManager(config, shape, device, torch.bfloat16, streams, stacked=stacked)
    assert m.pool.stacked == stacked
    assert m.reader is not None  # on CUDA, reader processes fill memfd rows registered pinned
    rows = m.pool._host_rows  # the tier's rows are pinned at start, so serving pins none
    chunks = rows.num_chunks
    assert rows.num_rows >= config.num_lora_host_slots
    assert m.host_rows_pinned == rows.num_rows * rows.row_bytes
    for n in "abc":
        await m.load(n, str(tmp_path / n))
    assert rows.num_chunks == chunks
    host_a = m._adapters["a"].host
    assert host_a is not None and host_a.is_pinned and host_a.layers[0]["qkv"].A.is_pinned()
    sa = m.admit("a", set(), overlap=False)
    assert sa is not None
    ev = m.ready_event(sa)
    assert ev is not None
    with streams.use(streams.compute):
        ev.wait(streams.compute)  # GPU-side: the first batch reading slot a waits for its upload
        seen_a = m.pool.layers[3]["down"].B[sa].clone()
    sb = m.admit("b", {sa}, overlap=False)
    assert sb is not None and sb != sa
    for _ in range(1000):
        m.poll()
        if m.state("a") is m.state("b") is Residency.RESIDENT:
            break
        await asyncio.sleep(0.001)
    assert m.state("a") is Residency.RESIDENT and m.ready_event(sa) is None
    # A copy from a host row is asynchronous: queued behind ~0.2 s of copy-stream work, the
    # call returns at once (a copy from pageable memory would wait for that work).
    dst = torch.empty_like(host_a.flat, device=device)
    with streams.use(streams.copy):
        torch.cuda._sleep(400_000_000)
        t0 = time.perf_counter()
        dst.copy_(host_a.flat, non_blocking=True)
        queued_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    assert queued_s < 0.05 and torch.equal(dst.cpu(), host_a.flat)
    for g in stacked:  # into a strided region of a stack: staged on the device, still queued
        rows = host_a.stacks[g].shape[1]
        dst = torch.zeros_like(m.pool.stacks[g])[:, -rows:]
        with streams.use(streams.copy):
            torch.cuda._sleep(400_000_000)
            t0 = time.perf_counter()
            dst.copy_(host_a.stacks[g], non_blocking=True)
            queued_s = time.perf_counter() - t0
        torch.cuda.synchronize()
        assert queued_s < 0.05 and torch.equal(dst.cpu(), host_a.stacks[g])
    torch.cuda.synchronize()
    torch.testing.assert_close(seen_a, host_a.layers[3]["down"].B.to(device))
    assert int(m.pool.slot_ranks[sb]) == 8

    # A slow batch reads slot a; the engine unlocks early, the last-use event must protect it.
    m.lock([sa])
    with streams.use(streams.compute):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the read
        read_late = m.pool.layers[0]["qkv"].A[sa].clone()
        last_use = streams.event()
        last_use.record(streams.compute)
    m.record_use([sa], last_use)
    m.unlock([sa])
    assert m.admit("b", set(), overlap=False) == sb  # b most recent: a is the LRU victim
    assert m.admit("c", set(), overlap=False) == sa
    assert not last_use.query()  # the upload is queued behind the slow batch, not blocking us
    last_use.synchronize()
    torch.cuda.synchronize()
    torch.testing.assert_close(read_late, host_a.layers[0]["qkv"].A.to(device))
    host_c = m._adapters["c"].host
    assert host_c is not None and host_c.embed is not None and host_c.lm_head is not None
    assert m.pool.embed is not None and m.pool.lm_head is not None
    torch.testing.assert_close(m.pool.layers[0]["qkv"].A[sa], host_c.layers[0]["qkv"].A.to(device))
    torch.testing.assert_close(m.pool.embed.A[sa], host_c.embed.A.to(device))
    torch.testing.assert_close(m.pool.lm_head.B[sa], host_c.lm_head.B.to(device))
    torch.testing.assert_close(m.pool.embed.scalings[sa], host_c.embed.scalings.to(device))
    m.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["batch", "loop"])
@pytest.mark.parametrize("stacked", [(), ("qkv", "down")])
def test_cuda_uploads_real_shapes(tmp_path: Path, stacked: tuple[str, ...], mode: str,
                                  monkeypatch) -> None:
    """Pinned host copies, copy-stream uploads, ready and last-use events on an H200; with
    stacked groups too, whose A goes by a copy into a strided region of the stack, still
    asynchronous and still behind the last-use event; batched in one foreach call (the
    default) and one call a copy (LORASERVE_UPLOAD_BATCH=0)."""
    monkeypatch.setenv("LORASERVE_UPLOAD_BATCH", "1" if mode == "batch" else "0")
    asyncio.run(_cuda_uploads(tmp_path, stacked))


async def test_adaptive_overlap_waits_only_for_short_uploads(folders: dict[str, Path]) -> None:
    """overlap None (the default): a request joins while its adapter uploads only when the
    upload should end within the allowed wait; a completed upload always joins."""
    streams = FakeStreams()
    streams.auto_done = False
    m = make_manager(streams)
    await m.load("a", str(folders["a"]))
    m.acquire("a")
    slot = m.slot_of("a")
    assert slot is not None and m.state("a") is Residency.UPLOADING
    m.upload_bytes_per_s = 1.0  # this upload would take "forever"
    assert m.upload_remaining_s(slot) > 1.0
    assert m.admit("a", set(), overlap=None, max_wait_s=0.01) is None
    m.upload_bytes_per_s = 1e18  # now it should be done about now
    assert m.upload_remaining_s(slot) == 0.0
    assert m.admit("a", set(), overlap=None, max_wait_s=0.01) == slot
    assert m.admit("a", set(), overlap=True, max_wait_s=10.0) is None  # on: never waits
    streams.events[-1].is_done = True  # finished, not yet polled: every policy admits
    assert m.upload_remaining_s(slot) == 0.0
    assert m.admit("a", set(), overlap=True) == slot
    m.upload_bytes_per_s = 10e9
    m.poll()  # learns a bandwidth from the finished upload
    assert m.upload_bytes_per_s != 10e9
    m.release("a")
