"""Serving many adapters through few GPU slots, end to end through the engine (CPU, float32).

Every output is compared with the same request served alone (PEFT parity of solo outputs is
tests/test_lora_parity.py's job). Checked here: eviction order by policy, pinned adapters that
never move, queued requests that lock nothing, unload while requests run, on-demand loading
under lora_roots, a failed background load ending its requests with the error, and the adapter
metrics.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from metrics import ServingMetrics
from runtime.config import LoraPathSpec
from runtime.engine import Engine
from runtime.errors import UnknownAdapterError
from runtime.request import FinishReason
from tests.engine_utils import collect, greedy, run
from tests.models import make_model, prompts, read_vocab
from tests.test_lora_parity import make_peft_adapter

NUM_SLOTS = 3
NAMES = [f"a{i}" for i in range(3 * NUM_SLOTS)]  # three times as many adapters as slots
NEW_TOKENS = 16
Pair = tuple[str | None, int]  # (adapter or None, index into the prompts)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lora_serving")
    folder = make_model(root / "model", "llama")
    adapters = root / "adapters"
    paths = {}
    for i, name in enumerate(NAMES):
        rank = 1 + i % 4
        targets: Any = ["q_proj", "v_proj"] if i % 2 else "all-linear"
        paths[name] = make_peft_adapter(
            folder, adapters / name, seed=i, r=rank, lora_alpha=2 * rank, target_modules=targets
        )
    outside = make_peft_adapter(folder, root / "outside", seed=99, r=2, target_modules=["q_proj"])
    return {
        "folder": folder,
        "paths": paths,
        "root": adapters,
        "outside": outside,
        "prompts": prompts(32, read_vocab(folder), seed=3, lo=3, hi=24),
        "solo": {},
    }


def serving_engine(setup: dict[str, Any], metrics: Any = None, **kw: Any) -> Engine:
    from runtime.config import ServerConfig

    cfg: dict[str, Any] = {
        "model_path": str(setup["folder"]),
        "device": "cpu",
        "dtype": "float32",
        "enable_lora": True,
        "max_lora_rank": 4,
        "lora_target_modules": ("all",),
        "max_loras_per_batch": NUM_SLOTS,
        "kv_cache_cpu_bytes": 1 << 24,
        "page_size": 8,
    }
    cfg.update(kw)
    return Engine.from_config(ServerConfig(**cfg), metrics)


def specs(setup: dict[str, Any], names: list[str], pinned: tuple[str, ...] = ()) -> tuple:
    return tuple(LoraPathSpec(n, str(setup["paths"][n]), n in pinned) for n in names)


def solo(setup: dict[str, Any], pairs: list[Pair], n: int = NEW_TOKENS) -> list[list[int]]:
    """Each (adapter, prompt) served alone, one request at a time, every adapter resident."""
    cache: dict[tuple[str | None, int, int], list[int]] = setup["solo"]
    missing = sorted({p for p in pairs if (*p, n) not in cache}, key=str)
    if missing:
        engine = serving_engine(
            setup, lora_paths=specs(setup, NAMES), max_loras_per_batch=len(NAMES)
        )

        async def go() -> None:
            await engine.start()
            try:
                for name, i in missing:
                    req = await engine.submit(setup["prompts"][i], greedy(n), name)
                    cache[(name, i, n)] = await collect(engine, req)
            finally:
                await engine.stop()

        run(go())
    return [cache[(*p, n)] for p in pairs]


async def serve(engine: Engine, setup: dict[str, Any], pairs: list[Pair], n: int) -> list[Any]:
    reqs = [await engine.submit(setup["prompts"][i], greedy(n), name) for name, i in pairs]
    return list(await asyncio.gather(*(collect(engine, r) for r in reqs)))


def metric(metrics: ServingMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(f"loraserve:{name}", labels)
    return 0.0 if value is None else value


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["batch", "loop"])
def test_more_adapters_than_slots(setup: dict[str, Any], mode: str, monkeypatch) -> None:
    """3x as many adapters as slots, requests interleaved; one adapter pinned. Uploads issued
    together at each poll or admission (the default) and one call a copy as each starts
    (LORASERVE_UPLOAD_BATCH=0)."""
    monkeypatch.setenv("LORASERVE_UPLOAD_BATCH", "1" if mode == "batch" else "0")
    pinned = NAMES[0]
    pairs: list[Pair] = [(name, i) for i, name in enumerate(NAMES * 2)]
    pairs += [(None, 18), (None, 19)]
    expected = solo(setup, pairs)
    metrics = ServingMetrics()
    engine = serving_engine(
        setup, metrics, lora_paths=specs(setup, NAMES, pinned=(pinned,)), max_running_requests=6
    )
    manager = engine.adapters
    assert manager is not None
    pinned_slots: list[int | None] = []
    before_step = engine._before_step

    def spy(slots: set[int]) -> None:  # the pinned adapter's slot at every step
        pinned_slots.append(manager.slot_of(pinned))
        before_step(slots)

    engine._before_step = spy  # type: ignore[method-assign]

    async def go() -> list[Any]:
        await engine.start()
        try:
            return await serve(engine, setup, pairs, NEW_TOKENS)
        finally:
            await engine.stop()

    outs = run(go())
    for (name, i), out, want in zip(pairs, outs, expected):
        assert out == want, f"{name} on prompt {i}: differs from its solo output"
    c, counters = engine.scheduler.counters, manager.counters
    # a step holds every slot's adapter (batched, the admission issues what waits)
    assert c.num_mixed_adapter_steps > 0
    assert c.max_adapters_in_step == NUM_SLOTS
    assert counters.evictions["gpu"] >= len(NAMES) - NUM_SLOTS
    assert pinned not in {n for _, n in counters.recent_evictions}
    assert len(set(pinned_slots)) == 1 and pinned_slots[0] is not None, "the pinned slot moved"
    assert manager.state(pinned).value == "resident"
    assert manager.upload_mode == mode
    assert sum(a.refs for a in manager.list()) == 0
    assert all(s.locks == 0 for s in manager._slots)
    # metrics: every request counted once by residency at arrival; loads and evictions exported
    by_residency = {
        r: metric(metrics, "lora_requests_total", residency=r)
        for r in ("gpu", "host", "disk", "base")
    }
    assert sum(by_residency.values()) == len(pairs) and by_residency["base"] == 2
    assert by_residency["host"] > 0
    assert metric(metrics, "lora_evictions_total", tier="gpu") == counters.evictions["gpu"]
    assert metric(metrics, "lora_loads_total", tier="gpu") == counters.loads["gpu"]
    assert metric(metrics, "lora_loads_total", tier="host") == len(NAMES)
    assert metric(metrics, "lora_load_seconds_count", tier="gpu") == counters.loads["gpu"]
    gauges = {t: metric(metrics, "lora_adapters", tier=t) for t in ("gpu", "host", "disk")}
    assert gauges == {"gpu": NUM_SLOTS, "host": len(NAMES) - NUM_SLOTS, "disk": 0}
    assert metric(metrics, "lora_pinned_adapters") == 1


def policy_victims(policy: str, sequence: list[str], num_slots: int) -> list[str]:
    """The victims a cache of `num_slots` evicts serving `sequence` one at a time."""
    resident: list[str] = []  # eviction order first
    victims = []
    for name in sequence:
        if name in resident:
            if policy == "lru":
                resident.remove(name)
                resident.append(name)
            continue
        if len(resident) == num_slots:
            victims.append(resident.pop(0))
        resident.append(name)
    return victims


@pytest.mark.parametrize("policy", ["lru", "fifo"])
def test_eviction_order_follows_policy(setup: dict[str, Any], policy: str) -> None:
    names = NAMES[:6]  # 3x the 2 slots
    a1, a2, a3, a4, a5, a6 = names
    sequence = [a1, a2, a1, a3, a2, a4, a1, a5, a6, a3, a3, a2]
    expected_victims = policy_victims(policy, sequence, 2)
    assert policy_victims("lru", sequence, 2) != policy_victims("fifo", sequence, 2)
    pairs: list[Pair] = [(name, i) for i, name in enumerate(sequence)]
    expected = solo(setup, pairs, n=4)
    engine = serving_engine(
        setup, lora_paths=specs(setup, names), max_loras_per_batch=2, lora_eviction_policy=policy
    )

    async def go() -> list[list[int]]:
        await engine.start()
        try:  # one request at a time: the policy alone picks every victim
            return [(await serve(engine, setup, [p], 4))[0] for p in pairs]
        finally:
            await engine.stop()

    assert run(go()) == expected
    assert engine.adapters is not None
    victims = [n for tier, n in engine.adapters.counters.recent_evictions if tier == "gpu"]
    assert victims == expected_victims


def test_adapter_with_only_queued_requests_can_be_evicted(setup: dict[str, Any]) -> None:
    a1, a2, a3 = NAMES[:3]
    engine = serving_engine(setup, max_loras_per_batch=2, max_running_requests=2)
    manager = engine.adapters
    assert manager is not None
    pairs: list[Pair] = [(a1, 0), (a3, 1), (a2, 2)]
    expected = solo(setup, pairs, n=24)

    async def go() -> list[list[int]]:
        for name in (a1, a2, a3):
            await engine.load_adapter(name, str(setup["paths"][name]))
        p = setup["prompts"]
        x = await engine.submit(p[0], greedy(24), a1)  # prefetched into a free slot
        early = await engine.submit(p[5], greedy(24), a2)  # prefetched into the other one
        z = await engine.submit(p[1], greedy(24), a3)  # no slot: both adapters referenced
        y = await engine.submit(p[2], greedy(24), a2)
        engine.abort(early.rid)  # a2 is now held only by the queued request y, behind z
        manager.poll()  # the uploads completed (CPU copies are synchronous)
        assert manager.state(a3).value == "in_host" and manager.state(a2).value == "resident"
        await engine.start()
        try:
            return list(await asyncio.gather(*(collect(engine, r) for r in (x, z, y))))
        finally:
            await engine.stop()

    assert run(go()) == expected
    # z's admission took a2's slot although a2's request y was queued: queued requests lock
    # nothing; y was served once a slot came free
    assert manager.counters.recent_evictions[0] == ("gpu", a2)


# the adapter whose requests run, another beside it, and the adapter its name is loaded with
# after (test_unload_while_requests_run, test_load_in_place_while_requests_run)
FIRST, OTHER, LATER = NAMES[1], NAMES[2], NAMES[5]
RUNNING: list[Pair] = [(FIRST, 0), (FIRST, 1), (OTHER, 2)]


class Running:
    """RUNNING's requests on an engine with FIRST and OTHER loaded: their tokens alone, and
    LATER's for prompt 3."""

    def __init__(self, setup: dict[str, Any], slots: int) -> None:
        self.setup = setup
        self.engine = serving_engine(setup, lora_paths=specs(setup, [FIRST, OTHER]),
                                     max_loras_per_batch=slots)
        assert self.engine.adapters is not None
        self.manager = self.engine.adapters
        self.expected = solo(setup, RUNNING, n=40)
        self.expected_after = solo(setup, [(LATER, 3)])[0]

    async def start(self) -> None:
        """Submit RUNNING's requests and wait for the first one's first token."""
        p = self.setup["prompts"]
        self.reqs = [await self.engine.submit(p[i], greedy(40), name) for name, i in RUNNING]
        self.stream = self.engine.stream(self.reqs[0])
        assert not (await anext(self.stream)).finished  # the requests run

    async def finish(self) -> None:
        """Their tokens once done: each as the adapter it started with gives alone."""
        rest = [o async for o in self.stream]
        outs = [rest[-1].output_token_ids]
        outs += [await collect(self.engine, r) for r in self.reqs[1:]]
        assert outs == self.expected

    async def later(self) -> None:
        """A request for FIRST's name gets LATER's tokens."""
        req = await self.engine.submit(self.setup["prompts"][3], greedy(NEW_TOKENS), FIRST)
        assert await collect(self.engine, req) == self.expected_after


def test_unload_while_requests_run(setup: dict[str, Any]) -> None:
    case = Running(setup, slots=2)
    engine, manager = case.engine, case.manager

    async def go() -> None:
        await engine.start()
        try:
            await case.start()
            unload = asyncio.create_task(engine.unload_adapter(FIRST))
            await asyncio.sleep(0.01)
            assert not unload.done(), "unload returned while its requests still ran"
            with pytest.raises(UnknownAdapterError, match="is being unloaded"):
                await engine.submit(setup["prompts"][4], greedy(4), FIRST)
            await case.finish()  # the running requests finished correctly
            await asyncio.wait_for(unload, 10)
            assert FIRST not in manager and manager.slot_of(FIRST) is None
            assert [a.name for a in manager.list()] == [OTHER]
            owners = [s.owner.name for s in manager._slots if s.owner is not None]
            assert owners == [OTHER], "the unloaded adapter's slot was not freed"
            assert manager._host_usage()[0] == 1, "its host copy was not freed"
            # the name again, with another adapter's files: serves that adapter
            await engine.load_adapter(FIRST, str(setup["paths"][LATER]))
            await case.later()
        finally:
            await engine.stop()

    run(go())


def test_load_in_place_while_requests_run(setup: dict[str, Any]) -> None:
    """vLLM's load_inplace: a name loaded anew while its requests run. Those finish with the
    old version's tokens; a request submitted once the load answered gets the new version's,
    in the same batches; the old version is unloaded once its requests are done."""
    case = Running(setup, slots=3)
    engine, manager, paths = case.engine, case.manager, setup["paths"]

    async def go() -> None:
        await engine.start()
        try:
            await case.start()
            await engine.load_adapter(FIRST, str(paths[LATER]), inplace=True)
            fresh = asyncio.create_task(case.later())
            listed = {a.path: a.replaced for a in manager.list() if a.name == FIRST}
            assert listed == {os.path.realpath(paths[FIRST]): True,
                              os.path.realpath(paths[LATER]): False}
            await case.finish()  # the running requests finished on the old version
            await fresh
            for _ in range(200):
                if len(manager.list()) == 2:
                    break
                await asyncio.sleep(0.01)
            assert sorted((a.name, a.path) for a in manager.list()) == sorted([
                (FIRST, os.path.realpath(paths[LATER])), (OTHER, os.path.realpath(paths[OTHER]))])
            assert engine.loaded_adapters()[FIRST] == os.path.realpath(paths[LATER])
            assert manager._host_usage()[0] == 2, "the old version's host copy was not freed"
            owners = sorted(s.owner.name for s in manager._slots if s.owner is not None)
            assert owners == sorted([FIRST, OTHER]), "the old version's slot was not freed"
        finally:
            await engine.stop()

    run(go())


def test_on_demand_loading_under_roots(setup: dict[str, Any]) -> None:
    name = NAMES[4]
    expected = solo(setup, [(name, 6)])
    engine = serving_engine(setup, lora_roots=(str(setup["root"]),), lora_resolve_on_demand=True)
    manager = engine.adapters
    assert manager is not None
    outside = setup["outside"]
    escapes = ["../outside", str(outside), str(setup["paths"][name]), "a4/../../outside", ".."]

    async def go() -> None:
        await engine.start()
        try:
            assert name not in manager
            req = await engine.submit(setup["prompts"][6], greedy(NEW_TOKENS), name)
            assert await collect(engine, req) == expected[0]
            assert [a.name for a in manager.list()] == [name]
            for bad in escapes:
                with pytest.raises(UnknownAdapterError, match="lora_roots") as info:
                    await engine.submit([5, 6, 7], greedy(2), bad)
                assert repr(bad) in str(info.value)
            assert [a.name for a in manager.list()] == [name], "an escaping name was loaded"
        finally:
            await engine.stop()

    run(go())


def test_failed_background_load_aborts_its_requests(setup: dict[str, Any], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(setup["paths"][NAMES[0]], broken)
    lora_paths = (LoraPathSpec("broken", str(broken)), *specs(setup, [NAMES[1]]))
    # one host copy: loading the second adapter drops the first to disk
    engine = serving_engine(setup, lora_paths=lora_paths, max_loras_per_batch=1, max_loaded_loras=1)
    manager = engine.adapters
    assert manager is not None
    expected_base = solo(setup, [(None, 7)])[0]

    async def go() -> None:
        await engine.start()
        try:
            assert {a.name: a.tier for a in manager.list()}["broken"] == "disk"
            weights = broken / "adapter_model.safetensors"
            weights.write_bytes(weights.read_bytes()[:100])  # corrupt it on disk
            reqs = [await engine.submit(setup["prompts"][7], greedy(8), "broken") for _ in range(2)]
            outs = await asyncio.wait_for(
                asyncio.gather(*(collect_last(engine, r) for r in reqs)), 10
            )
            for out in outs:
                assert out.finish_reason is FinishReason.ABORT
                assert out.error is not None and "could not be loaded" in out.error
                assert "corrupt" in out.error
            assert manager.counters.load_failures >= 1
            assert sum(a.refs for a in manager.list()) == 0
            req = await engine.submit(setup["prompts"][7], greedy(NEW_TOKENS))
            assert await collect(engine, req) == expected_base  # the engine still serves
        finally:
            await engine.stop()

    run(go())


async def collect_last(engine: Engine, req: Any) -> Any:
    last = None
    async for out in engine.stream(req):
        last = out
    return last


def test_no_adapter_loads_once_the_engine_drains(setup: dict[str, Any]) -> None:
    """Engine.load_adapter refuses like submit once stop() has begun (the HTTP admin route
    answers 503 before it gets here; Python callers got a load into a draining engine)."""
    from runtime.errors import EngineStoppedError

    engine = serving_engine(setup, lora_paths=specs(setup, [NAMES[1]]))

    async def go() -> None:
        await engine.start()
        req = await engine.submit(setup["prompts"][0], greedy(200), NAMES[1])
        stream = engine.stream(req)
        await anext(stream)  # it runs: the drain waits for it
        stopping = asyncio.create_task(engine.stop(drain_timeout=30.0))
        await asyncio.sleep(0.01)
        assert not stopping.done()
        with pytest.raises(EngineStoppedError, match="shutting down"):
            await engine.load_adapter(NAMES[2], str(setup["paths"][NAMES[2]]))
        assert NAMES[2] not in engine.adapters
        assert (await collect(engine, req))  # the running request still finishes
        await stopping

    run(go())
