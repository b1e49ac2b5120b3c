"""Reading an adapter into its host copy in few torch calls gives what per-tensor copies give.

The reference here is the per-tensor path: every tensor read on its own with safetensors,
converted to float32, and slice-assigned into the pool's per-group views of a zeroed host copy.
A pool with stacked groups holds, after the same uploads, what a flat pool holds.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from runtime.adapters.peft_format import AdapterError, load_peft_adapter
from runtime.adapters.pool import (
    EMBED,
    GLOBAL_LAYER,
    GROUPS,
    LM_HEAD,
    HostAdapter,
    LoraModelShape,
    LoraPool,
    module_dims,
)

CPU = torch.device("cpu")
SHAPE = LoraModelShape(
    num_layers=3, hidden_size=32, intermediate_size=48, q_size=32, kv_size=16, vocab_size=40
)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (layer, module) -> rank
Spec = dict[tuple[int, str], int]


def tensor_prefix(layer: int, module: str) -> str:
    if module == EMBED:
        return "base_model.model.model.embed_tokens"
    if module == LM_HEAD:
        return "base_model.model.lm_head"
    parent = "self_attn" if module in (*GROUPS["qkv"], "o_proj") else "mlp"
    return f"base_model.model.model.layers.{layer}.{parent}.{module}"


def ab_names(layer: int, module: str) -> tuple[str, str]:
    p = tensor_prefix(layer, module)
    if module == EMBED:
        return f"{p}.lora_embedding_A", f"{p}.lora_embedding_B"
    return f"{p}.lora_A.weight", f"{p}.lora_B.weight"


def random_tensors(
    spec: Spec, seed: int, dtypes: tuple[torch.dtype, torch.dtype]
) -> dict[str, torch.Tensor]:
    """Fresh random A and B for every (layer, module) of `spec`, A in dtypes[0], B in [1]."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for (layer, module), r in spec.items():
        in_f, out_f = module_dims(SHAPE, module)
        a_name, b_name = ab_names(layer, module)
        tensors[a_name] = torch.randn(r, in_f, generator=g).to(dtypes[0])
        tensors[b_name] = torch.randn(out_f, r, generator=g).to(dtypes[1])
    return tensors


def write_config(folder: Path, spec: Spec, r: int, **extra: Any) -> None:
    """A config whose resolved modules are exactly `spec` (ranks through rank_pattern)."""
    modules = sorted({m for _, m in spec})
    layers = sorted({layer for layer, _ in spec if layer != GLOBAL_LAYER})
    patterns = {
        tensor_prefix(layer, m).removeprefix("base_model.model."): rank
        for (layer, m), rank in spec.items()
        if rank != r
    }
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": modules}
    cfg["rank_pattern"] = patterns
    if layers and len(layers) < SHAPE.num_layers and not {EMBED, LM_HEAD} & set(modules):
        cfg["layers_to_transform"] = layers
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **extra}))


def write_adapter(
    folder: Path,
    spec: Spec,
    r: int,
    seed: int = 0,
    dtypes: tuple[torch.dtype, torch.dtype] = (torch.bfloat16, torch.bfloat16),
) -> dict[str, torch.Tensor]:
    tensors = random_tensors(spec, seed, dtypes)
    write_config(folder, spec, r)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return tensors


def write_unsorted_safetensors(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file with the tensors in the given order and no alignment padding (the
    format allows it; the safetensors writer sorts by dtype and would align them)."""
    codes = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}
    header: dict[str, Any] = {}
    blobs, pos = [], 0
    for name, t in tensors.items():
        blob = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape)}
        header[name]["data_offsets"] = [pos, pos + len(blob)]
        blobs.append(blob)
        pos += len(blob)
    head = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def full_spec(modules: tuple[str, ...], r: int) -> Spec:
    return {(layer, m): r for layer in range(SHAPE.num_layers) for m in modules}


# the per-tensor reference ---------------------------------------------------------------


def reference_weights(folder: Path, spec: Spec) -> dict[tuple[int, str], tuple[Any, ...]]:
    """(A, B) float32 per module, read one tensor at a time."""
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for layer, module in spec:
        a, b = (tensors[n].to(torch.float32) for n in ab_names(layer, module))
        out[(layer, module)] = (a, b)
    return out


def reference_host(pool: LoraPool, folder: Path, spec: Spec) -> tuple[Any, ...]:
    """The host copy's flat buffers as per-tensor slice assignments into the pool's group
    views write them."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    flat = torch.zeros(pool.slot_numel, dtype=pool.dtype)
    flat_scalings = torch.zeros(pool.slot_num_scalings, dtype=torch.float32)
    R = pool.max_rank
    for (layer, module), (a, b) in reference_weights(folder, spec).items():
        rank = a.shape[0]
        scaling = cfg["lora_alpha"] / rank
        group = (
            module
            if module in (EMBED, LM_HEAD)
            else next(g for g, ms in GROUPS.items() if module in ms)
        )
        A, B, s = pool._carve(flat, flat_scalings, layer, group)
        offsets = pool._group_layout(group)[2]
        i = 0 if group in (EMBED, LM_HEAD) else GROUPS[group].index(module)
        if module == EMBED:
            A[:, :rank] = a.t()
        else:
            A[i * R : i * R + rank] = a
        B[offsets[i] : offsets[i + 1], :rank] = b
        s[i] = scaling
    return flat, flat_scalings


def check_host_groups(pool: LoraPool, host: HostAdapter, spec: Spec) -> None:
    """The per-group views of the host copy are the pool's own carving of its flat buffers
    (and of its stacked groups' A regions)."""
    targeted = {(layer, g) for layer, g in pool._host_groups(set(spec))}
    places = [(layer, g, host.layers[layer][g])
              for layer in range(SHAPE.num_layers) for g in pool.group_names]
    places += [(GLOBAL_LAYER, EMBED, host.embed), (GLOBAL_LAYER, LM_HEAD, host.lm_head)]
    for layer, g, got in places:
        assert (got is not None) == ((layer, g) in targeted)
        if got is not None:
            want = pool._carve(host.flat, host.flat_scalings, layer, g, host.stacks)
            for x, y in zip(got.__dict__.values(), want, strict=True):
                assert x.data_ptr() == y.data_ptr() and x.shape == y.shape
                assert x.stride() == y.stride()


CASES: dict[str, tuple[Spec, int, tuple[str, ...], int]] = {
    # name: (spec, config r, pool targets, pool max rank)
    "qv_r8": (full_spec(("q_proj", "v_proj"), 8), 8, ("q_proj", "v_proj"), 8),
    "all_linear_r4_in_r8_pool": (full_spec(ALL, 4), 4, ALL, 8),
    "mixed_ranks": (
        {**full_spec(ALL, 4), (1, "q_proj"): 2, (0, "up_proj"): 8, (2, "down_proj"): 1},
        4,
        ALL,
        8,
    ),
    "some_layers": (
        {(0, "k_proj"): 4, (2, "k_proj"): 2, (0, "o_proj"): 4, (2, "o_proj"): 4},
        4,
        ALL,
        4,
    ),
    "embed_lm_head": (
        {(GLOBAL_LAYER, EMBED): 4, (GLOBAL_LAYER, LM_HEAD): 2, **full_spec(("q_proj",), 4)},
        4,
        (EMBED, LM_HEAD, "q_proj", "gate_proj"),
        4,
    ),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("pool_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "file_dtypes",
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32), (torch.float32,) * 2],
)
def test_host_copy_equals_per_tensor_copies(
    tmp_path: Path,
    case: str,
    pool_dtype: torch.dtype,
    file_dtypes: tuple[torch.dtype, torch.dtype],
) -> None:
    spec, r, targets, max_rank = CASES[case]
    write_adapter(tmp_path, spec, r, seed=len(case), dtypes=file_dtypes)
    pool = LoraPool(SHAPE, 2, max_rank, targets, CPU, pool_dtype)
    weights = load_peft_adapter(str(tmp_path), SHAPE)
    for key, (a, b) in reference_weights(tmp_path, spec).items():
        w = weights.modules[key]
        assert w.A.dtype == w.B.dtype == torch.float32
        assert torch.equal(w.A, a) and torch.equal(w.B, b), key
        assert w.A.is_contiguous() and w.B.is_contiguous()
    reference = reference_weights(tmp_path, spec)
    assert weights.nbytes == sum(4 * (a.numel() + b.numel()) for a, b in reference.values())
    host = pool.build_host(weights)
    assert "_views" not in host.__dict__  # per-group views are built on first use only
    flat, flat_scalings = reference_host(pool, tmp_path, spec)
    # byte-identical: compare the raw bytes (NaN-safe, and -0.0 differs from 0.0)
    assert torch.equal(host.flat.view(torch.uint8), flat.view(torch.uint8))
    assert torch.equal(host.flat_scalings, flat_scalings)
    assert int(host.rank[0]) == max(spec.values())
    assert host.nbytes == pool.slot_nbytes
    check_host_groups(pool, host, spec)


def test_misaligned_tensors(tmp_path: Path) -> None:
    """An odd-sized fp16 tensor leaves the next fp32 one off its alignment: still read right."""
    shape = LoraModelShape(1, 32, 48, 32, 16, 41)  # embed A [r, 41] in fp16: 82 bytes a row
    g = torch.Generator().manual_seed(3)
    tensors = {
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(
            1, 41, generator=g
        ).half(),
        "base_model.model.model.embed_tokens.lora_embedding_B": torch.randn(32, 1, generator=g),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(
            1, 32, generator=g
        ).half(),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(
            32, 1, generator=g
        ),
    }
    cfg = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": [EMBED, "q_proj"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    write_unsorted_safetensors(tmp_path / "adapter_model.safetensors", tensors)
    weights = load_peft_adapter(str(tmp_path), shape)
    got = {(0, "q_proj"): weights.modules[(0, "q_proj")], EMBED: weights.modules[(-1, EMBED)]}
    names = list(tensors)
    assert torch.equal(got[EMBED].A, tensors[names[0]].float())
    assert torch.equal(got[EMBED].B, tensors[names[1]])
    assert torch.equal(got[(0, "q_proj")].A, tensors[names[2]].float())
    assert torch.equal(got[(0, "q_proj")].B, tensors[names[3]])


# refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16,) * 2, (torch.float16, torch.float32)])
@pytest.mark.parametrize("where", [(0, "q_proj", 0), (1, "v_proj", 1), (2, "q_proj", 1)])
def test_non_finite_names_the_tensor(
    tmp_path: Path,
    bad: float,
    dtypes: tuple[torch.dtype, torch.dtype],
    where: tuple[int, str, int],
) -> None:
    spec = full_spec(("q_proj", "v_proj"), 4)
    tensors = random_tensors(spec, 1, dtypes)
    name = ab_names(where[0], where[1])[where[2]]
    tensors[name].view(-1)[5] = bad
    write_config(tmp_path, spec, 4)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=f"tensor {name}: holds NaN or Inf values"):
        load_peft_adapter(str(tmp_path), SHAPE)


def test_non_finite_names_the_first_in_module_order(tmp_path: Path) -> None:
    """Of two bad tensors, the error names the first in (layer, module, A then B) order, as a
    per-tensor walk would, whatever their order in the file."""
    spec = full_spec(("q_proj", "v_proj"), 4)
    tensors = random_tensors(spec, 2, (torch.float32, torch.float32))
    later, first = ab_names(2, "q_proj")[0], ab_names(1, "v_proj")[1]
    tensors[later][0, 0] = float("nan")
    tensors[first][3, 2] = float("inf")
    write_config(tmp_path, spec, 4)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=f"tensor {first}: holds NaN or Inf"):
        load_peft_adapter(str(tmp_path), SHAPE)


def test_float64_beyond_float32_is_refused(tmp_path: Path) -> None:
    """Weights are checked as float32: a float64 value that overflows it is refused."""
    spec = full_spec(("q_proj",), 2)
    tensors = random_tensors(spec, 4, (torch.float64, torch.float64))
    name = ab_names(1, "q_proj")[0]
    tensors[name][1, 1] = 1e300
    write_config(tmp_path, spec, 2)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=f"tensor {name}: holds NaN or Inf"):
        load_peft_adapter(str(tmp_path), SHAPE)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_non_float_dtype_is_refused(tmp_path: Path, dtype: torch.dtype) -> None:
    spec = full_spec(("q_proj", "v_proj"), 4)
    tensors = random_tensors(spec, 5, (torch.float16, torch.float32))
    name = ab_names(1, "v_proj")[1]
    tensors[name] = tensors[name].to(dtype)
    write_config(tmp_path, spec, 4)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=f"tensor {name}: dtype {dtype} is not a float type"):
        load_peft_adapter(str(tmp_path), SHAPE)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("shape", "bytes for shape"),
        ("dtype", "unknown dtype 'X9'"),
        ("offsets", "outside the data section"),
    ],
)
def test_bad_header_is_corrupt(tmp_path: Path, edit: str, message: str) -> None:
    spec = full_spec(("q_proj",), 2)
    write_adapter(tmp_path, spec, 2)
    file = tmp_path / "adapter_model.safetensors"
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    entry = header[ab_names(0, "q_proj")[0]]
    if edit == "shape":
        entry["shape"] = [entry["shape"][0], entry["shape"][1] + 1]
    elif edit == "dtype":
        entry["dtype"] = "X9"
    else:
        entry["data_offsets"] = [0, 10**9]
    head = json.dumps(header).encode()
    file.write_bytes(len(head).to_bytes(8, "little") + head + data[8 + n :])
    with pytest.raises(AdapterError, match=f"corrupt or truncated: .*{message}"):
        load_peft_adapter(str(tmp_path), SHAPE)


# cost -----------------------------------------------------------------------------------


class CountTorchCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_torch_calls_do_not_grow_with_layers_beyond_one_view_a_tensor(tmp_path: Path) -> None:
    """The loader's torch calls (each takes the GIL from the serving loop): about one view per
    tensor, the rest a fixed handful, whatever the number of layers. Measured on a recycled
    host row (a new chunk of rows costs a few calls a row, once)."""
    counts = []
    for num_layers in (2, 8):
        shape = LoraModelShape(num_layers, 32, 48, 32, 16, 40)
        spec = {(layer, m): 4 for layer in range(num_layers) for m in ("q_proj", "v_proj")}
        folder = tmp_path / str(num_layers)
        g = torch.Generator().manual_seed(num_layers)
        tensors = {}
        for (layer, m), r in spec.items():
            in_f, out_f = module_dims(shape, m)
            a_name, b_name = ab_names(layer, m)
            tensors[a_name] = torch.randn(r, in_f, generator=g).bfloat16()
            tensors[b_name] = torch.randn(out_f, r, generator=g).bfloat16()
        folder.mkdir()
        cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        pool = LoraPool(shape, 2, 8, ("q_proj", "v_proj"), CPU, torch.bfloat16)
        # dropped at once: its host row is free for the next one
        pool.build_host(load_peft_adapter(str(folder), shape))
        with CountTorchCalls() as calls:
            pool.build_host(load_peft_adapter(str(folder), shape))
        counts.append((len(tensors), calls.count))
    (n_small, c_small), (n_big, c_big) = counts
    assert c_big - c_small <= 1.0 * (n_big - n_small), counts
    assert c_small <= n_small + 40, counts


# recycled host rows ---------------------------------------------------------------------


class FakeEvent:
    def __init__(self) -> None:
        self.complete = False

    def query(self) -> bool:
        return self.complete


def test_dropped_host_copy_row_is_reused_zeroed_and_exact(tmp_path: Path) -> None:
    """A dropped host copy's row goes to the next adapter, which reads exactly as a copy in a
    fresh row would: the groups it does not target are zero again."""
    pool = LoraPool(SHAPE, 2, 8, ALL, CPU, torch.bfloat16)
    wide, narrow = full_spec(ALL, 8), full_spec(("q_proj",), 4)
    write_adapter(tmp_path / "wide", wide, 8, seed=1)
    write_adapter(tmp_path / "narrow", narrow, 4, seed=2)
    first = pool.build_host(load_peft_adapter(str(tmp_path / "wide"), SHAPE))
    row = first.flat.data_ptr()
    assert first.flat.abs().sum() > 0
    del first
    second = pool.build_host(load_peft_adapter(str(tmp_path / "narrow"), SHAPE))
    assert second.flat.data_ptr() == row and pool._host_rows.num_rows == 1
    flat, flat_scalings = reference_host(pool, tmp_path / "narrow", narrow)
    assert torch.equal(second.flat, flat) and torch.equal(second.flat_scalings, flat_scalings)
    assert second.rank.tolist() == [4]
    check_host_groups(pool, second, narrow)


def test_row_waits_for_its_last_upload(tmp_path: Path) -> None:
    """A dropped copy whose last upload has not completed keeps its row out of circulation
    until the upload's event completes."""
    pool = LoraPool(SHAPE, 2, 8, ALL, CPU, torch.bfloat16)
    spec = full_spec(("q_proj", "v_proj"), 8)
    write_adapter(tmp_path / "a", spec, 8)
    weights = load_peft_adapter(str(tmp_path / "a"), SHAPE)
    host = pool.build_host(weights)
    row, event = host.flat.data_ptr(), FakeEvent()
    host.lease.event = event  # what the manager's upload records
    del host
    other = pool.build_host(weights)
    assert other.flat.data_ptr() != row  # still being read by the copy engine
    del other
    event.complete = True
    again = [pool.build_host(weights) for _ in range(2)]
    assert row in {h.flat.data_ptr() for h in again}
    assert pool._host_rows.num_rows == 2


def test_rows_come_in_growing_chunks_and_failed_builds_give_theirs_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Live copies get distinct rows from chunks that double up to HOST_CHUNK_BYTES; a build
    that fails returns its row."""
    import runtime.adapters.pool as pool_mod

    pool = LoraPool(SHAPE, 2, 8, ALL, CPU, torch.bfloat16)
    rows = pool._host_rows
    monkeypatch.setattr(pool_mod, "HOST_CHUNK_BYTES", 4 * rows.row_bytes)
    spec = full_spec(("q_proj",), 8)
    write_adapter(tmp_path / "a", spec, 8)
    weights = load_peft_adapter(str(tmp_path / "a"), SHAPE)
    live = [pool.build_host(weights) for _ in range(11)]
    assert len({h.flat.data_ptr() for h in live}) == 11
    assert rows.num_rows == 12 and rows.num_chunks == 5  # 1 + 1 + 2 + 4 + 4 rows
    monkeypatch.setattr(pool, "write_host_row", lambda *a: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError):
        pool.build_host(weights)
    monkeypatch.undo()
    live.append(pool.build_host(weights))
    assert rows.num_rows == 12  # the failed build's row was the one left, and came back


def test_reserved_rows_serve_the_tier_without_growing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """reserve_host_rows allocates rows up front in chunks of up to HOST_CHUNK_BYTES; copies up
    to that many take reserved rows, and only one past them allocates again."""
    import runtime.adapters.pool as pool_mod

    pool = LoraPool(SHAPE, 2, 8, ALL, CPU, torch.bfloat16)
    rows = pool._host_rows
    monkeypatch.setattr(pool_mod, "HOST_CHUNK_BYTES", 4 * rows.row_bytes)
    pinned = pool.reserve_host_rows(7)
    n = rows.num_rows  # the second chunk is as large as the allocator rounds 3 rows up to
    assert 7 <= n <= 8 and rows.num_chunks == 2 and pinned == n * pool.host_row_bytes
    assert pool.reserve_host_rows(5) == pinned  # already there
    write_adapter(tmp_path / "a", full_spec(("q_proj",), 8), 8)
    weights = load_peft_adapter(str(tmp_path / "a"), SHAPE)
    live = [pool.build_host(weights) for _ in range(n)]
    assert rows.num_chunks == 2 and len({h.flat.data_ptr() for h in live}) == n
    live.append(pool.build_host(weights))
    assert rows.num_chunks == 3 and rows.num_rows > n


def test_host_tier_rows_follow_both_limits_and_refuse_what_cannot_be_pinned() -> None:
    from runtime.adapters.manager import HOST_ROW_SLACK, host_tier_rows
    from runtime.config import ConfigError, ServerConfig

    row = 10 << 20
    lora = {"enable_lora": True, "max_lora_rank": 8, "lora_target_modules": ("q_proj",)}
    config = ServerConfig(**lora, max_loras_per_batch=8, max_loaded_loras=40)
    assert host_tier_rows(config, row, None) == 40 + HOST_ROW_SLACK
    assert host_tier_rows(config, row, 64 << 30) == 40 + HOST_ROW_SLACK
    small = config.replace(max_lora_host_bytes=25 * row + 1)
    assert host_tier_rows(small, row, None) == 25 + HOST_ROW_SLACK
    default = ServerConfig(**lora, max_loras_per_batch=8)  # tier of 16 copies
    assert host_tier_rows(default, row, None) == 16 + HOST_ROW_SLACK
    with pytest.raises(ConfigError, match="max_loaded_loras 40.*lower max_loaded_loras"):
        host_tier_rows(config, row, 200 << 20)


def test_cpu_manager_pins_nothing_at_start() -> None:
    from runtime.adapters.manager import AdapterManager
    from runtime.config import ServerConfig

    config = ServerConfig(enable_lora=True, max_lora_rank=8, lora_target_modules=("q_proj",))
    m = AdapterManager(config, SHAPE, CPU, torch.float32, streams=None)  # type: ignore[arg-type]
    assert m.host_rows_pinned == 0 and m.pool._host_rows.num_rows == 0
    m.close()


# stacked groups -------------------------------------------------------------------------


def upload(pool: LoraPool, slot: int, host: HostAdapter) -> None:
    """What the manager's upload does with `slot_copies`, on the CPU."""
    for dst, src in pool.slot_copies(slot, host):
        if src is None:
            dst.zero_()
        else:
            dst.copy_(src)


def assert_same_slots(got: LoraPool, want: LoraPool) -> None:
    """Every group's A, B and scalings, of every slot and layer, and the slot ranks."""
    pairs = [(got.layers[layer][g], want.layers[layer][g])
             for layer in range(SHAPE.num_layers) for g in want.group_names]
    pairs += [(got.embed, want.embed), (got.lm_head, want.lm_head)]
    for x, y in pairs:
        assert x is not None and y is not None
        assert torch.equal(x.A, y.A) and torch.equal(x.B, y.B)
        assert torch.equal(x.scalings, y.scalings)
    assert torch.equal(got.slot_ranks, want.slot_ranks)


STACKINGS = [("qkv", "down"), ("qkv", "o", "gate_up", "down")]
EVERY = (*ALL, EMBED, LM_HEAD)


@pytest.mark.parametrize("stacked", STACKINGS)
def test_stacked_pool_holds_what_the_flat_pool_holds(
    tmp_path: Path, stacked: tuple[str, ...]
) -> None:
    """A stacked group's A lives in its stack, not the slab: the same uploads (each one copy
    more a stack) leave every group's buffers as a flat pool's, an upload clears what the
    slot's last adapter left, and the stacks' base rows stay as they were. Host copies are as
    large as a slot, and their views hold the flat pool's host copies' values."""
    specs = {
        "wide": CASES["mixed_ranks"][0],
        "some": CASES["some_layers"][0],
        "narrow": CASES["embed_lm_head"][0],
    }
    for i, (name, spec) in enumerate(specs.items()):
        write_adapter(tmp_path / name, spec, 4, seed=i)
    flat = LoraPool(SHAPE, 2, 8, EVERY, CPU, torch.bfloat16)
    pool = LoraPool(SHAPE, 2, 8, EVERY, CPU, torch.bfloat16, stacked=stacked)
    assert pool.stacked == tuple(g for g in GROUPS if g in stacked)
    assert pool.slot_numel + pool.slot_stack_numel == flat.slot_numel
    assert pool.slot_nbytes == flat.slot_nbytes
    for layer in range(SHAPE.num_layers):
        for g in pool.group_names:
            group = pool.layers[layer][g]
            if g not in stacked:
                assert group.stack is None
                continue
            (nR, K), (N, _), _ = pool._group_layout(g)
            assert pool.stacks[g].shape == (SHAPE.num_layers, N + 2 * nR, K)
            assert group.stack is not None
            assert group.stack.data_ptr() == pool.stacks[g][layer].data_ptr()
            assert group.A.data_ptr() == group.stack[N:].data_ptr()
            assert group.A.shape == (2, nR, K)
            group.stack[:N] = float(layer + 1)  # stands for the base weight
    base = {g: s[:, : s.shape[1] - 2 * pool._layouts[g][0][0]].clone()
            for g, s in pool.stacks.items()}
    hosts = {}
    for name, spec in specs.items():
        weights = load_peft_adapter(str(tmp_path / name), SHAPE)
        hosts[name] = (pool.build_host(weights), flat.build_host(weights))
        host, want = hosts[name]
        assert host.nbytes == pool.slot_nbytes
        assert set(host.stacks) == set(stacked)
        check_host_groups(pool, host, spec)
        views = [(host.layers[layer][g], want.layers[layer][g])
                 for layer in range(SHAPE.num_layers) for g in pool.group_names]
        for x, y in [*views, (host.embed, want.embed), (host.lm_head, want.lm_head)]:
            assert (x is None) == (y is None)
            if x is not None and y is not None:
                assert torch.equal(x.A, y.A) and torch.equal(x.B, y.B)
                assert torch.equal(x.scalings, y.scalings)
    for slot, name in ((0, "wide"), (1, "some"), (0, "narrow")):  # narrow replaces wide
        host, want = hosts[name]
        assert len(pool.slot_copies(slot, host)) == 3 + len(stacked)
        upload(pool, slot, host)
        upload(flat, slot, want)
        assert_same_slots(pool, flat)
        if name == "wide":
            assert all(torch.count_nonzero(pool._stack_a[g][:, 0]) > 0 for g in stacked)
    for g in stacked:  # narrow targets q_proj only: the rest of slot 0's A rows are clear
        rows = slice(pool.max_rank, None) if g == "qkv" else slice(None)
        assert torch.count_nonzero(pool._stack_a[g][:, 0, rows]) == 0
        assert torch.equal(pool.stacks[g][:, : base[g].shape[1]], base[g])


def linear(in_f: int, out_f: int, seed: int, bias: bool = False,
           dtype: torch.dtype = torch.float32) -> nn.Linear:
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g))
    return lin


def base_linears() -> list[dict[str, nn.Module]]:
    """Every layer's bias-free base linears of each group, as the model fuses them."""
    h, i, q, kv = SHAPE.hidden_size, SHAPE.intermediate_size, SHAPE.q_size, SHAPE.kv_size
    dims = {"qkv": (h, q + 2 * kv), "o": (q, h), "gate_up": (h, 2 * i), "down": (i, h)}
    return [{g: linear(*d, seed=10 * layer + n) for n, (g, d) in enumerate(dims.items())}
            for layer in range(SHAPE.num_layers)]


def test_adopted_base_weights_live_in_the_stack_and_one_gemm_gives_base_and_shrink(
    tmp_path: Path,
) -> None:
    """After adopt_base_weights the stacked linears' weights are the stacks' top rows (same
    outputs), other groups' linears are left alone, uploads keep off the base rows, and one
    F.linear over a layer's stack gives [linear(x), x A_s^T for each slot s] side by side."""
    pool = LoraPool(SHAPE, 2, 8, ALL, CPU, torch.float32, stacked=("qkv", "down"))
    linears = base_linears()
    g = torch.Generator().manual_seed(5)
    xs = {name: torch.randn(5, lin.in_features, generator=g)
          for name, lin in linears[0].items() if isinstance(lin, nn.Linear)}
    before = [{name: lin(xs[name]) for name, lin in layer.items()} for layer in linears]
    o_weight = linears[1]["o"].weight
    pool.adopt_base_weights(linears)
    assert linears[1]["o"].weight is o_weight
    for i, (name, spec) in enumerate((("wide", full_spec(ALL, 8)),
                                      ("mixed", CASES["mixed_ranks"][0]))):
        write_adapter(tmp_path / name, spec, 4, seed=i)
        upload(pool, i, pool.build_host(load_peft_adapter(str(tmp_path / name), SHAPE)))
    for layer, layer_linears in enumerate(linears):
        for name in pool.stacked:
            lin, group = layer_linears[name], pool.layers[layer][name]
            assert group.stack is not None
            N = group.slice_offsets[-1]
            assert lin.weight.data_ptr() == group.stack.data_ptr()
            assert lin.weight.shape == (N, group.stack.shape[1])
            assert not lin.weight.requires_grad
            x = xs[name]
            torch.testing.assert_close(lin(x), before[layer][name], rtol=0, atol=0)
            out = F.linear(x, group.stack)
            torch.testing.assert_close(out[:, :N], before[layer][name])
            for slot in range(2):
                assert torch.count_nonzero(group.A[slot]) > 0
                rows = out[:, N + slot * group.A.shape[1] : N + (slot + 1) * group.A.shape[1]]
                torch.testing.assert_close(rows, x @ group.A[slot].t())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("shape", r"stacked group qkv, layer 1: base weight \(63, 32\)"),
        ("dtype", r"stacked group down, layer 0: .*torch.bfloat16"),
        ("bias", "stacked group qkv, layer 2: the base linear has a bias"),
        ("missing", "stacked group down, layer 2: no base linear given"),
        ("layers", "2 layers of linears, the pool has 3"),
    ],
)
def test_adopt_base_weights_refuses_what_does_not_fit(edit: str, message: str) -> None:
    """A wrong shape, dtype, a bias or a missing linear is refused naming the group and
    layer, before any weight moves."""
    pool = LoraPool(SHAPE, 2, 8, ALL, CPU, torch.float32, stacked=("qkv", "down"))
    linears = base_linears()
    h, i = SHAPE.hidden_size, SHAPE.intermediate_size
    if edit == "shape":
        linears[1]["qkv"] = linear(h, 63, seed=1)
    elif edit == "dtype":
        linears[0]["down"] = linear(i, h, seed=1, dtype=torch.bfloat16)
    elif edit == "bias":
        linears[2]["qkv"] = linear(h, pool.layers[2]["qkv"].slice_offsets[-1], 1, bias=True)
    elif edit == "missing":
        del linears[2]["down"]
    else:
        linears = linears[:2]
    ptrs = [lin.weight.data_ptr() for layer in linears for lin in layer.values()]
    with pytest.raises(ValueError, match=message):
        pool.adopt_base_weights(linears)
    assert [lin.weight.data_ptr() for layer in linears for lin in layer.values()] == ptrs
    assert all(torch.count_nonzero(s) == 0 for s in pool.stacks.values())


@pytest.mark.parametrize(
    ("stacked", "message"),
    [
        ((LM_HEAD,), r"stacked: \['lm_head'\] are not layer groups"),
        (("qkv", "mlp"), r"stacked: \['mlp'\] are not layer groups"),
        (("qkv", "gate_up"), r"stacked: the pool holds no \['gate_up'\] group"),
    ],
)
def test_stacked_names_only_layer_groups_the_pool_holds(
    stacked: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        LoraPool(SHAPE, 2, 8, ("q_proj", "v_proj", LM_HEAD), CPU, torch.float32, stacked=stacked)
