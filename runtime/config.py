"""One frozen, validated ServerConfig. TOML keys = CLI flags (dashes) = SGLang's option names.

Each field's `metadata["help"]` is the text `--help` prints. Derived values are properties.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """An option holds a value we cannot start with. The message names the option."""


def _opt(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class LoraPathSpec:
    """One startup adapter: `name=path`, a bare path, or {lora_name, lora_path, pinned}."""

    lora_name: str
    lora_path: str
    pinned: bool = False


DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("auto", "bfloat16", "float16", "float32")
LOAD_FORMATS = ("auto", "dummy")
EVICTION_POLICIES = ("lru", "fifo")
LORA_BACKENDS = ("csgmv", "triton")
LORA_LOADERS = ("auto", "process", "thread")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LORA_MODULES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "embed_tokens", "lm_head",
)


@dataclass(frozen=True)
class ServerConfig:
    # model
    model_path: str = _opt("bundled:smollm2-135m-instruct", "HF folder, hub id or bundled:<name>")
    served_model_name: str | None = _opt(None, "model name reported by the API (default: path)")
    device: str = _opt("auto", "auto, cuda or cpu", choices=DEVICES)
    dtype: str = _opt("auto", "auto, bfloat16, float16 or float32", choices=DTYPES)
    load_format: str = _opt("auto", "auto (read weights) or dummy (random)", choices=LOAD_FORMATS)
    context_length: int | None = _opt(None, "max tokens per sequence (default: the model's)")
    # server
    host: str = _opt("127.0.0.1", "address to bind")
    port: int = _opt(30000, "port to listen on")
    api_key: str | None = _opt(None, "Bearer key for inference endpoints")
    admin_api_key: str | None = _opt(None, "Bearer key for adapter admin endpoints")
    log_level: str = _opt("info", "debug, info, warning, error", choices=LOG_LEVELS)
    max_request_bytes: int = _opt(8 << 20, "largest accepted request body, bytes")
    # executor
    tp_size: int = _opt(1, "tensor-parallel degree (GPUs)")
    mem_fraction_static: float = _opt(0.85, "fraction of GPU memory for weights + KV cache")
    kv_cache_cpu_bytes: int = _opt(1 << 30, "KV cache bytes on CPU")
    max_total_tokens: int | None = _opt(
        None, "most tokens the KV cache holds, on any device (default: what memory allows)")
    page_size: int = _opt(16, "tokens per KV block")
    enable_prefix_caching: bool = _opt(
        False, "share the KV blocks of prompt prefixes between requests of the same adapter "
        "version and cache_salt (prefill starts after the longest cached prefix)")
    max_running_requests: int = _opt(256, "most requests in one step")
    max_queued_requests: int = _opt(4096, "most waiting requests; beyond: 503")
    chunked_prefill_size: int = _opt(4096, "prefill token budget per step")
    disable_cuda_graph: bool = _opt(False, "run decode eagerly")
    cuda_graph_max_bs: int = _opt(256, "largest decode batch captured in a graph")
    cuda_graph_max_tokens: int = _opt(
        512, "largest step that prefills still run as a CUDA graph (tokens; 0: eagerly)")
    skip_server_warmup: bool = _opt(
        False, "skip the start-up steps that compile every eager kernel variant before serving"
    )
    disable_overlap_schedule: bool = _opt(
        False, "wait for each step's tokens before scheduling the next (no CPU/GPU overlap)"
    )
    random_seed: int = _opt(0, "seed for dummy weights and unseeded sampling")
    allow_auto_truncate: bool = _opt(
        False, "cut a prompt longer than the context (keeping its start) and a requested "
        "max_new_tokens past the context to fit, instead of refusing the request (400)"
    )
    # LoRA
    enable_lora: bool = _opt(False, "enable LoRA (implied by lora_paths)")
    lora_paths: tuple[LoraPathSpec, ...] = _opt((), "startup adapters")
    max_loras_per_batch: int = _opt(8, "GPU adapter slots (base rows take none)")
    max_loaded_loras: int | None = _opt(None, "adapters in host memory (>= max_loras_per_batch)")
    max_lora_host_bytes: int = _opt(8 << 30, "byte budget of the host adapter tier")
    lora_eviction_policy: str = _opt("lru", "lru or fifo", choices=EVICTION_POLICIES)
    lora_backend: str = _opt("csgmv", "csgmv or triton", choices=LORA_BACKENDS)
    lora_loader: str = _opt(
        "auto", "where adapter files are read: process (reader processes, off the serving "
        "GIL), thread, or auto (process on CUDA at tp_size 1)", choices=LORA_LOADERS
    )
    max_lora_rank: int | None = _opt(None, "largest adapter rank (default: from lora_paths)")
    lora_target_modules: tuple[str, ...] | None = _opt(None, "modules with LoRA, or all")
    enable_lora_overlap_loading: bool | None = _opt(
        None, "on: skip requests whose adapter is uploading; off: batch them; unset: adaptive"
    )
    max_lora_chunk_size: int = _opt(
        32, "csgmv tile rows of steps that prefill, in chunks of 8 tiles (decode: chunks of "
        "16 rows): power of two, 16..128"
    )
    trust_request_chat_template: bool = _opt(
        False, "render a chat_template sent with a chat request (it runs on the server)"
    )
    lora_roots: tuple[str, ...] = _opt((), "folders run-time adapter paths must lie under")
    lora_allow_hub: bool = _opt(False, "allow hub ids as run-time adapter paths")
    lora_resolve_on_demand: bool = _opt(False, "load unknown adapter names found under lora_roots")

    @property
    def is_lora_enabled(self) -> bool:
        return self.enable_lora or bool(self.lora_paths)

    @property
    def num_lora_host_slots(self) -> int:
        return self.max_loaded_loras or max(2 * self.max_loras_per_batch, 16)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_path

    def replace(self, **changes: Any) -> ServerConfig:
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(
                    f"{f.name}: must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}"
                )
        _positive(self, "port", "max_running_requests", "max_queued_requests", "page_size",
                  "chunked_prefill_size", "max_loras_per_batch", "tp_size", "cuda_graph_max_bs")
        if self.cuda_graph_max_tokens < 0:
            raise ConfigError("cuda_graph_max_tokens: must be >= 0 (0 runs prefill eagerly)")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ConfigError("mem_fraction_static: must be in (0, 1)")
        if self.kv_cache_cpu_bytes <= 0:
            raise ConfigError("kv_cache_cpu_bytes: must be positive")
        if self.max_total_tokens is not None and self.max_total_tokens < self.page_size:
            raise ConfigError(f"max_total_tokens: must be at least page_size ({self.page_size}) "
                              f"for one KV block, got {self.max_total_tokens}")
        c = self.max_lora_chunk_size
        if c not in (16, 32, 64, 128):
            raise ConfigError(f"max_lora_chunk_size: must be 16, 32, 64 or 128, got {c}")
        if self.max_loaded_loras is not None and self.max_loaded_loras < self.max_loras_per_batch:
            raise ConfigError(
                f"max_loaded_loras ({self.max_loaded_loras}) must be >= max_loras_per_batch "
                f"({self.max_loras_per_batch})"
            )
        if self.lora_loader == "process" and not hasattr(os, "memfd_create"):
            raise ConfigError("lora_loader: process needs memfd_create (Linux); use thread")
        if self.lora_loader == "process" and self.tp_size > 1:
            raise ConfigError(
                "lora_loader: process is not supported at tp_size > 1 (each rank reads its "
                "shard in threads); use auto or thread"
            )
        if self.enable_lora_overlap_loading is False and self.tp_size > 1:
            raise ConfigError(
                "enable_lora_overlap_loading: false is not supported at tp_size > 1 (a worker's "
                "upload may still wait on its disk read, so adapters always join batches once "
                "every rank has them); leave it unset"
            )
        if self.max_lora_rank is not None and not 1 <= self.max_lora_rank <= 1024:
            raise ConfigError("max_lora_rank: must be between 1 and 1024")
        if self.lora_target_modules is not None:
            for m in self.lora_target_modules:
                if m != "all" and m not in LORA_MODULES:
                    raise ConfigError(
                        f"lora_target_modules: unknown module {m!r}; "
                        f"supported: all, {', '.join(LORA_MODULES)}"
                    )
        names = [p.lora_name for p in self.lora_paths]
        for n in names:
            if ":" in n or not n:
                raise ConfigError(f"lora_paths: adapter name {n!r} must be non-empty without ':'")
        if len(set(names)) != len(names):
            raise ConfigError("lora_paths: adapter names must be unique")
        taken = sorted(set(names) & {self.model_path, self.model_name})
        if taken:
            raise ConfigError(f"lora_paths: adapter name {taken[0]!r} is the base model's name")
        if sum(p.pinned for p in self.lora_paths) > self.max_loras_per_batch - 1:
            raise ConfigError(
                f"lora_paths: at most max_loras_per_batch - 1 = {self.max_loras_per_batch - 1} "
                "adapters can be pinned"
            )
        if self.is_lora_enabled and not self.lora_paths:
            missing = [n for n in ("max_lora_rank", "lora_target_modules")
                       if getattr(self, n) is None]
            if missing:
                raise ConfigError(
                    f"enable_lora without lora_paths needs {' and '.join(missing)} "
                    "(the adapter pool is sized from them)"
                )


def _positive(cfg: ServerConfig, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{n}: must be a positive integer, got {v!r}")
