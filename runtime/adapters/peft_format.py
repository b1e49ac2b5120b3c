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

import functools
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

    @functools.cached_property
    def rank(self) -> int:
        return max(s.rank for s in self.modules.values())

    @functools.cached_property
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
    if isinstance(targets, str):
        # PEFT refuses these with a string target too (a regular expression, or "all-linear"):
        # its layer filter applies to a list of names only
        for key in ("layers_to_transform", "layers_pattern"):
            if not _is_unset(cfg.get(key)):
                raise AdapterError(f"{key}: cannot be used with target_modules given as a string "
                                   f"({targets!r}); list the module names instead")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise AdapterError(f"use_rslora: must be true or false, got {cfg['use_rslora']!r}")


def _check_targets(cfg: dict[str, Any], num_layers: int) -> None:
    """Refuse targets that name modules we cannot adapt."""
    targets = cfg["target_modules"]
    supported = _module_names(num_layers)
    if isinstance(targets, list):
        for t in targets:
            if not any(n == t or n.endswith(f".{t}") for n in supported):
                raise AdapterError(
                    f"target_modules: {t!r} is not a supported module of this model "
                    f"({num_layers} layers; supported: "
                    f"{', '.join((*LAYER_MODULES, EMBED, LM_HEAD))})"
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
    return _checked_config_of(json.dumps(cfg, sort_keys=True), num_layers)


@functools.lru_cache(maxsize=256)
def _checked_config_of(cfg_json: str, num_layers: int) -> AdapterConfig:
    """_checked_config of a config given as its canonical JSON, remembered: adapters trained
    from one recipe share their config's content, and resolving it against a 32-layer model
    took 0.7 ms of Python a name (on the CPU box), which a burst of hundreds of new names
    spent holding the GIL beside the runner's launches. Failures are not remembered.
    (The AdapterConfig returned is shared: nothing may change it.)"""
    return _checked_config(json.loads(cfg_json), num_layers)


def _checked_config(cfg: dict[str, Any], num_layers: int) -> AdapterConfig:
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


# Safetensors dtype names; anything else is refused as a corrupt file.
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
}


@dataclass(frozen=True)
class _Entry:
    """Where one tensor of a safetensors file lies in its data section (bytes)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _read_safetensors(file: str) -> tuple[dict[str, _Entry], Tensor]:
    """The header entries and the data section (uint8) of a safetensors file, read at once.

    Checks what the format promises: a JSON header of known dtypes whose byte ranges match
    their shapes and lie inside the data section."""
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("no header")
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            raise ValueError(f"header of {header_len} bytes in a file of {size}")
        header = json.loads(f.read(header_len))
        data = torch.empty(size - 8 - header_len, dtype=torch.uint8)
        if f.readinto(data.numpy()) != data.numel():
            raise ValueError("the file changed while being read")
    if not isinstance(header, dict):
        raise TypeError("the header is not a JSON object")
    entries: dict[str, _Entry] = {}
    data_nbytes = data.numel()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: unknown dtype {info['dtype']!r}")
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        nbytes = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_nbytes:
            raise ValueError(f"{name}: bytes {begin}..{end} outside the data section")
        if end - begin != nbytes:
            raise ValueError(f"{name}: {end - begin} bytes for shape {list(shape)}")
        entries[name] = _Entry(dtype, shape, begin, end)
    return entries, data


def _is_finite(t: Tensor) -> bool:
    """Whether `t` (non-empty) holds no NaN or Inf: min and max propagate NaN and show an Inf,
    and one pass for both is many times faster than isfinite(t).all()."""
    lo, hi = torch.aminmax(t)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


class _TensorFile:
    """The tensors of an adapter's weight file: their shapes and dtypes up front, their data
    converted to float32 on demand. A safetensors file is read in one go and its tensors are
    views of a few float32 runs (each a stretch of same-dtype tensors converted in one op)."""

    def __init__(self, path: str) -> None:
        st_file, bin_file = os.path.join(path, SAFETENSORS_FILE), os.path.join(path, BIN_FILE)
        self._entries: dict[str, _Entry] = {}
        self._data = torch.empty(0, dtype=torch.uint8)
        self._state: dict[str, Tensor] = {}
        if os.path.isfile(st_file):
            try:
                self._entries, self._data = _read_safetensors(st_file)
            except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
                raise AdapterError(f"{SAFETENSORS_FILE}: corrupt or truncated: {e}") from None
            self.shapes = {k: e.shape for k, e in self._entries.items()}
            self.dtypes = {k: e.dtype for k, e in self._entries.items()}
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
            self.dtypes = {k: v.dtype for k, v in state.items()}
        else:
            raise AdapterError(f"{SAFETENSORS_FILE}: missing in {path} (nor {BIN_FILE})")

    def read_float32(self, names: list[str]) -> dict[str, Tensor]:
        """The float (see `dtypes`) tensors `names` as contiguous float32 tensors, checked
        finite: the first of `names` (in order) that holds NaN or Inf is named in the error."""
        if self._entries:
            runs, tensors = self._read_runs(names)
        else:
            tensors = {n: self._state[n].to(torch.float32).contiguous() for n in names}
            runs = list(tensors.values())
        # One check per run; only a failure walks the tensors, to name the first bad one.
        if not all(_is_finite(run) for run in runs):
            bad = next(n for n in names if not torch.isfinite(tensors[n]).all())
            raise AdapterError(f"tensor {bad}: holds NaN or Inf values")
        return tensors

    def _read_runs(self, names: list[str]) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Group `names` into runs of back-to-back tensors of one dtype in the data section,
        convert each run to float32 in one op, and view each tensor in its run."""
        order = sorted(names, key=lambda n: self._entries[n].begin)
        runs: list[Tensor] = []
        tensors: dict[str, Tensor] = {}
        start = 0
        for i, name in enumerate(order):
            e, nxt = self._entries[name], order[i + 1] if i + 1 < len(order) else None
            if nxt is not None and (
                self._entries[nxt].begin == e.end and self._entries[nxt].dtype == e.dtype
            ):
                continue  # the run goes on
            members = order[start : i + 1]
            start = i + 1
            first = self._entries[members[0]]
            run = self._data[first.begin : e.end]
            if first.begin % e.dtype.itemsize:
                run = run.clone()  # views of another dtype must start aligned
            run = run.view(e.dtype).to(torch.float32)
            runs.append(run)
            base = run.storage_offset()  # as_strided counts from the storage's start
            for n in members:
                m = self._entries[n]
                strides = tuple(math.prod(m.shape[j + 1 :]) for j in range(len(m.shape)))
                offset = base + (m.begin - first.begin) // e.dtype.itemsize
                tensors[n] = run.as_strided(m.shape, strides, offset)
        return runs, tensors


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
    # Every structural check first (from the header alone), then one read that converts and
    # checks the values of all the tensors at once.
    ab_names = {
        key: _check_module(key, spec, wanted[key], files, shape)
        for key, spec in config.modules.items()
    }
    tensors = files.read_float32([n for ab in ab_names.values() for n in ab])
    modules = {
        key: LoraModuleWeights(tensors[a], tensors[b], spec.rank, spec.scaling)
        for (key, spec), (a, b) in zip(config.modules.items(), ab_names.values(), strict=True)
    }
    nbytes = 4 * sum(math.prod(files.shapes[n]) for n in tensors)
    return AdapterWeights(modules, config.rank, config.target_modules, nbytes)


def _check_module(
    key: tuple[int, str],
    spec: ModuleSpec,
    tensor_names: dict[str, str],
    files: _TensorFile,
    shape: LoraModelShape,
) -> tuple[str, str]:
    """The names of one module's A and B tensors, after checking they exist with the expected
    shapes and float dtypes."""
    layer, module = key
    where = module if layer == GLOBAL_LAYER else f"layer {layer} {module}"
    expected = dict(zip("AB", _expected_shapes(key, spec, shape), strict=True))
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
        dtype = files.dtypes[name]
        if not dtype.is_floating_point:
            raise AdapterError(f"tensor {name}: dtype {dtype} is not a float type")
    return tensor_names["A"], tensor_names["B"]
