"""Read and validate a PEFT LoRA adapter folder.

A folder holds `adapter_config.json` and `adapter_model.safetensors` (or `adapter_model.bin`,
read with `torch.load(weights_only=True)`). Modules are named as in a causal LM:
`model.layers.{i}.self_attn.{q,k,v,o}_proj`, `model.layers.{i}.mlp.{gate,up,down}_proj`,
`model.embed_tokens` and `lm_head`. Which modules are adapted, and each one's rank and alpha,
are resolved from the config the way PEFT resolves them; the tensors must then match exactly.
Anything that would change the maths beyond `scaling * B @ A` is refused with an
`AdapterError` whose message names the field or tensor.

The folder's contents are untrusted (on-demand names load whatever lies under `lora_roots`), so
reading them is bounded: only regular files are opened (a FIFO would block the reader, a device
never ends), the config's size is capped, the regular expressions it holds match module names
within a time budget without holding the GIL, and a weight file's bytes must be exactly the
LoRA tensors its header declares, checked against the model before its data is read.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import re
import stat
import time
from dataclasses import dataclass
from typing import IO, Any

import regex
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
from runtime.errors import AdapterError, AdapterReadError

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


# The time every regular expression of one config may take to match the model's module names.
# Python's `re` holds the GIL while it backtracks, so one pattern such as "(.|.|.)*x" froze the
# whole server (event loop included) for good; `regex` matches with a timeout, the GIL released.
REGEX_BUDGET_S = 1.0


class _Patterns:
    """The config's regular expressions (target_modules or exclude_modules as a string,
    rank_pattern and alpha_pattern keys, layers_pattern), matched as PEFT matches them but
    within REGEX_BUDGET_S in all; `where` names the config field in errors."""

    def __init__(self, budget_s: float = REGEX_BUDGET_S) -> None:
        self._deadline = time.monotonic() + budget_s
        self._compiled: dict[str, Any] = {}

    def _compile(self, pattern: str, where: str, shown: str) -> Any:
        if pattern not in self._compiled:
            try:
                self._compiled[pattern] = regex.compile(pattern)
            except (regex.error, ValueError, OverflowError, RecursionError) as e:
                raise AdapterError(
                    f"{where}: invalid regular expression {shown!r}: {e}") from None
        return self._compiled[pattern]

    def _run(self, method: str, pattern: str, name: str, where: str, shown: str) -> Any:
        compiled = self._compile(pattern, where, shown)
        remaining = self._deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            return getattr(compiled, method)(name, timeout=remaining, concurrent=True)
        except TimeoutError:
            raise AdapterError(
                f"{where}: the regular expression {shown!r} takes too long to match "
                f"the model's module names (over {REGEX_BUDGET_S:g} s in all)") from None

    def fullmatch(self, pattern: str, name: str, where: str) -> bool:
        return self._run("fullmatch", pattern, name, where, pattern) is not None

    def match(self, pattern: str, name: str, where: str, shown: str) -> Any:
        """re.match of `pattern`, built around the config's `shown`."""
        return self._run("match", pattern, name, where, shown)


def _get_pattern_key(patterns: dict[str, Any], name: str, rx: _Patterns,
                     where: str) -> str | None:
    """The first pattern key that matches `name` as PEFT matches rank/alpha patterns: the key is
    a regex that must match the whole name or a suffix starting after a dot."""
    for key in patterns:
        if rx.match(rf"(.*\.)?({key})$", name, where, key):
            return key
    return None


def _matches_list(keys: list[str], name: str) -> bool:
    return name in keys or any(name.endswith(f".{k}") for k in keys)


def _is_targeted(cfg: dict[str, Any], name: str, rx: _Patterns) -> bool:
    """Whether PEFT would put a LoRA on module `name` (its target/exclude/layer rules)."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str) and rx.fullmatch(exclude, name, "exclude_modules"):
            return False
        if isinstance(exclude, list) and _matches_list(exclude, name):
            return False
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return name.rsplit(".", 1)[-1] in LAYER_MODULES
        return rx.fullmatch(targets, name, "target_modules")
    if name in targets:
        return True
    if not any(name.endswith(f".{t}") for t in targets):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    return _layer_index(cfg.get("layers_pattern"), name, rx) in (
        [layers] if isinstance(layers, int) else layers
    )


def _layer_index(layers_pattern: str | list[str] | None, name: str,
                 rx: _Patterns) -> int | None:
    """The layer index in `name` as PEFT finds it for layers_to_transform."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for p in patterns:
            match = rx.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name, "layers_pattern", p)
            if match:
                break
    return int(match.group("idx")) if match else None


# PEFT task types whose adapters sit on a causal LM's decoder as we run it. The others add a
# classification or QA head (SEQ_CLS, TOKEN_CLS, QUESTION_ANS) or belong to an encoder-decoder
# model (SEQ_2_SEQ_LM): served as a causal LM they would answer with something else.
_TASK_TYPES = (None, "CAUSAL_LM", "FEATURE_EXTRACTION")
# The largest rank a config may state (ranks beyond the pool's are refused later, by name).
MAX_CONFIG_RANK = 1 << 20
_FLOAT32_MAX = torch.finfo(torch.float32).max


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _check_number(where: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdapterError(f"{where}: must be a number, got {value!r}")
    try:
        is_finite = math.isfinite(value)
    except OverflowError:  # an integer beyond every float
        is_finite = False
    if not is_finite:
        raise AdapterError(f"{where}: must be finite, got {value!r}")


def _check_rank(where: str, value: Any) -> None:
    if not _is_int(value) or not 0 < value <= MAX_CONFIG_RANK:
        raise AdapterError(f"{where}: must be a positive integer (at most {MAX_CONFIG_RANK}), "
                           f"got {value!r}")


def _check_options(cfg: dict[str, Any]) -> None:
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"peft_type: not a LoRA adapter (got {peft_type!r})")
    task_type = cfg.get("task_type")
    if task_type not in _TASK_TYPES:
        raise AdapterError(
            f"task_type: {task_type!r} adapters are not supported (only "
            f"{', '.join(map(repr, _TASK_TYPES))}: this server runs causal LMs)")
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
    _check_rank("r", cfg.get("r"))
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise AdapterError(f"{key}: must be an object, got {cfg[key]!r}")
    for key, value in (cfg.get("rank_pattern") or {}).items():
        _check_rank(f"rank_pattern[{key!r}]", value)
    _check_number("lora_alpha", cfg.get("lora_alpha", 8))
    for key, value in (cfg.get("alpha_pattern") or {}).items():
        _check_number(f"alpha_pattern[{key!r}]", value)
    _check_target_fields(cfg)
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise AdapterError(f"use_rslora: must be true or false, got {cfg['use_rslora']!r}")


def _check_target_fields(cfg: dict[str, Any]) -> None:
    """The types of the fields that choose the adapted modules: a value of another type would
    be ignored, or match otherwise than in PEFT."""
    targets = cfg.get("target_modules")
    if not targets or not isinstance(targets, (str, list)):
        raise AdapterError(f"target_modules: must be a non-empty list or string, got {targets!r}")
    if isinstance(targets, list) and not _is_str_list(targets):
        raise AdapterError(f"target_modules: must hold strings, got {targets!r}")
    exclude = cfg.get("exclude_modules")
    if exclude is not None and not (isinstance(exclude, str) or _is_str_list(exclude)):
        raise AdapterError(f"exclude_modules: must be a string or a list of strings, "
                           f"got {exclude!r}")
    layers = cfg.get("layers_to_transform")
    if layers is not None and not (
        (_is_int(layers) and layers >= 0)
        or (isinstance(layers, list) and all(_is_int(i) and i >= 0 for i in layers))
    ):
        raise AdapterError(f"layers_to_transform: must be a layer index or a list of them, "
                           f"got {layers!r}")
    pattern = cfg.get("layers_pattern")
    if pattern is not None and not (isinstance(pattern, str) or _is_str_list(pattern)):
        raise AdapterError(f"layers_pattern: must be a string or a list of strings, "
                           f"got {pattern!r}")
    if isinstance(targets, str):
        # PEFT refuses these with a string target too (a regular expression, or "all-linear"):
        # its layer filter applies to a list of names only
        for key in ("layers_to_transform", "layers_pattern"):
            if not _is_unset(cfg.get(key)):
                raise AdapterError(f"{key}: cannot be used with target_modules given as a string "
                                   f"({targets!r}); list the module names instead")


def _check_targets(cfg: dict[str, Any], num_layers: int, rx: _Patterns) -> None:
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
            if rx.fullmatch(targets, n, "target_modules"):
                raise AdapterError(f"target_modules: {targets!r} matches unsupported module {n!r}")


# The largest adapter_config.json read: PEFT writes a few KiB (a rank_pattern naming every
# module of a large model, some tens); reading a bigger one whole would only cost memory.
MAX_CONFIG_BYTES = 1 << 20
# Configs remembered by content are at most this long, so the cache holds a few MiB at most.
MAX_REMEMBERED_CONFIG_CHARS = 16 << 10


def read_adapter_config(path: str, num_layers: int) -> AdapterConfig:
    """Read `path/adapter_config.json`, refuse unsupported options, and resolve every targeted
    (layer, module) with its rank and scaling."""
    file = os.path.join(path, CONFIG_FILE)
    try:
        with _open_regular(file, CONFIG_FILE) as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise AdapterError(f"{CONFIG_FILE}: missing in {path}") from None
    except OSError as e:
        raise read_error(f"{CONFIG_FILE}: cannot read {file}", e) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{CONFIG_FILE}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested or numbers too big
        raise AdapterError(f"{CONFIG_FILE}: cannot read {file}: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{CONFIG_FILE}: must hold a JSON object")
    canonical = json.dumps(cfg, sort_keys=True)
    if len(canonical) > MAX_REMEMBERED_CONFIG_CHARS:  # the cache holds its key
        return _checked_config(cfg, num_layers)
    return _checked_config_of(canonical, num_layers)


def _open_regular(file: str, what: str) -> IO[bytes]:
    """`file` opened for reading, if it is a regular file once symlinks are followed: a FIFO
    would block the open and then the read for good (stalling every later load behind it on
    its thread), a device such as /dev/zero never ends. FileNotFoundError if it is missing."""
    try:
        mode = os.stat(file).st_mode
    except ValueError as e:  # a NUL in the path
        raise AdapterError(f"{what}: invalid path {file!r}: {e}") from None
    if not stat.S_ISREG(mode):
        raise AdapterError(f"{what}: not a regular file")
    # O_NONBLOCK: a FIFO swapped in after the check must not block the open either
    fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AdapterError(f"{what}: not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


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
    rx = _Patterns()
    _check_targets(cfg, num_layers, rx)
    return _resolve_modules(cfg, num_layers, rx)


def _resolve_modules(cfg: dict[str, Any], num_layers: int, rx: _Patterns) -> AdapterConfig:
    r, alpha = cfg["r"], cfg.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    use_rslora = bool(cfg.get("use_rslora", False))
    modules: dict[tuple[int, str], ModuleSpec] = {}
    for name, key in _module_names(num_layers).items():
        if not _is_targeted(cfg, name, rx):
            continue
        rk = _get_pattern_key(rank_pattern, name, rx, "rank_pattern")
        ak = _get_pattern_key(alpha_pattern, name, rx, "alpha_pattern")
        rank = rank_pattern[rk] if rk is not None else r
        a = float(alpha_pattern[ak] if ak is not None else alpha)
        scaling = a / math.sqrt(rank) if use_rslora else a / rank
        if not abs(scaling) <= _FLOAT32_MAX:  # the pool keeps scalings in float32
            where = f"alpha_pattern[{ak!r}]" if ak is not None else "lora_alpha"
            raise AdapterError(f"{where}: the scaling of {name} ({scaling:g}) overflows float32")
        modules[key] = ModuleSpec(rank, scaling)
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


# safetensors' own limit on a header's size
MAX_HEADER_BYTES = 100_000_000


def _parse_header(raw: bytes, data_nbytes: int) -> dict[str, _Entry]:
    """The entries of a safetensors header, checked as the format (and the safetensors
    library) requires: known dtypes, byte ranges that match their shapes, and tensors that lie
    back to back and fill the data section of `data_nbytes` bytes exactly."""
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise TypeError("the header is not a JSON object")
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise TypeError(f"{name}: not a tensor entry")
        dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype_name, str) or dtype_name not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: unknown dtype {dtype_name!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ValueError(f"{name}: invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
            raise ValueError(f"{name}: invalid data_offsets {offsets!r}")
        dtype, (begin, end) = _SAFETENSORS_DTYPES[dtype_name], offsets
        if not 0 <= begin <= end <= data_nbytes:
            raise ValueError(f"{name}: bytes {begin}..{end} outside the data section")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{name}: {end - begin} bytes for shape {shape}")
        entries[name] = _Entry(dtype, tuple(shape), begin, end)
    covered = 0
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin != covered:
            raise ValueError(f"tensors overlap or leave a gap at byte {covered}")
        covered = e.end
    if covered != data_nbytes:
        raise ValueError(f"{data_nbytes - covered} bytes after the last tensor")
    return entries


def _in_range(t: Tensor, limit: float) -> bool:
    """Whether `t` (non-empty) holds no NaN or Inf and no magnitude beyond `limit`: min and max
    propagate NaN and show an Inf, and one pass for both is many times faster than
    isfinite(t).all()."""
    lo, hi = (x.item() for x in torch.aminmax(t))
    return math.isfinite(lo) and math.isfinite(hi) and max(-lo, hi) <= limit


class _TensorFile:
    """The tensors of an adapter's weight file: their shapes and dtypes up front (a safetensors
    file's header alone), their data read and converted to float32 on demand, once the
    structure is checked. A safetensors file's data is read in one go and its tensors are
    views of a few float32 runs (each a stretch of same-dtype tensors converted in one op).
    `max_bin_bytes`: the largest adapter_model.bin to unpickle. Close it after use."""

    def __init__(self, path: str, max_bin_bytes: int) -> None:
        st_file, bin_file = os.path.join(path, SAFETENSORS_FILE), os.path.join(path, BIN_FILE)
        self._entries: dict[str, _Entry] = {}
        self._state: dict[str, Tensor] = {}
        self._file = _open_weights(st_file, SAFETENSORS_FILE)
        if self._file is not None:
            try:
                self._entries, self._data_start = self._read_header(self._file)
            except BaseException:
                self.close()
                raise
            self.shapes = {k: e.shape for k, e in self._entries.items()}
            self.dtypes = {k: e.dtype for k, e in self._entries.items()}
            return
        file = _open_weights(bin_file, BIN_FILE)
        if file is None:
            raise AdapterError(f"{SAFETENSORS_FILE}: missing in {path} (nor {BIN_FILE})")
        with file:
            self._state = self._read_bin(file, max_bin_bytes)
        self.shapes = {k: tuple(v.shape) for k, v in self._state.items()}
        self.dtypes = {k: v.dtype for k, v in self._state.items()}

    @staticmethod
    def _read_header(f: IO[bytes]) -> tuple[dict[str, _Entry], int]:
        """A safetensors file's entries, and where its data section starts."""
        try:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("no header")
            header_len = int.from_bytes(head, "little")
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"header of {header_len} bytes in a file of {size}")
            raw = f.read(header_len)
            if len(raw) != header_len:
                raise ValueError("the file changed while being read")
            return _parse_header(raw, size - 8 - header_len), 8 + header_len
        except OSError as e:
            raise read_error(f"{SAFETENSORS_FILE}: cannot read", e) from None
        except (ValueError, TypeError, OverflowError, RecursionError) as e:
            raise AdapterError(f"{SAFETENSORS_FILE}: corrupt or truncated: {e}") from None

    @staticmethod
    def _read_bin(f: IO[bytes], max_bytes: int) -> dict[str, Tensor]:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise AdapterError(f"{BIN_FILE}: {size} bytes, more than the tensors of this "
                               f"adapter's config can take ({max_bytes})")
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling errors of every kind
            raise AdapterError(f"{BIN_FILE}: cannot read: {e}") from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise AdapterError(f"{BIN_FILE}: must hold a dict of tensors")
        return state

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _read_data(self) -> Tensor:
        """The safetensors data section (uint8); then the file is closed."""
        f = self._file
        assert f is not None, "the data was read already"
        try:
            f.seek(self._data_start)
            data = torch.empty(os.fstat(f.fileno()).st_size - self._data_start,
                               dtype=torch.uint8)
            if data.numel() != max((e.end for e in self._entries.values()), default=0) or (
                f.readinto(data.numpy()) != data.numel()
            ):
                raise ValueError("the file changed while being read")
        except OSError as e:
            raise read_error(f"{SAFETENSORS_FILE}: cannot read", e) from None
        except ValueError as e:
            raise AdapterError(f"{SAFETENSORS_FILE}: corrupt or truncated: {e}") from None
        finally:
            self.close()
        return data

    def read_float32(self, names: list[str], limit: float = _FLOAT32_MAX,
                     dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """The float (see `dtypes`) tensors `names` as contiguous float32 tensors, checked
        finite and within `limit` (what `dtype`, the type they are stored in, can hold): the
        first of `names` (in order) that is not is named in the error."""
        if self._entries:
            runs, tensors = self._read_runs(names, self._read_data())
        else:
            tensors = {n: self._state[n].to(torch.float32).contiguous() for n in names}
            runs = list(tensors.values())
        # One check per run; only a failure walks the tensors, to name the first bad one.
        if not all(_in_range(run, limit) for run in runs):
            bad = next(n for n in names if not _in_range(tensors[n], limit))
            if not torch.isfinite(tensors[bad]).all():
                raise AdapterError(f"tensor {bad}: holds NaN or Inf values")
            big = tensors[bad].abs().max().item()
            raise AdapterError(f"tensor {bad}: holds values up to {big:g}, beyond what {dtype} "
                               "holds (the server's dtype)")
        return tensors

    def _read_runs(self, names: list[str], data: Tensor) -> tuple[list[Tensor], dict[str, Tensor]]:
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
            run = data[first.begin : e.end]
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


# errno values that say the machine could not read, not that the adapter is wrong
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EINTR, errno.ENOMEM, errno.ESTALE,
                              errno.ETIMEDOUT, errno.ENFILE, errno.EMFILE, errno.ENOBUFS,
                              errno.EBUSY})


def read_error(message: str, e: OSError) -> AdapterError:
    """The error for an OSError `e` while reading adapter files: AdapterReadError where its
    errno is the machine's (TRANSIENT_ERRNOS), else AdapterError (a link, no permission...)."""
    cls = AdapterReadError if e.errno in TRANSIENT_ERRNOS else AdapterError
    return cls(f"{message}: {e}")


def _open_weights(file: str, what: str) -> IO[bytes] | None:
    """`file` opened if it is a regular file; None if it is missing."""
    try:
        return _open_regular(file, what)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise read_error(f"{what}: cannot read", e) from None


def _expected_shapes(
    key: tuple[int, str], spec: ModuleSpec, shape: LoraModelShape
) -> tuple[tuple[int, int], tuple[int, int]]:
    in_f, out_f = module_dims(shape, key[1])
    return (spec.rank, in_f), (out_f, spec.rank)


def _max_bin_bytes(config: AdapterConfig, shape: LoraModelShape) -> int:
    """The most bytes an adapter_model.bin of `config` can need: every tensor it may hold in
    float64 (the base embedding and lm_head saved beside their adapters included), and room
    for the pickle and the zip records around them."""
    numel = sum(spec.rank * sum(module_dims(shape, m)) for (_, m), spec in config.modules.items())
    numel += sum(shape.vocab_size * shape.hidden_size
                 for m in (EMBED, LM_HEAD) if m in config.target_modules)
    return 8 * numel + (1 << 20) + 4096 * (2 * len(config.modules) + 2)


def load_peft_adapter(path: str, shape: LoraModelShape,
                      dtype: torch.dtype = torch.float32) -> AdapterWeights:
    """Read and validate the PEFT LoRA adapter in folder `path` for a model of `shape` whose
    adapters are kept in `dtype` (values it cannot hold are refused).

    Blocking (disk reads): call it from a worker thread. Every weight comes back float32.
    """
    if not os.path.isdir(path):
        raise AdapterError(f"adapter path {path!r} is not a folder")
    config = read_adapter_config(path, shape.num_layers)
    files = _TensorFile(path, _max_bin_bytes(config, shape))
    try:
        ab_names = _check_tensors(config, files, shape)
        limit = min(torch.finfo(dtype).max, _FLOAT32_MAX)
        tensors = files.read_float32([n for ab in ab_names.values() for n in ab], limit, dtype)
    finally:
        files.close()
    modules = {
        key: LoraModuleWeights(tensors[a], tensors[b], spec.rank, spec.scaling)
        for (key, spec), (a, b) in zip(config.modules.items(), ab_names.values(), strict=True)
    }
    nbytes = 4 * sum(math.prod(files.shapes[n]) for n in tensors)
    return AdapterWeights(modules, config.rank, config.target_modules, nbytes)


def _check_tensors(config: AdapterConfig, files: _TensorFile,
                   shape: LoraModelShape) -> dict[tuple[int, str], tuple[str, str]]:
    """Every structural check, from the header alone: each tensor is an A or B of a targeted
    module (or the base embedding or lm_head saved beside their adapters), once, with the
    expected shape and a float dtype. The names of each module's A and B."""
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
        ab = "A" if kind in ("lora_A.weight", "lora_embedding_A") else "B"
        if ab in wanted[key]:
            raise AdapterError(f"tensor {tensor_name}: a second lora_{ab} for {module} "
                               f"(beside {wanted[key][ab]})")
        wanted[key][ab] = tensor_name
    return {key: _check_module(key, spec, wanted[key], files, shape)
            for key, spec in config.modules.items()}


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
