"""Run-time adapter loading is safe to expose: hostile or broken adapter folders, names and
timing, against the real engine over HTTP (a tiny random Llama on CPU).

Every adapter here is a real folder (PEFT's, then edited). Each refused load must answer 400
with a message naming the option, file or tensor (503 while the server shuts down), answer
promptly (no FIFO, device, regular expression or oversized file may stall the server), leave
nothing held (no name, load in progress, reference, host row or slot lock), and another
adapter's requests must keep being served. Options we support must load.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from api import create_app
from api.app import ENGINE, _stop_engine
from metrics import ServingMetrics
from runtime.adapters.peft_format import read_adapter_config
from runtime.config import LoraPathSpec, ServerConfig
from runtime.engine import Engine
from runtime.errors import AdapterError, EngineStoppedError
from tests.models import make_adapter, make_model

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
BIN = "adapter_model.bin"
TIMEOUT_S = 15.0
REPO = str(Path(__file__).resolve().parent.parent)
# Backtracks exponentially on a module name that does not end in "m" (every one but
# model.norm): Python's re holds the GIL meanwhile, freezing every thread of the server.
REDOS = r"(.|.|.)*m"


class Setup:
    def __init__(self, base: Path) -> None:
        self.model = make_model(base / "model")
        self.root = base / "adapters"
        self.good = make_adapter(self.model, self.root / "good", seed=1)  # rank 4, q_proj v_proj
        self.other = make_adapter(self.model, self.root / "other", seed=2)
        self.outside = base / "outside"  # beside lora_roots, not in it
        self.outside.mkdir()
        self.counter = 0

    def copy(self, name: str | None = None) -> Path:
        """A private copy of the good adapter inside lora_roots."""
        self.counter += 1
        dst = self.root / (name or f"case{self.counter}")
        shutil.copytree(self.good, dst)
        return dst

    def with_config(self, **changes: Any) -> Path:
        folder = self.copy()
        cfg = json.loads((folder / CONFIG).read_text())
        cfg.update(changes)
        (folder / CONFIG).write_text(json.dumps(cfg))
        return folder

    def with_config_bytes(self, raw: bytes) -> Path:
        folder = self.copy()
        (folder / CONFIG).write_bytes(raw)
        return folder

    def with_tensors(self, edit) -> Path:
        folder = self.copy()
        tensors = load_file(folder / WEIGHTS)
        edit(tensors)
        save_file(tensors, folder / WEIGHTS)
        return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(tmp_path_factory.mktemp("adapter_safety"))


def server_config(setup: Setup, **overrides: Any) -> ServerConfig:
    cfg: dict[str, Any] = {
        "model_path": str(setup.model), "device": "cpu", "dtype": "float32",
        "kv_cache_cpu_bytes": 1 << 24, "enable_lora": True, "max_lora_rank": 8,
        "lora_target_modules": ("q_proj", "v_proj"), "served_model_name": "tiny",
        "max_loras_per_batch": 2, "lora_roots": (str(setup.root),),
        "lora_resolve_on_demand": True, "lora_paths": (LoraPathSpec("a1", str(setup.other)),),
    }
    cfg.update(overrides)
    return ServerConfig(**cfg)


@pytest.fixture
def make_client(aiohttp_client, setup):
    async def make(**overrides: Any):
        cfg = server_config(setup, **overrides)
        metrics = ServingMetrics()
        return await aiohttp_client(create_app(Engine.from_config(cfg, metrics), cfg, metrics))
    return make


GREEDY = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}


async def ids(client, lora: str | None) -> list[int]:
    r = await asyncio.wait_for(client.post("/generate", json={
        "text": "Paris is", "lora_path": lora, "sampling_params": GREEDY}), TIMEOUT_S)
    assert r.status == 200, await r.text()
    return (await r.json())["output_ids"]


async def load(client, folder: Path | str, name: str = "probe") -> tuple[int, str]:
    """POST /load_lora_adapter; (status, error message). Fails on a load that hangs."""
    try:
        r = await asyncio.wait_for(client.post("/load_lora_adapter", json={
            "lora_name": name, "lora_path": str(folder)}), TIMEOUT_S)
    except TimeoutError:
        pytest.fail(f"loading {folder} hung for {TIMEOUT_S} s")
    body = await r.json()
    return r.status, body["error_message"]


def assert_nothing_held(client, names: set[str]) -> None:
    """Only `names` are registered, and nothing else is held: no load in progress, no name
    reference, no slot lock, and host rows only for the host copies of `names`."""
    m = client.app[ENGINE].adapters
    rows = m.pool._host_rows
    # A dropped host copy gives its row back when it is collected, and a loader thread holds
    # the copy it read (its work item's future) a moment after the loop has the result: under
    # load (CI's two cores) the test could get here first.
    deadline = time.monotonic() + 5.0
    while True:
        gc.collect()
        in_use = rows.num_rows - len(rows._free) - len(rows._draining)
        copies = sum(a.host is not None for a in m._adapters.values())
        if in_use == copies or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not m._loading and not m._loading_pinned and not m._resolving
    assert set(m._adapters) == names
    assert sum(a.refs for a in m._adapters.values()) == 0
    assert all(s.locks == 0 for s in m._slots)
    assert all(s.owner is None or s.owner.name in names for s in m._slots)
    assert in_use == m._host_tally.count == copies


async def check_refusals(client, cases: dict[str, tuple[Path | str, str]]) -> None:
    """Each case is refused with a 400 whose message holds its word; nothing is held after
    it, and a1 keeps serving the same tokens."""
    expected = await ids(client, "a1")
    for case, (folder, word) in cases.items():
        status, message = await load(client, folder)
        assert status == 400 and word in message, (case, status, message)
        assert_nothing_held(client, {"a1"})
        assert await ids(client, "a1") == expected, case


# ---------------------------------------------------------------- adapter_config.json options

def huge_int_config(field: str, digits: int) -> bytes:
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    cfg[field] = 7  # placeholder, replaced by a number JSON allows but no float holds
    return json.dumps(cfg).replace(f'"{field}": 7', f'"{field}": 1{"0" * digits}').encode()


async def test_config_options_are_refused_by_name(make_client, setup) -> None:
    """Options that change the maths or that we cannot honour, and values of the wrong type
    or beyond any float, are 400s naming the option (several were 500s, or loaded while
    ignored)."""
    c = setup.with_config
    big = json.loads((setup.good / CONFIG).read_text())
    big["revision"] = "x" * (2 << 20)
    cases = {
        # changes the maths
        "use_dora": (c(use_dora=True), "use_dora"),
        "modules_to_save": (c(modules_to_save=["lm_head"]), "modules_to_save"),
        "bias": (c(bias="lora_only"), "bias"),
        "lora_bias": (c(lora_bias=True), "lora_bias"),
        "megatron_config": (c(megatron_config={"tensor_model_parallel_size": 2}),
                            "megatron_config"),
        "trainable_token_indices": (c(trainable_token_indices=[1, 2]),
                                    "trainable_token_indices"),
        "init_pissa": (c(init_lora_weights="pissa_niter_4"), "init_lora_weights"),
        "peft_type": (c(peft_type="LOHA"), "peft_type"),
        "unknown option": (c(some_future_option=1), "some_future_option"),
        # an adapter for another head or architecture (loaded before, and served wrongly)
        "task_type SEQ_CLS": (c(task_type="SEQ_CLS"), "task_type"),
        "task_type SEQ_2_SEQ_LM": (c(task_type="SEQ_2_SEQ_LM"), "task_type"),
        # fields of the wrong type: ignored (loaded) or a 500 before
        "exclude_modules int": (c(exclude_modules=5), "exclude_modules"),
        "exclude_modules dict": (c(exclude_modules={"q_proj": 1}), "exclude_modules"),
        "layers_to_transform str": (c(layers_to_transform="0"), "layers_to_transform"),
        "layers_to_transform [str]": (c(layers_to_transform=["0"]), "layers_to_transform"),
        "layers_pattern int": (c(layers_to_transform=[0], layers_pattern=5), "layers_pattern"),
        "target regex matching nothing": (c(target_modules=r".*\.nothing"), "target_modules"),
        "target outside the pool": (c(target_modules=["q_proj", "gate_proj"]),
                                    "--lora-target-modules"),
        "rank above max_lora_rank": (c(r=16, lora_alpha=16), "max-lora-rank"),
        # numbers JSON allows that no float (or the pool's float32 scalings) holds: 500s or
        # NaN outputs before
        "lora_alpha 1e400 as an int": (setup.with_config_bytes(huge_int_config("lora_alpha", 400)),
                                       "lora_alpha"),
        "r of 5000 digits": (setup.with_config_bytes(huge_int_config("r", 5000)), CONFIG),
        "r 1e30": (c(r=10**30), "r: must be a positive integer"),
        "scaling beyond float32": (c(lora_alpha=1e300), "lora_alpha"),
        # the file itself
        "not JSON": (setup.with_config_bytes(b"{nope"), CONFIG),
        "not UTF-8": (setup.with_config_bytes(b'{"peft_type": "\xff"}'), CONFIG),
        "JSON but an array": (setup.with_config_bytes(b"[1, 2]"), "JSON object"),
        "nested 100000 deep": (setup.with_config_bytes(b"[" * 100000 + b"]" * 100000), CONFIG),
        "over 1 MiB": (setup.with_config_bytes(json.dumps(big).encode()), "larger than"),
    }
    await check_refusals(await make_client(), cases)


async def test_supported_options_load_and_serve(make_client, setup) -> None:
    """Options that leave the maths alone, or that we apply as PEFT does, load and serve."""
    c = setup.with_config
    cases = {
        "use_rslora": c(use_rslora=True),
        "fan_in_fan_out": c(fan_in_fan_out=True),
        "inference_mode false": c(inference_mode=False),
        "init eva": c(init_lora_weights="eva"),
        "base_model_name_or_path of another model": c(
            base_model_name_or_path="meta-llama/Llama-2-70b-hf"),
        "task_type FEATURE_EXTRACTION": c(task_type="FEATURE_EXTRACTION"),
        "target regex": c(target_modules=r".*\.(q|v)_proj"),
        "exclude_modules list": c(target_modules=["q_proj", "v_proj", "k_proj"],
                                  exclude_modules=["k_proj"]),
        "layers_to_transform int": c(layers_to_transform=0, target_modules=["q_proj"]),
    }
    # layers_to_transform 0 with q_proj alone: the file's other tensors must go
    keep_q0 = cases["layers_to_transform int"]
    tensors = load_file(keep_q0 / WEIGHTS)
    save_file({k: v for k, v in tensors.items() if "layers.0.self_attn.q_proj" in k},
              keep_q0 / WEIGHTS)
    client = await make_client()
    for i, (case, folder) in enumerate(cases.items()):
        status, message = await load(client, folder, f"ok{i}")
        assert status == 200, (case, message)
        await ids(client, f"ok{i}")
    assert_nothing_held(client, {"a1", *(f"ok{i}" for i in range(len(cases)))})


def test_rslora_scaling_is_alpha_over_sqrt_rank(setup) -> None:
    folder = setup.with_config(use_rslora=True, lora_alpha=6, r=4,
                               rank_pattern={"v_proj": 2})
    spec = read_adapter_config(str(folder), 2).modules
    assert spec[(0, "q_proj")].scaling == pytest.approx(6 / math.sqrt(4))
    assert spec[(1, "v_proj")].scaling == pytest.approx(6 / math.sqrt(2))


# ---------------------------------------------------------------- regular expressions

_REDOS_CHILD = """
import sys, threading, time
sys.path[:0] = [{repo!r}]
from runtime.adapters.peft_format import AdapterError, read_adapter_config
gaps, done = [], threading.Event()
def beat():
    last = time.monotonic()
    while not done.is_set():
        time.sleep(0.01)
        now = time.monotonic()
        gaps.append(now - last)
        last = now
threading.Thread(target=beat, daemon=True).start()
try:
    read_adapter_config({path!r}, 2)
    print("LOADED")
except AdapterError as e:
    print("REFUSED", e)
done.set()
print("GAP", max(gaps, default=0.0))
"""


def read_config_in_child(folder: Path) -> str | None:
    """What _REDOS_CHILD prints for `folder`; None if it did not end within a minute."""
    code = _REDOS_CHILD.format(repo=REPO, path=str(folder))
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, check=False).stdout
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.parametrize("field", ["exclude_modules", "rank_pattern", "alpha_pattern"])
async def test_regex_cannot_freeze_the_server(make_client, setup, field: str) -> None:
    """A catastrophically backtracking pattern froze the whole process for good (the GIL was
    held: no thread, not the event loop, ran). Now it is refused within a time budget, naming
    the field, and other threads run meanwhile."""
    value: Any = REDOS if field == "exclude_modules" else {REDOS: 4}
    folder = setup.with_config(**{field: value})
    # first in a child process, which a hang cannot take down with the test run
    out = await asyncio.to_thread(read_config_in_child, folder)
    if out is None:
        pytest.fail(f"{field} {REDOS!r}: matching the module names did not end in 60 s")
    assert f"REFUSED {field}" in out and "takes too long" in out, out
    assert float(out.rsplit("GAP", 1)[1]) < 0.5, out  # the GIL was not held
    # then through the server: /health answers while the load runs
    client = await make_client()
    loading = asyncio.create_task(load(client, folder))
    t0 = time.monotonic()
    r = await asyncio.wait_for(client.get("/health"), 0.5)
    assert r.status == 200 and time.monotonic() - t0 < 0.5
    status, message = await loading
    assert status == 400 and field in message and "takes too long" in message, message
    assert_nothing_held(client, {"a1"})
    await ids(client, "a1")


# ---------------------------------------------------------------- weight files

async def test_weight_files_are_refused_by_name(make_client, setup) -> None:
    def first(t: dict[str, torch.Tensor], part: str) -> str:
        return min(k for k in t if part in k)

    def set_value(part: str, value: float):
        def edit(t: dict[str, torch.Tensor]) -> None:
            k = first(t, part)
            t[k] = t[k].clone()
            t[k][0, 0] = value
        return edit

    def duplicate(t: dict[str, torch.Tensor]) -> None:
        k = first(t, "lora_A")  # the same tensor again, saved without the PEFT prefix
        t[k.removeprefix("base_model.model.")] = torch.randn_like(t[k])

    data = (setup.good / WEIGHTS).read_bytes()
    truncated, trailing, huge_header = setup.copy(), setup.copy(), setup.copy()
    (truncated / WEIGHTS).write_bytes(data[: len(data) // 2])
    (trailing / WEIGHTS).write_bytes(data + bytes(1 << 20))  # 1 MiB after the last tensor
    (huge_header / WEIGHTS).write_bytes((1 << 62).to_bytes(8, "little") + data[8:])
    cases = {
        "truncated": (truncated, "truncated"),
        "bytes after the last tensor": (trailing, "after the last tensor"),
        "header length beyond the file": (huge_header, "header of"),
        "int dtype": (setup.with_tensors(lambda t: t.update(
            {k: v.to(torch.int32) for k, v in t.items() if "lora_A" in k})), "float type"),
        "wrong shape": (setup.with_tensors(lambda t: t.update(
            {first(t, "lora_A"): torch.zeros(5, 64)})), "expected shape"),
        "missing lora_B": (setup.with_tensors(lambda t: t.pop(first(t, "lora_B"))),
                           "missing tensor lora_B"),
        "a tensor twice": (setup.with_tensors(duplicate), "a second lora_A"),
        "unknown key": (setup.with_tensors(lambda t: t.update({"some.thing": torch.zeros(2)})),
                        "not a LoRA weight"),
        "layer beyond the model": (setup.with_tensors(lambda t: t.update({
            "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight":
                torch.zeros(4, 64)})), "layers.7"),
        "NaN": (setup.with_tensors(set_value("lora_A", float("nan"))), "NaN"),
        "Inf": (setup.with_tensors(set_value("lora_B", float("inf"))), "Inf"),
    }
    await check_refusals(await make_client(), cases)


async def test_values_the_pool_dtype_cannot_hold_are_refused(make_client, setup) -> None:
    """A float16 server turned weights of 1e30 into Inf in its host copy and answered with
    NaN logits (token 0); such values are refused naming the tensor and the dtype."""
    folder = setup.with_tensors(lambda t: t.update({k: v * 1e30 for k, v in t.items()}))
    client = await make_client(dtype="float16")
    status, message = await load(client, folder)
    assert status == 400 and "lora_" in message and "float16" in message, message
    assert_nothing_held(client, {"a1"})
    status, message = await load(client, setup.good, "fine")
    assert status == 200, message


class Unpickled:
    """Makes a marker folder when unpickled (as a hostile pickle would run anything)."""

    marker = ""

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


async def test_pickle_weights_are_never_unpickled_unsafely(make_client, setup, tmp_path) -> None:
    """adapter_model.bin is read with torch.load(weights_only=True): a pickle that would run
    code is refused and runs nothing; one larger than the config's tensors can need is
    refused before it is unpickled at all; a plain one loads."""
    marker = tmp_path / "ran"
    Unpickled.marker = str(marker)
    tensors = load_file(setup.good / WEIGHTS)
    plain, hostile, oversized = setup.copy(), setup.copy(), setup.copy()
    for folder in (plain, hostile, oversized):
        (folder / WEIGHTS).unlink()
    torch.save(tensors, plain / BIN)
    torch.save({**tensors, "x": Unpickled()}, hostile / BIN)
    torch.save({**tensors, "padding": torch.zeros(1 << 20)}, oversized / BIN)
    client = await make_client()
    status, message = await load(client, hostile)
    assert status == 400 and BIN in message, message
    assert not marker.exists()
    status, message = await load(client, oversized)
    assert status == 400 and "bytes, more than" in message, message
    assert_nothing_held(client, {"a1"})
    status, message = await load(client, plain, "plain")
    assert status == 200, message
    safetensors_copy = setup.copy()
    status, message = await load(client, safetensors_copy, "same")
    assert status == 200, message
    assert await ids(client, "plain") == await ids(client, "same")


# ---------------------------------------------------------------- special files and links

def release_fifo(fifo: Path) -> None:
    """Open `fifo` for writing and close it: a reader blocked on it (before the fix) ends."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # nobody is reading it


async def test_special_files_do_not_hang_the_server(make_client, setup) -> None:
    """A FIFO as the config blocked the config thread for good (every later load and
    on-demand resolution queued behind it); a FIFO, folder or device as the weights was
    "missing". Each is refused at once as not a regular file, and loads go on."""
    fifo_config = setup.copy("fifo_config")
    (fifo_config / CONFIG).unlink()
    os.mkfifo(fifo_config / CONFIG)
    fifo_weights, dir_weights = setup.copy(), setup.copy()
    for folder in (fifo_weights, dir_weights):
        (folder / WEIGHTS).unlink()
    os.mkfifo(fifo_weights / WEIGHTS)
    (dir_weights / WEIGHTS).mkdir()
    device = setup.copy()
    (device / WEIGHTS).unlink()
    os.symlink("/dev/zero", device / WEIGHTS)
    client = await make_client()
    try:
        await check_refusals(client, {
            "FIFO config": (fifo_config, "adapter_config.json: not a regular file"),
            "FIFO weights": (fifo_weights, "not a regular file"),
            "folder as weights": (dir_weights, "not a regular file"),
            "/dev/zero as weights": (device, "system folder"),
            "a file as the folder": (fifo_config / "adapter_model.safetensors", "lora_path"),
        })
        # an on-demand name naming the FIFO folder: refused, no hang
        r = await asyncio.wait_for(client.post("/generate", json={
            "text": "x", "lora_path": "fifo_config"}), TIMEOUT_S)
        assert r.status == 400
        status, message = await load(client, setup.good, "after")
        assert status == 200, message
    finally:
        release_fifo(fifo_config / CONFIG)


async def test_links_out_of_lora_roots_are_refused(make_client, setup) -> None:
    """With lora_roots set, the folder was checked but not the files in it: a config or weights
    file that is a link out of the roots was read."""
    config_link, weights_link = setup.copy(), setup.copy()
    (config_link / CONFIG).rename(setup.outside / "config.json")
    os.symlink(setup.outside / "config.json", config_link / CONFIG)
    (weights_link / WEIGHTS).rename(setup.outside / WEIGHTS)
    os.symlink(setup.outside / WEIGHTS, weights_link / WEIGHTS)
    inside = setup.copy()  # a link that stays inside the roots is fine
    (inside / WEIGHTS).rename(setup.root / "shared.safetensors")
    os.symlink(setup.root / "shared.safetensors", inside / WEIGHTS)
    loop = setup.root / "loop"
    os.symlink(loop, loop)
    client = await make_client()
    await check_refusals(client, {
        "config links out": (config_link, "adapter_config.json links outside lora_roots"),
        "weights link out": (weights_link, "adapter_model.safetensors links outside lora_roots"),
        "symlink loop": (loop, "lora_path"),
    })
    status, message = await load(client, inside, "inside")
    assert status == 200, message


async def test_bad_startup_adapter_fails_fast(setup) -> None:
    """A startup adapter (lora_paths) whose config is a FIFO failed to start by hanging."""
    folder = setup.copy("fifo_startup")
    (folder / CONFIG).unlink()
    os.mkfifo(folder / CONFIG)
    cfg = server_config(setup, lora_paths=(LoraPathSpec("bad", str(folder)),))
    engine = Engine.from_config(cfg, ServingMetrics())
    try:
        with pytest.raises(AdapterError, match="not a regular file"):
            await asyncio.wait_for(engine.start(), TIMEOUT_S)
    finally:
        release_fifo(folder / CONFIG)
        await engine.stop()


# ---------------------------------------------------------------- names

async def test_names(make_client, setup) -> None:
    client = await make_client()
    long_name = "n" * 100_000
    status, message = await load(client, setup.good, long_name)
    assert status == 400 and "at most 256 characters" in message
    assert len(message) < 200  # the name is not echoed back
    for name in ("", " ", " lead", "trail ", "a:b", "a\x00b", "a\nb", "a\u202eb"):
        status, message = await load(client, setup.good, name)
        assert status == 400 and message.startswith("lora_name"), (name, message)
    assert_nothing_held(client, {"a1"})
    # slashes are fine in a name (it is never a path): both APIs and the listing take it
    status, message = await load(client, setup.good, "org/adapter")
    assert status == 200, message
    await ids(client, "org/adapter")
    r = await client.post("/v1/completions", json={
        "model": "tiny:org/adapter", "prompt": "Paris is", "max_tokens": 4, "temperature": 0})
    assert r.status == 200, await r.text()
    status, message = await load(client, setup.other, "org/adapter")
    assert status == 400 and "already loaded" in message
    r = await client.post("/unload_lora_adapter", json={"lora_name": "org/adapter"})
    assert r.status == 200
    # an on-demand name that no path may hold was a 500 (os.path refuses a NUL)
    for name in ("a\x00b", "../other", ".", "x" * 5000):
        r = await client.post("/generate", json={"text": "x", "lora_path": name})
        assert r.status == 400, (name, await r.text())
    assert_nothing_held(client, {"a1"})


# ---------------------------------------------------------------- shutdown

async def test_loads_during_shutdown_are_503(make_client, setup) -> None:
    """A load once shutdown had begun was a 500 (its executor was shut down)."""
    client = await make_client()
    engine = client.app[ENGINE]
    await _stop_engine(client.app, 0.0)
    r = await client.post("/load_lora_adapter", json={"lora_name": "late",
                                                      "lora_path": str(setup.good)})
    body = await r.json()
    assert r.status == 503 and body["success"] is False and "shutting down" in body[
        "error_message"], body
    with pytest.raises(EngineStoppedError):
        await engine.adapters.load("late", str(setup.good))


async def test_load_cut_short_by_shutdown_is_engine_stopped(setup) -> None:
    """A load queued on the config thread when the manager closes ends as EngineStoppedError
    (it was a bare CancelledError, which an HTTP handler cannot answer)."""
    import threading

    engine = Engine.from_config(server_config(setup, lora_paths=()), ServingMetrics())
    manager = engine.adapters
    gate = threading.Event()
    busy = asyncio.get_running_loop().run_in_executor(manager._meta_executor, gate.wait, 10)
    loading = asyncio.create_task(manager.load("queued", str(setup.good)))
    await asyncio.sleep(0.05)
    manager.close()
    with pytest.raises(EngineStoppedError):
        await asyncio.wait_for(loading, TIMEOUT_S)
    gate.set()
    await busy
    assert not manager._loading and not manager._adapters
    await engine.stop()


async def test_unload_while_loading_says_so(make_client, setup) -> None:
    """An unload of a name whose load has not answered yet said it was never loaded."""
    import threading

    client = await make_client()
    manager = client.app[ENGINE].adapters
    gate = threading.Event()
    busy = asyncio.get_running_loop().run_in_executor(manager._meta_executor, gate.wait, 10)
    loading = asyncio.create_task(load(client, setup.good, "slow"))
    await asyncio.sleep(0.1)
    r = await client.post("/unload_lora_adapter", json={"lora_name": "slow"})
    body = await r.json()
    assert r.status == 400 and "still loading" in body["error_message"], body
    gate.set()
    await busy
    assert await loading == (200, "")
    r = await client.post("/unload_lora_adapter", json={"lora_name": "slow"})
    assert r.status == 200
    assert_nothing_held(client, {"a1"})


def test_hub_adapters_fetch_only_adapter_files(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    """A hub id downloaded the whole repository (a model's weights too, whatever it holds)."""
    import huggingface_hub

    from runtime.adapters.paths import resolve_adapter_path

    asked: dict[str, Any] = {}

    def fake_download(repo_id: str, **kw: Any) -> str:
        asked.update(kw, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_adapter_path("org/adapter", (), True) == str(tmp_path)
    assert asked["repo_id"] == "org/adapter"
    assert sorted(asked.get("allow_patterns") or []) == sorted([BIN, CONFIG, WEIGHTS])


# ---------------------------------------------------------------- re-reads from disk

async def generate(client, lora: str) -> tuple[int, dict[str, Any]]:
    """POST /generate for `lora`; (status, body). Fails on a request that hangs."""
    try:
        r = await asyncio.wait_for(client.post("/generate", json={
            "text": "Paris is", "lora_path": lora, "sampling_params": GREEDY}), TIMEOUT_S)
    except TimeoutError:
        pytest.fail(f"a request for {lora} hung for {TIMEOUT_S} s")
    return r.status, await r.json()


def abort_message(body: dict[str, Any]) -> str:
    reason = body["meta_info"]["finish_reason"]
    assert reason["type"] == "abort", body
    return reason["message"]


async def evict_to_disk(client, setup: Setup, loaded: set[str]) -> None:
    """Push every other adapter out of host memory (max_loaded_loras 2) and out of the GPU
    slots (max_loras_per_batch 2): load two fillers and serve them."""
    for name in ("filler1", "filler2"):
        status, message = await load(client, setup.good, name)
        assert status == 200, message
        loaded.add(name)
        await ids(client, name)
    tiers = {a.name: a.tier for a in client.app[ENGINE].adapters.list()}
    assert {n for n, t in tiers.items() if t != "disk"} == {"filler1", "filler2"}, tiers


async def test_reread_repeats_the_path_checks(make_client, setup) -> None:
    """A run-time adapter whose host copy was dropped is read again from disk: the folder
    or a file in it swapped for a link out of lora_roots (or into /proc) after the first load
    was read (the checks ran at the first load only), and so was an adapter of another rank,
    and weights rewritten in place (same rank and targets: the name then served other weights
    than it was loaded with). Now that re-read is refused as a failed load is: its request
    ends with the reason, nothing is held, and a1 keeps serving."""
    client = await make_client(max_loaded_loras=2)
    expected = await ids(client, "a1")

    def link_out(folder: Path, file: str) -> None:
        (folder / file).rename(setup.outside / f"{folder.name}-{file}")
        os.symlink(setup.outside / f"{folder.name}-{file}", folder / file)

    def folder_out(folder: Path) -> None:
        shutil.move(folder, setup.outside / folder.name)
        os.symlink(setup.outside / folder.name, folder)

    def to_proc(folder: Path) -> None:
        (folder / WEIGHTS).unlink()
        os.symlink("/proc/self/environ", folder / WEIGHTS)

    rank8 = make_adapter(setup.model, setup.outside / "rank8", rank=8, seed=3)

    def other_rank(folder: Path) -> None:
        for file in (CONFIG, WEIGHTS):
            shutil.copyfile(rank8 / file, folder / file)

    reseeded = make_adapter(setup.model, setup.outside / "reseeded", seed=7)  # as good's

    def rewrite(folder: Path) -> None:
        shutil.copyfile(reseeded / WEIGHTS, folder / WEIGHTS)

    swaps: dict[str, tuple[Any, str]] = {  # case: (the swap, a word of the refusal)
        "weights link out": (lambda f: link_out(f, WEIGHTS), f"{WEIGHTS} links outside"),
        "config link out": (lambda f: link_out(f, CONFIG), f"{CONFIG} links outside"),
        "folder link out": (folder_out, "no longer the folder"),
        "weights to /proc": (to_proc, "system folder"),
        "rank changed": (other_rank, "changed on disk"),
        "weights rewritten": (rewrite, "files were rewritten"),
    }
    names = {case: f"r{i}" for i, case in enumerate(swaps)}
    folders = {case: setup.copy(f"reread{i}") for i, case in enumerate(swaps)}
    for case, name in names.items():
        status, message = await load(client, folders[case], name)
        assert status == 200, message
    loaded = {"a1", *names.values()}
    on_demand = setup.copy("reread_on_demand")  # loaded by a request naming its folder
    status, body = await generate(client, on_demand.name)
    assert status == 200 and body["meta_info"]["finish_reason"]["type"] == "length", body
    loaded.add(on_demand.name)
    await evict_to_disk(client, setup, loaded)
    for case, (swap, _) in swaps.items():
        swap(folders[case])
    folder_out(on_demand)
    cases = {names[case]: word for case, (_, word) in swaps.items()}
    cases[on_demand.name] = "no longer the folder"
    for name, word in cases.items():
        status, body = await generate(client, name)
        assert status == 200, body
        message = abort_message(body)
        assert "could not be loaded" in message and word in message, (name, message)
        assert_nothing_held(client, loaded)
        assert await ids(client, "a1") == expected, name


async def test_files_changed_during_a_read_fail_it(make_client, setup, monkeypatch) -> None:
    """A read whose files' stat signature after it is not the one before it may mix two
    versions of the weights: the load fails with the reason, holds nothing, and the same
    folder loads once its files hold still."""
    from runtime.adapters import manager as manager_module

    client = await make_client()
    real, calls = manager_module.files_signature, []

    def moving(folder: str) -> Any:  # the checks', the read's before, then after: another
        calls.append(folder)
        return real(folder) + ((len(calls) >= 3, 0, 0),)

    monkeypatch.setattr(manager_module, "files_signature", moving)
    folder = setup.copy()
    status, message = await load(client, folder, "torn")
    assert status == 400 and "changed while they were read" in message, message
    assert len(calls) == 3, calls
    assert_nothing_held(client, {"a1"})
    monkeypatch.setattr(manager_module, "files_signature", real)
    status, message = await load(client, folder, "torn")
    assert status == 200, message


async def test_swap_between_the_checks_and_the_read_is_refused(make_client, setup,
                                                                monkeypatch) -> None:
    """A first load checks the folder and its files (links out of lora_roots, system folders)
    on the metadata thread, then reads the weights later on a loader thread. A weights file
    swapped in between for a link out of the roots was read as it was (here a valid adapter
    outside the roots: the load succeeded). Now the read compares the files' stat signature
    with the one taken right after the checks: the load is refused and holds nothing, and the
    folder loads once its file is back."""
    client = await make_client()
    m = client.app[ENGINE].adapters
    folder = setup.copy()
    parked = setup.outside / "parked.safetensors"
    real_read = m._read_host

    def swap_then_read(path: str, *args: Any) -> Any:
        (folder / WEIGHTS).rename(parked)
        os.symlink(setup.outside / "other.safetensors", folder / WEIGHTS)
        return real_read(path, *args)

    shutil.copyfile(setup.other / WEIGHTS, setup.outside / "other.safetensors")
    monkeypatch.setattr(m, "_read_host", swap_then_read)
    status, message = await load(client, folder, "swapped")
    assert status == 400 and "changed after the folder's checks" in message, message
    assert_nothing_held(client, {"a1"})
    monkeypatch.setattr(m, "_read_host", real_read)
    (folder / WEIGHTS).unlink()
    parked.rename(folder / WEIGHTS)  # the very file: the same signature
    status, message = await load(client, folder, "swapped")
    assert status == 200, message


async def test_reread_of_startup_adapters_skips_lora_roots(make_client, setup) -> None:
    """Startup adapters (lora_paths) are the operator's: their re-read is not held to
    lora_roots, as their first load was not, but a file swapped for a link into a system
    folder is still refused."""
    trusted, jailed = setup.outside / "trusted", setup.outside / "trusted_proc"
    for folder in (trusted, jailed):
        shutil.copytree(setup.good, folder)
    client = await make_client(max_loaded_loras=2, lora_paths=(
        LoraPathSpec("t1", str(trusted)), LoraPathSpec("t2", str(jailed))))
    expected = await ids(client, "t1")
    await evict_to_disk(client, setup, {"t1", "t2"})
    (trusted / WEIGHTS).rename(setup.outside / "trusted.safetensors")
    os.symlink(setup.outside / "trusted.safetensors", trusted / WEIGHTS)
    (jailed / WEIGHTS).unlink()
    os.symlink("/proc/self/environ", jailed / WEIGHTS)
    assert await ids(client, "t1") == expected
    status, body = await generate(client, "t2")
    assert status == 200 and "system folder" in abort_message(body), body


# ---------------------------------------------------------------- failed on-demand loads

def count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, attr: str) -> list[str]:
    """Record each call of owner.attr (its first argument) while still making it."""
    calls: list[str] = []
    real = getattr(owner, attr)

    def counted(*args: Any, **kw: Any) -> Any:
        calls.append(str(args[0]))
        return real(*args, **kw)

    monkeypatch.setattr(owner, attr, counted)
    return calls


async def test_failed_on_demand_loads_are_remembered(make_client, setup, monkeypatch) -> None:
    """A request naming a folder whose config fails read that config again on every request,
    on the one thread every load's config read waits for: a planted slow config (a regular
    expression at its 1 s budget) cost that second per request. The failure is remembered:
    the same 400 at once while the folder is unchanged; a fixed folder loads on the next
    request, and an admin load of the name is never answered from the memory."""
    import runtime.adapters.manager as manager_module

    slow = setup.with_config(exclude_modules=REDOS)
    client = await make_client()
    reads = count_calls(monkeypatch, manager_module, "read_adapter_config")
    first = await client.post("/generate", json={"text": "x", "lora_path": slow.name})
    first_body = await first.json()
    assert first.status == 400 and "takes too long" in first_body["error"]["message"]
    assert len(reads) == 1
    t0 = time.monotonic()
    for _ in range(4):
        r = await client.post("/generate", json={"text": "x", "lora_path": slow.name})
        assert (r.status, await r.json()) == (first.status, first_body)
    assert len(reads) == 1 and time.monotonic() - t0 < 2.0  # each read took its second
    # the operator fixes the folder: the next request loads it
    shutil.copyfile(setup.good / CONFIG, slow / CONFIG)
    status, body = await generate(client, slow.name)
    assert status == 200 and body["meta_info"]["finish_reason"]["type"] == "length", body
    assert len(reads) == 2
    # an admin load is never answered from the memory, and clears it
    broken = setup.with_config(use_dora=True)
    for _ in range(2):
        r = await client.post("/generate", json={"text": "x", "lora_path": broken.name})
        assert r.status == 400 and "use_dora" in (await r.json())["error"]["message"]
    assert len(reads) == 3
    status, message = await load(client, broken, broken.name)
    assert status == 400 and "use_dora" in message and len(reads) == 4
    r = await client.post("/generate", json={"text": "x", "lora_path": broken.name})
    assert r.status == 400 and len(reads) == 5
    assert_nothing_held(client, {"a1", slow.name})


async def test_failed_on_demand_weights_are_remembered(make_client, setup, monkeypatch) -> None:
    """The same for a folder whose config passes and whose weights fail (read on a loader
    thread each time), until the memory's time is up."""
    client = await make_client()
    reads = count_calls(monkeypatch, client.app[ENGINE].adapters, "_read_host")
    folder = setup.copy()
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    messages = set()
    for _ in range(3):
        r = await client.post("/generate", json={"text": "x", "lora_path": folder.name})
        assert r.status == 400
        messages.add((await r.json())["error"]["message"])
    assert len(reads) == 1 and len(messages) == 1 and "truncated" in messages.pop()
    import runtime.adapters.failures as failures_module

    monkeypatch.setattr(failures_module, "FAILURE_MEMORY_S", 0.0)
    r = await client.post("/generate", json={"text": "x", "lora_path": folder.name})
    assert r.status == 400 and len(reads) == 2
    assert_nothing_held(client, {"a1"})


@pytest.mark.parametrize("what", ["config", "weights"])
async def test_machine_read_errors_answer_503_and_are_not_remembered(
        make_client, setup, monkeypatch, what: str) -> None:
    """An I/O error of the machine's (EIO here) reading an on-demand adapter's config or
    weights answers 503 with Retry-After, not a 400 blaming the request, and is not kept by
    the failure memory: the next request reads again and, the disk back, loads it. A refused
    file (a link out of the roots, no permission) stays a 400 (tests above)."""
    import errno

    import runtime.adapters.manager as manager_module
    from runtime.adapters import peft_format

    client = await make_client()
    folder = setup.copy()
    target = folder / (CONFIG if what == "config" else WEIGHTS)
    real_open = peft_format._open_regular
    failing = {"on": True}

    def flaky_open(file, *args, **kwargs):
        if failing["on"] and Path(file) == target:
            raise OSError(errno.EIO, "Input/output error", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(peft_format, "_open_regular", flaky_open)
    if what == "config":
        reads = count_calls(monkeypatch, manager_module, "read_adapter_config")
    else:
        reads = count_calls(monkeypatch, client.app[ENGINE].adapters, "_read_host")
    for n in (1, 2):
        r = await client.post("/generate", json={"text": "x", "lora_path": folder.name})
        body = await r.json()
        assert r.status == 503 and r.headers.get("Retry-After") == "1", body
        assert "Input/output error" in body["error"]["message"], body
        assert len(reads) == n  # read again: not answered from the memory
    failing["on"] = False
    status, body = await generate(client, folder.name)
    assert status == 200 and body["meta_info"]["finish_reason"]["type"] == "length", body
    assert_nothing_held(client, {"a1", folder.name})


async def test_reread_read_errors_answer_503(make_client, setup, monkeypatch) -> None:
    """An evicted adapter's re-read that hits the machine's read error (EIO) ends its
    requests as the load's read error answers: 503 with Retry-After on the OpenAI routes,
    streamed too (before, a 500 blaming nothing the client could retry); the native route's
    abort chunk says why. The disk back, the adapter serves again."""
    import errno

    from runtime.adapters import peft_format

    client = await make_client(max_loaded_loras=2)
    folder = setup.copy()
    status, message = await load(client, folder, "flaky")
    assert status == 200, message
    await ids(client, "flaky")
    await evict_to_disk(client, setup, {"a1", "flaky"})
    real_open = peft_format._open_regular
    failing = {"on": True}

    def flaky_open(file, *args, **kwargs):
        if failing["on"] and Path(file) == folder / WEIGHTS:
            raise OSError(errno.EIO, "Input/output error", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(peft_format, "_open_regular", flaky_open)
    body = {"model": "flaky", "prompt": "Paris is", "max_tokens": 3, "temperature": 0}
    for stream in (False, True):
        r = await asyncio.wait_for(client.post("/v1/completions", json=body | {
            "stream": stream}), TIMEOUT_S)
        err = (await r.json())["error"]
        assert r.status == 503 and r.headers.get("Retry-After") == "1", (stream, err)
        assert err["code"] == "request_aborted" and "Input/output error" in err["message"]
    status, answer = await generate(client, "flaky")
    assert status == 200 and "Input/output error" in abort_message(answer), answer
    failing["on"] = False
    r = await client.post("/v1/completions", json=body)
    assert r.status == 200, await r.text()


def test_read_errors_by_errno() -> None:
    """peft_format.read_error: the machine's errnos give AdapterReadError, the rest (a link
    refused, no permission, not a directory) the plain AdapterError of a refused adapter."""
    import errno

    from runtime.adapters.peft_format import read_error
    from runtime.errors import AdapterReadError

    for code in (errno.EIO, errno.ESTALE, errno.EMFILE, errno.ENOMEM):
        assert type(read_error("x", OSError(code, "m"))) is AdapterReadError
    for code in (errno.ELOOP, errno.EACCES, errno.ENOTDIR, errno.EISDIR):
        assert type(read_error("x", OSError(code, "m"))) is AdapterError


def test_failure_memory_is_bounded_and_keyed_by_the_folder(tmp_path, monkeypatch) -> None:
    """The memory holds the most recent MAX_REMEMBERED_FAILURES names; a failure stands only
    for the folder it was read from, unchanged, and only a refused adapter is remembered."""
    from runtime.adapters import failures
    from runtime.errors import HostTierFullError

    monkeypatch.setattr(failures, "MAX_REMEMBERED_FAILURES", 3)
    memory = failures.FailedLoads()
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / CONFIG).write_text("{}")
    where = (str(folder), failures.folder_signature(str(folder)))
    for i in range(5):
        memory.remember(f"n{i}", *where, AdapterError(f"e{i}"))
    assert [memory.error(f"n{i}", *where) for i in range(2)] == [None, None]
    assert str(memory.error("n4", *where)) == "e4"
    assert memory.error("n3", str(tmp_path), where[1]) is None  # another folder
    (folder / CONFIG).write_text('{"r": 4}')  # the operator's fix
    assert memory.error("n2", str(folder), failures.folder_signature(str(folder))) is None
    memory.remember("full", *where, HostTierFullError("no room now"))
    assert memory.error("full", *where) is None
    memory.forget("n4")
    assert memory.error("n4", *where) is None
