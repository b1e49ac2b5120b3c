"""PEFT adapter reading: slot contents against PEFT's own tensors and scalings, and every refusal.

The adapters are made by PEFT (get_peft_model + save_pretrained) on a tiny Llama; the expected
values come from the PEFT model objects, so rank_pattern / alpha_pattern / rsLoRA resolution is
PEFT's, not ours.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.adapters.manager import AdapterManager
from runtime.adapters.peft_format import AdapterError, load_peft_adapter, read_adapter_config
from runtime.adapters.pool import GROUPS, LoraModelShape, LoraPool
from runtime.config import ServerConfig
from runtime.streams import Streams

CPU = torch.device("cpu")
SHAPE = LoraModelShape(
    num_layers=2, hidden_size=64, intermediate_size=128, q_size=64, kv_size=32, vocab_size=256
)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

Expected = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]


def tiny_llama(seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def peft_tensors(model: Any) -> Expected:
    """(layer, module) -> (A [r, in], B [out, r], scaling), read from a PEFT model."""
    out: Expected = {}
    for name, mod in model.named_modules():
        name = name.removeprefix("base_model.model.")
        leaf = name.rsplit(".", 1)[-1]
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
        if hasattr(mod, "lora_embedding_A") and "default" in mod.lora_embedding_A:
            a, b = mod.lora_embedding_A["default"], mod.lora_embedding_B["default"]
            out[(layer, leaf)] = (a.detach().clone(), b.detach().clone(), mod.scaling["default"])
        elif hasattr(mod, "lora_A") and "default" in mod.lora_A:
            a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            out[(layer, leaf)] = (a.detach().clone(), b.detach().clone(), mod.scaling["default"])
    return out


def make_adapter(folder: Path, seed: int, bin_format: bool = False, **lora: Any) -> Expected:
    """Save a PEFT adapter with random non-zero A and B; returns PEFT's tensors."""
    import peft

    model = peft.get_peft_model(tiny_llama(seed), peft.LoraConfig(**lora))
    torch.manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(folder), safe_serialization=not bin_format)
    return peft_tensors(model)


def load_with_peft(folder: Path) -> Expected:
    """Load `folder` into a fresh tiny Llama with PEFT itself."""
    import peft

    return peft_tensors(peft.PeftModel.from_pretrained(tiny_llama(0), str(folder)))


ADAPTERS: dict[str, dict[str, Any]] = {
    "r1_qv": {"r": 1, "lora_alpha": 2, "target_modules": ["q_proj", "v_proj"]},
    "r4_all_linear": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    "r8_rslora": {
        "r": 8,
        "lora_alpha": 16,
        "use_rslora": True,
        "target_modules": ["o_proj", "down_proj"],
    },
    "patterns": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ALL_LINEAR,
        "rank_pattern": {"model.layers.1.self_attn.q_proj": 2, "up_proj": 8},
        "alpha_pattern": {"layers.0.mlp.down_proj": 3, "k_proj": 5},
    },
    "rslora_patterns": {
        "r": 2,
        "lora_alpha": 4,
        "use_rslora": True,
        "target_modules": ["gate_proj", "up_proj"],
        "rank_pattern": {"gate_proj": 6},
    },
    "embed_lm_head": {
        "r": 4,
        "lora_alpha": 4,
        "target_modules": ["embed_tokens", "lm_head", "q_proj"],
    },
    "regex": {"r": 2, "lora_alpha": 4, "target_modules": r".*\.layers\.1\.self_attn\.(k|v)_proj"},
    "layers_to_transform": {
        "r": 3,
        "lora_alpha": 6,
        "target_modules": ["q_proj", "down_proj"],
        "layers_to_transform": [1],
    },
    "exclude": {
        "r": 2,
        "lora_alpha": 2,
        "target_modules": ["q_proj"],
        "exclude_modules": ["layers.0.self_attn.q_proj"],
    },
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Expected]]:
    root = tmp_path_factory.mktemp("adapters")
    made = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        made[name] = (root / name, make_adapter(root / name, seed=i, **kw))
    made["bin"] = (
        root / "bin",
        make_adapter(root / "bin", 50, bin_format=True, r=2, target_modules=["q_proj", "up_proj"]),
    )
    return made


def expected_slot(pool: LoraPool, expected: Expected) -> dict[str, torch.Tensor]:
    """The documented slot layout, built independently of the pool code."""
    R = pool.max_rank
    want: dict[str, torch.Tensor] = {}
    dims = {
        "q_proj": (64, 64),
        "k_proj": (64, 32),
        "v_proj": (64, 32),
        "o_proj": (64, 64),
        "gate_proj": (64, 128),
        "up_proj": (64, 128),
        "down_proj": (128, 64),
    }
    for layer in range(SHAPE.num_layers):
        for g, modules in GROUPS.items():
            in_f = dims[modules[0]][0]
            n_total = sum(dims[m][1] for m in modules)
            A = torch.zeros(len(modules) * R, in_f)
            B = torch.zeros(n_total, R)
            s = torch.zeros(len(modules))
            off = 0
            for i, m in enumerate(modules):
                if (layer, m) in expected:
                    a, b, sc = expected[(layer, m)]
                    A[i * R : i * R + a.shape[0]] = a
                    B[off : off + b.shape[0], : b.shape[1]] = b
                    s[i] = sc
                off += dims[m][1]
            want[f"{layer}.{g}.A"], want[f"{layer}.{g}.B"], want[f"{layer}.{g}.s"] = A, B, s
    for g in ("embed_tokens", "lm_head"):
        if g == "embed_tokens":
            A, B = torch.zeros(256, R), torch.zeros(64, R)
        else:
            A, B = torch.zeros(R, 64), torch.zeros(256, R)
        s = torch.zeros(1)
        if (-1, g) in expected:
            a, b, sc = expected[(-1, g)]
            if g == "embed_tokens":
                A[:, : a.shape[0]] = a.t()
            else:
                A[: a.shape[0]] = a
            B[:, : b.shape[1]] = b
            s[0] = sc
        want[f"{g}.A"], want[f"{g}.B"], want[f"{g}.s"] = A, B, s
    return want


def actual_slot(pool: LoraPool, slot: int) -> dict[str, torch.Tensor]:
    got = {}
    for layer, groups in enumerate(pool.layers):
        for g, bufs in groups.items():
            got[f"{layer}.{g}.A"] = bufs.A[slot].float()
            got[f"{layer}.{g}.B"] = bufs.B[slot].float()
            got[f"{layer}.{g}.s"] = bufs.scalings[slot]
    for g, bufs in (("embed_tokens", pool.embed), ("lm_head", pool.lm_head)):
        assert bufs is not None
        got[f"{g}.A"], got[f"{g}.B"], got[f"{g}.s"] = (
            bufs.A[slot].float(),
            bufs.B[slot].float(),
            bufs.scalings[slot],
        )
    return got


def lora_config(**kw: Any) -> ServerConfig:
    base: dict[str, Any] = {
        "device": "cpu",
        "enable_lora": True,
        "max_lora_rank": 8,
        "lora_target_modules": ("all",),
        "max_loras_per_batch": 2,
    }
    return ServerConfig(**{**base, **kw})


@pytest.mark.parametrize("name", [*ADAPTERS, "bin"])
async def test_slot_contents_equal_peft_tensors(
    adapters: dict[str, tuple[Path, Expected]], name: str
) -> None:
    folder, expected = adapters[name]
    assert expected and all(b.abs().sum() > 0 for _, b, _ in expected.values())
    manager = AdapterManager(lora_config(), SHAPE, CPU, torch.float32, Streams(CPU))
    # poison both slots: every element of the adapter's slot must be written
    for groups in manager.pool.layers:
        for bufs in groups.values():
            for t in (bufs.A, bufs.B, bufs.scalings):
                t.fill_(float("nan"))
    await manager.load("a", str(folder))
    slot = manager.admit("a", set(), overlap=False)
    assert slot is not None
    manager.poll()
    want, got = expected_slot(manager.pool, expected), actual_slot(manager.pool, slot)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    rank = max(a.shape[0] for a, _, _ in expected.values())
    assert int(manager.pool.slot_ranks[slot]) == rank
    info = manager.list()[0]
    assert info.rank == rank and set(info.target_modules) == {m for _, m in expected}


async def test_slot_contents_in_bf16_pool(adapters: dict[str, tuple[Path, Expected]]) -> None:
    folder, expected = adapters["patterns"]
    manager = AdapterManager(lora_config(), SHAPE, CPU, torch.bfloat16, Streams(CPU))
    await manager.load("a", str(folder))
    slot = manager.admit("a", set(), overlap=False)
    assert slot is not None
    want, got = expected_slot(manager.pool, expected), actual_slot(manager.pool, slot)
    for key in want:
        torch.testing.assert_close(got[key], want[key].bfloat16().float(), rtol=0, atol=0)


def test_rank_and_alpha_patterns_resolve_like_peft(
    adapters: dict[str, tuple[Path, Expected]],
) -> None:
    for name in ("patterns", "rslora_patterns", "r8_rslora", "layers_to_transform", "exclude"):
        folder, expected = adapters[name]
        cfg = read_adapter_config(str(folder), SHAPE.num_layers)
        assert set(cfg.modules) == set(expected), name
        for key, (a, _, scaling) in expected.items():
            assert cfg.modules[key].rank == a.shape[0], (name, key)
            assert cfg.modules[key].scaling == pytest.approx(scaling), (name, key)


def test_config_resolution_is_remembered_by_content(tmp_path: Path) -> None:
    """Folders whose configs say the same thing (keys in any order) resolve once; a different
    config or layer count resolves anew; a refused config is refused each time, and the same
    folder fixed afterwards reads as fixed."""
    from runtime.adapters import peft_format

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_adapter(a, 1, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    make_adapter(b, 2, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    cfg_b = json.loads((b / "adapter_config.json").read_text())
    (b / "adapter_config.json").write_text(json.dumps(dict(reversed(list(cfg_b.items())))))
    make_adapter(c, 3, r=4, lora_alpha=4, target_modules=["q_proj"])
    peft_format._checked_config_of.cache_clear()
    first = read_adapter_config(str(a), SHAPE.num_layers)
    assert read_adapter_config(str(b), SHAPE.num_layers) is first
    info = peft_format._checked_config_of.cache_info()
    assert (info.hits, info.misses) == (1, 1)
    other = read_adapter_config(str(c), SHAPE.num_layers)
    assert other != first and other.rank == 4 and other.target_modules == {"q_proj"}
    fewer = read_adapter_config(str(a), SHAPE.num_layers - 1)
    assert len(fewer.modules) < len(first.modules)
    edit_config(c, bias="all")
    for _ in range(2):
        with pytest.raises(AdapterError, match="bias"):
            read_adapter_config(str(c), SHAPE.num_layers)
    edit_config(c, bias="none")
    assert read_adapter_config(str(c), SHAPE.num_layers) == other


def test_fan_in_fan_out_does_not_transpose(tmp_path: Path) -> None:
    """PEFT keeps A [r, in] / B [out, r] whatever fan_in_fan_out says (it resets the flag for
    linear layers), so a hand-made file with the flag loads exactly as PEFT loads it."""
    make_adapter(tmp_path, 7, r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        expected = load_with_peft(tmp_path)
    weights = load_peft_adapter(str(tmp_path), SHAPE)
    assert set(weights.modules) == set(expected)
    for key, (a, b, scaling) in expected.items():
        w = weights.modules[key]
        torch.testing.assert_close(w.A, a, rtol=0, atol=0)
        torch.testing.assert_close(w.B, b, rtol=0, atol=0)
        assert w.scaling == scaling


def test_peft_loads_what_we_load(adapters: dict[str, tuple[Path, Expected]]) -> None:
    """Round trip through PEFT's loader for the pattern adapter (rank per layer)."""
    folder, _ = adapters["patterns"]
    expected = load_with_peft(folder)
    weights = load_peft_adapter(str(folder), SHAPE)
    for key, (a, b, scaling) in expected.items():
        torch.testing.assert_close(weights.modules[key].A, a, rtol=0, atol=0)
        torch.testing.assert_close(weights.modules[key].B, b, rtol=0, atol=0)
        assert weights.modules[key].scaling == pytest.approx(scaling)
    assert weights.nbytes == sum(4 * (a.numel() + b.numel()) for a, b, _ in expected.values())


# refusals -----------------------------------------------------------------------------------


@pytest.fixture
def plain(tmp_path: Path, adapters: dict[str, tuple[Path, Expected]]) -> Path:
    """A private copy of a valid adapter to break."""
    dst = tmp_path / "plain"
    shutil.copytree(adapters["embed_lm_head"][0], dst)
    return dst


def edit_config(folder: Path, **changes: Any) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def edit_tensors(folder: Path, fn: Any) -> None:
    file = folder / "adapter_model.safetensors"
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file))


CONFIG_REFUSALS = [
    ({"peft_type": "PREFIX_TUNING"}, "not a LoRA adapter"),
    ({"use_dora": True}, "use_dora"),
    ({"bias": "all"}, "bias"),
    ({"bias": "lora_only"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ({"lora_bias": True}, "lora_bias"),
    ({"use_qalora": True}, "use_qalora"),
    ({"target_parameters": ["mlp.experts.down_proj"]}, "target_parameters"),
    ({"layer_replication": [[0, 2]]}, "layer_replication"),
    ({"alora_invocation_tokens": [5]}, "alora_invocation_tokens"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"some_future_option": 3}, "some_future_option"),
    ({"target_modules": ["q_proj", "fc1"]}, "target_modules: 'fc1' is not a supported module"),
    ({"target_modules": r".*\.mlp"}, "target_modules"),
    ({"target_modules": []}, "target_modules"),
    ({"r": 0}, "r: must be a positive integer"),
    ({"lora_alpha": "x"}, "lora_alpha: must be a number"),
    ({"alpha_pattern": {"q_proj": float("inf")}}, "alpha_pattern['q_proj']: must be finite"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ({"target_modules": "(["}, "invalid regular expression"),
    # PEFT refuses a layer filter with a string target (it would be ignored)
    ({"target_modules": r".*\.q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"target_modules": "all-linear", "layers_pattern": "layers"}, "layers_pattern"),
    ({"use_rslora": "false"}, "use_rslora: must be true or false"),
    # lm_head matches by equality (no layer filter, as in PEFT); embed_tokens is filtered out
    ({"layers_to_transform": [0], "layers_pattern": "h"}, "embedding_A: its module is not in"),
]


@pytest.mark.parametrize(("changes", "message"), CONFIG_REFUSALS)
def test_config_refusals(plain: Path, changes: dict[str, Any], message: str) -> None:
    edit_config(plain, **changes)
    with pytest.raises(AdapterError, match=re.escape(message)):
        load_peft_adapter(str(plain), SHAPE)


def test_missing_files(plain: Path) -> None:
    (plain / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors: missing"):
        load_peft_adapter(str(plain), SHAPE)
    (plain / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json: missing"):
        load_peft_adapter(str(plain), SHAPE)
    with pytest.raises(AdapterError, match="not a folder"):
        load_peft_adapter(str(plain / "nope"), SHAPE)


@pytest.mark.parametrize("cut", [4, 100, -100])
def test_truncated_safetensors(plain: Path, cut: int) -> None:
    file = plain / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:cut])
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        load_peft_adapter(str(plain), SHAPE)


def test_garbage_safetensors(plain: Path) -> None:
    (plain / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        load_peft_adapter(str(plain), SHAPE)


def test_wrong_model_shape(adapters: dict[str, tuple[Path, Expected]]) -> None:
    folder = str(adapters["r4_all_linear"][0])
    other = LoraModelShape(2, 64, 96, 64, 32, 256)
    match = r"gate_proj.lora_B.weight: expected shape \[96, 4\], got \[128, 4\]"
    with pytest.raises(AdapterError, match=match):
        load_peft_adapter(folder, other)
    with pytest.raises(
        AdapterError,
        match=r"'model.layers.1.\S+' is not a supported module of this model \(1 layers",
    ):
        load_peft_adapter(folder, LoraModelShape(1, 64, 128, 64, 32, 256))


def test_rank_differs_from_config(plain: Path) -> None:
    edit_config(plain, r=2)
    with pytest.raises(
        AdapterError, match=r"q_proj.lora_A.weight: expected shape \[2, 64\], got \[4, 64\]"
    ):
        load_peft_adapter(str(plain), SHAPE)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(plain: Path, bad: float) -> None:
    name = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[name][3, 1] = bad

    edit_tensors(plain, poison)
    with pytest.raises(AdapterError, match=f"tensor {name}: holds NaN or Inf"):
        load_peft_adapter(str(plain), SHAPE)


def test_added_tokens_refused(plain: Path) -> None:
    def grow(t: dict[str, torch.Tensor]) -> None:
        key = "base_model.model.model.embed_tokens.lora_embedding_A"
        t[key] = torch.cat([t[key], torch.randn(4, 8)], dim=1)

    edit_tensors(plain, grow)
    with pytest.raises(AdapterError, match="added tokens"):
        load_peft_adapter(str(plain), SHAPE)


def test_resized_base_embedding_refused(plain: Path) -> None:
    def grow(t: dict[str, torch.Tensor]) -> None:
        key = "base_model.model.model.embed_tokens.base_layer.weight"
        t[key] = torch.randn(300, 64)

    edit_tensors(plain, grow)
    with pytest.raises(AdapterError, match="added tokens"):
        load_peft_adapter(str(plain), SHAPE)


@pytest.mark.parametrize(
    "extra",
    [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
        "base_model.model.model.layers.0.mlp.act_fn.lora_A.weight",
    ],
)
def test_extra_tensors_refused(plain: Path, extra: str) -> None:
    edit_tensors(plain, lambda t: t.__setitem__(extra, torch.zeros(4)))
    with pytest.raises(AdapterError, match="not a LoRA weight"):
        load_peft_adapter(str(plain), SHAPE)


def test_untargeted_and_missing_tensors(plain: Path) -> None:
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    edit_tensors(plain, lambda t: t.__setitem__(key, torch.zeros(4, 64)))
    with pytest.raises(AdapterError, match="not in target_modules"):
        load_peft_adapter(str(plain), SHAPE)
    edit_tensors(plain, lambda t: (t.pop(key), t.pop(key.replace("k_proj", "q_proj"))))
    with pytest.raises(AdapterError, match="layer 0 q_proj: missing tensor lora_A"):
        load_peft_adapter(str(plain), SHAPE)
