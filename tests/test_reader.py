"""Adapter reads in reader processes (runtime/adapters/reader.py): host copies equal to the
in-process build's, the same errors, chunks made after start, a killed reader replaced, and
the manager serving through them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from runtime.adapters.manager import AdapterManager, uses_reader_processes
from runtime.adapters.peft_format import AdapterError, load_peft_adapter
from runtime.adapters.pool import LoraPool
from runtime.adapters.reader import ProcessReader
from runtime.config import ConfigError, ServerConfig
from tests.test_adapter_load_fast import (
    ALL,
    CPU,
    SHAPE,
    check_host_groups,
    full_spec,
    write_adapter,
)

WIDE = full_spec(ALL, 8)
NARROW = full_spec(("q_proj",), 4)


@pytest.fixture
def adapters(tmp_path: Path) -> dict[str, Path]:
    out = {"wide": tmp_path / "wide", "narrow": tmp_path / "narrow"}
    write_adapter(out["wide"], WIDE, 8, seed=1)
    write_adapter(out["narrow"], NARROW, 4, seed=2)
    return out


def shared_pool(stacked: tuple[str, ...] = ()) -> LoraPool:
    pool = LoraPool(SHAPE, 2, 8, ALL, CPU, torch.bfloat16, stacked=stacked)
    pool.share_host_rows()
    return pool


def assert_same_copy(got, want) -> None:
    assert torch.equal(got.flat, want.flat)
    assert torch.equal(got.flat_scalings, want.flat_scalings)
    assert got.stacks.keys() == want.stacks.keys()
    for g, a in got.stacks.items():
        assert torch.equal(a, want.stacks[g])
    assert got.rank.tolist() == want.rank.tolist() and got.nbytes == want.nbytes


@pytest.mark.parametrize("stacked", [(), ("qkv", "down")])
def test_process_reads_equal_in_process_builds_and_reuse_rows_zeroed(
    adapters: dict[str, Path], stacked: tuple[str, ...]
) -> None:
    """A reader's host copy is byte-equal to the in-process build (stacked groups' A regions
    too: the reader's pool has the serving pool's layout); a row reused after a wide adapter
    holds a narrow one exactly (the reader zeroes it)."""
    pool = shared_pool(stacked)
    ref = LoraPool(SHAPE, 2, 8, ALL, CPU, torch.bfloat16, stacked=stacked)
    reader = ProcessReader(pool, SHAPE, workers=1)
    try:
        wide, rank, targets = reader.read(str(adapters["wide"]))
        assert rank == 8 and targets == frozenset(ALL)
        assert_same_copy(wide, ref.build_host(load_peft_adapter(str(adapters["wide"]), SHAPE)))
        assert wide.nbytes == pool.slot_nbytes
        assert all(torch.count_nonzero(a) > 0 for a in wide.stacks.values())
        check_host_groups(pool, wide, WIDE)
        row = wide.flat.data_ptr()
        del wide  # its row is free again
        narrow, rank, targets = reader.read(str(adapters["narrow"]))
        assert narrow.flat.data_ptr() == row and rank == 4 and targets == {"q_proj"}
        want = ref.build_host(load_peft_adapter(str(adapters["narrow"]), SHAPE))
        assert_same_copy(narrow, want)
        check_host_groups(pool, narrow, NARROW)
    finally:
        reader.close()


def test_reader_errors_are_the_in_process_errors(adapters: dict[str, Path]) -> None:
    """A bad adapter fails with the message the in-process read gives, and frees its row."""
    bad = adapters["wide"].parent / "bad"
    write_adapter(bad, WIDE, 8, seed=3)
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError) as local:
        load_peft_adapter(str(bad), SHAPE)
    pool = shared_pool()
    reader = ProcessReader(pool, SHAPE, workers=1)
    try:
        with pytest.raises(AdapterError) as remote:
            reader.read(str(bad))
        assert str(remote.value) == str(local.value)
        assert pool._host_rows.num_rows == 1
        host, _, _ = reader.read(str(adapters["narrow"]))  # the failed read's row came back
        assert pool._host_rows.num_rows == 1 and host.rank.tolist() == [4]
    finally:
        reader.close()


def test_chunks_made_after_start_reach_the_readers(
    adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Live copies beyond the reserved rows come from new chunks, which readers map as
    they are made: every copy reads back exactly."""
    import runtime.adapters.pool as pool_mod

    pool = shared_pool()
    monkeypatch.setattr(pool_mod, "HOST_CHUNK_BYTES", 2 * pool.host_row_bytes)
    pool.reserve_host_rows(2)
    reader = ProcessReader(pool, SHAPE, workers=2)
    try:
        want = LoraPool(SHAPE, 2, 8, ALL, CPU, torch.bfloat16).build_host(
            load_peft_adapter(str(adapters["wide"]), SHAPE)
        )
        live = [reader.read(str(adapters["wide"]))[0] for _ in range(7)]
        assert pool._host_rows.num_chunks >= 4
        assert len({h.flat.data_ptr() for h in live}) == 7
        for host in live:
            assert_same_copy(host, want)
    finally:
        reader.close()


@pytest.fixture
def one_reader(adapters: dict[str, Path]) -> Iterator[tuple[LoraPool, ProcessReader, int]]:
    """A pool, a reader process that has served one read, and its pid."""
    pool = shared_pool()
    reader = ProcessReader(pool, SHAPE, workers=1)
    try:
        reader.read(str(adapters["narrow"]))  # started and serving
        (pid,) = reader.pids()
        yield pool, reader, pid
    finally:
        reader.close()


def test_a_reader_killed_mid_read_fails_that_read_and_is_replaced(
    adapters: dict[str, Path], one_reader: tuple[LoraPool, ProcessReader, int]
) -> None:
    pool, reader, pid = one_reader
    os.kill(pid, signal.SIGSTOP)  # the next read is sent and waits on a reader that ...
    with ThreadPoolExecutor(1) as ex:
        pending = ex.submit(reader.read, str(adapters["narrow"]))
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)  # ... dies in the middle of it
        with pytest.raises(AdapterError, match="reader process failed"):
            pending.result(timeout=30)
    assert reader.restarts == 1 and reader.pids() != [pid]
    assert pool._host_rows.num_rows == 1  # the failed read's row came back
    host, rank, _ = reader.read(str(adapters["wide"]))
    assert rank == 8 and host.rank.tolist() == [8]


def test_a_reader_found_dead_while_idle_is_replaced_before_the_read(
    adapters: dict[str, Path], one_reader: tuple[LoraPool, ProcessReader, int]
) -> None:
    _, reader, pid = one_reader
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):  # reaped
        if reader._all[0].proc.poll() is not None:
            break
        time.sleep(0.05)
    _, rank, _ = reader.read(str(adapters["wide"]))  # no failure for a read it never had
    assert rank == 8 and reader.restarts == 1 and reader.pids() != [pid]


async def test_manager_serves_through_reader_processes(adapters: dict[str, Path]) -> None:
    """lora_loader process on the CPU: loads, uploads and slot contents as with threads."""
    from tests.test_adapters import FakeStreams

    config = ServerConfig(device="cpu", enable_lora=True, max_lora_rank=8,
                          lora_target_modules=ALL, max_loras_per_batch=2, lora_loader="process")
    m = AdapterManager(config, SHAPE, CPU, torch.bfloat16, FakeStreams())
    try:
        assert m.reader is not None
        await m.load("wide", str(adapters["wide"]))
        await m.load("narrow", str(adapters["narrow"]))
        ref = LoraPool(SHAPE, 2, 8, ALL, CPU, torch.bfloat16)
        for name in ("wide", "narrow"):
            slot = m.admit(name, set(), overlap=False)
            assert slot is not None
            want = ref.build_host(load_peft_adapter(str(adapters[name]), SHAPE))
            assert torch.equal(m.pool._slab[slot], want.flat)
            assert torch.equal(m.pool._slab_scalings[slot], want.flat_scalings)
        bad = adapters["wide"].parent / "bad"
        write_adapter(bad, NARROW, 4, seed=3)
        (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 7)
        with pytest.raises(AdapterError, match="corrupt or truncated"):
            await m.load("bad", str(bad))
        assert m.counters.load_failures == 1 and m.state("wide") is not None
    finally:
        pids = m.reader.pids() if m.reader else []
        m.close()
    for pid in pids:  # the readers have exited
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_script_without_a_main_guard_can_start_readers(adapters: dict[str, Path],
                                                         tmp_path: Path) -> None:
    """A user's script that starts readers at top level (as building an engine does on CUDA)
    runs once: readers do not re-run the parent's main script."""
    script = tmp_path / "top_level.py"
    marker = tmp_path / "runs"
    script.write_text(
        "import torch\n"
        "from runtime.adapters.pool import LoraPool\n"
        "from runtime.adapters.reader import ProcessReader\n"
        "from tests.test_adapter_load_fast import ALL, SHAPE\n"
        f"open({str(marker)!r}, 'a').write('run\\n')\n"
        "pool = LoraPool(SHAPE, 2, 8, ALL, torch.device('cpu'), torch.bfloat16)\n"
        "pool.share_host_rows()\n"
        "reader = ProcessReader(pool, SHAPE, workers=1)\n"
        f"host, rank, _ = reader.read({str(adapters['wide'])!r})\n"
        "print('rank', rank)\n"
        "reader.close()\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(script)], check=False, cwd=root,
                         capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    assert "rank 8" in out.stdout and marker.read_text() == "run\n"


def test_loader_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"enable_lora": True, "max_lora_rank": 8, "lora_target_modules": ("q_proj",)}
    cpu_pool = LoraPool(SHAPE, 2, 8, ("q_proj",), CPU, torch.float32)
    assert not uses_reader_processes(ServerConfig(**base), cpu_pool)  # auto: CUDA only
    with monkeypatch.context() as m:  # a pool whose copies are pinned, as on CUDA
        m.setattr(LoraPool, "pins_host_rows", property(lambda self: True))
        assert uses_reader_processes(ServerConfig(**base), cpu_pool)
        m.setattr(sys, "executable", "")  # embedded: no interpreter to start readers with
        assert not uses_reader_processes(ServerConfig(**base), cpu_pool)
    assert uses_reader_processes(ServerConfig(**base, lora_loader="process"), cpu_pool)
    assert not uses_reader_processes(ServerConfig(**base, lora_loader="thread"), cpu_pool)
    with pytest.raises(ConfigError, match="lora_loader: process is not supported at tp_size"):
        ServerConfig(**base, lora_loader="process", tp_size=2)
