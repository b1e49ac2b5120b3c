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
    "ops.triton_rope_store_kv", "ops.triton_silu_mul", "ops.triton_argmax",
)
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "launch_pdl", "enable_fp_fusion")


class KeyLog:
    """Keys of every launch of the kernels in `modules` while active: (kernel, key) pairs.
    With execute=False the launches only record their keys and run nothing, so kernels can be
    "launched" at full model shapes on the CPU (their outputs are left as they were)."""

    def __init__(self, modules: tuple[str, ...] = OPS_MODULES, execute: bool = True) -> None:
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
        self.execute = execute

    def __enter__(self) -> Self:
        run = self._orig = self._cls.run
        binders, launches, execute = self._binders, self.launches, self.execute

        def recording_run(fn: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            if id(fn) in binders:
                name, binder = binders[id(fn)]
                _, spec, _ = binder(*args, **kwargs)
                options = tuple((k, kwargs.get(k)) for k in _LAUNCH_OPTIONS)
                launches.append((name, (*map(tuple, spec), *options)))
                if not execute:
                    return None
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


_COMPILE = r"""
import importlib, json, os, subprocess, sys, tempfile
import triton
from benchmarks.sass_stats import half_fmas
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
modules, keys = json.loads(sys.stdin.read())
kernels = {}
for name in modules:
    for obj in vars(importlib.import_module(name)).values():
        if isinstance(obj, triton.runtime.jit.JITFunction):
            kernels[obj.fn.__name__] = obj
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = []
for kernel, spec in keys:
    fn = kernels[kernel]
    params, options = spec[: len(fn.arg_names)], dict(spec[len(fn.arg_names) :])
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, (ty, sp)) in enumerate(zip(fn.arg_names, params)):
        signature[name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = sp
        elif sp:
            attrs[(i,)] = backend.parse_attr(sp)
    opts = {k: v for k, v in options.items() if v is not None}
    try:
        k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=opts)
    except Exception as e:  # reported, not raised: the test names every failing variant
        out.append({"kernel": kernel, "error": f"{type(e).__name__}: {e}"[-2000:]})
        continue
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"]); f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    line = next(l for l in usage.splitlines() if "REG:" in l)
    fields = dict(p.split(":", 1) for p in line.split() if ":" in p)
    out.append({"kernel": kernel, "registers": int(fields["REG"]), "local": int(fields["LOCAL"]),
                "shared": k.metadata.shared,
                "half_fma": half_fmas(k.asm["ptx"])})
print(json.dumps(out))
"""


def compile_for_sm90(keys: set[tuple[str, tuple]], modules: tuple[str, ...] = OPS_MODULES,
                     timeout: float = 1800) -> list[dict]:
    """Compile each (kernel, key) for CUDA sm_90 on this machine, as Triton would on an H200
    (its front end, the LLVM passes and ptxas run without a GPU), in a fresh process without
    TRITON_INTERPRET. One dict a key, in sorted key order: {"kernel", "registers", "local"
    (bytes of spilled local memory a thread), "shared" (bytes a program), "half_fma" (fp16 and
    bf16 FMAs in its PTX)} or {"kernel", "error"}."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    payload = json.dumps([list(modules), sorted(([k, list(s)] for k, s in keys), key=str)])
    done = subprocess.run([sys.executable, "-c", _COMPILE], input=payload, cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the sm_90 compile process failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
