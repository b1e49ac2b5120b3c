"""Adapter faults and run-time loading safety, against the real engine over HTTP.

Broken adapters (missing files, truncated or corrupt safetensors, wrong shapes, a rank above the
pool, NaN weights, a config that is not LoRA) must be refused with a 400 that says why, change
nothing (loaded adapters and the listing stay as they were) and never disturb another adapter's
stream. A failed upload must leave no half-written slot in use. With admin_api_key set, admin
routes refuse everyone else; paths outside lora_roots and oversized adapters are refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from api import create_app
from api.app import ENGINE
from metrics import ServingMetrics
from runtime.config import LoraPathSpec, ServerConfig
from runtime.engine import Engine
from tests._fake_engine import build_tiny_adapter
from tests.models import make_model
from tests.test_api import sse_events

WEIGHTS = "adapter_model.safetensors"
GREEDY = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
TIMEOUT_S = 60.0


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS)


def _first_key(tensors: dict[str, torch.Tensor], part: str) -> str:
    return min(k for k in tensors if part in k)


def build_broken(good: Path, root: Path, model: Path) -> dict[str, tuple[Path, str]]:
    """Broken adapters under `root`: name -> (folder, a word the error must contain)."""
    out: dict[str, tuple[Path, str]] = {}
    out["no_such_folder"] = (root / "nope", "nope")
    folder = _copy(good, root / "no_weights")
    (folder / WEIGHTS).unlink()
    out["no_weights"] = (folder, "missing")
    folder = _copy(good, root / "no_config")
    (folder / "adapter_config.json").unlink()
    out["no_config"] = (folder, "adapter_config.json")
    folder = _copy(good, root / "truncated")
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[:len(data) // 2])
    out["truncated"] = (folder, "truncated")
    folder = _copy(good, root / "corrupt")
    (folder / WEIGHTS).write_bytes(os.urandom(4096))
    out["corrupt"] = (folder, "corrupt")
    folder = _copy(good, root / "bad_header")
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[8:40] = b"{" * 32
    (folder / WEIGHTS).write_bytes(bytes(data))
    out["bad_header"] = (folder, WEIGHTS)
    folder = _copy(good, root / "wrong_shape")
    def widen(t: dict[str, torch.Tensor]) -> None:
        key = _first_key(t, "lora_A")
        t[key] = torch.randn(t[key].shape[0], t[key].shape[1] + 3)
    _edit_weights(folder, widen)
    out["wrong_shape"] = (folder, "shape")
    folder = _copy(good, root / "nan")
    nan_key: dict[str, str] = {}

    def poison(t: dict[str, torch.Tensor]) -> None:
        key = _first_key(t, "lora_B")
        nan_key["key"] = key
        t[key] = t[key].clone()
        t[key][0, 0] = float("nan")
    _edit_weights(folder, poison)
    module = nan_key["key"].removesuffix(".weight").rsplit(".", 1)[0]
    out["nan"] = (folder, module.split("model.", 1)[-1])  # the message names the tensor
    folder = _copy(good, root / "prefix_tuning")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["peft_type"] = "PREFIX_TUNING"
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    out["prefix_tuning"] = (folder, "LoRA")
    folder = _copy(good, root / "config_garbage")
    (folder / "adapter_config.json").write_text("{not json")
    out["config_garbage"] = (folder, "adapter_config.json")
    out["rank_16"] = (build_tiny_adapter(model, root / "rank_16", rank=16), "rank")
    return out


class Setup:
    def __init__(self, model: Path, good: Path, root: Path,
                 broken: dict[str, tuple[Path, str]]) -> None:
        self.model, self.good, self.root, self.broken = model, good, root, broken


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    base = tmp_path_factory.mktemp("faults")
    model = make_model(base / "model")
    root = base / "adapters"
    good = build_tiny_adapter(model, root / "good")
    return Setup(model, good, root, build_broken(good, root, model))


def config(setup: Setup, **overrides) -> ServerConfig:
    cfg = {"model_path": str(setup.model), "device": "cpu", "dtype": "float32",
           "kv_cache_cpu_bytes": 1 << 24, "max_lora_rank": 8, "served_model_name": "tiny",
           "lora_target_modules": ("q_proj", "v_proj"), "lora_roots": (str(setup.root),),
           "lora_paths": (LoraPathSpec("a1", str(setup.good)),)}
    cfg.update(overrides)
    return ServerConfig(**cfg)


@pytest.fixture
def make_client(aiohttp_client, setup):
    async def make(**overrides):
        cfg = config(setup, **overrides)
        metrics = ServingMetrics()
        return await aiohttp_client(create_app(Engine.from_config(cfg, metrics), cfg, metrics))
    return make


async def stream_ids(client, lora: str | None, prompt: list[int],
                     headers: dict[str, str] | None = None) -> list[int]:
    r = await client.post("/generate", headers=headers, json={
        "input_ids": prompt, "lora_path": lora, "stream": True, "sampling_params": GREEDY})
    assert r.status == 200, await r.text()
    chunks = sse_events(await r.text())
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    return chunks[-1]["output_ids"]


async def stream_last(client, lora: str | None, prompt: list[int]) -> dict:
    """The last chunk of a greedy stream, whatever it finished with."""
    r = await client.post("/generate", json={
        "input_ids": prompt, "lora_path": lora, "stream": True, "sampling_params": GREEDY})
    assert r.status == 200, await r.text()
    return sse_events(await r.text())[-1]


async def listing(client, headers=None) -> list[dict]:
    """The admin listing without the in-flight counts (streams run alongside)."""
    r = await client.get("/lora_adapters", headers=headers)
    return [{k: v for k, v in a.items() if k != "in_flight_requests"}
            for a in (await r.json())["adapters"]]


# ---------------------------------------------------------------- broken adapters

async def test_broken_adapters_are_refused_and_change_nothing(make_client, setup) -> None:
    client = await make_client()
    prompt = [5, 6, 7, 8]
    expected = await stream_ids(client, "a1", prompt)  # alone first
    before = await listing(client)
    faults = 0
    for name, (folder, word) in setup.broken.items():
        # a stream for the good adapter runs while each broken load is attempted
        other = asyncio.create_task(stream_ids(client, "a1", prompt))
        r = await client.post("/load_lora_adapter", json={"lora_name": f"bad-{name}",
                                                          "lora_path": str(folder)})
        body = await r.json()
        assert r.status == 400, (name, body)
        assert body["success"] is False and word in body["error_message"], (name, body)
        assert body["loaded_adapters"] == {"a1": str(setup.good)}, name
        assert await listing(client) == before, name
        assert await asyncio.wait_for(other, TIMEOUT_S) == expected, name
        # the failed name is free: nothing half-registered blocks it
        r = await client.post("/generate", json={"text": "x", "lora_path": f"bad-{name}"})
        assert r.status == 400
        faults += 1
    manager = client.app[ENGINE].adapters
    assert manager.counters.load_failures + faults > 0
    assert sum(a.refs for a in manager.list()) == 0
    print(f"\nfaults: {faults} broken adapters refused, 0 changes, "
          f"{faults} concurrent streams correct")


async def test_nan_error_names_the_tensor(make_client, setup) -> None:
    client = await make_client()
    folder, _ = setup.broken["nan"]
    r = await client.post("/load_lora_adapter", json={"lora_name": "n", "lora_path": str(folder)})
    message = (await r.json())["error_message"]
    assert r.status == 400 and "NaN" in message and "lora_B" in message, message


# ---------------------------------------------------------------- upload faults

async def test_failed_upload_leaves_no_half_written_slot(make_client, setup) -> None:
    client = await make_client(max_loras_per_batch=2)
    engine = client.app[ENGINE]
    manager = engine.adapters
    prompt = [9, 10, 11, 12]
    expected = await stream_ids(client, "a1", prompt)
    # a2 is the same files as a1: if a half-written slot were used, its output would differ
    r = await client.post("/load_lora_adapter", json={"lora_name": "a2",
                                                      "lora_path": str(setup.good)})
    assert r.status == 200
    failures: list[tuple[str, int]] = []

    def fail_once(name: str, slot: int) -> None:
        if name == "a2" and not failures:
            failures.append((name, slot))
            raise RuntimeError("simulated copy failure")
    manager.upload_fault = fail_once
    base_ids = await stream_ids(client, None, prompt)
    a2, a1 = await asyncio.wait_for(asyncio.gather(
        stream_last(client, "a2", prompt), stream_last(client, "a1", prompt)), TIMEOUT_S)
    assert failures, "the fault hook never ran"
    failed_slot = failures[0][1]
    assert manager.counters.upload_failures == 1
    # the a2 request ends with a1's tokens (a retried upload) or an abort that says why,
    # never with tokens read from the half-written slot; a1 is untouched
    a2_finish = a2["meta_info"]["finish_reason"]
    if a2_finish["type"] == "abort":
        assert "upload" in a2_finish["message"], a2_finish
    else:
        assert a2["output_ids"] == expected
    assert a1["output_ids"] == expected
    assert manager._slots[failed_slot].owner is None or \
        manager._slots[failed_slot].ready is None  # any owner got a complete upload
    print(f"\nupload fault: slot {failed_slot} failed mid-copy; the a2 request ended "
          f"{a2_finish}; a1 alongside correct")
    manager.upload_fault = None
    assert await stream_ids(client, "a2", prompt) == expected
    assert await stream_ids(client, None, prompt) == base_ids
    check_slots(manager)


def check_slots(manager) -> None:
    """Every slot is free or owned by an adapter that knows it; no references are held."""
    owners = [s.owner for s in manager._slots]
    for i, owner in enumerate(owners):
        if owner is not None:
            assert owner.slot == i
    resident = sum(o is not None for o in owners)
    free = sum(o is None for o in owners)
    assert resident + free == len(manager._slots)
    assert all(s.locks == 0 for s in manager._slots)
    assert sum(a.refs for a in manager.list()) == 0


# ---------------------------------------------------------------- run-time loading safety

async def test_admin_key_refuses_everyone_else(make_client, setup) -> None:
    client = await make_client(api_key="inf", admin_api_key="adm")
    load = {"lora_name": "k", "lora_path": str(setup.good)}
    refused = 0
    for headers in [None, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer inf"},
                    {"Authorization": "adm"}, {"Authorization": "Basic adm"},
                    {"Authorization": "Bearer adm2"}, {"Authorization": "Bearer "}]:
        for path, body in [("/load_lora_adapter", load), ("/v1/load_lora_adapter", load),
                           ("/unload_lora_adapter", {"lora_name": "a1"}),
                           ("/v1/unload_lora_adapter", {"lora_name": "a1"})]:
            r = await client.post(path, json=body, headers=headers)
            assert r.status == 401, (path, headers)
            assert (await r.json())["success"] is False
            refused += 1
        assert (await client.get("/lora_adapters", headers=headers)).status == 401
        refused += 1
    adm = {"Authorization": "Bearer adm"}
    assert [a["name"] for a in await listing(client, adm)] == ["a1"]  # nothing changed
    r = await client.post("/load_lora_adapter", json=load, headers=adm)
    assert r.status == 200
    print(f"\nsecurity: {refused} admin calls without the admin key refused")


@pytest.mark.parametrize("path_of", [
    lambda s: "../model",
    lambda s: str(s.root / ".." / "model"),
    lambda s: str(s.model),
    lambda s: "/proc/self",
    lambda s: "/proc/self/cwd",
    lambda s: "/etc",
    lambda s: "/",
    lambda s: "good/../../model",
    lambda s: "escape_link",
    lambda s: "escape_link/sub",
    lambda s: "some-org/some-adapter",
    lambda s: "gpt2",
], ids=["dotdot", "abs_dotdot", "abs_outside", "proc_self", "proc_cwd", "etc", "root",
        "nested_dotdot", "symlink", "symlink_sub", "hub_id", "hub_bare"])
async def test_paths_outside_roots_refused(make_client, setup, path_of) -> None:
    link = setup.root / "escape_link"
    if not link.exists():
        link.symlink_to(setup.model.parent, target_is_directory=True)
    client = await make_client(admin_api_key="adm")
    adm = {"Authorization": "Bearer adm"}
    r = await client.post("/load_lora_adapter", headers=adm,
                          json={"lora_name": "x", "lora_path": path_of(setup)})
    body = await r.json()
    assert r.status == 400 and body["success"] is False and "lora_path" in body["error_message"]
    assert body["loaded_adapters"] == {"a1": str(setup.good)}
    # inside the root it works, both spellings
    for spelling in ("good", str(setup.good)):
        r = await client.post("/load_lora_adapter", headers=adm,
                              json={"lora_name": "ok", "lora_path": spelling})
        assert r.status == 200, await r.text()
        r = await client.post("/unload_lora_adapter", headers=adm, json={"lora_name": "ok"})
        assert r.status == 200


async def test_adapter_over_host_budget_refused(make_client, setup) -> None:
    # less than one tiny adapter (no startup adapter: it would not fit either)
    client = await make_client(max_lora_host_bytes=1024, lora_paths=(), enable_lora=True)
    r = await client.post("/load_lora_adapter", json={"lora_name": "big",
                                                      "lora_path": str(setup.good)})
    body = await r.json()
    assert r.status == 400 and "max_lora_host_bytes" in body["error_message"], body
    assert "big" not in body["loaded_adapters"]


async def test_startup_adapters_outside_roots_are_trusted(make_client, setup, tmp_path) -> None:
    inside = tmp_path / "roots"
    inside.mkdir()
    # lora_roots limits run-time loads only: the operator's startup adapters are trusted
    client = await make_client(lora_roots=(str(inside),))  # a1 lies outside this root
    assert "a1" in client.app[ENGINE].loaded_adapters()
