"""The Triton kernel variants a piece of code launches, read on the CPU.

On CUDA, Triton compiles a kernel once per specialization key: the arguments' dtypes, which
integers are 1 or multiples of 16, which pointers are 16-byte aligned, the constexprs and the
launch options. A served step whose key the start-up warm-up did not meet compiles while
requests wait. `KeyLog` computes, under TRITON_INTERPRET=1, the key the CUDA backend (sm_90)
would compute for every launch of our kernels, from the launch's own arguments, so a CPU test can
check that serving meets only keys the warm-up met (with `ops.dispatch.TRITON_ON_CPU` set, the
serving path runs its Triton kernels through the interpreter).
"""

from __future__ import annotations

import collections
import importlib
from typing import Any, Self

OPS_MODULES = (
    "ops.triton_decode_attention", "ops.triton_prefill_attention", "ops.triton_lora_shrink",
    "ops.triton_lora_expand", "ops.triton_lora_embed", "ops.triton_rmsnorm",
    "ops.triton_rope_store_kv", "ops.triton_silu_mul",
)
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "launch_pdl")


class KeyLog:
    """Keys of every launch of the kernels in `modules` while active: (kernel, key) pairs."""

    def __init__(self, modules: tuple[str, ...] = OPS_MODULES) -> None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction, create_function_from_signature

        self._cls = InterpretedFunction
        backend = make_backend(GPUTarget("cuda", 90, 32))
        self._binders: dict[int, tuple[str, Any]] = {}
        for name in modules:
            for obj in vars(importlib.import_module(name)).values():
                if isinstance(obj, InterpretedFunction):
                    jit = JITFunction(obj.fn, **{k: v for k, v in obj.kwargs.items()
                                                 if k.startswith("do_not_specialize")})
                    binder = create_function_from_signature(jit.signature, jit.params, backend)
                    self._binders[id(obj)] = (obj.fn.__name__, binder)
        assert self._binders, "no interpreted kernels: is TRITON_INTERPRET=1 set?"
        self.launches: list[tuple[str, tuple]] = []

    def __enter__(self) -> Self:
        run = self._orig = self._cls.run
        binders, launches = self._binders, self.launches

        def recording_run(fn: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            if id(fn) in binders:
                name, binder = binders[id(fn)]
                _, spec, _ = binder(*args, **kwargs)
                options = tuple((k, kwargs.get(k)) for k in _LAUNCH_OPTIONS)
                launches.append((name, (*map(tuple, spec), *options)))
            return run(fn, *args, grid=grid, warmup=warmup, **kwargs)

        self._cls.run = recording_run
        return self

    def __exit__(self, *exc: object) -> None:
        self._cls.run = self._orig

    def keys(self) -> set[tuple[str, tuple]]:
        return set(self.launches)

    def counts(self) -> dict[str, int]:
        return dict(collections.Counter(name for name, _ in self.launches))


def describe(missing: set[tuple[str, tuple]], seen: set[tuple[str, tuple]]) -> str:
    """Each missing key next to the nearest seen key of its kernel: the positions that differ."""
    lines = []
    for name, key in sorted(missing, key=str):
        same = [k for n, k in seen if n == name and len(k) == len(key)]
        if not same:
            lines.append(f"{name}: never launched before")
            continue
        near = min(same, key=lambda k: sum(a != b for a, b in zip(k, key)))
        diff = [(i, near[i], key[i]) for i in range(len(key)) if near[i] != key[i]]
        lines.append(f"{name}: position (seen -> now) {diff}")
    return "\n".join(lines)
