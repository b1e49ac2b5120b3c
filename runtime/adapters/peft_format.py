"""Read and validate a PEFT LoRA adapter folder.

A folder holds `adapter_config.json` and `adapter_model.safetensors` (or `adapter_model.bin`,
read with `torch.load(weights_only=True)`). Modules are named as in a causal LM:
`model.layers.{i}.self_attn.{q,k,v,o}_proj`, `model.layers.{i}.mlp.{gate,up,down}_proj`,
`model.embed_tokens` and `lm_head`. Which modules are adapted, and each one's rank and alpha,
are resolved from the config the way PEFT resolves them; the tensors must then match exactly.
Anything that would change the maths beyond `scaling * B @ A` is refused with an
`AdapterError` whose message names the field or tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from runtime.adapters.pool import (
    EMBED,
    GLOBAL_LAYER,
    GROUPS,
    LAYER_MODULES,
    LM_HEAD,
    LoraModelShape,
    module_dims,
)
from runtime.errors import AdapterError

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"


@dataclass
class LoraModuleWeights:
    """One adapted module: delta = scaling * B @ A."""

    A: Tensor  # [r, in] float32 (embed_tokens: [r, vocab])
    B: Tensor  # [out, r] float32 (embed_tokens: [hidden, r])
    rank: int
    scaling: float


@dataclass
class AdapterWeights:
    """A validated adapter. modules is keyed by (layer, module); layer is -1 for embed_tokens
    and lm_head."""

    modules: dict[tuple[int, str], LoraModuleWeights]
    rank: int  # max over modules
    target_modules: frozenset[str]
    nbytes: int


@dataclass(frozen=True)
class ModuleSpec:
    rank: int
    scaling: float


@dataclass(frozen=True)
class AdapterConfig:
    """What the config says, resolved against the model: each targeted (layer, module)."""

    modules: dict[tuple[int, str], ModuleSpec]

    @property
    def rank(self) -> int:
        return max(s.rank for s in self.modules.values())

    @property
    def target_modules(self) -> frozenset[str]:
        return frozenset(m for _, m in self.modules)


# Options whose non-default value changes the forward maths (or the base weights).
_MATH_OPTIONS = (
    "use_dora",
    "lora_bias",
    "use_qalora",
    "target_parameters",
    "layer_replication",
    "alora_invocation_tokens",
    "megatron_config",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "velora_config",
    "monteclora_config",
    "ensure_weight_tying",
    "trainable_token_indices",
    "modules_to_save",
)
# Options that only concern training, initialisation or bookkeeping. fan_in_fan_out only
# describes how a Conv1D base weight is stored: LoRA's A and B are [r, in] and [out, r]
# whatever its value, and for linear layers PEFT resets it to false.
_INERT_OPTIONS = frozenset(
    (
        "task_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "lora_dropout",
        "runtime_config",
        "megatron_core",
        "qalora_group_size",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "fan_in_fan_out",
        "init_lora_weights",
    )
)
_HANDLED_OPTIONS = frozenset(
    (
        "peft_type",
        "r",
        "lora_alpha",
        "use_rslora",
        "target_modules",
        "exclude_modules",
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layers_pattern",
        "bias",
        *_MATH_OPTIONS,
    )
)
# Initialisations that also rewrite the base weights: the adapter only works with them.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _module_names(num_layers: int) -> dict[str, tuple[int, str]]:
    """Full module name -> (layer, module) for every module we support."""
    names: dict[str, tuple[int, str]] = {}
    for layer in range(num_layers):
        for g, modules in GROUPS.items():
            parent = "self_attn" if g in ("qkv", "o") else "mlp"
            for m in modules:
                names[f"model.layers.{layer}.{parent}.{m}"] = (layer, m)
    names["model.embed_tokens"] = (GLOBAL_LAYER, EMBED)
    names[LM_HEAD] = (GLOBAL_LAYER, LM_HEAD)
    return names


def _other_module_names(num_layers: int) -> list[str]:
    """Module names of a causal LM that we cannot adapt (a target that matches them is refused)."""
    names = ["model", "model.layers", "model.norm", "model.rotary_emb"]
    for layer in range(num_layers):
        p = f"model.layers.{layer}"
        names += [
            p,
            f"{p}.self_attn",
            f"{p}.mlp",
            f"{p}.mlp.act_fn",
            f"{p}.input_layernorm",
            f"{p}.post_attention_layernorm",
        ]
    return names


def _is_unset(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


def _get_pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    """The first pattern key that matches `name` as PEFT matches rank/alpha patterns: the key is
    a regex that must match the whole name or a suffix starting after a dot."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _matches_list(keys: list[str], name: str) -> bool:
    return name in keys or any(name.endswith(f".{k}") for k in keys)


def _is_targeted(cfg: dict[str, Any], name: str) -> bool:
    """Whether PEFT would put a LoRA on module `name` (its target/exclude/layer rules)."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str) and re.fullmatch(exclude, name):
            return False
        if isinstance(exclude, list) and _matches_list(exclude, name):
            return False
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return name.rsplit(".", 1)[-1] in LAYER_MODULES
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith(f".{t}") for t in targets):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    return _layer_index(cfg.get("layers_pattern"), name) in (
        [layers] if isinstance(layers, int) else layers
    )


def _layer_index(layers_pattern: str | list[str] | None, name: str) -> int | None:
    """The layer index in `name` as PEFT finds it for layers_to_transform."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for p in patterns:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def _check_options(cfg: dict[str, Any]) -> None:
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"peft_type: not a LoRA adapter (got {peft_type!r})")
    for key in _MATH_OPTIONS:
        if not _is_unset(cfg.get(key)):
            raise AdapterError(f"{key}: {cfg[key]!r} is not supported (it changes the LoRA maths)")
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise AdapterError(f"bias: {bias!r} is not supported (only 'none')")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterError(
            f"init_lora_weights: {init!r} adapters need modified base weights; convert the "
            "adapter to plain LoRA (PEFT's path_initial_model_for_weight_conversion) first"
        )
    for key, value in cfg.items():
        if key not in _HANDLED_OPTIONS and key not in _INERT_OPTIONS and not _is_unset(value):
            raise AdapterError(f"{key}: unknown adapter option {value!r} is not supported")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"r: must be a positive integer, got {r!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise AdapterError(f"{key}: must be an object, got {cfg[key]!r}")
    for key, value in (cfg.get("rank_pattern") or {}).items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise AdapterError(f"rank_pattern: rank of {key!r} must be a positive integer")
    alphas = [("lora_alpha", cfg.get("lora_alpha", 8))]
    alphas += [(f"alpha_pattern[{k!r}]", v) for k, v in (cfg.get("alpha_pattern") or {}).items()]
    for where, value in alphas:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AdapterError(f"{where}: must be a number, got {value!r}")
        if not math.isfinite(value):
            raise AdapterError(f"{where}: must be finite, got {value!r}")
    targets = cfg.get("target_modules")
    if not targets or not isinstance(targets, (str, list)):
        raise AdapterError(f"target_modules: must be a non-empty list or string, got {targets!r}")
    if isinstance(targets, list) and not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"target_modules: must hold strings, got {targets!r}")


def _check_targets(cfg: dict[str, Any], num_layers: int) -> None:
    """Refuse targets that name modules we cannot adapt."""
    targets = cfg["target_modules"]
    supported = _module_names(num_layers)
    if isinstance(targets, list):
        for t in targets:
            if not any(n == t or n.endswith(f".{t}") for n in supported):
                raise AdapterError(
                    f"target_modules: {t!r} is not a supported module of this model "
                    f"({num_layers} layers; supported: {', '.join((*LAYER_MODULES, EMBED, LM_HEAD))})"
                )
    elif targets.lower() != "all-linear":
        for n in _other_module_names(num_layers):
            if re.fullmatch(targets, n):
                raise AdapterError(f"target_modules: {targets!r} matches unsupported module {n!r}")


def read_adapter_config(path: str, num_layers: int) -> AdapterConfig:
    """Read `path/adapter_config.json`, refuse unsupported options, and resolve every targeted
    (layer, module) with its rank and scaling."""
    file = os.path.join(path, CONFIG_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise AdapterError(f"{CONFIG_FILE}: missing in {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{CONFIG_FILE}: cannot read {file}: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{CONFIG_FILE}: must hold a JSON object")
    _check_options(cfg)
    try:
        _check_targets(cfg, num_layers)
        return _resolve_modules(cfg, num_layers)
    except re.error as e:
        raise AdapterError(f"target_modules / patterns: invalid regular expression: {e}") from None


def _resolve_modules(cfg: dict[str, Any], num_layers: int) -> AdapterConfig:
    r, alpha = cfg["r"], cfg.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    use_rslora = bool(cfg.get("use_rslora", False))
    modules: dict[tuple[int, str], ModuleSpec] = {}
    for name, key in _module_names(num_layers).items():
        if not _is_targeted(cfg, name):
            continue
        rk, ak = _get_pattern_key(rank_pattern, name), _get_pattern_key(alpha_pattern, name)
        rank = rank_pattern[rk] if rk is not None else r
        a = alpha_pattern[ak] if ak is not None else alpha
        modules[key] = ModuleSpec(rank, a / math.sqrt(rank) if use_rslora else a / rank)
    if not modules:
        raise AdapterError(f"target_modules: {cfg['target_modules']!r} matches no module")
    return AdapterConfig(modules)


_KEY_RE = re.compile(
    r"(?:base_model\.model\.)?(?P<module>.+?)\."
    r"(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|base_layer\.weight)"
)


def _canonical(module: str) -> str:
    """Module name as in a causal LM (adapters saved from the bare decoder lack `model.`)."""
    if module.startswith(("layers.", "embed_tokens")):
        return f"model.{module}"
    return module


class _TensorFile:
    """The tensors of an adapter's weight file: their shapes up front, their data on demand."""

    def __init__(self, path: str) -> None:
        st_file, bin_file = os.path.join(path, SAFETENSORS_FILE), os.path.join(path, BIN_FILE)
        self._handle: Any = None
        self._state: dict[str, Tensor] = {}
        if os.path.isfile(st_file):
            from safetensors import safe_open

            try:
                self._handle = safe_open(st_file, framework="pt", device="cpu")
                keys = self._handle.keys()
                self.shapes = {k: tuple(self._handle.get_slice(k).get_shape()) for k in keys}
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise AdapterError(f"{SAFETENSORS_FILE}: corrupt or truncated: {e}") from None
        elif os.path.isfile(bin_file):
            try:
                state = torch.load(bin_file, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - unpickling errors of every kind
                raise AdapterError(f"{BIN_FILE}: cannot read: {e}") from None
            if not isinstance(state, dict) or not all(
                isinstance(v, Tensor) for v in state.values()
            ):
                raise AdapterError(f"{BIN_FILE}: must hold a dict of tensors")
            self._state = state
            self.shapes = {k: tuple(v.shape) for k, v in state.items()}
        else:
            raise AdapterError(f"{SAFETENSORS_FILE}: missing in {path} (nor {BIN_FILE})")

    def get(self, name: str) -> Tensor:
        if self._handle is None:
            return self._state[name]
        try:
            return self._handle.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise AdapterError(f"{SAFETENSORS_FILE}: corrupt or truncated at {name}: {e}") from None


def _expected_shapes(
    key: tuple[int, str], spec: ModuleSpec, shape: LoraModelShape
) -> tuple[tuple[int, int], tuple[int, int]]:
    in_f, out_f = module_dims(shape, key[1])
    return (spec.rank, in_f), (out_f, spec.rank)


def load_peft_adapter(path: str, shape: LoraModelShape) -> AdapterWeights:
    """Read and validate the PEFT LoRA adapter in folder `path` for a model of `shape`.

    Blocking (disk reads): call it from a worker thread. Every weight comes back float32.
    """
    if not os.path.isdir(path):
        raise AdapterError(f"adapter path {path!r} is not a folder")
    config = read_adapter_config(path, shape.num_layers)
    files = _TensorFile(path)
    names = _module_names(shape.num_layers)
    wanted: dict[tuple[int, str], dict[str, str]] = {k: {} for k in config.modules}
    for tensor_name, tshape in files.shapes.items():
        m = _KEY_RE.fullmatch(tensor_name)
        module = _canonical(m.group("module")) if m else None
        if m is None or module not in names:
            raise AdapterError(
                f"tensor {tensor_name}: not a LoRA weight of a supported module "
                "(bias, DoRA, modules_to_save or other extra weights are not supported)"
            )
        key, kind = names[module], m.group("kind")
        if kind == "base_layer.weight":
            # Saved alongside embedding adapters; equal-shaped means no added tokens.
            want = (shape.vocab_size, shape.hidden_size)
            if key[1] not in (EMBED, LM_HEAD) or tshape != want:
                hint = ""
                if len(tshape) == 2 and tshape[0] != shape.vocab_size:
                    hint = " (added tokens / resized vocabularies are not supported)"
                raise AdapterError(
                    f"tensor {tensor_name}: expected shape {list(want)}, got {list(tshape)}{hint}"
                )
            continue
        if key not in wanted:
            raise AdapterError(f"tensor {tensor_name}: its module is not in target_modules")
        is_embed_kind = kind.startswith("lora_embedding")
        if is_embed_kind != (key[1] == EMBED):
            raise AdapterError(f"tensor {tensor_name}: unexpected kind for module {module}")
        wanted[key]["A" if kind in ("lora_A.weight", "lora_embedding_A") else "B"] = tensor_name
    modules: dict[tuple[int, str], LoraModuleWeights] = {}
    for key, spec in config.modules.items():
        modules[key] = _load_module(key, spec, wanted[key], files, shape)
    nbytes = sum(w.A.nbytes + w.B.nbytes for w in modules.values())
    return AdapterWeights(modules, config.rank, config.target_modules, nbytes)


def _load_module(
    key: tuple[int, str],
    spec: ModuleSpec,
    tensor_names: dict[str, str],
    files: _TensorFile,
    shape: LoraModelShape,
) -> LoraModuleWeights:
    layer, module = key
    where = module if layer == GLOBAL_LAYER else f"layer {layer} {module}"
    expected = dict(zip("AB", _expected_shapes(key, spec, shape), strict=True))
    out: dict[str, Tensor] = {}
    for ab in "AB":
        if ab not in tensor_names:
            raise AdapterError(f"{where}: missing tensor lora_{ab} (the config targets it)")
        name = tensor_names[ab]
        got = files.shapes[name]
        if got != expected[ab]:
            hint = ""
            if module == EMBED and ab == "A" and len(got) == 2 and got[1] != shape.vocab_size:
                hint = " (vocab size differs from the model's: added tokens are not supported)"
            raise AdapterError(
                f"tensor {name}: expected shape {list(expected[ab])}, got {list(got)}{hint}"
            )
        t = files.get(name)
        if not t.is_floating_point():
            raise AdapterError(f"tensor {name}: dtype {t.dtype} is not a float type")
        t = t.to(torch.float32)
        if not torch.isfinite(t).all():
            raise AdapterError(f"tensor {name}: holds NaN or Inf values")
        out[ab] = t.contiguous()
    return LoraModuleWeights(out["A"], out["B"], spec.rank, spec.scaling)
