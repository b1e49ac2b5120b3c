"""Build a `ServerConfig` from a TOML file and command-line flags (flags override the file).

Every `ServerConfig` field is a TOML key (`max_loras_per_batch`) and a flag
(`--max-loras-per-batch`, the underscore spelling accepted too). Booleans are presence flags; the
tri-state `enable_lora_overlap_loading` has `--enable-lora-overlap-loading` / `--disable-...`.
List options take several values. Mistakes raise `ConfigError` naming the option.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.config import ConfigError, LoraPathSpec, ServerConfig

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
    "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

# vLLM's names of options that loraserve names as SGLang does: the same option under either
# name, as a TOML key or a flag; giving both in one place is an error naming the two.
VLLM_ALIASES: dict[str, str] = {
    "lora_modules": "lora_paths",
    "max_loras": "max_loras_per_batch",
    "max_cpu_loras": "max_loaded_loras",
    "max_num_seqs": "max_running_requests",
    "max_model_len": "context_length",
    "gpu_memory_utilization": "mem_fraction_static",
    "tensor_parallel_size": "tp_size",
    "enforce_eager": "disable_cuda_graph",
    "seed": "random_seed",
}


@dataclass(frozen=True)
class _Option:
    """How one ServerConfig field is spelled and parsed."""

    name: str  # the field (= TOML key)
    kind: type  # bool, int, float, str, tuple (list of str) or LoraPathSpec (list of specs)
    optional: bool  # None is a valid value
    help: str
    default: Any
    choices: tuple[str, ...] | None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def is_size(self) -> bool:
        return self.name.endswith("_bytes")

    @property
    def is_tristate(self) -> bool:
        return self.kind is bool and self.optional


def _options() -> list[_Option]:
    hints = typing.get_type_hints(ServerConfig)
    out = []
    for f in dataclasses.fields(ServerConfig):
        kind, optional = _kind_of(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(_Option(f.name, kind, optional, f.metadata.get("help", ""), default,
                           f.metadata.get("choices")))
    return out


def _kind_of(hint: Any) -> tuple[type, bool]:
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return (LoraPathSpec if item is LoraPathSpec else tuple), optional
    return hint, optional


# ---------------------------------------------------------------- values

def parse_size(text: str | int, name: str) -> int:
    """'8GiB', '512MB', '1.5g' or a plain integer -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE_RE.match(str(text))
    unit = _SIZE_UNITS.get(m.group(2).lower()) if m else None
    if m is None or unit is None:
        raise ConfigError(f"{name}: expected a size such as 8GiB, 512MB or 1048576, got {text!r}")
    return int(float(m.group(1)) * unit)


def parse_lora_path(value: Any, name: str = "lora_paths") -> LoraPathSpec:
    """`name=path`, a bare path (named by the path as written), a JSON object string or a TOML
    table: SGLang's {lora_name, lora_path, pinned} or vLLM's --lora-modules object {name,
    path, base_model_name} (the base model's name only labels the adapter in vLLM's model
    list; here every adapter's parent there is the served model)."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{name}: invalid JSON adapter spec {value!r}: {e}") from None
    if isinstance(value, dict) and {"name", "path"} & set(value):
        unknown = set(value) - {"name", "path", "base_model_name"}
        if unknown:
            raise ConfigError(f"{name}: unknown keys {sorted(unknown)} in adapter spec")
        value = {"lora_name": value.get("name"), "lora_path": value.get("path")}
    if isinstance(value, dict):
        unknown = set(value) - {"lora_name", "lora_path", "pinned"}
        if unknown:
            raise ConfigError(f"{name}: unknown keys {sorted(unknown)} in adapter spec")
        lora_name, lora_path = value.get("lora_name"), value.get("lora_path")
        pinned = value.get("pinned", False)
        if not isinstance(lora_name, str) or not isinstance(lora_path, str) or not lora_path:
            raise ConfigError(f"{name}: an adapter spec needs string lora_name and lora_path")
        if not isinstance(pinned, bool):
            raise ConfigError(f"{name}: pinned must be true or false, got {pinned!r}")
        return LoraPathSpec(lora_name, lora_path, pinned)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name}: expected name=path, a path or an object, got {value!r}")
    if "=" in value:
        lora_name, lora_path = value.split("=", 1)
        return LoraPathSpec(lora_name, lora_path)
    return LoraPathSpec(value, value)  # named by its path as written, as SGLang names it


def _convert(opt: _Option, value: Any, from_cli: bool) -> Any:
    """Check and convert one value; CLI values arrive as strings (lists of strings)."""
    if opt.optional and from_cli and isinstance(value, str) and value.lower() in ("none", "null"):
        return None
    if opt.kind is LoraPathSpec:
        if isinstance(value, dict) and not {"lora_name", "lora_path"} & set(value):
            value = [{"lora_name": k, "lora_path": v} for k, v in value.items()]  # {name = path}
        if not isinstance(value, list):
            raise ConfigError(f"{opt.name}: expected a list of adapters, got {value!r}")
        return tuple(parse_lora_path(v, opt.name) for v in value)
    if opt.kind is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{opt.name}: expected a list of strings, got {value!r}")
        return tuple(value)
    if opt.kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{opt.name}: expected true or false, got {value!r}")
        return value
    if opt.is_size:
        return parse_size(value, opt.name)
    if opt.kind is int:
        if from_cli:
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{opt.name}: expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{opt.name}: expected an integer, got {value!r}")
        return value
    if opt.kind is float:
        if from_cli:
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{opt.name}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{opt.name}: expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{opt.name}: expected a string, got {value!r}")
    return value


# ---------------------------------------------------------------- TOML

def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a config file into {field: value}; relative paths resolve against its folder."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
    options = {o.name: o for o in _options()}
    values = {}
    for key, value in _canonical(raw, f"in {path}").items():
        opt = options.get(key)
        if opt is None:
            raise ConfigError(f"{key}: unknown option in {path}")
        if opt.is_tristate and isinstance(value, bool):
            values[key] = value
            continue
        values[key] = _convert(opt, value, from_cli=False)
    return _resolve_paths(values, path.resolve().parent)


def _canonical(values: dict[str, Any], where: str) -> dict[str, Any]:
    """`values` with vLLM's option names (VLLM_ALIASES) under loraserve's; an option given
    under both names `where` (one file, one command line) is an error."""
    out = {}
    for key, value in values.items():
        name = VLLM_ALIASES.get(key, key)
        if name in out:
            alias = next(a for a, n in VLLM_ALIASES.items() if n == name)
            raise ConfigError(f"{alias}: the same option as {name}, given twice {where}")
        out[name] = value
    return out


def _resolve_paths(values: dict[str, Any], folder: Path) -> dict[str, Any]:
    model = values.get("model_path")
    if model and not Path(model).is_absolute() and (folder / model).is_dir():
        values["model_path"] = str(folder / model)
    if "lora_roots" in values:
        values["lora_roots"] = tuple(str(folder / p) for p in values["lora_roots"])
    if "lora_paths" in values:
        values["lora_paths"] = tuple(
            dataclasses.replace(s, lora_path=_local_path(s.lora_path, folder))
            for s in values["lora_paths"]
        )
    return values


def _local_path(path: str, folder: Path) -> str:
    """Resolve a relative adapter path against `folder`; hub ids (org/name) stay as they are."""
    p = Path(path)
    if p.is_absolute():
        return path
    if path.startswith(("./", "../")) or (folder / p).exists():
        return str((folder / p).resolve())
    return path


# ---------------------------------------------------------------- flags

class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of exiting, so callers choose what to do."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m runtime` parser. Unset flags leave no attribute (argparse.SUPPRESS)."""
    p = _Parser(
        prog="python -m runtime",
        description="loraserve: serve one base model with many LoRA adapters over HTTP.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", metavar="TOML", help="server config file; flags override it")
    aliases = {v: k for k, v in VLLM_ALIASES.items()}
    for opt in _options():
        spellings = [opt.flag] + ([f"--{opt.name}"] if "_" in opt.name else [])
        if opt.name in aliases:  # vLLM's name: its own dest, so that giving both is caught
            alias = aliases[opt.name]
            p.add_argument("--" + alias.replace("_", "-"), f"--{alias}", dest=alias,
                           **_flag_kwargs(opt, f"vLLM's name of {opt.flag}"))
        shown = opt.default not in (None, (), "")
        text = opt.help + (f" (default: {opt.default})" if shown else "")
        if opt.is_tristate:
            stem = opt.name.removeprefix("enable_")
            p.add_argument(*spellings, dest=opt.name, action="store_true",
                           help=f"{opt.help}: turn on")
            p.add_argument(f"--disable-{stem.replace('_', '-')}", f"--disable_{stem}",
                           dest=opt.name, action="store_false", help=f"turn {opt.name} off")
        else:
            p.add_argument(*spellings, dest=opt.name, **_flag_kwargs(opt, text))
    return p


def _flag_kwargs(opt: _Option, text: str) -> dict[str, Any]:
    """argparse's arguments for a flag of `opt` (not a tri-state one)."""
    if opt.kind is bool:
        return {"action": "store_true", "help": text}
    if opt.kind in (tuple, LoraPathSpec):
        meta = "SPEC" if opt.kind is LoraPathSpec else opt.name.upper().removesuffix("S")
        return {"nargs": "+", "metavar": meta, "help": text}
    meta = "SIZE" if opt.is_size else opt.kind.__name__.upper()
    return {"metavar": meta, "choices": opt.choices, "help": text}


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    """Defaults <- the --config file <- flags, validated into a ServerConfig."""
    ns = vars(build_parser().parse_args(argv))
    values = load_toml(ns.pop("config")) if "config" in ns else {}
    ns = _canonical(ns, "on the command line")
    options = {o.name: o for o in _options()}
    for name, value in ns.items():
        opt = options[name]
        values[name] = value if opt.kind is bool else _convert(opt, value, from_cli=True)
    if "lora_roots" in ns:
        values["lora_roots"] = tuple(os.path.abspath(p) for p in values["lora_roots"])
    try:
        return ServerConfig(**values)
    except TypeError as e:  # a value of the wrong type reached the dataclass
        raise ConfigError(str(e)) from None
